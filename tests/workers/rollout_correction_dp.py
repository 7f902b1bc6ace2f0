"""The rollout correction on a real Megatron actor at data-parallel size 2 with several micro-batches per rank
(tests/test_rollout_correction.py runs it under torchrun). Prints ROLLOUT_CORRECTION_DP_OK at the end.

The rollout log-probs are set from the actor's own log-probs at the start of each update minus a chosen offset
per token, so rho_t = pi_T / pi_b = e^offset is known exactly and every loss below is a hand formula of the
offsets and advantages (the update is one step, so the clip's decoupled ratio is 1):

* decoupled, TIS at 2, token rejection [0.5, 3]: the offset-3 tokens (rho = 20) leave; a kept token's loss is
  -A_i min(rho_t, 2); the logged loss is the token mean over the kept tokens of both ranks (token_mean) or the
  mean over samples of their kept-token means (seq_mean_token_mean), and the trained token count is the kept one;
* bypass: the clip sees r_t = pi_theta / pi_b = rho_t (dual clip at 3); every token counts;
* two PPO mini-batches: the rejection is decided once, before the first: both steps train the kept tokens only;
* a rejection of every token on both ranks: the optimizer step is skipped (weights bit-identical, counted);
* every token of one rank rejected, the other rank's kept: the step trains the kept rank's tokens, and the logged
  ``rollout_corr/*`` (tokens, samples, rejected fractions, k1, k3) are the hand values over both ranks' real
  response tokens (the rejected rank's rows are in its micro-batches with no token in the loss; no padding
  micro-batch adds to them).
"""

import math
import random

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
from megatron_pz.model import load_hf_config
from megatron_pz.rl.types import Experience
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import Actor
from megatron_pz.rl.config import RejectionConfig, RolloutCorrectionConfig
from megatron_pz.rl.rollout_correction import correction_metrics
from megatron_pz.run_config import GrpoConfig
from megatron_pz.train.losses import token_logprobs_at_temperature
from megatron_pz.train.update import experiences_to_sequences, grpo_update, make_grpo_loss_fn, token_means

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False)
ADVANTAGES = [1.0, -1.0, 2.0, -0.5, 0.5, -2.0, 1.5, -1.0]
MAX_TOKENS = 16  # rows of 9..12 tokens: one or two per micro-batch, several micro-batches per rank


def offsets(i: int, n: int) -> list[float]:
    """log rho of sample i's n tokens: 3.0 (rho 20: rejected) on its second token when i is odd, -0.4 and 0.9
    (kept, weights 0.67 and 2.0, truncated from 2.46) on its first and last, 0 elsewhere."""
    out = [0.0] * n
    out[0], out[-1] = -0.4, 0.9
    if i % 2:
        out[1] = 3.0
    return out


def one_rank_out(i: int, n: int) -> list[float]:
    """Every token of the odd samples (data-parallel rank 1's share) at rho = 20 (rejected); the even ones as in
    :func:`offsets` (kept)."""
    return [3.0] * n if i % 2 else offsets(i, n)


def experiences(actor, loss_agg: str, offsets_of=offsets) -> list:
    """This rank's share (every other sample) with rollout log-probs = the actor's now - offset."""
    rng = random.Random(7)
    everything = []
    for i, a in enumerate(ADVANTAGES):
        prompt = [rng.randrange(256) for _ in range(6)]
        response = [rng.randrange(256) for _ in range(3 + i % 4)]
        everything.append(Experience(prompt, response, reward=0.0, group=f"g{i}", role="predictor", advantage=a,
                                     temperature=0.7, component="x", loss_agg=loss_agg))
    mine = everything[ps.get_data_parallel_rank()::2]
    batches = actor.micro_batches(experiences_to_sequences(mine), MAX_TOKENS, 0)
    for mb, values in zip(batches, actor.forward_values(batches, token_logprobs_at_temperature)):
        for r, (idx, length) in enumerate(zip(mb.indices, mb.lengths)):
            if idx >= 0:
                e = mine[idx]
                start = values[r, len(e.prompt_ids):length].tolist()
                i = everything.index(e)
                e.rollout_logprobs = [s - o for s, o in zip(start, offsets_of(i, len(e.response_ids)))]
    return mine


def expected(loss_agg: str, mode: str) -> tuple[float, int]:
    """The hand formula over both ranks' samples: (loss, tokens in the loss)."""
    per_sample = []
    for i, a in enumerate(ADVANTAGES):
        terms = []
        for x in offsets(i, 3 + i % 4):
            rho = math.exp(x)
            if mode == "decoupled":
                if 0.5 <= rho <= 3.0:
                    terms.append(-a * min(rho, 2.0))
            else:  # bypass: the clip's ratio is rho itself, no weight, dual clip 3 for A < 0
                loss = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
                terms.append(min(loss, -3.0 * a) if a < 0 else loss)
        per_sample.append(terms)
    tokens = sum(len(t) for t in per_sample)
    if loss_agg == "token_mean":
        return sum(map(sum, per_sample)) / tokens, tokens
    return sum(sum(t) / len(t) for t in per_sample) / len(per_sample), tokens


