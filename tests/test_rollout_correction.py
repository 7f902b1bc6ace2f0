"""Rollout correction (megatron_pz/rl/rollout_correction.py) against hand-worked numbers, and against verl 0.9.1.

One batch serves the hand-worked cases: three responses of 3, 2 and 4 tokens whose mismatch log rho_t =
log pi_T - log pi_b is chosen per token::

    sample 0: [ 0.1, -0.2, 0.9]          rho = 1.105, 0.819, 2.460   sum  0.8  (prod 2.226), mean 0.2667 (geo 1.306)
    sample 1: [ 0.0,  0.05]              rho = 1.000, 1.051          sum  0.05 (prod 1.051), mean 0.025  (geo 1.025)
    sample 2: [-0.8,  0.3, 0.2, 0.1]     rho = 0.449, 1.350, 1.221, 1.105
                                         sum -0.2 (prod 0.819), mean -0.05 (geo 0.951)
"""

import math
import os

import pytest
import torch

from megatron_pz.config import ConfigError
from megatron_pz.rl.grpo import grpo_loss
from megatron_pz.rl.rollout_correction import (COUNTER_PREFIX, HISTOGRAM_EDGES, RolloutCorrection, correction_metrics,
                                               importance_weights, keep_mask, metric_sums, reject_before_update)
from megatron_pz.rl.types import Experience
from megatron_pz.train.batching import make_micro_batches
from megatron_pz.rl.config import RejectionConfig, RolloutCorrectionConfig
from megatron_pz.run_config import load_run_config
from megatron_pz.train.update import experiences_to_sequences, update_loss_weights

LOG_RHO = [[0.1, -0.2, 0.9], [0.0, 0.05], [-0.8, 0.3, 0.2, 0.1]]
TINY_YAML = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu.yaml")


def batch():
    log_rho = torch.zeros(3, 4)
    response = torch.zeros(3, 4)
    for i, row in enumerate(LOG_RHO):
        log_rho[i, :len(row)] = torch.tensor(row)
        response[i, :len(row)] = 1.0
    log_rho[response == 0] = 9.0  # padding junk must not matter
    return log_rho, response


def rows_of(x, response):
    return [x[i, :len(r)].tolist() for i, r in enumerate(LOG_RHO)]


def flat(rows):
    return [v for row in rows for v in row]


# ====================================================================== importance weights


def test_importance_weights_token_sequence_geometric_by_hand():
    log_rho, response = batch()
    e = math.exp
    w, cut = importance_weights(log_rho, response, "token", 2.0)  # TIS: min(rho_t, 2)
    assert flat(rows_of(w, response)) == pytest.approx([e(0.1), e(-0.2), 2.0, 1.0, e(0.05),
                                                        e(-0.8), e(0.3), e(0.2), e(0.1)], rel=1e-6)
    assert rows_of(cut.float(), response) == [[0, 0, 1], [0, 0], [0, 0, 0, 0]]
    w, cut = importance_weights(log_rho, response, "sequence", 2.0)  # min(prod rho, 2): e^0.8 = 2.23 -> 2
    assert flat(rows_of(w, response)) == pytest.approx([2.0] * 3 + [e(0.05)] * 2 + [e(-0.2)] * 4, rel=1e-6)
    assert rows_of(cut.float(), response) == [[1, 1, 1], [0, 0], [0, 0, 0, 0]]
    w, cut = importance_weights(log_rho, response, "geometric", 1.3)  # min(exp(mean log rho), 1.3)
    assert flat(rows_of(w, response)) == pytest.approx([1.3] * 3 + [e(0.025)] * 2 + [e(-0.05)] * 4, rel=1e-6)
    assert rows_of(cut.float(), response)[0] == [1, 1, 1] and not cut[1:].any()
    w, cut = importance_weights(log_rho, response, "none", 2.0)
    assert (w == 1).all() and not cut.any()


# ====================================================================== rejection


