#!/usr/bin/env python
"""Colocated vs rollouts on their own ranks (max_staleness 0 and 1): RL step period on 2 CPU cores.

usage: python bench/bench_async.py [--part a|b|both] [--steps 7] [--ratios 0.5,1,2] [--cache DIR] [--out DIR]

Every run is the real trainer (`megatron-pz train`, RLP on a tiny Qwen3, random init, `hf` engine) under
torchrun; the period of an RL step is the wall time between the logs of steps 3 and N, divided by N - 3
(steps 1-2 warm up, and step 1 of a staleness-1 run cannot overlap anything). Each process is pinned to
one core (`os.sched_setaffinity`): the trainer to core 0, the rollout rank to core 1.

(a) Thoughts of 2 tokens (generation is nearly free) and a fixed latency added to every rollout phase (a
    sleep at its end, on whichever process runs the engine: a stand-in for a GPU engine whose latency does
    not compete with the trainer for the CPU), set to 0.5, 1 and 2 times the update time T that a first
    colocated run measures.
(b) The real `hf` engine (no sleep) on core 1 and the trainer on core 0, against the best synchronous
    setting: colocated on one core with 1 thread, or on both cores with 2 threads.

L (generation on the rollout rank) and T (RLP scoring + update on the trainer) are taken from the s=0 run,
where nothing overlaps; (L + T) / max(L, T) is the most overlapping them can give. Colocated, RLP's scoring
runs inside the rollout phase, so its own rollout/update split differs; only its period is compared.

The machine must be otherwise idle for (b): two 1-thread processes on 2 cores run at near solo speed, but
anything else running steals from one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.architecture.vocab_size=4096", "model.architecture.hidden_size=128",
         "model.architecture.intermediate_size=384", "model.architecture.num_hidden_layers=4"]
WORK = ["objective.name=rlp", "objective.rlp_group=4", "objective.rlp_thought_max_tokens=16",
        "train.passages_per_step=8", "train.max_prompt_tokens=512", "train.eval_passages=2",
        "train.eval_max_new_tokens=2", "warm_start.enabled=false", "rollout.engine=hf", "train.tensorboard=false",
        "train.save_interval=1000", "train.log_samples=0"]
SPLIT = ["rollout.placement=disaggregated", "rollout.ranks=1"]


# ====================================================================== one run (the worker side)


def worker(argv: list[str]) -> int:
    """Runs inside torchrun: pin this process, add the simulated latency, time each RL log, train."""
    latency, cores, argv = float(argv[0]), argv[1], argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    core_sets = [set(map(int, c.split("+"))) for c in cores.split(",")]
    os.sched_setaffinity(0, core_sets[rank % len(core_sets)])
    import torch

    torch.set_num_threads(len(core_sets[rank % len(core_sets)]))
    from megatron_pz.rollout.hf_engine import HFRolloutEngine
    from megatron_pz.train.metrics import MetricsLogger

    if latency > 0:
        finish = HFRolloutEngine.finish_phase

        def slow_finish(self):  # every rollout phase lasts L seconds more, wherever the engine runs
            time.sleep(latency)
            return finish(self)

        HFRolloutEngine.finish_phase = slow_finish
    log = MetricsLogger.log

    def timed_log(self, step, metrics, phase="rl"):
        return log(self, step, {**metrics, "bench/wall_s": time.time()}, phase)

    MetricsLogger.log = timed_log
    from megatron_pz.cli import main

    return main(argv)


# ====================================================================== the bench (the driver side)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, out: Path, cache: Path, steps: int, nproc: int, cores: str, latency: float, extra: list[str],
        threads: int = 1) -> dict:
    run_dir = out / name
    if (run_dir / "metrics.jsonl").is_file():
        (run_dir / "metrics.jsonl").unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--max_restarts=0", __file__, "--worker", str(latency), cores,
           "train", str(ROOT / "examples" / "tiny_cpu.yaml"), *MODEL, *WORK, f"train.steps={steps}",
           f"data.default_cache_dir={cache}", f"train.run_dir={run_dir}", "train.resume=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = {r["step"]: r for r in records if r["phase"] == "rl"}
    first = 3
    period = (rl[steps]["bench/wall_s"] - rl[first]["bench/wall_s"]) / (steps - first)
    steady = [rl[s] for s in range(first + 1, steps + 1)]
    mean = lambda key: sum(r.get(key, 0.0) for r in steady) / len(steady)  # noqa: E731
    return {"period": period, "rollout": mean("time/rollout_s"), "train": mean("time/train_s"),
            "wait": mean("time/wait_rollout_s"), "push": mean("time/push_s"), "gbps": mean("bridge/push_gbps"),
            "push_s": mean("bridge/push_s")}


def part_a(out, cache, steps, ratios) -> list[str]:
    short = ["objective.rlp_thought_max_tokens=2"]
    T = run("a_colocated_T", out, cache, steps, 1, "0", 0.0, short)["train"]
    rows = [f"update time T = {T:.2f} s (colocated, no added latency)", "",
            "| added L / T | colocated | disaggregated s=0 | s=1 | L, T (s=0) | s=1 vs s=0 | ideal (L+T)/max(L,T) | s=1 vs colocated |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ratio in ratios:
        latency = round(ratio * T, 2)
        colo = run(f"a_colocated_{ratio}", out, cache, steps, 1, "0", latency, short)
        s0 = run(f"a_s0_{ratio}", out, cache, steps, 2, "0,1", latency, [*short, *SPLIT])
        s1 = run(f"a_s1_{ratio}", out, cache, steps, 2, "0,1", latency, [*short, *SPLIT, "rollout.max_staleness=1"])
        rows.append(row(f"{ratio:g}", colo, s0, s1))
        print(rows[-1], flush=True)
    return rows


def row(label: str, colo: dict, s0: dict, s1: dict) -> str:
    """L: generation on the rollout rank, T: scoring + update on the trainer, both from the s=0 run (where
    nothing overlaps); the ideal is what overlapping them gives at best."""
    L, T = s0["rollout"], s0["train"]
    return (f"| {label} | {colo['period']:.2f} s | {s0['period']:.2f} s | {s1['period']:.2f} s | {L:.2f}, {T:.2f} s | "
            f"{s0['period'] / s1['period']:.2f}x | {(L + T) / max(L, T):.2f}x | {colo['period'] / s1['period']:.2f}x |")


def part_b(out, cache, steps) -> list[str]:
    one = run("b_colocated_1thread", out, cache, steps, 1, "0", 0.0, [], threads=1)
    two = run("b_colocated_2threads", out, cache, steps, 1, "0+1", 0.0, [], threads=2)
    s0 = run("b_s0", out, cache, steps, 2, "0,1", 0.0, SPLIT)
    s1 = run("b_s1", out, cache, steps, 2, "0,1", 0.0, [*SPLIT, "rollout.max_staleness=1"])
    best = one if one["period"] <= two["period"] else two
    rows = [f"colocated, 1 core, 1 thread: {one['period']:.2f} s per RL step; 2 cores, 2 threads: {two['period']:.2f} s",
            f"weight push (receive + load on the rollout rank): {s1['push_s']:.3f} s, {s1['gbps']:.2f} GB/s", "",
            "| best synchronous | colocated | disaggregated s=0 | s=1 | L, T (s=0) | s=1 vs s=0 | ideal (L+T)/max(L,T) | s=1 vs colocated |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            row("1 thread" if best is one else "2 threads", best, s0, s1)]
    print("\n".join(rows), flush=True)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("a", "b", "both"), default="both")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--ratios", default="0.5,1,2", help="(a): added engine latency L as multiples of the update time T")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_async" / "cache"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_async"))
    args = p.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    if args.part in ("a", "both"):
        tables += ["(a) simulated engine latency L against the real trainer", *part_a(
            out, cache, args.steps, [float(x) for x in args.ratios.split(",")]), ""]
    if args.part in ("b", "both"):
        tables += ["(b) the real hf engine on its own core against the best synchronous thread setting",
                   *part_b(out, cache, args.steps)]
    print("\n".join(tables))
    (out / "table.md").write_text("\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