def main():
    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=3))
    assert ps.get_data_parallel_world_size() == 2
    hf = load_hf_config(TINY)
    opt = OptimizerConfig(lr=0.01, lr_schedule="constant", clip_grad=0.0, weight_decay=0.0)
    actor = Actor(hf, ModelConfig(), ParallelConfig(), opt, info.device, total_steps=8)
    group = ps.get_data_parallel_group()
    mis = RolloutCorrectionConfig(reject=[RejectionConfig("token", 0.5, 3.0)])
    bypass = RolloutCorrectionConfig(mode="bypass", weights="none")
    for loss_agg, correction, mode in [("token_mean", mis, "decoupled"), ("seq_mean_token_mean", mis, "decoupled"),
                                       ("token_mean", bypass, "bypass")]:
        grpo = GrpoConfig(rollout_correction=correction)
        exps = experiences(actor, loss_agg)
        summed, result, batches = grpo_update(actor, exps, grpo, make_grpo_loss_fn(grpo), MAX_TOKENS, 0, group)
        assert len(batches) >= 3, len(batches)  # several micro-batches on this rank
        got = token_means(summed)
        loss, tokens = expected(loss_agg, mode)
        assert got["train_tokens"] == tokens, (loss_agg, mode, got["train_tokens"], tokens)
        assert abs(got["loss"] - loss) < 1e-5 * max(1.0, abs(loss)), (loss_agg, mode, got["loss"], loss)
        if dist.get_rank() == 0:
            print(f"{mode} {loss_agg}: loss {got['loss']:.6f} (hand {loss:.6f}), {tokens} tokens", flush=True)
    # two PPO mini-batches: the rejection decided once before the first, both steps train kept tokens only
    grpo = GrpoConfig(mini_batches=2, rollout_correction=mis)
    summed, _, _ = grpo_update(actor, experiences(actor, "token_mean"), grpo, make_grpo_loss_fn(grpo), MAX_TOKENS, 0,
                               group)
    assert token_means(summed)["train_tokens"] == expected("token_mean", "decoupled")[1]
    # a correction that rejects every token on both ranks: no optimizer step at all (an Adam step on a zero
    # gradient would still move the weights by its moments), counted; weights and LR schedule untouched
    everything_out = GrpoConfig(rollout_correction=RolloutCorrectionConfig(reject=[RejectionConfig("token", 1e6, 2e6)]))
    before = [p.detach().clone() for c in actor.chunks for p in c.parameters()]
    steps_before = actor.scheduler.num_steps
    summed, result, batches = grpo_update(actor, experiences(actor, "token_mean"), everything_out,
                                          make_grpo_loss_fn(everything_out), MAX_TOKENS, 0, group)
    assert summed["skipped_steps"] == 1.0 and batches == [] and result.grad_norm == 0.0, summed
    assert actor.scheduler.num_steps == steps_before
    assert all(torch.equal(a, p) for a, p in zip(before, (p for c in actor.chunks for p in c.parameters())))
    # rank 1 rejects every token, rank 0 none: one optimizer step on rank 0's tokens; the correction's metrics are
    # the hand values over both ranks' real response tokens
    grpo = GrpoConfig(rollout_correction=mis)
    summed, result, _ = grpo_update(actor, experiences(actor, "token_mean", one_rank_out), grpo,
                                    make_grpo_loss_fn(grpo), MAX_TOKENS, 0, group)
    lengths = [3 + i % 4 for i in range(len(ADVANTAGES))]
    xs = [x for i, n in enumerate(lengths) for x in one_rank_out(i, n)]
    odd = sum(n for i, n in enumerate(lengths) if i % 2)
    got, hand = correction_metrics(summed), {
        "tokens": len(xs), "samples": len(lengths), "rejected_tokens": odd / len(xs), "rejected_samples": 0.5,
        "k1": sum(-x for x in xs) / len(xs), "k3": sum(math.exp(x) - 1 - x for x in xs) / len(xs)}
    assert "skipped_steps" not in summed and result.grad_norm > 0
    assert token_means(summed)["train_tokens"] == len(xs) - odd, token_means(summed)
    for name, value in hand.items():
        assert abs(got[f"rollout_corr/{name}"] - value) < 1e-5 * max(1.0, abs(value)), (name, got, hand)
    if dist.get_rank() == 0:
        print(f"one rank rejected whole: rollout_corr {({k: round(got[f'rollout_corr/{k}'], 6) for k in hand})}",
              flush=True)
        print("ROLLOUT_CORRECTION_DP_OK", flush=True)


if __name__ == "__main__":
    main()
