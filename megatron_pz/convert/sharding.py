"""Split full Megatron tensors into tensor-parallel shards and gather them back.

Megatron's column-parallel layers keep contiguous row blocks per rank (for the fused qkv that is a
block of whole query groups, because the layout is per group); the SwiGLU fc1 is the exception: each
rank holds ``[gate_shard; up_shard]``, so gate and up are split separately.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_pz.convert.mapping import COLUMN, GATE_UP, REPLICATED, ROW


def shard(full: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    if size == 1 or split == REPLICATED:
        return full
    if split == COLUMN:
        return _chunk(full, 0, rank, size)
    if split == ROW:
        return _chunk(full, full.dim() - 1, rank, size)
    if split == GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([_chunk(gate, 0, rank, size), _chunk(up, 0, rank, size)], dim=0)
    raise ValueError(split)


def unshard(shards: list[torch.Tensor], split: str) -> torch.Tensor:
    if len(shards) == 1 or split == REPLICATED:
        return shards[0]
    if split == COLUMN:
        return torch.cat(shards, dim=0)
    if split == ROW:
        return torch.cat(shards, dim=shards[0].dim() - 1)
    if split == GATE_UP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(split)


def _chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by {size} ranks")
    return torch.chunk(t, size, dim=dim)[rank]


def all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's copy of ``tensor`` (same shape on all ranks), in group-rank order."""
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return [tensor]
    tensor = tensor.detach().contiguous()
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor, group=group)
    return out
