"""Weight-version lags of a batch's tokens, and what happens to samples staler than ``rollout.max_staleness``.

Rollout ranks record the weight version that sampled each token (``Experience.versions``; in-flight updates
change it inside one sample, :mod:`megatron_pz.disagg.stream`). At the update of RL step k (the trainer holds
v_k) a token's lag is k - its version and a sample's *staleness* is its oldest token's lag (the issue's and
AReaL's definition). The schedule keeps it <= N = ``rollout.max_staleness``; partial rollouts defer unfinished
units to later batches, so a deferred sample can exceed it. Such a sample is

* ``drop`` (default): out of the loss, its tokens out of the numerator and the denominator (``trainable``
  False, as the DAPO filter does; NeMo-RL's async GRPO does not train on trajectories older than its
  ``max_trajectory_age_steps`` either);
* ``mask``: only its tokens with lag > N leave the loss (``token_mask`` 0, marked in ``rejected`` as the
  rollout correction's rejection does, so they also leave the token count the loss is normalised by).

``mask_offpolicy_prefix`` (slime's ``--mask-offpolicy-in-partial-rollout``): the tokens sampled before the
sample's last weight version leave the loss, whatever their lag. Everything done is counted (``stale/*``).
"""

from __future__ import annotations


def token_lags(e, step: int, fallback_version: int) -> list[int]:
    """Lag of each response token of ``e`` at the update of step ``step`` (its ``versions``, else one version)."""
    versions = e.versions if e.versions is not None else [fallback_version] * len(e.response_ids)
    if len(versions) != len(e.response_ids):
        raise ValueError(f"experience of group {e.group}: {len(versions)} token versions for "
                         f"{len(e.response_ids)} response tokens")
    return [step - int(v) for v in versions]


def _mask_tokens(e, cut: list[bool]) -> int:
    """Take the tokens flagged in ``cut`` out of the loss; returns how many were still in it."""
    mask = list(e.token_mask) if e.token_mask is not None else [1.0] * len(e.response_ids)
    rejected = list(e.rejected) if e.rejected is not None else [0.0] * len(e.response_ids)
    removed = 0
    for t, c in enumerate(cut):
        if c and mask[t] > 0:
            removed += 1
            mask[t], rejected[t] = 0.0, 1.0
    e.token_mask, e.rejected = mask, rejected
    return removed


def apply_staleness(experiences, step: int, fallback_version: int, max_staleness: int, policy: str = "drop",
                    mask_offpolicy_prefix: bool = False) -> dict[str, float]:
    """Set each experience's per-token ``lag`` and apply the staleness policy (module docstring) in place.
    Returns the counts logged with the step."""
    dropped = masked = prefix = stale = 0
    oldest = 0
    for e in experiences:
        lags = token_lags(e, step, fallback_version)
        e.lag = lags
        if not lags:
            continue
        staleness = max(lags)
        oldest = max(oldest, staleness)
        if mask_offpolicy_prefix and e.trainable:
            prefix += _mask_tokens(e, [lag > min(lags) for lag in lags])
        if staleness <= max_staleness:
            continue
        stale += 1
        if not e.trainable:
            continue
        if policy == "drop":
            e.trainable = False
            e.info["dropped_stale"] = staleness
            dropped += 1
        else:
            masked += _mask_tokens(e, [lag > max_staleness for lag in lags])
    return {"stale/max_staleness": float(oldest), "stale/samples_over": float(stale),
            "stale/dropped_samples": float(dropped), "stale/masked_tokens": float(masked),
            "stale/offpolicy_prefix_tokens": float(prefix)}