@pytest.mark.parametrize("criterion, kept", [
    # MIS / IcePop: tokens with rho outside [0.5, 2] leave (2.46 and 0.449)
    (RejectionConfig("token", 0.5, 2.0), [[1, 1, 0], [1, 1], [0, 1, 1, 1]]),
    # TRL's sequence mask: prod rho in [0.5, 2]; sample 0's 2.226 is out, whole
    (RejectionConfig("sequence", 0.5, 2.0), [[0, 0, 0], [1, 1], [1, 1, 1, 1]]),
    # NeMo-RL's seq-mask-tis: geometric mean in [0.95, 1.2]; sample 0's 1.306 is out
    (RejectionConfig("geometric", 0.95, 1.2), [[0, 0, 0], [1, 1], [1, 1, 1, 1]]),
    # the largest token deviation: one token outside [0.5, 2] takes its sample with it
    (RejectionConfig("max_token", 0.5, 2.0), [[0, 0, 0], [1, 1], [0, 0, 0, 0]]),
    # only a lower bound (slime's veto, one-sided): rho_t >= 0.5 for every token
    (RejectionConfig("max_token", 0.5), [[1, 1, 1], [1, 1], [0, 0, 0, 0]]),
])
def test_rejection_levels_by_hand(criterion, kept):
    log_rho, response = batch()
    keep = keep_mask(log_rho, response, [criterion])
    assert rows_of(keep, response) == kept
    assert (keep[response == 0] == 0).all()


def test_off_policy_sequence_masking_only_acts_on_negative_advantages():
    """DeepSeek-V3.2 eq. 9 with delta = 0.04: a sample with A < 0 and mean log(pi_b / pi_T) > 0.04, i.e.
    geometric mean rho < e^-0.04 = 0.961, leaves; sample 2 (geometric 0.951) leaves only when its A < 0."""
    log_rho, response = batch()
    opsm = RejectionConfig("geometric", lower=math.exp(-0.04), negative_advantage_only=True)
    assert rows_of(keep_mask(log_rho, response, [opsm], torch.tensor([1.0, -1.0, -1.0])), response) == \
        [[1, 1, 1], [1, 1], [0, 0, 0, 0]]
    assert rows_of(keep_mask(log_rho, response, [opsm], torch.tensor([-1.0, -1.0, 1.0])), response) == \
        [[1, 1, 1], [1, 1], [1, 1, 1, 1]]  # sample 0 (A < 0) has geometric 1.306 > lower: kept
    # criteria combine with AND: token bounds and the sequence mask together
    both = keep_mask(log_rho, response, [RejectionConfig("token", 0.5, 2.0), opsm], torch.tensor([1.0, -1.0, -1.0]))
    assert rows_of(both, response) == [[1, 1, 0], [1, 1], [0, 0, 0, 0]]


# ====================================================================== where the rejected tokens stand


def experiences(advantages, loss_agg="token_mean"):
    """The batch as experiences: prompts of 2 tokens, trainer log-probs -1 everywhere, rollout log-probs
    -1 - log rho, so pi_T / pi_b is exactly the table's rho."""
    out, start = [], {}
    for i, (row, a) in enumerate(zip(LOG_RHO, advantages)):
        out.append(Experience([5, 6], [7 + t for t in range(len(row))], reward=0.0, group=f"g{i}", role="predictor",
                              advantage=a, rollout_logprobs=[-1.0 - x for x in row], component="x",
                              loss_agg=loss_agg))
        start[i] = [-1.0] * (2 + len(row))
    return out, start


def mean_loss(exps, weights, ranks, correction, max_tokens=8):
    """Sum of loss over every micro-batch of every 'rank' / sum of token counts: Megatron's division. ``ranks``:
    which experiences each data-parallel rank holds; the logits are such that log pi_theta = log pi_T = -1."""
    loss_sum, count = 0.0, 0.0
    for mine in ranks:
        rows = experiences_to_sequences([exps[i] for i in mine], [weights[i] for i in mine])
        for mb in make_micro_batches(rows, max_tokens, 0):
            logp = torch.full_like(mb.loss_mask, -1.0)
            s, n, _ = grpo_loss(logp, logp, mb.per_token["advantages"], mb.loss_mask,
                                rollout_logprobs=mb.per_token["rollout_logprobs"], correction=correction,
                                rejected=mb.per_token["rejected"], token_lags=mb.per_token["lag"],
                                token_weights=mb.per_token["loss_weight"])
            loss_sum, count = loss_sum + float(s), count + float(n)
    return loss_sum / count, count


