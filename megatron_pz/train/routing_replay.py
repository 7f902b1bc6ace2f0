"""Training forwards on the experts the rollout used (R3, arXiv 2510.11370), and how often they agree.

One :class:`RoutingReplay` per actor. The actor's pipeline schedule calls :meth:`RoutingReplay.begin_forward`
right before a chunk's forward on a micro-batch and :meth:`RoutingReplay.end_forward` right after it, and
:meth:`RoutingReplay.finish` once the schedule is done. Per micro-batch and MoE layer the chunk's router
gets the rollout's choices for its tokens (``[tokens, topk]`` in the router's own token order,
:func:`~megatron_pz.model.moe_routers.router_token_order`) through megatron-core 0.16.1's ``RouterReplay``:

* ``REPLAY_FORWARD`` during the forward: the router takes the given ids and gathers its own scores for
  them, so the gate weights come from the training router's logits under the rollout's mask, as R3 does
  (arXiv 2510.11370), and the router keeps its gradient;
* ``REPLAY_BACKWARD`` from the end of that forward on: activation recompute pops the same ids again in
  forward order (``RouterReplay.replay_backward_list`` is a FIFO filled by ``set_target_indices``; the
  schedule runs backwards in forward order under 1F1B and interleaving alike). Megatron never switches
  the action itself.

Tokens without a rollout route (:data:`~megatron_pz.model.routes.NATIVE`: a sample's last token, what
RLP's scorer appends, padding rows and filler micro-batches) are routed natively: a forward pre-hook runs
the router's own gate and Megatron's ``topk_routing_with_score_function`` on just those tokens and writes
the choice into the target in place, before the router reads it (and the recompute pops the filled
tensor). Native top-k never repeats an id in a row, which the all-to-all dispatcher needs.

Agreement (``rollout/routing_agreement``): a forward hook compares, for every token x MoE layer with a
rollout route, the expert set the router actually used (its ``routing_map``) with the rollout's, during
the forward passes wrapped in :meth:`RoutingReplay.measuring`. With replay off it measures how often
native routing agrees with the rollout; with replay on it is 1 unless replay failed to act.

The EMA teacher routes natively (a reference, not the policy): only the actor's own chunks are driven.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_pz.model.moe_routers import check_replay_supported, local_routers, router_token_order
from megatron_pz.model.routes import NATIVE, RouteShape


@dataclass
class _Pending:
    """One router's share of the micro-batch in flight."""

    known: torch.Tensor  # [tokens] bool: the token has a rollout route
    reference: Optional[torch.Tensor]  # [known tokens, topk] the rollout's ids (when measuring)


def routers_recomputed(config) -> bool:
    """Whether activation recompute re-runs the routers in backward (megatron-core 0.16.1: full recompute
    re-runs whole layers; selective recompute re-runs MoE layers when ``"moe"`` is among its modules)."""
    if config.recompute_granularity == "full":
        return True
    return config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or [])


