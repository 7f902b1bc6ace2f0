#!/usr/bin/env python
"""Write throughput of a training checkpoint (megatron-core dist_checkpointing, torch_dist, fsync'd).

usage: python bench/bench_checkpoint_save.py [--models tiny,mid] [--saves 3] [--out DIR]

One process (a world of one, gloo, CPU) builds the actor of each model (bf16 weights, the distributed
optimizer's fp32 main params and Adam moments, as on a GPU cluster), then saves it ``--saves`` times
with :func:`megatron_pz.checkpoint.save_checkpoint` (what the trainer calls). Prints per save: bytes on
disk, seconds, bytes/s, and the bytes the plan predicts
(:func:`megatron_pz.memory_plan.checkpoint_time.checkpoint_size`).
``tiny`` is the tiny CPU default's shape; ``mid`` a Qwen3-0.6B-like body with a 32k vocab (0.44B
parameters: ~6.2 GB of checkpoint, ~8 GB of memory while it runs).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": "examples/tiny_cpu.yaml",  # model.architecture of the tiny default
    # Qwen3-0.6B-like body (hidden 1024, 24 layers, GQA 16/8, head_dim 128) with a 32k vocab: 0.44B params
    "mid": dict(model_type="qwen3", vocab_size=32000, hidden_size=1024, intermediate_size=3072,
                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=4096, tie_word_embeddings=False),
}


def architecture(name: str) -> dict:
    spec = MODELS[name]
    if isinstance(spec, dict):
        return spec
    from megatron_pz.run_config import load_run_config

    return dict(load_run_config(REPO / spec).model.architecture)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(name: str, saves: int, out_root: Path) -> list[dict]:
    from megatron_pz.checkpoint import _materialize_optimizer_state, save_checkpoint
    from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.memory_plan import Shapes, layout_of
    from megatron_pz.memory_plan.checkpoint_time import checkpoint_size
    from megatron_pz.model import load_hf_config
    from megatron_pz.runtime import initialize
    from megatron_pz.train.actor import Actor

    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu"))
    hf = load_hf_config(architecture(name))
    model_cfg = ModelConfig(architecture=architecture(name), params_dtype="bfloat16")
    actor = Actor(hf, model_cfg, ParallelConfig(), OptimizerConfig(use_distributed_optimizer=True), info.device,
                  total_steps=10, max_sequence_length=256)
    _materialize_optimizer_state(actor.optimizer)  # Adam's moments exist after a first step
    predicted = checkpoint_size(Shapes.from_hf(hf), layout_of(ParallelConfig(), 1), "local", False, 2, True,
                                with_teacher=False, ranks_per_node=1)
    rows = []
    root = out_root / name
    for i in range(saves):
        start = time.perf_counter()
        path = save_checkpoint(root, i + 1, actor.chunks, actor.optimizer, actor.scheduler, hf_config=hf)
        seconds = time.perf_counter() - start
        size = directory_bytes(path)
        rows.append({"model": name, "save": i + 1, "bytes": size, "seconds": seconds, "bytes_per_s": size / seconds,
                     "predicted_bytes": predicted.per_rank})
        shutil.rmtree(path)
    del actor
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--out", default=None, help="where to write (default: a temporary dir)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_ckpt_"))
    print(f"{'model':<6}{'save':>5}{'bytes':>16}{'predicted':>16}{'seconds':>9}{'MB/s':>9}")
    try:
        for name in args.models.split(","):
            for r in bench(name, args.saves, out):
                print(f"{r['model']:<6}{r['save']:>5}{r['bytes']:>16,}{r['predicted_bytes']:>16,}{r['seconds']:>9.2f}"
                      f"{r['bytes_per_s'] / 1e6:>9.1f}", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
