"""GRPO advantages and loss against direct hand computations; split invariance of the token mean."""

import math

import pytest
import torch

from megatron_pz.rl.grpo import group_advantages, grpo_loss
from megatron_pz.rl.rollout_correction import RolloutCorrection, correction_metrics
from megatron_pz.rl.config import RolloutCorrectionConfig


def test_group_advantages_hand_numbers():
    adv = group_advantages([1.0, 0.0, 1.0, 1.0, 0.0, 5.0], ["a", "a", "b", "b", "b", "c"])
    # a: mean 1/2, unbiased std sqrt(1/2); b: mean 2/3, unbiased std sqrt(1/3); c: single sample -> 0
    sa, sb = math.sqrt(0.5), math.sqrt(1 / 3)
    expected = [0.5 / sa, -0.5 / sa, (1 / 3) / sb, (1 / 3) / sb, (-2 / 3) / sb, 0.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)
    centred = group_advantages([1.0, 0.0, 1.0, 1.0, 0.0], ["a", "a", "b", "b", "b"], std_scale=False)
    assert centred.tolist() == pytest.approx([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3])
    assert group_advantages([1.0, 1.0], ["a", "a"]).tolist() == [0.0, 0.0]  # zero std: eps keeps it finite
    with pytest.raises(ValueError, match="2 rewards but 3 group ids"):
        group_advantages([1.0, 0.0], ["a", "a", "b"])


def _toy_batch():
    # 5 responses in 2 groups ("a": rewards 1, 0; "b": rewards 1, 1, 0), lengths 2, 1, 3, 2, 1
    adv_seq = group_advantages([1.0, 0.0, 1.0, 1.0, 0.0], ["a", "a", "b", "b", "b"]).tolist()
    delta = [  # logp - logp_old per token; chosen to hit every branch of the clipped surrogate
        [0.5, -0.1, 0.0],   # A>0: ratio 1.65 clipped at 1.28; ratio 0.90 free
        [-0.5, 0.0, 0.0],   # A<0: ratio 0.61 clipped at 0.8
        [-0.5, 0.2, 0.3],   # A>0: 0.61 free (min picks it), 1.22 free, 1.35 clipped
        [0.0, 0.1, 0.0],    # A>0: free
        [0.4, 0.0, 0.0],    # A<0: ratio 1.49 free (min picks the unclipped, more negative term)
    ]
    lengths = [2, 1, 3, 2, 1]
    old = torch.linspace(-3.0, -0.5, 15).reshape(5, 3)
    new = old + torch.tensor(delta)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(3)] for n in lengths])
    new = torch.where(mask.bool(), new, torch.full_like(new, 7.0))  # padding junk must not matter
    return adv_seq, delta, lengths, old, new, mask


def test_grpo_loss_and_gradient_equal_hand_computation():
    adv_seq, delta, lengths, old, new, mask = _toy_batch()
    logp = new.clone().requires_grad_(True)
    loss_sum, num_tokens, metrics = grpo_loss(logp, old, torch.tensor(adv_seq), mask)
    (loss_sum / num_tokens).backward()

    exp_loss, exp_grad, clipped = 0.0, [[0.0] * 3 for _ in range(5)], 0
    for i, n in enumerate(lengths):
        a = adv_seq[i]
        for t in range(n):
            r = math.exp(delta[i][t])
            unclipped, clipped_term = r * a, min(max(r, 0.8), 1.28) * a
            exp_loss += -min(unclipped, clipped_term)
            if unclipped <= clipped_term:
                exp_grad[i][t] = -r * a  # d(-r a)/d logp
            else:
                clipped += 1
    assert num_tokens.item() == 9
    assert loss_sum.item() == pytest.approx(exp_loss, rel=1e-6)
    assert torch.allclose(logp.grad, torch.tensor(exp_grad) / 9, atol=1e-7)
    assert clipped == 3 and metrics["clip_fraction"] == pytest.approx(3 / 9)
    assert metrics["num_tokens"] == 9


def test_one_advantage_per_sequence_equals_per_token():
    adv_seq, _, _, old, new, mask = _toy_batch()
    per_seq, _, _ = grpo_loss(new, old, torch.tensor(adv_seq), mask)
    per_tok, _, _ = grpo_loss(new, old, torch.tensor(adv_seq)[:, None].expand(5, 3), mask)
    flat, _, _ = grpo_loss(new[mask.bool()], old[mask.bool()],
                           torch.tensor(adv_seq)[:, None].expand(5, 3)[mask.bool()], torch.ones(9))
    assert per_seq.item() == pytest.approx(per_tok.item()) == pytest.approx(flat.item())


