r"""GRPO: group-normalised advantages and the clipped policy-gradient loss (token-level sum).

Formulas (per response token t of sample i, mask m_t):

    A_i      = (r_i - mean_g r) / (std_g r + eps)      (std_scale=True; else r_i - mean_g r)
    rho_t    = exp(logp_t - logp_old_t)
    pg_t     = -min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t)     (clip-higher, DAPO)
    w_t      = min(exp(logp_old_t - logp_rollout_t), tis_cap), detached           (truncated IS)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                         (k3 estimator)
    loss_sum = sum_t m_t (w_t pg_t + kl_coef kl_t)

``loss_sum`` is *not* divided here: the trainer divides the sum over all micro-batches and
data-parallel ranks by one global response-token count, so splitting a batch differently cannot
change the loss (DAPO's token-level mean; Megatron's ``calculate_per_token_loss``).

*Paper-silent choice*: the group std is the unbiased (Bessel-corrected) sample std, as in the
reference GRPO implementations (TRL, verl); a group of one sample gets advantage 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Optional, Sequence

import torch


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
    tis_cap: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Clipped-surrogate loss summed over response tokens, the token count, and metrics.

    All tensors are per token, flat [n] or [b, s] (``advantages`` may also be one per sequence
    [b]). ``loss_mask`` is 1 on response tokens that enter the loss. Metrics are means over this
    call's masked tokens (weight them by ``num_tokens`` when aggregating), except ``*_max``.
    """
    mask = loss_mask.to(logprobs.dtype)
    adv = _as_token_tensor(advantages, logprobs)
    old = old_logprobs.detach()
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    surr_unclipped = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surr_unclipped, surr_clipped)

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
        if tis_cap is not None:
            raw = torch.exp(old - rollout)
            weight = torch.clamp(raw, max=tis_cap)
            per_token = per_token * weight
            metrics["tis/weight_mean"] = masked_mean(weight)
            metrics["tis/capped_fraction"] = masked_mean((raw > tis_cap).to(mask.dtype))
    if ref_logprobs is not None and kl_coef != 0.0:
        delta = ref_logprobs.detach() - logprobs
        k3 = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * k3
        metrics["kl_ref"] = masked_mean(k3)

    loss_sum = (per_token * mask).sum()

    with torch.no_grad():
        clipped = (surr_clipped < surr_unclipped).to(mask.dtype)  # the clip is the active branch
        metrics["clip_fraction"] = masked_mean(clipped)
        metrics["ratio_mean"] = masked_mean(ratio)
        metrics["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio)  # k3 estimate of KL(old || new)
        metrics["advantage_mean"] = masked_mean(adv)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy)
    return loss_sum, num_tokens, metrics
