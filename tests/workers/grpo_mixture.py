"""An objective mixture's GRPO update on a real Megatron Actor (one process): 2 steps.

Component "pz" (token_mean, lambda 0.75) and component "rlp" (seq_mean_token_mean, lambda 0.25) with
unequal response lengths. On-policy (one mini-batch, no rollout log-probs) the ratio is 1, so every
token's loss is -A and each part's loss is its aggregation of -A, computable by hand. Each step's
mixture loss must equal 0.75 L_pz + 0.25 L_rlp, where L_k is also what an update on part k alone
reports. Prints GRPO_MIXTURE_OK.
"""

import random

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
from megatron_pz.model import load_hf_config
from megatron_pz.rl.types import Experience
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import Actor
from megatron_pz.run_config import GrpoConfig
from megatron_pz.train.update import grpo_update, make_grpo_loss_fn, token_means

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False)
PARTS = {"pz": ("token_mean", 0.75), "rlp": ("seq_mean_token_mean", 0.25)}


def experiences(step: int, only=None):
    rng = random.Random(step)
    out = []
    for i in range(6):
        label = "pz" if i < 4 else "rlp"
        agg, weight = PARTS[label]
        prompt = [rng.randrange(256) for _ in range(5)]
        response = [rng.randrange(256) for _ in range(1 + (i * 3 + step) % 5)]
        out.append(Experience(prompt, response, reward=0.0, group=f"{label}{i // 2}", role=label,
                              advantage=rng.uniform(-1.5, 1.5), temperature=0.7 if label == "rlp" else 1.0,
                              component=label, loss_agg=agg, mix_weight=weight if only is None else 1.0))
    return out if only is None else [e for e in out if e.component == only]


def hand_loss(exps, agg):
    if agg == "token_mean":
        return sum(-e.advantage * len(e.response_ids) for e in exps) / sum(len(e.response_ids) for e in exps)
    return sum(-e.advantage for e in exps) / len(exps)  # mean over samples of the token mean of -A


def main():
    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=3))
    hf = load_hf_config(TINY)
    grpo = GrpoConfig()
    opt = OptimizerConfig(lr=1e-3, lr_schedule="constant")
    actor = Actor(hf, ModelConfig(), ParallelConfig(), opt, info.device, total_steps=2)
    loss_fn = make_grpo_loss_fn(grpo)
    for step in range(2):
        mix = experiences(step)
        parts = {label: hand_loss([e for e in mix if e.component == label], agg) for label, (agg, _) in PARTS.items()}
        expected = sum(PARTS[label][1] * parts[label] for label in PARTS)
        alone = {}
        for label in PARTS:  # the part alone, on the same experiences and weights (ratio 1: weights do not matter)
            summed, _, _ = grpo_update(actor, experiences(step, only=label), GrpoConfig(), loss_fn, 4096, 0)
            alone[label] = token_means(summed)["loss"]
        summed, _, _ = grpo_update(actor, mix, grpo, loss_fn, 4096, 0)
        got = token_means(summed)["loss"]
        print(f"step {step + 1}: L_pz={parts['pz']:.6f} (alone {alone['pz']:.6f}) L_rlp={parts['rlp']:.6f} "
              f"(alone {alone['rlp']:.6f}); mixture {got:.6f} = 0.75 L_pz + 0.25 L_rlp = {expected:.6f}", flush=True)
        for label in PARTS:
            assert abs(alone[label] - parts[label]) < 1e-5, (label, alone[label], parts[label])
        assert abs(got - expected) < 1e-5, (got, expected)
        assert abs(got - (0.75 * alone["pz"] + 0.25 * alone["rlp"])) < 1e-5
        # the aggregations differ on these lengths, so the test can tell them apart
        pz_as_seq = hand_loss([e for e in mix if e.component == "pz"], "seq_mean_token_mean")
        assert abs(pz_as_seq - parts["pz"]) > 1e-3
    print("GRPO_MIXTURE_OK", flush=True)


if __name__ == "__main__":
    main()