def test_split_into_microbatches_gives_same_loss_and_gradient():
    torch.manual_seed(0)
    b, s, v = 6, 7, 11
    logits = torch.randn(b, s, v)
    targets = torch.randint(0, v, (b, s))
    old = torch.log_softmax(torch.randn(b, s, v), -1).gather(-1, targets[..., None]).squeeze(-1)
    lengths = [7, 1, 3, 6, 2, 5]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(s)] for n in lengths])
    adv = torch.randn(b)

    def run(splits):
        w = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(w, -1).gather(-1, targets[..., None]).squeeze(-1)
        parts = [grpo_loss(logp[i:j], old[i:j], adv[i:j], mask[i:j]) for i, j in splits]
        total = sum(p[0] for p in parts) / sum(p[1] for p in parts)  # one global token count
        total.backward()
        per_micro_mean = sum(p[0] / p[1] for p in parts) / len(parts)
        return total.item(), w.grad.clone(), per_micro_mean.item()

    one, g_one, _ = run([(0, 6)])
    split, g_split, naive = run([(0, 2), (2, 3), (3, 6)])
    assert split == pytest.approx(one, rel=1e-6)
    assert torch.allclose(g_split, g_one, atol=1e-7)
    assert abs(naive - one) > 1e-3  # averaging per-micro-batch means would change the loss


def test_truncated_importance_sampling_and_kl_and_metrics():
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    logp = (old + torch.tensor([0.1, -0.1, 0.0, 0.05])).requires_grad_(True)
    rollout = old - torch.tensor([0.3, -0.2, 1.0, 0.0])  # exp(old - rollout): 1.35, 0.82, 2.72 -> 2.0, 1.0
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ref = old - 0.2
    entropy = torch.tensor([1.0, 2.0, 3.0, 100.0])
    # the default rollout correction (the former grpo.tis_cap: 2.0): w = min(exp(old - rollout), 2)
    loss_sum, n, m = grpo_loss(logp, old, adv, mask, rollout_logprobs=rollout,
                               correction=RolloutCorrection(RolloutCorrectionConfig()),
                               ref_logprobs=ref, kl_coef=0.1, entropy=entropy)
    corr = correction_metrics(m)
    d = [0.1, -0.1, 0.0]
    w = [math.exp(0.3), math.exp(-0.2), 2.0]
    expected = 0.0
    for t in range(3):
        r = math.exp(d[t])
        a = adv[t].item()
        pg = -min(r * a, min(max(r, 0.8), 1.28) * a)
        k = (ref[t] - logp[t]).item()
        expected += w[t] * pg + 0.1 * (math.exp(k) - k - 1)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert n.item() == 3
    assert corr["rollout_corr/weight_mean"] == pytest.approx(sum(w) / 3, rel=1e-6)
    assert corr["rollout_corr/truncated_tokens"] == pytest.approx(1 / 3)
    assert m["rollout/logp_diff_mean"] == pytest.approx((0.3 + 0.2 + 1.0) / 3, rel=1e-6)
    assert m["rollout/logp_diff_max"] == pytest.approx(1.0)
    assert m["entropy"] == pytest.approx(2.0)
    assert m["ratio_mean"] == pytest.approx(sum(math.exp(x) for x in d) / 3, rel=1e-6)
    assert m["approx_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3, rel=1e-5)
    # the IS weight is a constant: the gradient is weight x the surrogate's gradient
    loss_sum.backward()
    r0 = math.exp(0.1)
    k0 = (ref[0] - logp[0]).item()
    assert logp.grad[0].item() == pytest.approx(w[0] * (-r0 * 1.0) + 0.1 * (1 - math.exp(k0)), rel=1e-5)
    assert logp.grad[3].item() == 0.0


def test_loss_aggregation_token_mean_vs_sequence_mean_hand_numbers():
    """Unequal lengths 1 and 3, ratio 1 (loss per token = -A): the two aggregations differ.

    token_mean (DAPO; PZ §4.1):          (-(1) * 1 + -(-1) * 3) / 4 = (-1 + 3) / 4 = 0.5
    seq_mean_token_mean (RLP eq. 8):     ((-1) / 1 + (3) / 3) / 2 = (-1 + 1) / 2 = 0.0
    mixture 0.75 x token_mean + 0.25 x seq-mean over the same two samples: 0.375
    """
    from megatron_pz.rl.grpo import aggregation_weights

    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    totals = {"x": (4.0, 2.0)}

    def loss_with(agg, mix=1.0):
        w = aggregation_weights([1, 3], ["x", "x"], {"x": agg}, {"x": mix}, totals, 4.0)
        token_w = torch.tensor(w).unsqueeze(-1).expand(2, 3)
        loss_sum, n, _ = grpo_loss(logp, logp, adv, mask, token_weights=token_w)
        return (loss_sum / n).item(), w

    tm, w_tm = loss_with("token_mean")
    sm, w_sm = loss_with("seq_mean_token_mean")
    assert w_tm == [1.0, 1.0] and tm == pytest.approx(0.5)
    assert w_sm == pytest.approx([4 / (2 * 1), 4 / (2 * 3)]) and sm == pytest.approx(0.0, abs=1e-7)
    # two components over the same samples combine linearly with their weights
    w_mix = [a + b for a, b in zip(aggregation_weights([1, 3], ["x", "x"], {"x": "token_mean"}, {"x": 0.75},
                                                       totals, 4.0),
                                   aggregation_weights([1, 3], ["x", "x"], {"x": "seq_mean_token_mean"},
                                                       {"x": 0.25}, totals, 4.0))]
    loss_sum, n, _ = grpo_loss(logp, logp, adv, mask, token_weights=torch.tensor(w_mix).unsqueeze(-1).expand(2, 3))
    assert (loss_sum / n).item() == pytest.approx(0.75 * 0.5 + 0.25 * 0.0)
    # each objective's paper default
    from megatron_pz.objectives.config import ObjectiveConfig

    assert ObjectiveConfig(name="rlp").resolved_loss_agg() == "seq_mean_token_mean"
    assert ObjectiveConfig(name="pretrainzero").resolved_loss_agg() == "token_mean"
    assert ObjectiveConfig(name="rlp", loss_agg="token_mean").resolved_loss_agg() == "token_mean"


def test_dual_clip_hand_numbers():
    """Dual-clip PPO as verl 0.9.1's compute_policy_loss (clip_ratio_c = 3), by hand.

    tokens (A, ratio): (-1, e^3 = 20.09) -> clipped branch -A*1.28 = 1.28 < unclipped 20.09, so the
    standard loss is 20.09; dual clip bounds it at -c*A = 3.  (-1, 2.0): standard 2.0 < 3, kept.
    (+1, e^3): standard -1.28 (A > 0, dual clip does not act).  (-1, 0.5): clip low: max(0.5, 0.8) = 0.8.
    """
    ratios = torch.tensor([math.exp(3.0), 2.0, math.exp(3.0), 0.5])
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(ratios)
    mask = torch.ones(4)
    plain, _, m0 = grpo_loss(new, old, adv, mask)
    dual, _, m = grpo_loss(new, old, adv, mask, dual_clip=3.0)
    assert plain.item() == pytest.approx(math.exp(3.0) + 2.0 - 1.28 + 0.8, rel=1e-6)
    assert dual.item() == pytest.approx(3.0 + 2.0 - 1.28 + 0.8, rel=1e-6)
    assert m["dual_clip_fraction"] == pytest.approx(0.25)
    # clip branch active: token 3 (A>0, 20.09 > 1.28) and token 4 (A<0, ratio 0.5 raised to 0.8)
    assert m["clip_fraction"] == pytest.approx(0.5) and m0["clip_fraction"] == pytest.approx(0.5)
    # gradient: the dual-clipped token gets none (its loss is the constant 3)
    logp = new.clone().requires_grad_(True)
    grpo_loss(logp, old, adv, mask, dual_clip=3.0)[0].backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 2.0, 0.0, 0.0])