def test_rejected_tokens_leave_the_denominator_at_any_split():
    """Token rejection in [0.5, 2] (sample 0 loses token 3, sample 2 token 1), TIS weights min(rho, 2), ratio 1:
    the loss of a kept token is -A_i w_t. Both aggregations by hand, for one rank with one micro-batch and for
    two data-parallel ranks with several micro-batches each (the global counts as update_loss_weights takes
    them, summed over ranks)."""
    e = math.exp
    adv = [1.0, -1.0, 2.0]
    cfg = RolloutCorrectionConfig(reject=[RejectionConfig("token", 0.5, 2.0)])
    kept_terms = [[-1.0 * e(0.1), -1.0 * e(-0.2)], [1.0 * 1.0, 1.0 * e(0.05)],
                  [-2.0 * e(0.3), -2.0 * e(0.2), -2.0 * e(0.1)]]
    token_mean = sum(map(sum, kept_terms)) / 7  # 7 kept tokens of 9
    seq_mean = sum(sum(t) / len(t) for t in kept_terms) / 3
    diluted = sum(map(sum, kept_terms)) / 9  # the bug slime fixed: rejected tokens still counted
    for agg, expected in (("token_mean", token_mean), ("seq_mean_token_mean", seq_mean)):
        exps, start = experiences(adv, agg)
        exps = reject_before_update(exps, start, cfg)
        assert [x.token_mask for x in exps] == [[1, 1, 0], [1, 1], [0, 1, 1, 1]]
        assert [x.rejected for x in exps] == [[0, 0, 1], [0, 0], [1, 0, 0, 0]]
        weights, _ = update_loss_weights(exps)  # without a process group: the counts of the whole update
        if agg == "seq_mean_token_mean":  # a_i = T / (S |c_i|) over kept tokens: T = 7, S = 3, |c| = 2, 2, 3
            assert weights == pytest.approx([7 / 6, 7 / 6, 7 / 9])
        for ranks in ([[0, 1, 2]], [[0, 2], [1]]):
            budget = 8 if len(ranks) > 1 else 64  # several micro-batches per rank, or one
            loss, count = mean_loss(exps, weights, ranks, RolloutCorrection(cfg), max_tokens=budget)
            assert count == 7 and loss == pytest.approx(expected, rel=1e-6), (agg, ranks)
    assert abs(diluted - token_mean) > 0.1
    # Deciding in the forward and only shrinking the returned count would keep RLP's a_i = T / (S |c_i|) of the
    # unrejected counts (T = 9, |c| = 3, 2, 4): wrong for the per-sample mean, which is why it is decided before.
    in_forward = sum(9 / (3 * n) * sum(t) for n, t in zip((3, 2, 4), kept_terms)) / 7
    assert abs(in_forward - seq_mean) > 0.05


def test_a_wholly_rejected_sample_leaves_the_sample_count():
    """TRL's sequence mask in [0.5, 2]: sample 0 (prod 2.226) leaves whole; RLP's per-sample mean is over the 2
    samples left, each its own token mean, token weights min(rho, 2) (sample 2 keeps its 0.449 token)."""
    e = math.exp
    exps, start = experiences([1.0, -1.0, 2.0], "seq_mean_token_mean")
    cfg = RolloutCorrectionConfig(reject=[RejectionConfig("sequence", 0.5, 2.0)])
    exps = reject_before_update(exps, start, cfg)
    weights, _ = update_loss_weights(exps)
    assert weights == pytest.approx([0.0, 6 / (2 * 2), 6 / (2 * 4)])  # T = 6 kept tokens, S = 2
    expected = ((1.0 + e(0.05)) / 2 + -2.0 * (e(-0.8) + e(0.3) + e(0.2) + e(0.1)) / 4) / 2
    loss, count = mean_loss(exps, weights, [[0], [1, 2]], RolloutCorrection(cfg), max_tokens=6)
    assert count == 6 and loss == pytest.approx(expected, rel=1e-6)
    rows = experiences_to_sequences(exps, weights)
    assert len(rows) == 3 and sum(rows[0].loss_mask) == 0  # still there, for the metrics


# ====================================================================== decoupled vs bypass: the clip's ratio


