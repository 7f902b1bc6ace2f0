"""Differential test: our rollout correction against verl 0.9.1's ``verl/trainer/ppo/rollout_corr_helper.py`` on
the same tensors, for every mode both implement (the hand-worked cases, and the modes verl lacks, are in
tests/test_rollout_correction.py).

verl is a test dependency installed without its own requirements (``pip install --no-deps verl==0.9.1``: they
pin transformers < 5.11 and CUDA builds); the ``dev`` extra holds the light packages its import chain needs
(ray, tensordict, omegaconf, codetiming, orjson). Nothing of verl is stubbed. Locally the test skips when verl
is missing; under CI=true it fails.

Mapping (rho = pi_T / pi_b; verl's k1 = -log rho):
    weights token / sequence, cap c        rollout_is="token" / "sequence", rollout_is_threshold=c
    reject token [lo, hi]                  rollout_rs="token_k1",   threshold "1/hi_1/lo"
    reject sequence [lo, hi]               rollout_rs="seq_sum_k1", threshold "1/hi_1/lo"
    reject geometric [lo, hi]              rollout_rs="seq_mean_k1", threshold "1/hi_1/lo"
    reject max_token [1/c, c]              rollout_rs="seq_max_k2", threshold (ln c)^2 / 2
    bypass                                 apply_bypass_mode: old_log_probs := rollout_log_probs
    metrics k1, k3, truncated / rejected   kl, k3_kl, rollout_is_ratio_fraction_high, rollout_rs_(seq_)masked_fraction
"""

import math
import os

import pytest
import torch

from megatron_pz.rl.rollout_correction import (RolloutCorrection, correction_metrics, importance_weights, keep_mask)
from megatron_pz.rl.config import RejectionConfig, RolloutCorrectionConfig

if os.environ.get("CI") == "true":
    import verl.trainer.ppo.rollout_corr_helper as verl_rc
else:
    verl_rc = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                                  reason="verl 0.9.1 not installed (pip install --no-deps verl==0.9.1)")


