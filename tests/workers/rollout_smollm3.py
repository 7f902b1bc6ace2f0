"""Two-rank check: the Megatron rollout engine's KV-cache greedy decode of a tiny SmolLM3 equals
transformers' greedy decode by full recompute, at TP=1 (DP=2) and at PP=2.

SmolLM3 skips RoPE on every 4th layer (transformers 5.24 ``no_rope_layers``); Megatron's static KV path
(megatron-core 0.16.1 ``Attention._adjust_key_value_for_inference``) caches keys before RoPE and rotates
them per step, so a NoPE layer must also be skipped there. With 4 layers the NoPE layer is the last
one: on the second stage at PP=2. The same decode with RoPE on every layer must differ (the check has
power). Prints ROLLOUT_SMOLLM3_OK.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import VOCAB, byte_tokenizer  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.convert.weights import load_hf_tensors  # noqa: E402
from megatron_pz.model.provider import build_model, load_hf_config  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402

TOK = byte_tokenizer()
PROMPTS = [TOK.encode(t) for t in ["hello world", "ab", "the quick brown fox", "xyz!"]]
STEPS = 10
CONFIG = dict(model_type="smollm3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, no_rope_layer_interval=4,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_model():
    """Random fp32 transformers SmolLM3 (norms too), logits spread so greedy has clear winners."""
    from transformers import AutoModelForCausalLM

    cfg = load_hf_config(dict(CONFIG))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        model.lm_head.weight.mul_(8.0)
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    return model


def hf_greedy(model, prompt):
    """transformers' greedy continuation and each token's log-prob, by full recompute (no cache)."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            token = int(logits.argmax())
            logprobs.append(torch.log_softmax(logits, -1)[token].item())
            ids.append(token)
    return ids[len(prompt):], logprobs


def megatron_greedy(model, cfg):
    engine = MegatronRolloutEngine([model], TOK, cfg, max_batch_size=3)
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=STEPS, temperature=0.0, n=2))


def compare(name, groups, reference):
    for group, (tokens, logprobs) in zip(groups, reference, strict=True):
        for c in group:
            n = len(c.token_ids) if c.finish_reason == "eos" else STEPS  # cut by the real EOS: a prefix
            assert c.token_ids == tokens[:n], f"{name}: {c.token_ids} != transformers' {tokens[:n]}"
            diff = max(abs(a - b) for a, b in zip(c.logprobs, logprobs[:n]))
            assert diff < 1e-4, f"{name}: log-probs differ from transformers' by {diff}"
    print(f"rank {dist.get_rank()}: {name} KV-cache greedy equals transformers", flush=True)


def main():
    hf = hf_model()
    weights = dict(hf.state_dict())
    reference = [hf_greedy(hf, p) for p in PROMPTS]
    cfg = load_hf_config(dict(CONFIG))

    for name, parallel in (("TP=1", ParallelConfig()), ("PP=2", ParallelConfig(pp=2))):
        initialize(parallel, RuntimeConfig(device="cpu", seed=5))
        model = build_model(cfg, parallel=parallel)
        assert model.config.no_rope_freq == [0, 0, 0, 1]
        assert load_hf_tensors([model], cfg, weights.__getitem__)
        model.eval()
        compare(name, megatron_greedy(model, cfg), reference)
        if name == "PP=2":
            assert len(model.decoder.layers) == 2
        # power: the same decode with RoPE on the NoPE layer drifts from transformers
        kept, model.config.no_rope_freq = model.config.no_rope_freq, None
        drifted = megatron_greedy(model, cfg)
        model.config.no_rope_freq = kept
        off = max(abs(a - b) for group, (_, lps) in zip(drifted, reference) for c in group
                  for a, b in zip(c.logprobs, lps))
        assert off > 1e-3, f"{name}: RoPE on every layer changes the decode's log-probs by only {off}"
        print(f"rank {dist.get_rank()}: {name} with RoPE on the NoPE layer would be off by {off:.3g}", flush=True)
    dist.barrier()
    print("ROLLOUT_SMOLLM3_OK", flush=True)


if __name__ == "__main__":
    main()
