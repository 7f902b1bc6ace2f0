#!/usr/bin/env python
"""Mismatch metrics of each rollout-correction mode, one step off-policy (rollouts on their own rank).

usage: python bench/bench_rollout_correction.py [--steps 6] [--lr 1e-3] [--modes default,none,...]
                                               [--cache DIR] [--out DIR]

Every run is the real trainer (`megatron-pz train` under the launcher: one training rank, one `hf` rollout
rank, `rollout.max_staleness: 1`) on the tiny config of tests/test_disaggregated.py (RLP on a random-init
Qwen3 of 2 layers, lr 1e-3; ``--lr`` moves the policy further per step, so the lag costs more), the same seed
for every mode. From step 2 on every batch was sampled one weight
version before the one that trains on it (lag 1); the table averages the lag-1 steps of each run:
k1 / k3 (KL(pi_b || pi_T) estimates), the percentiles of rho = pi_T / pi_b, the fractions of tokens truncated
and of tokens / samples rejected, the loss and RLP's reward. The modes change what the update does, so from
step 3 on each run's mismatch is its own.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_pz.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # tests/test_trainer.py TINY + tests/test_disaggregated.py OFF_POLICY
    "model.architecture.vocab_size=1024", "model.architecture.hidden_size=64",
    "model.architecture.intermediate_size=128", "model.architecture.num_hidden_layers=2",
    "model.architecture.head_dim=32", "data.default_vocab_size=1024", "data.default_passage_tokens=64",
    "train.passages_per_step=4", "train.eval_passages=4", "train.eval_max_new_tokens=6",
    "train.max_prompt_tokens=400", "train.tensorboard=false",
    "warm_start.enabled=false", "rollout.engine=hf", "train.keep_last=0", "train.log_samples=0",
    "objective.name=rlp", "objective.rlp_group=2", "objective.rlp_thought_max_tokens=4",
    "rollout.placement=disaggregated", "rollout.ranks=1", "rollout.heartbeat_timeout_s=30",
    "rollout.max_staleness=1",
]
RC = "grpo.rollout_correction="
MODES = {  # name -> grpo.rollout_correction (README "Rollout correction")
    "none": "{weights: none}",
    "default": "{weights: token, weight_cap: 2.0}",
    "sequence": "{weights: sequence, weight_cap: 2.0}",
    "geometric": "{weights: geometric, weight_cap: 2.0}",
    "mis": "{reject: [{level: token, lower: 0.5, upper: 2.0}]}",
    "icepop": "{weights: none, reject: [{level: token, lower: 0.5, upper: 5.0}]}",
    "seq_mask_tis": "{reject: [{level: geometric, lower: 0.999, upper: 1.002}]}",
    "max_token": "{reject: [{level: max_token, lower: 0.5, upper: 2.0}]}",
    "opsm": "{reject: [{level: geometric, lower: 0.9512, negative_advantage_only: true}]}",  # delta 0.05
    "bypass": "{mode: bypass, weights: none}",
}
COLUMNS = [("k1", "rollout_corr/lag1/k1", "{:+.2e}"), ("k3", "rollout_corr/lag1/k3", "{:.2e}"),
           ("rho p1", "rollout_corr/lag1/ratio_p1", "{:.4f}"), ("p50", "rollout_corr/lag1/ratio_p50", "{:.4f}"),
           ("p99", "rollout_corr/lag1/ratio_p99", "{:.4f}"),
           ("trunc tok", "rollout_corr/lag1/truncated_tokens", "{:.3f}"),
           ("rej tok", "rollout_corr/lag1/rejected_tokens", "{:.3f}"),
           ("rej smp", "rollout_corr/lag1/rejected_samples", "{:.3f}"),
           ("loss", "loss", "{:+.4f}"), ("reward", "rlp/reward_mean", "{:+.4f}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, steps: int, lr: float, cache: Path, out: Path) -> list[dict]:
    run_dir = out / f"{name}_lr{lr:g}"
    if not (run_dir / "metrics.jsonl").is_file():
        cmd = [sys.executable, "-m", "megatron_pz.runtime.launcher", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megatron_pz.cli", "train",
               str(ROOT / "examples" / "tiny_cpu.yaml"), *TINY, f"data.default_cache_dir={cache}",
               f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.save_interval={steps}", f"optimizer.lr={lr}",
               RC + MODES[name]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"{name}: exit {result.returncode}\n{(result.stdout + result.stderr)[-4000:]}")
        print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return [r for r in read_metrics(run_dir) if r["phase"] == "rl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_cache")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_rollout_correction")
    args = ap.parse_args()
    names = args.modes.split(",")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; known: {', '.join(MODES)}")
    rows = []
    for name in names:
        records = [r for r in run(name, args.steps, args.lr, args.cache, args.out) if "rollout_corr/lag1/k1" in r]
        means = {key: sum(r.get(key, 0.0) for r in records) / max(len(records), 1) for _, key, _ in COLUMNS}
        rows.append((name, len(records), means))
    print(f"rollout correction at max_staleness 1, lr {args.lr:g}: means over the lag-1 steps (2..{args.steps}) "
          "of each run\n")
    header = ["mode", "steps"] + [c for c, _, _ in COLUMNS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, n, means in rows:
        print("| " + " | ".join([name, str(n)] + [fmt.format(means[key]) for _, key, fmt in COLUMNS]) + " |")


if __name__ == "__main__":
    main()