def test_grpo_config_errors_before_work():
    """kl_coef is rejected rather than silently ignored; the PPO schedule knobs are checked."""
    from pathlib import Path

    from megatron_pz.config import ConfigError
    from megatron_pz.run_config import load_run_config

    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
    cfg = load_run_config(tiny)
    assert (cfg.grpo.mini_batches, cfg.grpo.epochs, cfg.grpo.dual_clip, cfg.grpo.kl_coef) == (1, 1, 3.0, 0.0)
    for override, message in (("grpo.kl_coef=0.1", "grpo.kl_coef"), ("grpo.mini_batches=0", "grpo.mini_batches"),
                              ("grpo.dual_clip=0.5", "grpo.dual_clip"), ("objective.loss_agg=mean", "loss_agg"),
                              ("objective.prompt_style=fig6", "prompt_style")):
        with pytest.raises(ConfigError, match=message):
            load_run_config(tiny, [override])


@pytest.mark.slow
def test_ppo_mini_batches_make_the_ratio_live_and_the_clip_engage():
    """grpo.mini_batches=2 / grpo.epochs=2 on a real Megatron actor: step 1 ratio 1, step 2 live and clipped."""
    from multiproc import run_torchrun

    out = run_torchrun("grpo_minibatch.py", nproc=1, timeout=240)
    assert "GRPO_MINIBATCH_OK" in out


@pytest.mark.slow
def test_mixture_update_loss_is_the_weighted_sum_of_its_parts():
    """2 GRPO steps of a 0.75 / 0.25 mixture (token-mean and RLP's per-sample mean) on a real actor."""
    from multiproc import run_torchrun

    out = run_torchrun("grpo_mixture.py", nproc=1, timeout=240)
    assert "GRPO_MIXTURE_OK" in out