def test_decoupled_and_bypass_clip_different_ratios():
    """Two tokens, A = +1 and -1; log pi_theta - log pi_T = 0.1, log pi_T - log pi_b = 0.4 (rho = 1.49).

    decoupled: the clip sees r = e^0.1 = 1.105 (inside [0.8, 1.28]) and the loss is w r A with w = rho:
        token 1: -1.49 x 1.105,  token 2: +1.49 x 1.105;  nothing clipped, gradient -w r A.
    bypass: the clip sees r = pi_theta / pi_b = e^0.5 = 1.649 and no weight:
        token 1 (A > 0): min(1.649, 1.28) -> -1.28, clipped, no gradient;
        token 2 (A < 0): -min(-1.649, -1.28) = 1.649 (the pessimistic unclipped branch), gradient r.
    """
    old = torch.tensor([-1.0, -2.0])
    rollout = old - 0.4
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2)
    rho, r = math.exp(0.4), math.exp(0.1)
    for mode, weights, loss, grad, clipped in (
            ("decoupled", "token", -rho * r + rho * r, [-rho * r, rho * r], 0.0),
            ("bypass", "none", -1.28 + math.exp(0.5), [0.0, math.exp(0.5)], 0.5)):
        logp = (old + 0.1).requires_grad_(True)
        corr = RolloutCorrection(RolloutCorrectionConfig(mode=mode, weights=weights))
        s, n, m = grpo_loss(logp, old, adv, mask, rollout_logprobs=rollout, correction=corr, dual_clip=3.0)
        s.backward()
        assert s.item() == pytest.approx(loss, rel=1e-6, abs=1e-6), mode
        assert logp.grad.tolist() == pytest.approx(grad, rel=1e-5), mode
        assert m["clip_fraction"] == clipped and m["ratio_mean"] == pytest.approx(
            (r + r) / 2 if mode == "decoupled" else math.exp(0.5), rel=1e-6)
        # the mismatch metrics compare pi_T with pi_b in both modes
        assert correction_metrics(m)["rollout_corr/k1"] == pytest.approx(-0.4, rel=1e-5)


def test_decoupled_later_mini_batch_ratio_is_against_the_start_of_the_update():
    """With PPO mini-batches the old log-probs are the trainer's at the start of the update: decoupled centres
    the clip there (r = e^0.3 = 1.35 -> clipped at 1.28 for A > 0) and weights by min(pi_T / pi_b, 2) = e^0.2."""
    old, logp = torch.tensor([-1.0]), torch.tensor([-0.7])
    s, _, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1), rollout_logprobs=old - 0.2,
                        correction=RolloutCorrection(RolloutCorrectionConfig()))
    assert s.item() == pytest.approx(-1.28 * math.exp(0.2), rel=1e-6) and m["clip_fraction"] == 1.0


# ====================================================================== metrics


def test_mismatch_metrics_per_lag_by_hand():
    """Samples 0 and 1 sampled one version back (lag 1), sample 2 two versions back in its first token only (a
    sample's lag is its oldest token's: 2). k1 = mean(-log rho), k3 = mean(rho - 1 - log rho) over response
    tokens, rejected ones included; TIS at 2 truncates sample 0's 2.46; token rejection [0.5, 2] took 2 tokens."""
    log_rho, response = batch()
    lags = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [2, 0, 0, 0]], dtype=torch.float32)
    keep = keep_mask(log_rho, response, [RejectionConfig("token", 0.5, 2.0)])
    corr = RolloutCorrection(RolloutCorrectionConfig())
    m = correction_metrics(corr.apply(-1.0 + log_rho, -1.0 + 0 * log_rho, keep, response - keep, lags).sums)
    lag1 = LOG_RHO[0] + LOG_RHO[1]
    k3 = lambda xs: sum(math.exp(x) - 1 - x for x in xs) / len(xs)  # noqa: E731
    assert m["rollout_corr/lag1/tokens"] == 5 and m["rollout_corr/lag1/samples"] == 2
    assert m["rollout_corr/lag1/k1"] == pytest.approx(-sum(lag1) / 5, rel=1e-6)
    assert m["rollout_corr/lag1/k3"] == pytest.approx(k3(lag1), rel=1e-6)
    assert m["rollout_corr/lag2/k1"] == pytest.approx(-sum(LOG_RHO[2]) / 4, rel=1e-6)
    assert m["rollout_corr/k3"] == pytest.approx(k3(lag1 + LOG_RHO[2]), rel=1e-6)
    assert (m["rollout_corr/lag1/truncated_tokens"], m["rollout_corr/lag1/truncated_samples"]) == (1 / 5, 1 / 2)
    assert (m["rollout_corr/lag1/rejected_tokens"], m["rollout_corr/lag1/rejected_samples"]) == (1 / 5, 1 / 2)
    assert (m["rollout_corr/lag2/rejected_tokens"], m["rollout_corr/lag2/rejected_samples"]) == (1 / 4, 1.0)
    assert (m["rollout_corr/rejected_tokens"], m["rollout_corr/rejected_samples"]) == (2 / 9, 2 / 3)
    # the IS weight mean is over the kept tokens: sample 0's 2.46 was rejected, not truncated into the mean
    kept_w = [math.exp(0.1), math.exp(-0.2), 1.0, math.exp(0.05), math.exp(0.3), math.exp(0.2), math.exp(0.1)]
    assert m["rollout_corr/weight_mean"] == pytest.approx(sum(kept_w) / 7, rel=1e-6)
    assert "rollout_corr/lag0/k1" not in m


