"""``rollout.engine``: vllm (vLLM's CPU build) vs hf vs megatron, each built by the trainer's own factory.

For one model shape, every engine gets the same Megatron actor (random weights, fixed seed), the same
prompts (random token ids, mixed lengths) and the same budget (``--new-tokens`` per sequence, no EOS in
the vocabulary, so every engine produces the same token count), sampling at temperature 1, one request
of ``--batch`` prompts x ``--samples`` samples per call. Per engine:

* time to first rollout: build (vLLM: import, engine start) + first weight sync + first generate call, what
  a run pays before its first RL step;
* tokens/s: the best of ``--repeats`` further generate calls (weights unchanged);
* a weight sync's seconds (what every RL step pays on the engines that hold their own copy).

Shapes: ``--shape tiny`` (examples/tiny_cpu.yaml: 4096 vocab, hidden 128, 4 layers, tied head) and
``--shape 60m`` (a Qwen3 of ~60M parameters: 32000 vocab, hidden 512, 8 layers, 8 heads, 4 KV heads,
head_dim 64). Run: ``OMP_NUM_THREADS=2 python bench/bench_rollout_engines.py --shape tiny`` (vLLM
keeps torch at 1 thread for serving unless OMP_NUM_THREADS is set; the others use torch's count).
Prints one table row per engine. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
}


def word_tokenizer(vocab_size: int):
    """A real ``tokenizers`` tokenizer with one word per id and no EOS (vLLM detokenizes every id it samples)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0")


class _Actor:
    def __init__(self, chunks):
        self.chunks = chunks

    def finish_param_sync(self):
        pass


def measure(name, cfg, model, tok, hf_config, prompts, params, repeats, max_model_len):
    from megatron_pz.rollout.factory import build_rollout_engine
    from megatron_pz.rollout.phase import RolloutPhases

    start = time.perf_counter()
    engine = build_rollout_engine(cfg, [model], tok, hf_config, max_model_len=max_model_len)
    built = time.perf_counter() - start
    phases = RolloutPhases(engine, _Actor([model]))
    with phases.generating() as e:  # first sync + first generation
        e.generate(prompts, params)
    first = time.perf_counter() - start
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        with phases.generating() as e:
            t0 = time.perf_counter()
            out = e.generate(prompts, params)
            best = min(best, time.perf_counter() - t0)
        tokens = sum(len(c.token_ids) for g in out for c in g)
    start = time.perf_counter()
    phases.sync()
    sync = time.perf_counter() - start if engine.owns_weights else 0.0
    if hasattr(engine, "close"):
        engine.close()
    return dict(engine=name, build_s=built, first_s=first, tok_s=tokens / best, tokens=tokens, sync_s=sync)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--engines", default="megatron,hf,vllm")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (a GRPO group)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", default="150,250", help="min,max prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from megatron_pz.config import ParallelConfig, RuntimeConfig
    from megatron_pz.model.provider import build_model, load_hf_config
    from megatron_pz.rollout.base import SamplingParams
    from megatron_pz.rollout.config import RolloutConfig
    from megatron_pz.runtime import initialize

    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=args.seed))
    hf_config = load_hf_config(dict(model_type="qwen3", max_position_embeddings=2048, eos_token_id=None,
                                    bos_token_id=None, pad_token_id=0, **SHAPES[args.shape]))
    model = build_model(hf_config).eval()
    tok = word_tokenizer(hf_config.vocab_size)
    low, high = map(int, args.prompt_tokens.split(","))
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(1, hf_config.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(low, high + 1, (args.batch,), generator=gen)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, n=args.samples, seed=1)
    max_model_len = high + args.new_tokens + 8
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shape {args.shape}: {n_params / 1e6:.1f}M parameters; {args.batch} prompts x {args.samples} samples, "
          f"prompts {low}-{high} tokens, {args.new_tokens} new tokens; torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    rows = []
    for name in args.engines.split(","):
        cfg = RolloutConfig(engine=name, max_batch_size=args.batch * args.samples, seed=1)
        rows.append(measure(name, cfg, model, tok, hf_config, prompts, params, args.repeats, max_model_len))
        print(f"  {name}: {rows[-1]}", flush=True)
    print()
    print("| shape | engine | time to first rollout (s) | of which build (s) | tokens/s | weight sync (s) |")
    print("|-------|--------|--------------------------:|-------------------:|---------:|----------------:|")
    for r in rows:
        print(f"| {args.shape} | {r['engine']} | {r['first_s']:.1f} | {r['build_s']:.1f} | {r['tok_s']:.0f} | "
              f"{r['sync_s']:.3f} |")


if __name__ == "__main__":
    main()
