"""Megatron's MoE routers as routing replay sees them: which ones this rank holds, in which token order
they route, and which router settings replay cannot honour (megatron-core 0.16.1).

Every ``TopKRouter`` of a model built with ``moe_enable_routing_replay`` owns a ``RouterReplay``
(``transformer/moe/router_replay.py``). Megatron also appends each instance to the process-global
``RouterReplay.global_router_replay_instances`` and indexes that list by position in its static helpers
(``set_replay_data``, ``set_global_router_replay_action``); a second model built in the same process
(the RLP EMA teacher, a rebuilt actor) shifts every position, and replay then silently lands on the wrong
model. Routers are therefore found here by walking a model chunk and keyed by ``layer_number``; the
global list and its helpers are never used.
"""

from __future__ import annotations

import torch

from megatron_pz.config import ConfigError
from megatron_pz.model.routes import RouteShape


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def local_routers(chunk, shape: RouteShape) -> list[tuple[object, int]]:
    """``(router, route column)`` for every ``TopKRouter`` in this model chunk, in layer order.

    ``router.layer_number`` is the global 1-based layer number (``TransformerLayer`` adds the pipeline and
    virtual-pipeline offset and hands it to ``MoELayer.set_layer_number``), so the column is right on
    every pipeline stage and chunk.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    found = []
    for module in _unwrap(chunk).modules():
        if isinstance(module, TopKRouter):
            if module.router_replay is None:
                raise RuntimeError("this model's routers have no RouterReplay: build it with "
                                   "moe_enable_routing_replay=True (megatron_pz.model.provider does for MoE)")
            found.append((module, shape.column_of_layer_number(int(module.layer_number))))
    return sorted(found, key=lambda rc: rc[1])


def check_replay_supported(config) -> None:
    """Refuse router settings under which megatron-core 0.16.1's replay does not do what it says.

    * ``moe_router_fusion``: ``topk_routing_with_score_function`` returns TE's fused top-k before it
      reaches the ``router_replay`` argument: replay is silently skipped;
    * sinkhorn load balancing: ``TopKRouter.routing`` never calls the top-k function: skipped likewise;
    * ``moe_expert_capacity_factor``: ``apply_router_token_dropping`` drops replayed tokens again;
    * input jitter and forced load balancing make the native choice random, so a route filled in
      natively (tokens without a rollout route) would differ between a forward and its recompute.
    """
    problems = []
    if getattr(config, "moe_router_fusion", False):
        problems.append("moe_router_fusion=True (TE's fused top-k bypasses RouterReplay)")
    if getattr(config, "moe_router_load_balancing_type", None) == "sinkhorn":
        problems.append("moe_router_load_balancing_type='sinkhorn' (sinkhorn routing bypasses RouterReplay)")
    if getattr(config, "moe_expert_capacity_factor", None) is not None:
        problems.append(f"moe_expert_capacity_factor={config.moe_expert_capacity_factor} "
                        "(capacity dropping re-drops replayed tokens)")
    if getattr(config, "moe_input_jitter_eps", None):
        problems.append(f"moe_input_jitter_eps={config.moe_input_jitter_eps} (random router input)")
    if getattr(config, "moe_router_force_load_balancing", False):
        problems.append("moe_router_force_load_balancing=True (random router logits)")
    if problems:
        raise ConfigError("rollout.routing_replay=r3 cannot replay routes with " + "; ".join(problems)
                          + " (megatron-core 0.16.1); set rollout.routing_replay=off or change the router")


def router_token_order(per_token: torch.Tensor, sequence_parallel_size: int = 1,
                       sequence_parallel_rank: int = 0) -> torch.Tensor:
    """``per_token`` ``[b, s, ...]`` in the order a router of this rank sees the micro-batch's tokens.

    A router flattens its input ``[s_local, b, hidden]`` (sequence first, Megatron's layout) to
    ``[s_local * b]`` tokens. With sequence parallelism each TP rank holds the contiguous sequence block
    ``[rank * s / tp, (rank + 1) * s / tp)`` (``scatter_to_sequence_parallel_region`` splits dim 0); expert
    parallelism does not change the router's input. The actor feeds whole rows to every context-parallel
    rank (it does not split sequences over CP), so CP does not appear here either.
    """
    seq_first = per_token.transpose(0, 1)
    if sequence_parallel_size > 1:
        s = seq_first.shape[0]
        if s % sequence_parallel_size:
            raise ValueError(f"micro-batch width {s} is not a multiple of the sequence-parallel size "
                             f"{sequence_parallel_size}")
        block = s // sequence_parallel_size
        seq_first = seq_first[sequence_parallel_rank * block:(sequence_parallel_rank + 1) * block]
    return seq_first.reshape(-1, *per_token.shape[2:])
