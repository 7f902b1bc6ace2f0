"""SDPA core attention (local spec) against Megatron's own DotProductAttention, one process.

Two models with the same weights, one per ``model.local_attention``: training logits and every
gradient agree, greedy KV-cache decoding (prefill + one-query steps) gives the same tokens and
log-probs, SDPA really ran in one model and never in the other, and a call it does not cover
(attention dropout while training) goes to Megatron's implementation. Prints SDPA_OK at the end.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ModelConfig, ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.model.sdpa_attention import SdpaDotProductAttention  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402

calls = {"n": 0}
_sdpa = F.scaled_dot_product_attention


def counting_sdpa(*args, **kwargs):
    calls["n"] += 1
    return _sdpa(*args, **kwargs)


F.scaled_dot_product_attention = counting_sdpa


def core_attentions(model):
    return [layer.self_attention.core_attention for layer in model.decoder.layers]


def main():
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
    cfg = tiny_hf_config(layers=2)  # 4 query heads, 2 key/value groups: the GQA path
    fused = build_model(cfg, ModelConfig(local_attention="sdpa"))
    reference = build_model(cfg, ModelConfig(local_attention="megatron"))
    reference.load_state_dict(fused.state_dict())
    assert all(type(c) is SdpaDotProductAttention for c in core_attentions(fused))
    assert not any(isinstance(c, SdpaDotProductAttention) for c in core_attentions(reference))
    sharpen(fused)
    sharpen(reference)

    # 1. training forward and backward: logits and every gradient equal
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3, 37))
    pos = torch.arange(37).unsqueeze(0).expand(3, -1)
    outs = {}
    for name, model in (("sdpa", fused), ("megatron", reference)):
        model.train()
        before = calls["n"]
        logits = model(ids, pos, None)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        used = calls["n"] - before
        assert used == (2 if name == "sdpa" else 0), (name, used)  # one call per layer, none in Megatron's
        outs[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (la, ga), (lb, gb) = outs["sdpa"], outs["megatron"]
    diff = (la - lb).abs().max().item()
    assert diff < 1e-5, diff
    assert ga.keys() == gb.keys()
    worst = max(((ga[n] - gb[n]).abs().max() / gb[n].abs().max().clamp_min(1e-12)).item() for n in ga)
    assert worst < 1e-5, worst
    print(f"training logits max diff {diff:.2e}, largest relative gradient diff {worst:.2e}: ok")

    # 2. greedy KV-cache decoding: same tokens and log-probs
    tok = byte_tokenizer()
    prompts = [tok.encode(t) for t in ["hello world", "ab", "the quick brown fox"]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    before = calls["n"]
    got = MegatronRolloutEngine([fused], tok, cfg, max_batch_size=2).generate(prompts, params)
    assert calls["n"] > before
    ref = MegatronRolloutEngine([reference], tok, cfg, max_batch_size=2).generate(prompts, params)
    for g, r in zip(got, ref):
        assert g[0].token_ids == r[0].token_ids, (g[0].token_ids, r[0].token_ids)
        assert max(abs(a - b) for a, b in zip(g[0].logprobs, r[0].logprobs)) < 1e-5
    print("kv-cache greedy decoding equal: ok")

    # 3. not covered -> Megatron's implementation (here: attention dropout while training)
    for c in core_attentions(fused):
        c.attention_dropout.p = 0.1
    fused.train()
    before = calls["n"]
    fused(ids, pos, None)
    assert calls["n"] == before
    fused.eval()
    before = calls["n"]
    with torch.no_grad():
        evaluated = fused(ids, pos, None)
    assert calls["n"] == before + 2 and (evaluated - la).abs().max().item() < 1e-5
    print("fallback to Megatron's attention where SDPA does not apply: ok")
    print("SDPA_OK")


if __name__ == "__main__":
    main()