def tensors(seed: int):
    """8 responses of 3..16 tokens in a [8, 16] batch; log rho ~ N(0, 0.35) per token plus a per-sample
    drift, so every bound below is crossed by some tokens and samples and most stay inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 17, (8,), generator=g)
    mask = (torch.arange(16)[None, :] < lengths[:, None]).float()
    old = -torch.rand(8, 16, generator=g) * 4 - 0.1
    drift = torch.randn(8, 1, generator=g) * 0.1
    rollout = old - (torch.randn(8, 16, generator=g) * 0.35 + drift)
    return old, rollout, mask


def verl_run(old, rollout, mask, **kw):
    weights, new_mask, metrics = verl_rc.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, **kw)
    return (None if weights is None else weights.batch["rollout_is_weights"]), new_mask, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level, cap", [("token", 2.0), ("token", 1.2), ("sequence", 2.0), ("sequence", 1.5)])
def test_importance_weights_match_verl(seed, level, cap):
    old, rollout, mask = tensors(seed)
    ours, truncated = importance_weights(old - rollout, mask, level, cap)
    theirs, _, metrics = verl_run(old, rollout, mask, rollout_is=level, rollout_is_threshold=cap)
    assert torch.allclose(ours * mask, theirs, rtol=1e-6, atol=1e-7)
    assert 0 < truncated[mask.bool()].float().mean() < 1  # the cap acts on some tokens, not all
    if level == "token":  # the truncated fraction, as verl measures it
        m = correction_metrics(RolloutCorrection(RolloutCorrectionConfig(weight_cap=cap)).apply(
            old, rollout, mask).sums)
        assert m["rollout_corr/truncated_tokens"] == pytest.approx(
            metrics["rollout_corr/rollout_is_ratio_fraction_high"], abs=1e-7)


REJECTIONS = [
    (RejectionConfig("token", 0.5, 4.0), "token_k1", "0.25_2.0"),
    (RejectionConfig("token", 0.8, 1.25), "token_k1", "0.8_1.25"),
    (RejectionConfig("sequence", 0.5, 4.0), "seq_sum_k1", "0.25_2.0"),
    (RejectionConfig("geometric", 0.95, 1.25), "seq_mean_k1", f"{1 / 1.25}_{1 / 0.95}"),
    (RejectionConfig("max_token", 0.5, 2.0), "seq_max_k2", repr(math.log(2.0) ** 2 / 2)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ours, option, threshold", REJECTIONS, ids=[r[1] + "_" + r[2] for r in REJECTIONS])
def test_rejection_matches_verl(seed, ours, option, threshold):
    old, rollout, mask = tensors(seed)
    keep = keep_mask(old - rollout, mask, [ours])
    _, verl_mask, metrics = verl_run(old, rollout, mask, rollout_rs=option, rollout_rs_threshold=threshold)
    assert torch.equal(keep, verl_mask.float())
    assert 0 < keep.sum() < mask.sum()  # the criterion rejects something, not everything
    m = correction_metrics(RolloutCorrection(RolloutCorrectionConfig()).apply(
        old, rollout, keep, rejected=mask - keep).sums)
    assert m["rollout_corr/rejected_tokens"] == pytest.approx(metrics["rollout_corr/rollout_rs_masked_fraction"],
                                                              abs=1e-7)
    assert m["rollout_corr/rejected_samples"] == pytest.approx(
        metrics["rollout_corr/rollout_rs_seq_masked_fraction"], abs=1e-7)


def test_combined_criteria_match_verl():
    """verl chains options with a comma (all must pass), as our list does."""
    old, rollout, mask = tensors(3)
    criteria = [RejectionConfig("token", 0.5, 4.0), RejectionConfig("geometric", 0.95, 1.25)]
    keep = keep_mask(old - rollout, mask, criteria)
    _, verl_mask, _ = verl_run(old, rollout, mask, rollout_rs="token_k1,seq_mean_k1",
                               rollout_rs_threshold=f"0.25_2.0,{1 / 1.25}_{1 / 0.95}")
    assert torch.equal(keep, verl_mask.float())


@pytest.mark.parametrize("seed", [0, 1])
def test_mismatch_metrics_match_verl(seed):
    old, rollout, mask = tensors(seed)
    m = correction_metrics(RolloutCorrection(RolloutCorrectionConfig()).apply(old, rollout, mask).sums)
    theirs = verl_rc.compute_offpolicy_metrics(old_log_prob=old, rollout_log_prob=rollout, response_mask=mask)
    assert m["rollout_corr/k1"] == pytest.approx(theirs["kl"], rel=1e-5, abs=1e-7)
    assert m["rollout_corr/k3"] == pytest.approx(theirs["k3_kl"], rel=1e-5, abs=1e-7)


def test_bypass_centres_the_clip_on_the_rollout_log_probs_as_verl():
    """verl's bypass replaces the batch's old log-probs by the rollout's; ours hands the clip the rollout's as
    the proximal log-probs (decoupled: the trainer's old ones)."""
    from omegaconf import OmegaConf
    from verl.protocol import DataProto

    old, rollout, mask = tensors(4)
    batch = DataProto.from_dict(tensors={"old_log_probs": old.clone(), "rollout_log_probs": rollout.clone(),
                                         "response_mask": mask})
    verl_rc.apply_bypass_mode(batch, OmegaConf.create({}), policy_loss_config=OmegaConf.create({}))
    bypass = RolloutCorrection(RolloutCorrectionConfig(mode="bypass", weights="none")).apply(old, rollout, mask)
    decoupled = RolloutCorrection(RolloutCorrectionConfig()).apply(old, rollout, mask)
    assert torch.equal(bypass.proximal, batch.batch["old_log_probs"]) and torch.equal(decoupled.proximal, old)
    assert (bypass.weights == 1).all()
