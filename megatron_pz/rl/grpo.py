r"""GRPO: group-normalised advantages and the clipped policy-gradient loss (token-level sum).

Formulas (per response token t of sample i, mask m_t):

    A_i      = (r_i - mean_g r) / (std_g r + eps)      (std_scale=True; else r_i - mean_g r)
    rho_t    = exp(logp_t - logp_prox_t)      logp_prox = logp_old (decoupled) or logp_rollout (bypass)
    pg_t     = -min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t)     (clip-higher, DAPO)
    pg_t     = min(pg_t, -c A_t) where A_t < 0                                    (dual clip, c = dual_clip)
    w_t      = rollout-correction IS weight, detached; default min(exp(logp_old_t - logp_rollout_t), 2)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                         (k3 estimator)
    loss_sum = sum_t m_t a_t (w_t pg_t + kl_coef kl_t)

The proximal log-probs, the weights w and the rejected tokens (out of m) are the rollout correction's
(:mod:`megatron_pz.rl.rollout_correction`); without one, logp_prox = logp_old and w = 1.

``a_t`` is the aggregation weight (:func:`aggregation_weights`; 1 for DAPO's token mean).
``loss_sum`` is *not* divided here: the trainer divides the sum over all micro-batches and
data-parallel ranks by one global response-token count T, so splitting a batch differently cannot
change the loss (DAPO's token-level mean; Megatron's ``calculate_per_token_loss``). Other
aggregations are expressed as weights on that token mean: RLP's per-sample mean of token means
(RLP Algorithm 1, eq. 8) is a_t = T / (S |c_i|) for the S samples of the update.

Dual clip (Ye et al. 2020, "dual-clip PPO"): a token with A < 0 loses at most c |A|, however large its
ratio; c = 3 is verl 0.9.1's default (``actor.clip_ratio_c``, ``core_algos.compute_policy_loss``).

*Paper-silent choice*: the group std is the unbiased (Bessel-corrected) sample std, as in the
reference GRPO implementations (TRL, verl); a group of one sample gets advantage 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Mapping, Optional, Sequence

import torch

from megatron_pz.rl.rollout_correction import RolloutCorrection


def group_advantages(rewards, groups: Sequence[Hashable], std_scale: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantage of each sample relative to the other samples of its group (float32 tensor)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if rewards.numel() != len(groups):
        raise ValueError(f"group_advantages: {rewards.numel()} rewards but {len(groups)} group ids")
    members: dict = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    adv = torch.zeros_like(rewards)
    for idx in members.values():
        if len(idx) < 2:
            continue
        r = rewards[idx]
        centred = r - r.mean()
        adv[idx] = centred / (r.std() + eps) if std_scale else centred
    return adv


def aggregation_weights(lengths: Sequence[int], components: Sequence[Hashable], aggs: Mapping,
                        mix: Mapping, totals: Mapping, total_tokens: float) -> list[float]:
    """Per-sample weight a_i (given to each of its tokens) that turns the global token mean into the
    wanted aggregation.

    ``lengths``: trainable response tokens of each sample; ``components``: the objective each belongs
    to; ``aggs[k]``: 'token_mean' or 'seq_mean_token_mean'; ``mix[k]``: the component's loss weight
    lambda_k; ``totals[k] = (tokens_k, samples_k)`` summed over the whole update (all data-parallel
    ranks); ``total_tokens`` = T = sum_k tokens_k. Then sum_t a_t l_t / T equals

        sum_k lambda_k L_k,   L_k = (1/tokens_k) sum_{t in k} l_t                     (token_mean)
                              L_k = (1/samples_k) sum_{i in k} (1/|c_i|) sum_t l_t   (seq_mean_token_mean)

    With one token-mean component of weight 1 every a_i is 1.
    """
    out = []
    for n, k in zip(lengths, components):
        tokens_k, samples_k = totals[k]
        if n <= 0:
            out.append(0.0)
        elif aggs[k] == "token_mean":
            out.append(total_tokens * mix[k] / tokens_k)
        elif aggs[k] == "seq_mean_token_mean":
            out.append(total_tokens * mix[k] / (samples_k * n))
        else:
            raise ValueError(f"unknown loss aggregation {aggs[k]!r}")
    return out


def _as_token_tensor(x, like: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if x.dim() == like.dim() - 1:
        x = x.unsqueeze(-1)  # one advantage per sequence, broadcast over its tokens
    return x.expand_as(like)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    rollout_logprobs: Optional[torch.Tensor] = None,
    correction: Optional[RolloutCorrection] = None,
    rejected: Optional[torch.Tensor] = None,
    token_lags: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    dual_clip: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Clipped-surrogate loss summed over response tokens, the token count, and metrics.

    All tensors are per token, flat [n] or [b, s] (``advantages`` may also be one per sequence
    [b]). ``loss_mask`` is 1 on response tokens that enter the loss. Metrics are means over this
    call's masked tokens (weight them by ``num_tokens`` when aggregating), except ``*_max``.
    ``dual_clip``: c > 1 bounds the loss of negative-advantage tokens (None: off).
    ``token_weights``: the aggregation weights a_t (None: all 1, DAPO's token mean).
    ``correction`` (with ``rollout_logprobs``): the rollout correction; ``rejected`` marks response tokens it
    rejected before the update (already out of ``loss_mask``), ``token_lags`` each token's weight-version lag;
    its counters join the metrics under ``rc_raw/`` (sums, read by
    :func:`~megatron_pz.rl.rollout_correction.correction_metrics`).
    """
    mask = loss_mask.to(logprobs.dtype)
    adv = _as_token_tensor(advantages, logprobs)
    old = old_logprobs.detach()
    corrected = None
    if rollout_logprobs is not None and correction is not None:
        corrected = correction.apply(old, rollout_logprobs, mask, rejected, token_lags)
    proximal = old if corrected is None else corrected.proximal
    log_ratio = logprobs - proximal
    ratio = torch.exp(log_ratio)
    surr_unclipped = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surr_unclipped, surr_clipped)
    if dual_clip is not None:
        bounded = torch.minimum(per_token, -dual_clip * adv)
        dual_active = (adv < 0) & (bounded < per_token)
        per_token = torch.where(adv < 0, bounded, per_token)

    num_tokens = mask.sum()
    denom = num_tokens.clamp(min=1.0)

    def masked_mean(x: torch.Tensor) -> float:
        return float((x.detach() * mask).sum() / denom)

    metrics: dict[str, float] = {"num_tokens": float(num_tokens)}
    if rollout_logprobs is not None:
        rollout = rollout_logprobs.detach().to(logprobs.dtype)
        diff = (old - rollout).abs()
        metrics["rollout/logp_diff_mean"] = masked_mean(diff)
        metrics["rollout/logp_diff_max"] = float((diff * mask).max()) if mask.any() else 0.0
    if corrected is not None:
        per_token = per_token * corrected.weights  # 1 where the correction weighs nothing (weights: none)
        metrics.update(corrected.sums)
    if ref_logprobs is not None and kl_coef != 0.0:
        delta = ref_logprobs.detach() - logprobs
        k3 = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * k3
        metrics["kl_ref"] = masked_mean(k3)

    weighted = per_token if token_weights is None else per_token * token_weights.detach().to(per_token.dtype)
    loss_sum = (weighted * mask).sum()

    with torch.no_grad():
        clipped = (surr_clipped < surr_unclipped).to(mask.dtype)  # the clip is the active branch
        metrics["clip_fraction"] = masked_mean(clipped)
        if dual_clip is not None:
            metrics["dual_clip_fraction"] = masked_mean(dual_active.to(mask.dtype))
        metrics["ratio_mean"] = masked_mean(ratio)
        metrics["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio)  # k3 estimate of KL(old || new)
        metrics["advantage_mean"] = masked_mean(adv)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy)
    return loss_sum, num_tokens, metrics
