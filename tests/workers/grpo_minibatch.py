"""The PPO schedule of the GRPO update on a real Megatron Actor (one process).

Old log-probs are computed once before the first optimizer step, so with grpo.mini_batches = 2 the
first mini-batch sees ratio 1 exactly (nothing clipped) and the second a live ratio != 1, with the
clip engaging after a large step; grpo.epochs = 2 likewise. Prints GRPO_MINIBATCH_OK at the end.
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


def experiences(loss_agg="token_mean"):
    rng = random.Random(5)
    out = []
    for i in range(8):
        prompt = [rng.randrange(256) for _ in range(6)]
        response = [rng.randrange(256) for _ in range(3 + i % 4)]  # unequal lengths
        out.append(Experience(prompt, response, reward=float(i % 2), group=f"g{i // 2}", role="predictor",
                              advantage=1.0 if i % 2 else -1.0, temperature=0.7, component="x",
                              loss_agg=loss_agg))
    return out


def run(info, hf, grpo: GrpoConfig, loss_agg: str):
    opt = OptimizerConfig(lr=0.05, lr_schedule="constant", clip_grad=0.0, weight_decay=0.0)
    actor = Actor(hf, ModelConfig(), ParallelConfig(), opt, info.device, total_steps=4)
    steps = []
    train_step = actor.train_step

    def recording(batches, loss_fn):  # observe each optimizer step's metrics
        result = train_step(batches, loss_fn)
        steps.append(token_means(result.metrics))
        return result

    actor.train_step = recording
    summed, _, _ = grpo_update(actor, experiences(loss_agg), grpo, make_grpo_loss_fn(grpo), 4096, 0)
    return steps, token_means(summed)


def main():
    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=3))
    hf = load_hf_config(TINY)
    for grpo, agg in [(GrpoConfig(mini_batches=2), "token_mean"), (GrpoConfig(epochs=2), "seq_mean_token_mean")]:
        steps, total = run(info, hf, grpo, agg)
        assert len(steps) == 2, steps
        first, second = steps
        assert abs(first["ratio_mean"] - 1.0) < 1e-6 and first["clip_fraction"] == 0.0, first
        assert abs(second["ratio_mean"] - 1.0) > 1e-3, second
        assert second["clip_fraction"] > 0.0, second
        print(f"{grpo.mini_batches} mini-batches x {grpo.epochs} epochs ({agg}): step 1 ratio "
              f"{first['ratio_mean']:.6f} clip {first['clip_fraction']:.3f}; step 2 ratio "
              f"{second['ratio_mean']:.4f} clip {second['clip_fraction']:.3f} dual {second.get('dual_clip_fraction', 0):.3f}",
              flush=True)
        assert total["train_tokens"] == sum(s["train_tokens"] for s in steps)
    print("GRPO_MINIBATCH_OK", flush=True)


if __name__ == "__main__":
    main()
