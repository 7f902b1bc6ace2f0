"""A bf16 actor started from a model-only checkpoint (an imported HF model, a warm start) keeps those
weights through its first optimizer step: ``Actor.load_weights`` refreshes the optimizer's fp32 main params.

argv: workdir. Prints BF16_INIT_OK and the largest drift from the loaded weights after one step at a tiny
learning rate; with the plain ``load_checkpoint`` of before, the step wrote the construction-time weights back.
"""

import sys
from pathlib import Path

import torch

CFG = dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def main():
    from megatron_pz.checkpoint import load_checkpoint, save_checkpoint
    from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.convert.weights import unwrap
    from megatron_pz.model.provider import load_hf_config
    from megatron_pz.runtime import initialize
    from megatron_pz.train.actor import Actor
    from megatron_pz.train.batching import MicroBatch

    hf = load_hf_config(dict(CFG))
    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=3))
    params = lambda a: {n: p.detach().float().clone() for n, p in unwrap(a.chunks[0]).named_parameters()}  # noqa

    def step(actor):
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        mb = MicroBatch(ids, torch.arange(8).expand(2, 8), torch.ones(2, 8), {}, [8, 8], [0, 1])

        def loss_fn(mb, logits):
            nll = -torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, mb.input_ids[:, 1:, None])
            return nll.sum(), torch.tensor(nll.numel(), dtype=torch.int), {}

        actor.train_step([mb], loss_fn)

    results = {}
    for fixed in (True, False):
        actor = Actor(hf, ModelConfig(params_dtype="bfloat16"), ParallelConfig(),
                      OptimizerConfig(lr=1e-7, use_distributed_optimizer=True), info.device, total_steps=2)
        built = params(actor)
        with torch.no_grad():  # "imported" weights: far from the construction-time ones
            for p in unwrap(actor.chunks[0]).parameters():
                p.add_(0.5)
        ckpt = Path(sys.argv[1]) / f"imported_{fixed}"
        save_checkpoint(ckpt, 0, actor.chunks, hf_config=hf)
        with torch.no_grad():
            for p in unwrap(actor.chunks[0]).parameters():
                p.sub_(0.5)
        if fixed:
            actor.load_weights(ckpt / "iter_0000000")
        else:
            load_checkpoint(ckpt / "iter_0000000", actor.chunks, restore_rng=False)
        loaded = params(actor)
        step(actor)
        after = params(actor)
        results[fixed] = (max(float((after[n] - loaded[n]).abs().max()) for n in after),
                          max(float((after[n] - built[n]).abs().max()) for n in after))
    drift, _ = results[True]
    stale_drift, back_to_built = results[False]
    print(f"load_weights: largest change in one step {drift:.3g}; plain load_checkpoint: {stale_drift:.3g} "
          f"(distance to the construction-time weights {back_to_built:.3g})")
    assert drift < 0.01, drift  # lr 1e-7: the step leaves the loaded weights (bf16 rounding aside)
    assert stale_drift > 0.4 and back_to_built < 0.01  # the bug this guards against: the step reverts them
    print("BF16_INIT_OK")


if __name__ == "__main__":
    main()
