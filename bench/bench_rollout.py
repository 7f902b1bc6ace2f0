"""Rollout throughput on CPU: the Megatron KV-cache engine vs Hugging Face ``generate``.

Same tiny Qwen3-style model on both sides: built in Megatron (fixed seed), exported with
``megatron_to_hf_tensors`` into a ``transformers`` model (identical weights; logits are checked equal
before timing). Same prompts (random token ids, mixed lengths), batch sizes 1/8/32, greedy and
temperature-1 sampling, a fixed number of new tokens per sequence (no EOS) so both sides produce
the same token count. Prints tokens/s and the Megatron/HF ratio, plus the greedy token agreement.

Run: ``python bench/bench_rollout.py [--new-tokens 64] [--repeats 3] [--threads 1] [--attention sdpa|megatron]`` (one process).
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch


def build(args):
    from transformers import AutoModelForCausalLM

    from megatron_pz.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.convert.weights import megatron_to_hf_tensors
    from megatron_pz.model.provider import build_model, load_hf_config
    from megatron_pz.rollout.weight_sync import HFModelTarget
    from megatron_pz.runtime import initialize

    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=args.seed))
    hf_config = load_hf_config(dict(
        model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden // 4, max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_id=None, bos_token_id=None, pad_token_id=0,
    ))
    model = build_model(hf_config, ModelConfig(local_attention=args.attention)).eval()
    hf = AutoModelForCausalLM.from_config(hf_config).eval()
    target = HFModelTarget(hf)
    target.load_weights(megatron_to_hf_tensors([model], hf_config))
    assert not target.missing(), target.missing()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.randint(0, args.vocab, (1, 24))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids, torch.arange(24).unsqueeze(0), None)).abs().max().item()
    assert diff < 1e-4, f"HF and Megatron logits differ by {diff}"
    return hf_config, model, hf


class _IdTokenizer:
    """Token ids are enough here (no stop strings): text is the id list."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def run_megatron(engine, prompts, new_tokens, greedy, seed):
    from megatron_pz.rollout.base import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, seed=seed)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = [g[0].token_ids for g in out]
    assert all(len(t) == new_tokens for t in tokens)
    return seconds, tokens


def run_hf(hf, prompts, new_tokens, greedy, seed):
    longest = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, p in enumerate(prompts):  # HF batches by left padding with an attention mask
        input_ids[r, longest - len(p):] = torch.tensor(p)
        mask[r, longest - len(p):] = 1
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=not greedy,
                          temperature=None if greedy else 1.0, top_p=None, top_k=None)
    seconds = time.perf_counter() - start
    tokens = out[:, longest:].tolist()
    assert all(len(t) == new_tokens for t in tokens)
    return seconds, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (best is kept)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "megatron"),
                        help="model.local_attention of the Megatron model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (1 avoids OpenMP oversubscription on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine

    hf_config, model, hf = build(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M params, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; "
          f"{torch.get_num_threads()} threads; {args.new_tokens} new tokens per sequence")
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        lengths = torch.randint(16, 49, (batch,), generator=gen).tolist()
        prompts = [torch.randint(1, args.vocab, (n,), generator=gen).tolist() for n in lengths]
        engine = MegatronRolloutEngine([model], _IdTokenizer(), hf_config, max_batch_size=batch, eos_token_ids=[])
        for greedy in (True, False):
            mode = "greedy" if greedy else "sample"
            run_megatron(engine, prompts[:1], 4, greedy, 0)  # warm-up
            run_hf(hf, prompts[:1], 4, greedy, 0)
            m_best, h_best = float("inf"), float("inf")
            for rep in range(args.repeats):
                m_sec, m_tok = run_megatron(engine, prompts, args.new_tokens, greedy, rep)
                h_sec, h_tok = run_hf(hf, prompts, args.new_tokens, greedy, rep)
                m_best, h_best = min(m_best, m_sec), min(h_best, h_sec)
            total = batch * args.new_tokens
            agree = (sum(a == b for x, y in zip(m_tok, h_tok) for a, b in zip(x, y)) / total) if greedy else None
            rows.append((batch, mode, total / m_best, total / h_best, agree))
            print(f"  batch {batch:>3} {mode}: megatron {total / m_best:8.1f} tok/s   hf {total / h_best:8.1f} tok/s",
                  flush=True)

    print()
    print("| batch | mode   | Megatron engine tok/s | HF generate tok/s | ratio (Megatron/HF) | greedy tokens equal |")
    print("|------:|--------|----------------------:|------------------:|--------------------:|--------------------:|")
    for batch, mode, m, h, agree in rows:
        agree_s = f"{100 * agree:.1f}%" if agree is not None else "-"
        print(f"| {batch:>5} | {mode:<6} | {m:>21.1f} | {h:>17.1f} | {m / h:>19.2f} | {agree_s:>19} |")


if __name__ == "__main__":
    main()