def indices_of_routing_map(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """``[tokens, experts]`` bool map with exactly ``topk`` True per row -> ``[tokens, topk]`` ids."""
    return routing_map.nonzero()[:, 1].reshape(-1, topk)


class RoutingReplay:
    """Drives the routers of one actor's model chunks through micro-batches (see the module docstring)."""

    def __init__(self, chunks, shape: RouteShape, replay: bool):
        from megatron.core import parallel_state as ps

        model = chunks[0]
        while hasattr(model, "module"):
            model = model.module
        config = model.config
        self.shape = shape
        self.replay = bool(replay)
        if self.replay:
            check_replay_supported(config)
        self.keep_backward_copies = routers_recomputed(config)
        sp = bool(config.sequence_parallel) and ps.get_tensor_model_parallel_world_size() > 1
        self.sp_size = ps.get_tensor_model_parallel_world_size() if sp else 1
        self.sp_rank = ps.get_tensor_model_parallel_rank() if sp else 0
        # without SP every TP rank routes the same tokens: count them once
        self.counts_here = sp or ps.get_tensor_model_parallel_rank() == 0
        self._routers = {id(chunk): local_routers(chunk, shape) for chunk in chunks}
        self._pending: dict[int, _Pending] = {}  # id(router) -> its share of the micro-batch in flight
        self._measure = False
        self._counts = torch.zeros(2, dtype=torch.float64)  # [agreeing, compared] token x layer choices
        for routers in self._routers.values():
            for router, _ in routers:
                router.register_forward_pre_hook(self._fill_native_routes)
                router.register_forward_hook(self._count_agreement)

    # ------------------------------------------------------------------ the schedule's calls

    def begin_forward(self, chunk, mb) -> None:
        """Before ``chunk`` runs micro-batch ``mb``: each router's targets (replay) and references."""
        routers = self._routers.get(id(chunk))
        if not routers or (mb.routes is None and not self.replay):
            return
        b, s = mb.input_ids.shape
        if mb.routes is None:
            local = torch.full((s // self.sp_size * b, len(self.shape.moe_layers), self.shape.topk), NATIVE,
                               dtype=torch.long)
        else:
            local = router_token_order(mb.routes, self.sp_size, self.sp_rank)
        device = mb.input_ids.device
        for router, column in routers:
            target = local[:, column].to(device=device, dtype=torch.long).contiguous()
            known = target[:, 0] >= 0
            reference = target[known] if self._measure and mb.routes is not None else None
            self._pending[id(router)] = _Pending(known, reference)
            if self.replay:
                router.router_replay.set_target_indices(target)
                router.router_replay.set_router_replay_action(_action("REPLAY_FORWARD"))

    def end_forward(self, chunk, backward_follows: bool = True) -> None:
        """After ``chunk``'s forward: later router calls of this chunk are recomputes (REPLAY_BACKWARD).
        ``backward_follows``: False for forward-only passes (nothing will be recomputed)."""
        keep = backward_follows and self.keep_backward_copies
        for router, _ in self._routers.get(id(chunk), []):
            self._pending.pop(id(router), None)
            if not self.replay:
                continue
            replay = router.router_replay
            replay.set_router_replay_action(_action("REPLAY_BACKWARD"))
            if not keep and replay.replay_backward_list:
                # nothing recomputes this router: drop the copy set_target_indices queued for it, so only
                # the micro-batches in flight hold targets
                replay.replay_backward_list.pop()

    def finish(self) -> None:
        """After the whole schedule: no action and no ids left on any router."""
        self._pending.clear()
        if not self.replay:
            return
        for routers in self._routers.values():
            for router, _ in routers:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()

    # ------------------------------------------------------------------ agreement

    @contextlib.contextmanager
    def measuring(self):
        """Count agreement during the forwards inside this block (recomputes are not counted)."""
        self._measure = True
        try:
            yield
        finally:
            self._measure = False

    def take_agreement(self) -> Optional[float]:
        """Fraction of token x MoE-layer choices that agreed with the rollout since the last call, over the
        whole world (a collective: every rank calls it); None when nothing was compared."""
        counts = self._counts.clone()
        self._counts.zero_()
        if dist.is_initialized():
            dist.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] > 0 else None

    # ------------------------------------------------------------------ router hooks

    def _fill_native_routes(self, router, args):
        pending = self._pending.get(id(router))
        replay = router.router_replay
        if pending is None or not self.replay or replay.router_replay_action != _action("REPLAY_FORWARD"):
            return
        hidden = args[0]
        target = replay.target_topk_idx
        tokens = hidden.shape[0] * hidden.shape[1]
        if target.shape[0] != tokens:
            raise RuntimeError(f"routing replay: {target.shape[0]} routes for the MoE layer {router.layer_number} "
                               f"router, which sees {tokens} tokens (token order out of step with the model)")
        missing = ~pending.known
        if not bool(missing.any()):
            return
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        config = router.config
        with torch.no_grad():
            logits = router.gating(hidden.reshape(tokens, -1)[missing])
            _, routing_map = topk_routing_with_score_function(
                logits, router.topk, use_pre_softmax=config.moe_router_pre_softmax,
                num_groups=config.moe_router_num_groups, group_topk=config.moe_router_group_topk,
                scaling_factor=config.moe_router_topk_scaling_factor, score_function=router.score_function,
                expert_bias=router.expert_bias, fused=False, router_replay=None)
            target[missing] = indices_of_routing_map(routing_map, router.topk)

    def _count_agreement(self, router, args, output):
        pending = self._pending.get(id(router))
        if pending is None or pending.reference is None or not self.counts_here:
            return
        _, routing_map = output
        used = routing_map[pending.known]
        rollout = torch.zeros_like(used).scatter_(1, pending.reference, True)
        agreeing = (used == rollout).all(dim=1).sum()
        self._counts += torch.tensor([float(agreeing), float(used.shape[0])], dtype=torch.float64)


def _action(name: str):
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    return RouterReplayAction[name]
