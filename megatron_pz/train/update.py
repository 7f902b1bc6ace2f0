"""One rollout batch's policy update: experiences -> training rows -> GRPO optimizer steps -> the step's metrics.

:func:`experiences_to_sequences` turns experiences into rows (prompt + response, the loss on the response, each
token carrying its advantage, sampling temperature, rollout log-prob and aggregation weight; MoE rows their
rollout routes), :func:`grpo_update` runs ``grpo.epochs`` x ``grpo.mini_batches`` optimizer steps on them with
the loss of :func:`make_grpo_loss_fn` (:func:`megatron_pz.rl.grpo.grpo_loss` on the actor's vocab-parallel
micro-batches), and :func:`step_metrics` gathers what the step logs. The RL loop
(:mod:`megatron_pz.train.trainer`) calls these once per step, whatever the placement of the rollouts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_pz.model.routes import check_routes
from megatron_pz.rl.grpo import aggregation_weights, grpo_loss
from megatron_pz.rl.logprobs import vocab_parallel_entropy
from megatron_pz.rl.rollout_correction import (COUNTER_PREFIX, RolloutCorrection, correction_metrics,
                                               reject_before_update)
from megatron_pz.train.actor import StepResult
from megatron_pz.train.batching import TokenSequence, padding_fraction
from megatron_pz.train.losses import token_logprobs_at_temperature
from megatron_pz.train.metrics import mean_over_ranks


def experiences_to_sequences(experiences, loss_weights=None, route_shape=None,
                             require_routes: bool = False) -> list[TokenSequence]:
    """Prompt + response rows; the loss covers response tokens only, each carrying its advantage,
    its sampling temperature (log-probs are taken at it) and, if given, its aggregation weight
    (``loss_weights[i]`` for ``experiences[i]``, see :func:`megatron_pz.rl.grpo.aggregation_weights`).

    MoE (``route_shape`` set): each row carries its rollout routes, checked first (an error names the
    experience); ``require_routes`` (routing replay on) refuses a trainable experience without them."""
    rows = []
    for i, e in enumerate(experiences):
        if not e.trainable or not e.response_ids:
            continue
        p, r = len(e.prompt_ids), len(e.response_ids)
        tokens = list(e.prompt_ids) + list(e.response_ids)
        per_token = {"advantages": [0.0] * p + [float(e.advantage or 0.0)] * r,
                     "temperature": [float(e.temperature)] * (p + r),
                     # the rollout correction's: tokens it rejected (out of the loss mask), weight-version lags
                     "rejected": [0.0] * p + [float(x) for x in (e.rejected or [0.0] * r)],
                     "lag": [0.0] * p + [float(x) for x in (e.lag if isinstance(e.lag, list) else [e.lag] * r)]}
        if e.rollout_logprobs is not None:
            per_token["rollout_logprobs"] = [0.0] * p + [float(x) for x in e.rollout_logprobs]
        if loss_weights is not None:
            per_token["loss_weight"] = [0.0] * p + [float(loss_weights[i])] * r
        mask = [0.0] * p + ([float(x) for x in e.token_mask] if e.token_mask is not None else [1.0] * r)
        rows.append(TokenSequence(tokens, mask, per_token, index=i,
                                  routes=experience_routes(e, i, route_shape, require_routes)))
    return rows


def experience_routes(e, i: int, route_shape, required: bool):
    """The MoE routes experience ``i`` carries into its training row, checked (None: it has none)."""
    where = f"experience {i} (role {e.role}, group {e.group})"
    if e.routes is None:
        if required:
            raise ValueError(f"{where}: routing replay is on but the experience carries no MoE routes "
                             "(its rollout engine did not capture them)")
        return None
    if route_shape is None:
        raise ValueError(f"{where}: carries MoE routes but the model is dense")
    return check_routes(e.routes, route_shape, len(e.prompt_ids) + len(e.response_ids) - 1, where)


def update_loss_weights(experiences, dp_group=None) -> tuple[list[float], float]:
    """Aggregation weight of each experience for one optimizer step over ``experiences`` (this rank's
    share), from its tags (``component``, ``loss_agg``, ``mix_weight``); every component's token and
    sample counts are summed over the data-parallel group first. Also returns that group's number of tokens
    in the loss (0: no rank has a token to train)."""
    lengths = [(len(e.response_ids) if e.token_mask is None else int(sum(e.token_mask))) if e.trainable else 0
               for e in experiences]  # tokens in the loss: rejected ones leave the counts
    labels = sorted({e.component for e in experiences})
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        gathered: list = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(gathered, labels, group=dp_group)
        labels = sorted({label for ls in gathered for label in ls})
    counts = torch.zeros(2 * len(labels), dtype=torch.float64)
    for e, n in zip(experiences, lengths):
        k = labels.index(e.component)
        counts[2 * k] += n
        counts[2 * k + 1] += float(n > 0)
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
    totals = {label: (counts[2 * k].item(), counts[2 * k + 1].item()) for k, label in enumerate(labels)}
    tokens = sum(t for t, _ in totals.values())
    return aggregation_weights(lengths, [e.component for e in experiences],
                               {e.component: e.loss_agg for e in experiences},
                               {e.component: e.mix_weight for e in experiences}, totals, tokens), tokens


def make_grpo_loss_fn(grpo_cfg):
    """Adapts :func:`megatron_pz.rl.grpo.grpo_loss` to the actor's micro-batches (vocab-parallel).

    Log-probs are taken at each row's sampling temperature; ``old_logprobs`` come from the batch when
    the update computed them (PPO mini-batches / epochs), else they equal the current ones (ratio 1).
    """
    correction = RolloutCorrection(grpo_cfg.rollout_correction)

    def loss_fn(mb, logits):
        logp = token_logprobs_at_temperature(mb, logits)
        old = mb.per_token.get("old_logprobs", logp.detach())
        with torch.no_grad():
            entropy = torch.nn.functional.pad(vocab_parallel_entropy(logits[:, :-1].float()), (1, 0))
        rollout = mb.per_token.get("rollout_logprobs")
        loss_sum, num_tokens, metrics = grpo_loss(
            # a rank with nothing to train on runs one fully masked batch without per-token fields
            logp, old, mb.per_token.get("advantages", torch.zeros_like(mb.loss_mask)), mb.loss_mask,
            clip_low=grpo_cfg.clip_low, clip_high=grpo_cfg.clip_high,
            rollout_logprobs=rollout, correction=correction, rejected=mb.per_token.get("rejected"),
            token_lags=mb.per_token.get("lag"), kl_coef=0.0, entropy=entropy, dual_clip=grpo_cfg.dual_clip,
            token_weights=mb.per_token.get("loss_weight"))
        n = float(num_tokens)
        counters = {k: v for k, v in metrics.items() if k.startswith(COUNTER_PREFIX)}  # the correction's: sums already
        sums = {f"{k}_sum": v * n for k, v in metrics.items()
                if not k.endswith("_max") and k != "num_tokens" and k not in counters}
        sums.update(counters, loss_sum=loss_sum.detach(), num_tokens=num_tokens.detach())
        return loss_sum, num_tokens.to(torch.int), sums

    return loss_fn


def grpo_update(actor, experiences, grpo_cfg, loss_fn, max_tokens: int, pad_id: int, dp_group=None):
    """One rollout batch's policy update: ``grpo.epochs`` passes over ``grpo.mini_batches`` optimizer
    steps. With more than one step, old log-probs are computed once before the first (at each row's
    temperature), so every later step sees a live ratio and the clip can engage. The same pass runs when the
    rollout correction rejects: its decision is taken there, before any token is counted
    (:func:`megatron_pz.rl.rollout_correction.reject_before_update`).

    MoE: every forward carries the experiences' rollout routes (replayed under R3, see
    :mod:`megatron_pz.train.routing_replay`); routing agreement is measured on the first pass over the
    batch, at the rollout's weights (the old-log-prob pass, or the single optimizer step).

    An optimizer step whose tokens are all out of the loss on every rank is skipped (counted:
    ``update/skipped_steps``): a step on nothing is not a no-op, Adam's moments still move the weights (a batch
    the DAPO filter or the rollout correction's rejection emptied on every rank would keep drifting where the
    last real gradient pointed).

    Returns (summed loss metrics of all steps, the last StepResult, every micro-batch trained on).
    """
    routing = getattr(actor, "routing", None)
    routes = dict(route_shape=getattr(actor, "route_shape", None), require_routes=bool(routing and routing.replay))

    def measured(first: bool):
        return routing.measuring() if first and routing is not None else contextlib.nullcontext()

    n_mini, epochs = grpo_cfg.mini_batches, grpo_cfg.epochs
    correction = grpo_cfg.rollout_correction
    old, passed = None, n_mini * epochs > 1 or bool(correction.reject)
    if passed:  # the trainer's log-probs at the start of the update: PPO's old ones, the rejection's pi_T
        rows = experiences_to_sequences(experiences, **routes)
        batches = actor.micro_batches(rows, max_tokens, pad_id)
        with measured(True):
            values = actor.forward_values(batches, token_logprobs_at_temperature)
        start = {}
        for mb, vals in zip(batches, values):
            for r, (idx, length) in enumerate(zip(mb.indices, mb.lengths)):
                if idx >= 0:
                    start[idx] = vals[r, :length].tolist()
        experiences = reject_before_update(experiences, start, correction)  # before any token is counted
        old = start if n_mini * epochs > 1 else None  # one step: its own forward has these log-probs
    # strided slices of this rank's experiences (every n-th): one optimizer step each, so each
    # mini-batch holds samples of every role / mixture component
    summed: dict[str, float] = {}
    result, all_batches = None, []
    for _ in range(epochs):
        for k in range(n_mini):
            part = list(range(k, len(experiences), n_mini))
            mine = [experiences[i] for i in part]
            weights, tokens = update_loss_weights(mine, dp_group)
            rows = experiences_to_sequences(mine, weights, **routes)
            if not tokens:  # no rank has a token to train: no optimizer step
                summed["skipped_steps"] = summed.get("skipped_steps", 0.0) + 1.0
                continue
            if old is not None:
                for row in rows:
                    row.per_token["old_logprobs"] = old[part[row.index]]
            batches = actor.micro_batches(rows, max_tokens, pad_id)
            with measured(not passed):
                result = actor.train_step(batches, loss_fn)
            all_batches += batches
            for key, value in result.metrics.items():
                summed[key] = summed.get(key, 0.0) + value
    if result is None:  # every step skipped: the weights, the optimizer and the LR schedule are untouched
        result = StepResult(metrics={}, grad_norm=0.0, lr=actor.optimizer.param_groups[0]["lr"], num_tokens=0)
    return summed, result, all_batches


def step_metrics(metrics: dict, experiences, batches, summed: dict, result, seconds: float, dp_size: int,
                 actor=None) -> dict:
    """A step's metrics: the objective's and the loop's (averaged over ranks), the update's, MoE routing
    agreement (beside ``rollout/logp_diff_mean``, the train-vs-rollout log-prob gap), and throughput
    (rollout tokens of every replica + trained tokens, over the step's ``seconds``)."""
    metrics.update(padding_fraction=padding_fraction(batches),
                   rollout_tokens=float(sum(len(e.response_ids) for e in experiences)))
    metrics = mean_over_ranks(metrics)
    metrics.update(token_means(summed), lr=result.lr, grad_norm=result.grad_norm)
    metrics.update(correction_metrics(summed))  # rollout_corr/...: mismatch, truncation, rejection per lag
    metrics["update/skipped_steps"] = summed.get("skipped_steps", 0.0)  # optimizer steps with no token on any rank
    agreement = actor.routing.take_agreement() if actor is not None and actor.routing is not None else None
    if agreement is not None:
        metrics["rollout/routing_agreement"] = agreement
    metrics["tokens_per_s"] = (metrics["rollout_tokens"] * dp_size + summed.get("num_tokens", 0.0)) / max(seconds, 1e-9)
    return metrics


def token_means(summed: dict[str, float]) -> dict[str, float]:
    """Per-token means of the update's summed loss metrics (``<name>_sum`` over ``num_tokens``)."""
    n = max(1.0, summed.get("num_tokens", 0.0))
    out = {k[:-4]: v / n for k, v in summed.items() if k.endswith("_sum")}
    out["loss"] = out.pop("loss", 0.0)
    out["train_tokens"] = summed.get("num_tokens", 0.0)
    return out
