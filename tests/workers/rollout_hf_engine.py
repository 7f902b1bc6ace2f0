"""Two-rank checks of the ``hf`` rollout engine (its own transformers model, refreshed by weight sync).

DP=2 (each rank alone): before a sync the engine's weights are not the actor's; after one they are
bit for bit (``stale_weights``); a moved actor makes them stale again until the next sync. Greedy and
sampled completions equal the Megatron engine's on the same weights (same row seeds, same sampler),
with stop strings and EOS; a prompt's samples do not depend on its batch-mates or the batch size.
TP=2: only the group leader holds a model; both ranks get identical completions, equal to TP=1's.
Prints ROLLOUT_HF_OK.
"""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import EOS, byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.hf_engine import HFRolloutEngine, check_refresh  # noqa: E402
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402


def key(groups):
    return [[(c.token_ids, c.text, c.finish_reason) for c in g] for g in groups]


def main():
    tok = byte_tokenizer()
    cfg = tiny_hf_config()
    prompts = [tok.encode(t) for t in ["hello world", "ab", "the quick brown fox", "xyz!"]]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=11, stop=["o"])
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, n=1, seed=0)

    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))  # DP=2: every rank is its own group
    model = build_model(cfg)
    sharpen(model)
    model.eval()
    engine = HFRolloutEngine(tok, cfg, max_batch_size=4, seed=3)
    engine.bucket_bytes = 16 * 1024  # the tiny model spans many buckets
    assert engine.model is not None and engine.group.size == 1
    assert engine.stale_weights([model]), "a fresh engine must not already hold the actor's weights"
    engine.update_weights([model])
    assert engine.stale_weights([model]) == [] and engine.syncs == 1
    assert len(engine.last_sync.bucket_bytes) > 3 and max(engine.last_sync.bucket_bytes) <= 16 * 1024 + 4 * cfg.vocab_size * 64

    reference = MegatronRolloutEngine([model], tok, cfg, max_batch_size=4)
    for params in (greedy, sampled):
        mine, theirs = engine.generate(prompts, params), reference.generate(prompts, params)
        assert key(mine) == key(theirs), (params, key(mine), key(theirs))
        for a, b in zip(sum(mine, []), sum(theirs, [])):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    # a stop string the policy does write: a character of a free sample's text (random weights pick which)
    free = engine.generate(prompts, dataclasses.replace(sampled, stop=[]))
    i, j, k = next((i, j, k) for i, g in enumerate(free) for j, c in enumerate(g) for k, ch in enumerate(c.text)
                   if k >= 2 and ch.isprintable() and ch != "\ufffd")
    stop = free[i][j].text[k]
    out = engine.generate(prompts, dataclasses.replace(sampled, stop=[stop]))
    assert out[i][j].finish_reason == "stop" and out[i][j].text == free[i][j].text[:free[i][j].text.index(stop) + 1]
    assert all(c.text.endswith(stop) for g in out for c in g if c.finish_reason == "stop")
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # n samples of one prompt differ
    # a prompt's samples depend on (seed, prompt, sample index) only
    alone = HFRolloutEngine(tok, cfg, max_batch_size=1, seed=3)
    alone.update_weights([model])
    assert key(alone.generate([prompts[2]], dataclasses.replace(sampled, stop=[stop])))[0] == key(out)[2]
    eos_engine = HFRolloutEngine(tok, cfg, max_batch_size=4, seed=3)
    eos_engine.update_weights([model])
    forced = eos_engine.generate(prompts[:1], greedy)[0][0]
    eos_engine.eos_ids = {forced.token_ids[2]}
    cut = eos_engine.generate(prompts[:1], greedy)[0][0]
    assert cut.token_ids == forced.token_ids[:3] and cut.finish_reason == "eos" and EOS not in cut.token_ids[:2]

    # the actor moves: the copy is stale until the next sync
    with torch.no_grad():
        model.decoder.layers[0].mlp.linear_fc1.weight.add_(0.01)
    stale = engine.stale_weights([model])
    assert stale == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"], stale
    engine.update_weights([model])
    assert engine.stale_weights([model]) == []
    tp1 = key(engine.generate(prompts, sampled))
    seen = check_refresh([model], tok, cfg, prompts[0])  # the smoke check tools/gpu_smoke.py runs on CUDA
    assert seen["tokens"] == engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                         seed=0))[0][0].token_ids
    engine.sleep()
    try:
        engine.generate(prompts, sampled)
        raise AssertionError("generate while asleep must fail")
    except RuntimeError as exc:
        assert "asleep" in str(exc)

    initialize(ParallelConfig(tp=2), RuntimeConfig(device="cpu", seed=7))
    sharded = build_model(cfg, parallel=ParallelConfig(tp=2))
    from megatron_pz.convert.weights import load_hf_tensors

    tp_engine = HFRolloutEngine(tok, cfg, max_batch_size=4, seed=3)
    assert tp_engine.group.size == 2 and (tp_engine.model is not None) == (dist.get_rank() == 0)
    # same weights as the TP=1 model: load its export into the TP=2 shards
    source = dict(engine_export(engine))
    load_hf_tensors([sharded], cfg, source.__getitem__)
    tp_engine.update_weights([sharded])
    assert tp_engine.stale_weights([sharded]) == []
    got = key(tp_engine.generate(prompts, sampled))
    everyone = [None, None]
    dist.all_gather_object(everyone, got)
    assert everyone[0] == everyone[1] == tp1, "TP ranks must get identical completions, equal to TP=1"
    print(f"rank {dist.get_rank()}: hf engine OK", flush=True)
    dist.barrier()
    print("ROLLOUT_HF_OK", flush=True)


def engine_export(engine):
    """The weights an hf engine holds (its leader's model), as HF name -> tensor."""
    return {n: t.detach().clone() for n, t in engine.model.state_dict().items()}.items()


if __name__ == "__main__":
    main()
