"""Which ranks share a generation: the model-parallel group of the actor (TP x CP x PP).

All ranks of one model-parallel group train on identical data (they hold pieces of one replica), so
their experiences must be identical too. An engine that holds a whole model per rank (``hf``,
vLLM) generates once per group, on its first rank (the *leader*), and broadcasts the completions to
the others, instead of generating the same prompts TP x PP times with different random draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class GenerationGroup:
    """This rank's model-parallel group: ``group`` (None when alone), its ranks and its leader."""

    group: Any = None
    ranks: tuple[int, ...] = (0,)

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def size(self) -> int:
        return len(self.ranks)

    def is_leader(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == self.leader

    def broadcast_from_leader(self, value):
        """``value`` of the leader on every rank of the group (an object collective)."""
        if self.group is None:
            return value
        box = [value if self.is_leader() else None]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]


_CACHE: dict[tuple, GenerationGroup] = {}


def model_parallel_generation_group() -> GenerationGroup:
    """The ranks with this rank's data-parallel rank (TP x CP x PP of the actor).

    Built once per layout from Megatron's data-parallel rank (ranks that share it hold the same data);
    collective over the whole world the first time it is called. A rank without Megatron's groups (a
    rollout rank of a disaggregated run) is a group of its own.
    """
    if not dist.is_initialized():
        return GenerationGroup()
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():  # a rollout rank (no actor): it generates for itself
        return GenerationGroup(None, (dist.get_rank(),))
    world = dist.get_world_size()
    key = (world, id(ps.get_tensor_model_parallel_group()), id(ps.get_pipeline_model_parallel_group()),
           ps.get_data_parallel_rank())
    if key in _CACHE:
        return _CACHE[key]
    dp_ranks: list = [None] * world
    dist.all_gather_object(dp_ranks, ps.get_data_parallel_rank())
    mine = None
    for dp_rank in sorted(set(dp_ranks)):  # every rank creates every group, in the same order
        ranks = tuple(r for r in range(world) if dp_ranks[r] == dp_rank)
        group = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        if dist.get_rank() in ranks:
            mine = GenerationGroup(group, ranks)
    _CACHE[key] = mine
    return mine
