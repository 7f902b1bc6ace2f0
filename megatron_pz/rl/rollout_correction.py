r"""Rollout correction: what the GRPO loss does about rollout log-probs that are not the trainer's.

Three policies take part (AReaL's decoupled PPO objective, Fu et al. 2025, arXiv 2505.24298): the
*behaviour* policy pi_b that sampled the response (the rollout engine's log-probs, ``Experience.rollout_logprobs``), the
*proximal* policy pi_prox the PPO clip is centred on, and the *current* policy pi_theta being trained. For
response token t of sample i::

    rho_t = pi_T(t) / pi_b(t)      the rollout mismatch: pi_T = the trainer's policy at the start of the update
                                   (the "old" log-probs; in the default one-step update, this forward's own)
    r_t   = pi_theta(t) / pi_prox(t)             the ratio the clip (and the dual clip) sees

* ``mode: decoupled`` (default; AReaL's decoupled loss, verl's decoupled mode): pi_prox = pi_T, so
  r_t = pi_theta / pi_T (1 in the one-step update) and the loss is ``w_t * clipped(r_t)``, the importance
  weight w taken from rho.
* ``mode: bypass`` (verl 0.9.1 ``apply_bypass_mode`` + ``compute_policy_loss_bypass_mode``, loss_type
  ppo_clip): pi_prox = pi_b, so r_t = pi_theta / pi_b and the clip alone bounds the mismatch. An importance
  weight on top would count rho twice (verl drops it there), so bypass needs ``weights: none``.

Importance weights (``weights``, detached, truncated at ``weight_cap``):

    token      w_t = min(rho_t, cap)                       TIS; today's grpo.tis_cap (verl rollout_is=token,
                                                           slime tis_level=token, NeMo-RL "tis", TRL token_truncate)
    sequence   w_i = min(prod_t rho_t, cap)                verl rollout_is=sequence, slime "sequence",
                                                           TRL sequence_truncate
    geometric  w_i = min(exp(mean_t log rho_t), cap)       slime tis_level=geometric (verl 0.9.1 has none)
    none       w = 1

Rejection (``reject``: a list of criteria, all must pass; a rejected token is out of the loss):

    token      keep token t iff lower <= rho_t <= upper                   MIS / IcePop: slime tis_mode=mask,
                                                                          NeMo-RL "icepop", verl token_k1,
                                                                          TRL token_mask
    sequence   keep sample i iff lower <= prod_t rho_t <= upper           TRL sequence_mask, verl seq_sum_k1
    geometric  keep sample i iff lower <= exp(mean_t log rho_t) <= upper  NeMo-RL "seq-mask-tis", verl seq_mean_k1
    max_token  keep sample i iff every rho_t is in [lower, upper]         slime rs_veto_threshold (lower only),
                                                                          verl seq_max_k2 ([1/c, c]: k2 <= (ln c)^2 / 2)

``negative_advantage_only: true`` applies a criterion to samples with A_i < 0 only: ``{level: geometric,
lower: exp(-delta), negative_advantage_only: true}`` is DeepSeek-V3.2's off-policy sequence masking
(arXiv 2512.02556 eq. 9: mask a negative-advantage sample whose mean log(pi_b / pi_theta) exceeds delta;
TRL ``off_policy_mask_threshold``, slime ``opsm_delta``). Sequence statistics are taken over the sample's
response tokens before any rejection, as verl computes both from the same ``response_mask``. Log-ratio
sums are clamped to +-20 before ``exp`` (verl's ``SAFETY_BOUND``); the token weight is today's formula
unclamped, so the default reproduces the old loss bit for bit.

**Where rejected tokens stand in the loss.** A rejected token leaves the numerator *and* the denominator
(slime fixed exactly this: zeroed weights that stay in the token count dilute the mean; NeMo-RL's icepop
and AReaL's mask mode keep them in it). The project's loss is one global token mean: the aggregation
weights (:func:`megatron_pz.rl.grpo.aggregation_weights`: each component's token and sample counts summed
over data-parallel ranks) are fixed before the forward, and Megatron divides the summed gradients by the
token counts the loss returns, summed over micro-batches and ranks. A rejection decided *in* the forward
could only shrink that one scalar: exact for a single token-mean component, wrong for RLP's per-sample mean
(|c_i| and the sample count change) and for mixtures (each component has its own count). So the rejection
is decided *before* the update, from the trainer's log-probs at its start (:func:`reject_before_update`):
the pass that computes old log-probs for PPO mini-batches runs whenever rejection is on, rejected tokens
are cut from ``Experience.token_mask``, and every count (tokens and samples per component, |c_i|, over
all ranks) is taken over kept tokens only. In decoupled mode pi_T is pi_prox, as verl decides it; in bypass
mode it is pi_theta at the start of the update, which is verl's per-step pi_theta for the first (in the
default schedule, the only) optimizer step; later mini-batches keep that decision.

**Mismatch metrics** (always, per weight-version lag L: ``rollout_corr/lag{L}/...``, and over all lags:
``rollout_corr/...``): ``k1`` = mean log(pi_b / pi_T) and ``k3`` = mean(rho - 1 - log rho), both
estimates of KL(pi_b || pi_T) from the rollout's samples (verl ``kl`` / ``k3_kl``); ``ratio_p1`` ...
``ratio_p99``: percentiles of rho_t; ``truncated_tokens`` / ``truncated_samples``, ``rejected_tokens`` /
``rejected_samples``: fractions of response tokens / samples with at least one such token; ``tokens``,
``samples``: how many the lag holds. The lag of a token is the trainer's weight version minus the version
that sampled it (``Experience.lag``: 0 colocated; in the disaggregated loop the step minus the batch's
version; a sample's lag is its oldest token's). Every metric is a sum over micro-batches and ranks first;
percentiles come from a histogram of log rho with :data:`HISTOGRAM_EDGES` (10 bins per decade of |log rho|
from 1e-6 to 20: a percentile is exact to within its bin, about +-13 % of log rho).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_pz.rl.config import RejectionConfig, RolloutCorrectionConfig

SAFETY_BOUND = 20.0  # |log ratio| clamp before exp of a sequence sum (verl 0.9.1 rollout_corr_helper.SAFETY_BOUND)
PERCENTILES = (1, 5, 50, 95, 99)
METRIC_PREFIX = "rollout_corr/"
# |log rho| magnitudes 1e-6 * 10^(j/10), j = 0..73 (the last ~19.95 ~ SAFETY_BOUND), mirrored around a central bin
_MAGNITUDES = [10.0 ** (-6 + j / 10) for j in range(74)]
HISTOGRAM_EDGES = [-m for m in reversed(_MAGNITUDES)] + _MAGNITUDES
COUNTER_PREFIX = "rc_raw/"  # keys of the summed counters (not metrics: :func:`correction_metrics` reads them)


# ------------------------------------------------------------------ the tensor functions (any [b, s] batch)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def sequence_log_ratio(log_rho: torch.Tensor, response: torch.Tensor, level: str) -> torch.Tensor:
    """Per sample [b]: sum_t log rho_t (``sequence``) or its mean over the response tokens (``geometric``)."""
    log_rho, response = _rows(log_rho), _rows(response)
    total = (log_rho * response).sum(-1)
    if level == "sequence":
        return total
    if level == "geometric":
        return total / response.sum(-1).clamp(min=1.0)
    raise ValueError(f"not a sequence level: {level!r}")


def importance_weights(log_rho: torch.Tensor, response: torch.Tensor, level: str, cap: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated IS weights (shape of ``log_rho``, detached) and where the truncation acted (bool, same shape)."""
    if level == "none":
        return torch.ones_like(log_rho), torch.zeros_like(log_rho, dtype=torch.bool)
    if level == "token":
        raw = torch.exp(log_rho)  # today's grpo.tis_cap formula, unclamped: the default stays bit-exact
        return torch.clamp(raw, max=cap).detach(), raw > cap
    seq = sequence_log_ratio(log_rho, response, level).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    raw = torch.exp(seq).unsqueeze(-1).expand_as(_rows(log_rho)).reshape(log_rho.shape)
    return torch.clamp(raw, max=cap).detach(), raw > cap