def test_ratio_percentiles_from_the_summed_histogram():
    """1000 tokens, log rho = 0.012 for 960 of them, -0.5 for 20 and 0.7 for 20: p50 is rho = e^0.012 and
    p1 / p99 fall on the outliers, to within their histogram bin (log rho in (10^-2, 10^-1.9] holds 0.012,
    (10^-0.4, 10^-0.3] holds 0.5, (10^-0.2, 10^-0.1] holds 0.7). Split into two halves summed as ranks."""
    x = torch.tensor([0.012] * 960 + [-0.5] * 20 + [0.7] * 20)
    x = x[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    halves = [metric_sums(h, torch.ones_like(h), torch.zeros_like(h), torch.zeros_like(h), torch.ones_like(h))
              for h in (x[:500], x[500:])]
    summed = {k: halves[0].get(k, 0.0) + halves[1].get(k, 0.0) for k in set(halves[0]) | set(halves[1])}
    m = correction_metrics(summed)
    assert 0.01 < math.log(m["rollout_corr/ratio_p50"]) <= 10 ** -1.9
    assert -(10 ** -0.3) <= math.log(m["rollout_corr/ratio_p1"]) <= -(10 ** -0.4)
    assert 10 ** -0.2 < math.log(m["rollout_corr/ratio_p99"]) <= 10 ** -0.1
    assert m["rollout_corr/lag0/tokens"] == 1000 and len(HISTOGRAM_EDGES) == 148
    assert all(k.startswith(COUNTER_PREFIX) for k in summed)


# ====================================================================== config


def test_config_refusals_and_the_former_key():
    with pytest.raises(ConfigError, match=r"grpo.tis_cap was replaced by grpo.rollout_correction.*weight_cap"):
        load_run_config(TINY_YAML, ["grpo.tis_cap=2.0"])
    cases = [
        (["grpo.rollout_correction.mode=bypass"], r"mode=bypass .* set grpo.rollout_correction.weights: none"),
        (["grpo.rollout_correction.weights=geo"], r"weights must be one of token\|sequence\|geometric\|none"),
        (["grpo.rollout_correction.weight_cap=0"], r"weight_cap must be > 0"),
        (["grpo.rollout_correction.reject=[{level: tokens, upper: 2}]"], r"reject\[0\].level must be one of"),
        (["grpo.rollout_correction.reject=[{level: token}]"], r"reject\[0\] rejects nothing"),
        (["grpo.rollout_correction.reject=[{level: token, lower: 2, upper: 1}]"],
         r"reject\[0\]: need 0 <= lower < upper"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_run_config(TINY_YAML, overrides)
    cfg = load_run_config(TINY_YAML, ["grpo.rollout_correction={mode: bypass, weights: none, reject: "
                                      "[{level: geometric, lower: 0.999, upper: 1.002}]}"])
    assert cfg.grpo.rollout_correction.reject == [RejectionConfig("geometric", 0.999, 1.002)]
    assert RolloutCorrectionConfig() == load_run_config(TINY_YAML).grpo.rollout_correction  # the old tis_cap: 2.0


@pytest.mark.slow
def test_real_actor_at_two_data_parallel_ranks_matches_the_hand_formulas():
    """tests/workers/rollout_correction_dp.py: a real Megatron actor, DP = 2, several micro-batches per rank;
    the logged loss and token count of token rejection (token mean and per-sample mean) and of bypass equal
    their hand formulas, two PPO mini-batches train the kept tokens only, a rejection of every token skips the
    optimizer step, and with one rank's every token rejected the logged rollout_corr/* are the hand values over
    both ranks' tokens (they once saw one column of the rejected rank's rows: the logits window started at the
    first token in the loss, and a rejected token is out of it)."""
    from multiproc import run_torchrun

    out = run_torchrun("rollout_correction_dp.py", nproc=2, timeout=300)
    assert "ROLLOUT_CORRECTION_DP_OK" in out
