"""Two-rank checks: TP=2 and PP=2 rollouts equal TP=1 rollouts, EP=2 (MoE) equals EP=1, same weights.

Weights are made once at TP=1 (fixed seed), exported to full HF-named tensors with
``megatron_to_hf_tensors`` and loaded into each other layout with ``load_hf_tensors`` (in memory;
``dist_checkpointing.save`` needs psutil, which is not a dependency). Greedy and seeded sampling (plain, top-k, top-p) must give the same tokens,
and log-probs must agree. The EP=2 run gives the two ranks different numbers of batches and prompt
lengths, which exercises the lockstep of expert-parallel peers; then rank 1 makes one ``generate`` call
fewer than rank 0 in a phase and ``finish_phase`` keeps it in rank 0's all-to-alls. Prints ROLLOUT_PARALLEL_OK.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402

TOK = byte_tokenizer()
PROMPTS = [TOK.encode(t) for t in ["hello world", "ab", "the quick brown fox", "xyz!"]]
PARAMS = {
    "greedy": SamplingParams(max_new_tokens=12, temperature=0.0, n=2),
    "sample": SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=3),
    "top_k": SamplingParams(max_new_tokens=12, temperature=0.8, top_k=7, n=2, seed=4),
    "top_p": SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.7, n=2, seed=5),
}


def setup(tp=1, pp=1, ep=1):
    """Re-initialise Megatron's groups for a layout; returns a builder of models for it."""
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep)
    initialize(parallel, RuntimeConfig(device="cpu", seed=21))
    return lambda cfg: build_model(cfg, parallel=parallel)


def rollouts(model, cfg, prompts):
    engine = MegatronRolloutEngine([model], TOK, cfg, max_batch_size=3)
    return {name: engine.generate(prompts, p) for name, p in PARAMS.items()}


def compare(name, got, ref, tol=2e-4, reference="TP=1"):
    for key in PARAMS:
        for g_group, r_group in zip(got[key], ref[key], strict=True):
            for g, r in zip(g_group, r_group, strict=True):
                assert g.token_ids == r.token_ids, f"{name}/{key}: {g.token_ids} != {r.token_ids}"
                assert g.finish_reason == r.finish_reason and g.text == r.text
                diff = max((abs(a - b) for a, b in zip(g.logprobs, r.logprobs)), default=0.0)
                assert diff < tol, f"{name}/{key}: logprob diff {diff}"
    print(f"rank {dist.get_rank()}: {name} equals the {reference} reference", flush=True)


def save(model, cfg):
    from megatron_pz.convert.weights import megatron_to_hf_tensors

    return {name: t.detach().clone() for name, t in megatron_to_hf_tensors([model], cfg)}


def load(model, cfg, tensors):
    from megatron_pz.convert.weights import load_hf_tensors

    used = load_hf_tensors([model], cfg, tensors.__getitem__)
    assert used, "nothing loaded"


def from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main():
    dense = tiny_hf_config()

    build = setup()  # TP=1 PP=1 DP=2: both ranks build the same weights from the same seed
    model = build(dense)
    sharpen(model)
    weights = save(model, dense)
    ref = from_rank0(rollouts(model, dense, PROMPTS))  # DP rank 0's sampling stream

    build = setup(tp=2)
    model = build(dense)
    load(model, dense, weights)
    assert model.output_layer.weight.shape[0] == dense.vocab_size // 2
    compare("TP=2", rollouts(model, dense, PROMPTS), ref)

    build = setup(pp=2)
    model = build(dense)
    assert len(model.decoder.layers) == 1
    load(model, dense, weights)
    compare("PP=2", rollouts(model, dense, PROMPTS), ref)

    # MoE: EP=1 reference, then EP=2. Rank 0 gets 4 prompts (2 batches), rank 1 one short prompt.
    moe = tiny_hf_config(moe=True)
    mine = PROMPTS if dist.get_rank() == 0 else [PROMPTS[1]]
    build = setup(ep=1)
    model = build(moe)
    sharpen(model)
    moe_weights = save(model, moe)
    moe_ref = rollouts(model, moe, mine)
    greedy_ref = MegatronRolloutEngine([model], TOK, moe, max_batch_size=3).generate(PROMPTS, PARAMS["greedy"])
    build = setup(ep=2)
    model = build(moe)
    load(model, moe, moe_weights)
    assert len(model.decoder.layers[0].mlp.experts.local_experts) == 2
    compare("EP=2 (MoE)", rollouts(model, moe, mine), moe_ref, reference="EP=1")
    # a phase where rank 1's objective has nothing more to ask: finish_phase keeps it in rank 0's all-to-alls
    engine = MegatronRolloutEngine([model], TOK, moe, max_batch_size=3)
    first = engine.generate(mine, PARAMS["greedy"])
    if dist.get_rank() == 0:
        extra = engine.generate(PROMPTS, PARAMS["greedy"])
        assert [[c.token_ids for c in g] for g in extra] == [[c.token_ids for c in g] for g in greedy_ref]
    engine.finish_phase()
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in moe_ref["greedy"]]
    print(f"rank {dist.get_rank()}: EP=2 phase with uneven generate calls finished", flush=True)
    dist.barrier()
    print("ROLLOUT_PARALLEL_OK", flush=True)


if __name__ == "__main__":
    main()
