"""Capture on the Megatron KV-cache engine: every router records its choices while the engine decodes.

megatron-core 0.16.1's ``RouterReplay`` in ``RECORD`` mode keeps the last forward's top-k ids of each
router (``recorded_topk_idx``, ``[tokens, topk]`` in the router's token order: sequence-first,
``[length, batch]`` flattened). After each forward of a decode batch (the prefill, then one position per
step) :meth:`RouteRecorder.store` copies them into a host buffer ``[batch, capacity, moe_layers, topk]`` at
the positions that forward fed. Each pipeline stage holds only its own layers' routers, so
:meth:`RouteRecorder.gather` combines the stages (every column is written by exactly one stage; the others
hold -1) with one MAX all-reduce. Tensor-parallel ranks record the same ids (decoding runs without
sequence parallelism, see :mod:`megatron_pz.rollout.megatron_engine`); expert-parallel ranks decode their
own rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_pz.model.moe_routers import local_routers
from megatron_pz.model.routes import NATIVE, RouteShape


class RouteRecorder:
    def __init__(self, model_chunks, shape: RouteShape):
        self.shape = shape
        self.routers = [rc for chunk in model_chunks for rc in local_routers(chunk, shape)]

    @contextlib.contextmanager
    def recording(self):
        """RECORD on this rank's routers for the block; no action and no ids left after it."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for router, _ in self.routers:
            router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        try:
            yield
        finally:
            for router, _ in self.routers:
                router.router_replay.clear_router_replay_action()
                router.router_replay.clear_indices()

    def new_buffer(self, batch: int, capacity: int) -> torch.Tensor:
        """Host buffer of one decode batch; positions nobody wrote stay -1."""
        return torch.full((batch, capacity, len(self.shape.moe_layers), self.shape.topk), NATIVE, dtype=torch.int32)

    def store(self, buffer: torch.Tensor, start: int, length: int) -> None:
        """The last forward fed positions ``[start, start + length)`` of every row: keep its choices."""
        batch = buffer.shape[0]
        for router, column in self.routers:
            recorded = router.router_replay.recorded_topk_idx
            if recorded is None or recorded.shape[0] != length * batch:
                got = None if recorded is None else tuple(recorded.shape)
                raise RuntimeError(f"route recording: the MoE layer {router.layer_number} router recorded {got} "
                                   f"for a forward of {batch} rows x {length} positions")
            ids = recorded.reshape(length, batch, -1).transpose(0, 1)
            buffer[:, start:start + length, column] = ids.to("cpu", torch.int32)

    def gather(self, buffer: torch.Tensor, pp_group, pp_size: int) -> torch.Tensor:
        """Every MoE layer's column on every pipeline stage (each stage wrote its own layers)."""
        if pp_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=pp_group)
        return buffer