def _inside(log_value: torch.Tensor, lower: float, upper: Optional[float]) -> torch.Tensor:
    ok = torch.ones_like(log_value, dtype=torch.bool)
    if lower > 0.0:
        ok &= log_value >= math.log(lower)
    if upper is not None:
        ok &= log_value <= math.log(upper)
    return ok


def keep_mask(log_rho: torch.Tensor, response: torch.Tensor, criteria: Sequence[RejectionConfig],
              advantages: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1.0 where a response token survives every rejection criterion (0 elsewhere, and off the response).

    ``log_rho``, ``response``: [b, s]; ``advantages``: one per sample [b] (or per token, constant over a
    sample), needed by ``negative_advantage_only`` criteria. Bounds compare log rho with log(bound).
    """
    log_rho, response = _rows(log_rho), _rows(response).to(log_rho.dtype)
    keep = response.bool().clone()
    on = response.bool()
    for c in criteria:
        if c.level == "token":
            passed = _inside(log_rho, c.lower, c.upper) | ~on
        elif c.level == "max_token":
            passed = (_inside(log_rho, c.lower, c.upper) | ~on).all(-1, keepdim=True).expand_as(keep)
        else:
            seq = sequence_log_ratio(log_rho, response, c.level)
            passed = _inside(seq, c.lower, c.upper).unsqueeze(-1).expand_as(keep)
        if c.negative_advantage_only:
            if advantages is None:
                raise ValueError("a negative_advantage_only criterion needs the advantages")
            adv = torch.as_tensor(advantages, dtype=log_rho.dtype, device=log_rho.device)
            adv = adv if adv.dim() == 1 else (adv * response).sum(-1) / response.sum(-1).clamp(min=1.0)
            passed = passed | (adv >= 0).unsqueeze(-1)
        keep &= passed
    return keep.to(log_rho.dtype)


# ------------------------------------------------------------------ metrics (sums, reduced like the loss's)


def _edges(device) -> torch.Tensor:
    return torch.tensor(HISTOGRAM_EDGES, dtype=torch.float64, device=device)


_COUNTERS = ("tokens", "samples", "k1", "k3", "weight", "kept", "truncated_tokens", "truncated_samples",
             "rejected_tokens", "rejected_samples")


def metric_sums(log_rho: torch.Tensor, response: torch.Tensor, truncated: torch.Tensor, rejected: torch.Tensor,
                weights: torch.Tensor, lags: Optional[torch.Tensor] = None) -> dict[str, float]:
    """This micro-batch's counters for :func:`correction_metrics`, per lag: token and sample counts, sums of
    k1 / k3 / weights, truncated / rejected counts, the histogram of log rho. All [b, s] (or flat: one sample);
    ``response``: the response tokens before rejection; ``rejected``: those rejected (subset of ``response``)."""
    log_rho, response = _rows(log_rho).detach().double(), _rows(response).bool()
    truncated, rejected = _rows(truncated).bool() & response, _rows(rejected).bool() & response
    weights = _rows(weights).detach().double()
    lag = torch.zeros_like(log_rho, dtype=torch.long) if lags is None else _rows(lags).round().long()
    sample_lag = torch.where(response, lag, torch.full_like(lag, -1)).max(-1).values  # a sample's oldest token
    bins = torch.bucketize(log_rho, _edges(log_rho.device))
    lag_values = torch.unique(sample_lag[sample_lag >= 0]).tolist()
    stats = []
    for value in lag_values:  # one vector per lag, moved to the host in one transfer
        rows = sample_lag == value
        tok = response & rows.unsqueeze(-1)
        x = log_rho[tok]
        kept = tok & ~rejected
        stats.append(torch.cat([torch.stack([
            tok.sum(), rows.sum(), (-x).sum(), (torch.exp(x) - 1.0 - x).sum(), weights[kept].sum(), kept.sum(),
            (truncated & tok).sum(), (truncated & tok).any(-1).sum(), (rejected & tok).sum(),
            (rejected & tok).any(-1).sum()]).double(),
            torch.bincount(bins[tok], minlength=len(HISTOGRAM_EDGES) + 1).double()]))
    out: dict[str, float] = {}
    for value, row in zip(lag_values, torch.stack(stats).tolist() if stats else []):
        p = f"{COUNTER_PREFIX}lag{value}/"
        out.update({p + name: v for name, v in zip(_COUNTERS, row)})
        out.update({f"{p}hist/{j:03d}": c for j, c in enumerate(row[len(_COUNTERS):]) if c})
    return out


def histogram_percentile(counts: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of log rho from bin counts over :data:`HISTOGRAM_EDGES`, linear inside a
    bin (the open outer bins end at +-SAFETY_BOUND)."""
    edges = [-SAFETY_BOUND] + HISTOGRAM_EDGES + [SAFETY_BOUND]
    total = float(sum(counts))
    target = q / 100.0 * total
    seen = 0.0
    for j, c in enumerate(counts):
        if c > 0 and seen + c >= target:
            lo, hi = edges[j], edges[j + 1]
            return lo + (hi - lo) * (target - seen) / c
        seen += c
    return edges[-1]


def correction_metrics(summed: dict[str, float]) -> dict[str, float]:
    """The logged ``rollout_corr/...`` metrics from the counters summed over micro-batches, ranks and optimizer
    steps (per lag, and over all lags)."""
    per_lag: dict[str, dict[str, float]] = {}
    for key, value in summed.items():
        if key.startswith(COUNTER_PREFIX):
            lag, name = key[len(COUNTER_PREFIX):].split("/", 1)
            per_lag.setdefault(lag, {})[name] = value
    if not per_lag:
        return {}
    total: dict[str, float] = {}
    for counters in per_lag.values():
        for name, value in counters.items():
            total[name] = total.get(name, 0.0) + value
    out = {}
    groups = [(METRIC_PREFIX, total)] + [(f"{METRIC_PREFIX}{lag}/", c) for lag, c in sorted(per_lag.items())]
    for prefix, counters in groups:
        tokens, samples = max(counters.get("tokens", 0.0), 1.0), max(counters.get("samples", 0.0), 1.0)
        out[prefix + "tokens"] = counters.get("tokens", 0.0)
        out[prefix + "samples"] = counters.get("samples", 0.0)
        out[prefix + "k1"] = counters.get("k1", 0.0) / tokens
        out[prefix + "k3"] = counters.get("k3", 0.0) / tokens
        out[prefix + "weight_mean"] = counters.get("weight", 0.0) / max(counters.get("kept", 0.0), 1.0)
        for name in ("truncated_tokens", "rejected_tokens"):
            out[prefix + name] = counters.get(name, 0.0) / tokens
        for name in ("truncated_samples", "rejected_samples"):
            out[prefix + name] = counters.get(name, 0.0) / samples
        hist = [counters.get(f"hist/{j:03d}", 0.0) for j in range(len(HISTOGRAM_EDGES) + 1)]
        if sum(hist) > 0:
            for q in PERCENTILES:
                out[f"{prefix}ratio_p{q}"] = math.exp(histogram_percentile(hist, q))
    return out


# ------------------------------------------------------------------ the loss's side and the update's side


@dataclass
class Corrected:
    """What :meth:`RolloutCorrection.apply` hands the loss."""

    proximal: torch.Tensor  # the log-probs the clip's ratio is taken against
    weights: torch.Tensor  # IS weights (1 where off), detached
    sums: dict[str, float]  # counters for correction_metrics


class RolloutCorrection:
    """The configured correction, applied per micro-batch inside the loss (weights, the clip's centre, metrics).
    Rejection is decided before the update (:func:`reject_before_update`) and arrives as ``rejected``."""

    def __init__(self, cfg: RolloutCorrectionConfig):
        self.cfg = cfg

    def apply(self, trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor,
              rejected: Optional[torch.Tensor] = None, lags: Optional[torch.Tensor] = None) -> Corrected:
        """``trainer_logprobs``: pi_T (the old log-probs); ``loss_mask``: the response tokens still in the loss;
        ``rejected``: response tokens rejected before the update (None: none)."""
        trainer = trainer_logprobs.detach()
        rollout = rollout_logprobs.detach().to(trainer.dtype)
        log_rho = trainer - rollout
        kept = loss_mask.to(trainer.dtype)
        rejected = torch.zeros_like(kept) if rejected is None else rejected.to(trainer.dtype)
        response = kept + rejected
        weights, truncated = importance_weights(log_rho, response, self.cfg.weights, self.cfg.weight_cap)
        proximal = rollout if self.cfg.mode == "bypass" else trainer
        sums = metric_sums(log_rho, response, truncated, rejected, weights, lags)
        return Corrected(proximal, weights, sums)


def reject_before_update(experiences: list, start_logprobs: dict, cfg: RolloutCorrectionConfig) -> list:
    """``experiences`` with the rejected response tokens cut from their ``token_mask`` (copies; the others as
    they are). ``start_logprobs[i]``: experience i's per-token log-probs of prompt + response under the
    trainer at the start of the update (the old-log-prob pass). Experiences without rollout log-probs or
    outside the loss are left alone."""
    if not cfg.reject:
        return experiences
    todo = [i for i, e in enumerate(experiences)
            if e.trainable and e.response_ids and e.rollout_logprobs is not None and i in start_logprobs]
    if not todo:
        return experiences
    width = max(len(experiences[i].response_ids) for i in todo)
    log_rho = torch.zeros(len(todo), width, dtype=torch.float64)
    response = torch.zeros(len(todo), width, dtype=torch.float64)
    for row, i in enumerate(todo):
        e = experiences[i]
        r = len(e.response_ids)
        trainer = torch.tensor(start_logprobs[i][len(e.prompt_ids):len(e.prompt_ids) + r], dtype=torch.float32)
        rollout = torch.tensor(e.rollout_logprobs, dtype=torch.float32)
        log_rho[row, :r] = (trainer - rollout).double()  # the loss's float32 difference
        response[row, :r] = torch.tensor(e.token_mask if e.token_mask is not None else [1.0] * r, dtype=torch.float64)
    advantages = torch.tensor([float(experiences[i].advantage or 0.0) for i in todo], dtype=torch.float64)
    keep = keep_mask(log_rho, response, cfg.reject, advantages)
    out = list(experiences)
    for row, i in enumerate(todo):
        e = experiences[i]
        out[i] = dataclasses.replace(e, token_mask=keep[row, :len(e.response_ids)].tolist(),
                                     rejected=(response[row] - keep[row])[:len(e.response_ids)].tolist())
    return out
