"""Rollout throughput on CPU: the Megatron KV-cache engine, the ``hf`` engine and Hugging Face ``generate``.

Same tiny Qwen3-style model on all sides: built in Megatron (fixed seed), exported with
``megatron_to_hf_tensors`` into a ``transformers`` model (identical weights; logits are checked equal
before timing) and synced into the ``hf`` rollout engine's own copy (the sync is timed too). Same
prompts (random token ids, mixed lengths), greedy and temperature-1 sampling, a fixed number of new
tokens per sequence (no EOS) so every side produces the same token count. Prints tokens/s, the
Megatron/HF-generate and hf-engine/Megatron ratios, and the greedy token agreement with Megatron.

Run: ``python bench/bench_rollout.py [--new-tokens 64] [--repeats 3] [--threads 1] [--attention sdpa|megatron]``
(one process); ``--tiny-default`` measures the shape and rollout of ``examples/tiny_cpu.yaml``
(4096 vocab, hidden 128, 4 layers, tied head; ~150-250-token prompts, 16 new tokens, batches of 64).
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
        head_dim=args.hidden // 4, max_position_embeddings=1024, tie_word_embeddings=args.tied,
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


def run_hf_engine(engine, prompts, new_tokens, greedy, seed):
    return run_megatron(engine, prompts, new_tokens, greedy, seed)  # same RolloutEngine interface


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
    parser.add_argument("--prompt-tokens", default="16,48", help="min,max prompt length")
    parser.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    parser.add_argument("--tiny-default", action="store_true",
                        help="examples/tiny_cpu.yaml's model and rollout shape (overrides the size options)")
    args = parser.parse_args()
    if args.tiny_default:
        args.vocab, args.hidden, args.layers, args.tied = 4096, 128, 4, True
        args.new_tokens, args.batch_sizes, args.prompt_tokens = 16, "8,64", "150,250"
    torch.set_num_threads(args.threads)

    from megatron_pz.rollout.hf_engine import HFRolloutEngine
    from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine

    hf_config, model, hf = build(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M params, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; "
          f"{torch.get_num_threads()} threads; {args.new_tokens} new tokens per sequence")
    low, high = map(int, args.prompt_tokens.split(","))
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        lengths = torch.randint(low, high + 1, (batch,), generator=gen).tolist()
        prompts = [torch.randint(1, args.vocab, (n,), generator=gen).tolist() for n in lengths]
        engine = MegatronRolloutEngine([model], _IdTokenizer(), hf_config, max_batch_size=batch, eos_token_ids=[])
        own = HFRolloutEngine(_IdTokenizer(), hf_config, max_batch_size=batch)
        own.eos_ids = set()
        start = time.perf_counter()
        own.update_weights([model])
        sync_s = time.perf_counter() - start
        assert own.stale_weights([model]) == []
        for greedy in (True, False):
            mode = "greedy" if greedy else "sample"
            run_megatron(engine, prompts[:1], 4, greedy, 0)  # warm-up
            run_hf_engine(own, prompts[:1], 4, greedy, 0)
            run_hf(hf, prompts[:1], 4, greedy, 0)
            m_best, e_best, h_best = float("inf"), float("inf"), float("inf")
            for rep in range(args.repeats):
                m_sec, m_tok = run_megatron(engine, prompts, args.new_tokens, greedy, rep)
                e_sec, e_tok = run_hf_engine(own, prompts, args.new_tokens, greedy, rep)
                h_sec, h_tok = run_hf(hf, prompts, args.new_tokens, greedy, rep)
                m_best, e_best, h_best = min(m_best, m_sec), min(e_best, e_sec), min(h_best, h_sec)
            total = batch * args.new_tokens
            agree = lambda other: sum(a == b for x, y in zip(m_tok, other) for a, b in zip(x, y)) / total  # noqa: E731
            rows.append((batch, mode, total / m_best, total / e_best, total / h_best,
                         agree(h_tok) if greedy else None, agree(e_tok), sync_s))
            print(f"  batch {batch:>3} {mode}: megatron {total / m_best:8.1f} tok/s   hf engine {total / e_best:8.1f} "
                  f"tok/s   hf generate {total / h_best:8.1f} tok/s   (hf engine sync {sync_s * 1e3:.0f} ms)", flush=True)

    print()
    print("| batch | mode   | Megatron engine tok/s | hf engine tok/s | HF generate tok/s | hf engine / Megatron "
          "| Megatron / HF generate | greedy tokens equal (generate) | hf engine tokens equal | hf sync ms |")
    print("|------:|--------|----------------------:|----------------:|------------------:|---------------------:"
          "|-----------------------:|-------------------------------:|-----------------------:|-----------:|")
    for batch, mode, m, e, h, agree_h, agree_e, sync_s in rows:
        agree_s = f"{100 * agree_h:.1f}%" if agree_h is not None else "-"
        print(f"| {batch:>5} | {mode:<6} | {m:>21.1f} | {e:>15.1f} | {h:>17.1f} | {e / m:>20.2f} | {m / h:>22.2f} "
              f"| {agree_s:>30} | {100 * agree_e:>21.1f}% | {sync_s * 1e3:>10.0f} |")


if __name__ == "__main__":
    main()
