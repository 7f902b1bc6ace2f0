#!/usr/bin/env python
"""Staleness beyond one step (issue 30 items 5-6): the mismatch as it grows, and whether learning suffers.

usage: python bench/bench_staleness.py --part A|B|C [--steps N] [--out DIR] [--cache DIR] [--work DIR]
                                      [--runs name,name,...]

Every run is the real trainer (`megatron-pz train` under the launcher: one training rank, one rollout rank
of its own, `rollout.placement: disaggregated`). A finished run (its metrics and final evaluation present in
``--out``) is read back, not run again, so the tables can be printed again after the fact.

(A) Mismatch as staleness grows: the tiny RLP config of bench/bench_rollout_correction.py (`hf` rollout
    engine, lr 1e-2 where one step of lag is visible) with 16-token thoughts, s = `rollout.max_staleness` in
    {1, 2, 4} (s >= 2 with `rollout.partial_rollout_tokens: 6`, so every thought spans windows and weights
    change under samples in flight) x correction in {default, none, mis, seq_mask_tis, geometric}, same seed.
    Per run and lag L: `rollout_corr/lag{L}/...` averaged over the steps where lag L occurs.
(B) Learning not hurt, tiny default: examples/tiny_cpu.yaml's default job (PretrainZero, warm start, held-out
    evaluation before and after) placed disaggregated: s=1 vs s=4 (+ partial rollouts) with the default
    correction, s=4 without correction (`weights: none`), and s=4 without partial rollouts (`s4_whole`: whole
    samples, nothing deferred or dropped). The s=4 runs find the s=1 run's warm start in
    their folder and reuse it (the same weights, so the "before" evaluations are identical, checked).
(C) Learning not hurt, SmolLM2-135M-Instruct RLP (examples/smollm2_135m_cpu.yaml, the README's RLP setting:
    8 passages x 4 thoughts of 32 tokens, lr 3e-5; held-out 200 positions x 2 thoughts, 200 NLL passages) on
    one `hf` rollout rank, s=1 vs s=4 (+ partial rollouts of 12 tokens), the same steps. ``--work``: the folder
    bench/bench_learning.py builds (hf/, wiki/, megatron/; default ``$SMOLLM2_WORK``).

Reward curves: the mean over the last K steps with a 95 % t-interval over those steps (steps are not
independent: the interval is a rough guide). Held-out figures: the run's own evaluation records
(``eval_samples.jsonl``), paired bootstrap over the same items (megatron_pz/eval/intervals.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_rollout_correction import MODES, RC, TINY, free_port
from megatron_pz.train.metrics import read_live_jsonl, read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["-m", "megatron_pz.runtime.launcher", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1"]
SLOW_MACHINE = ["rollout.heartbeat_timeout_s=300", "rollout.bridge_timeout_s=3600"]  # a shared 2-core machine

# (A): the tiny RLP config with 16-token thoughts; s >= 2 decodes 6 tokens per window (a thought spans 3)
A_BASE = [o for o in TINY if not o.startswith(("rollout.max_staleness=", "objective.rlp_thought_max_tokens=",
                                                "rollout.heartbeat_timeout_s="))]
A_BASE += ["objective.rlp_thought_max_tokens=16", "optimizer.lr=1e-2", *SLOW_MACHINE]
A_STALENESS = {1: ["rollout.max_staleness=1"],
               2: ["rollout.max_staleness=2", "rollout.partial_rollout_tokens=6"],
               4: ["rollout.max_staleness=4", "rollout.partial_rollout_tokens=6"]}
A_MODES = ["default", "none", "mis", "seq_mask_tis", "geometric"]
A_LAG_COLUMNS = [("k1", "k1", "{:+.2e}"), ("k3", "k3", "{:.2e}"), ("rho p1", "ratio_p1", "{:.3f}"),
                 ("p99", "ratio_p99", "{:.3f}"), ("trunc tok", "truncated_tokens", "{:.3f}"),
                 ("rej tok", "rejected_tokens", "{:.3f}"), ("rej smp", "rejected_samples", "{:.3f}"),
                 ("tokens", "tokens", "{:.0f}")]
UNITS = ["rollout/deferred_units", "rollout/late_units"]
STALE = ["stale/samples_over", "stale/dropped_samples", "stale/masked_tokens", "stale/offpolicy_prefix_tokens"]

# (B): the tiny default job, disaggregated
B_BASE = ["rollout.placement=disaggregated", "rollout.ranks=1", *SLOW_MACHINE]
B_RUNS = {"s1": ["rollout.max_staleness=1"],
          "s4": ["rollout.max_staleness=4", "rollout.partial_rollout_tokens=6"],
          "s4_none": ["rollout.max_staleness=4", "rollout.partial_rollout_tokens=6", RC + MODES["none"]],
          "s4_whole": ["rollout.max_staleness=4"]}  # no partial rollouts: what the deferral and its drops cost

# (C): SmolLM2-135M-Instruct RLP (README "Does it learn?", run 4), disaggregated on one hf rollout rank
C_CONFIG = ROOT / "examples" / "smollm2_135m_cpu.yaml"
C_RLP = ["objective.name=rlp", "objective.rlp_group=4", "objective.rlp_thought_max_tokens=32",
         "train.passages_per_step=8", "optimizer.lr=3e-5", "train.eval_passages=0"]
# the held-out figures: RLP's information gain and the NLL run with colocated rollouts only (the trainer refuses
# them disaggregated), so they come from `megatron-pz eval --run-config` of the exported folders (the HF side)
C_EVAL = ["eval.nll_passages=200", "eval.info_gain_positions=200", "eval.info_gain_thoughts=2"]
C_BASE = [*C_RLP, "eval.nll_passages=0", "eval.info_gain_positions=0", "rollout.placement=disaggregated",
          "rollout.ranks=1", "rollout.engine=hf", *SLOW_MACHINE]
C_RUNS = {"s1": ["rollout.max_staleness=1"],
          "s4": ["rollout.max_staleness=4", "rollout.partial_rollout_tokens=12"]}


class RunFailed(RuntimeError):
    """A run exited non-zero (its log's tail in the message)."""


def finished(run_dir: Path, steps: int) -> bool:
    """The run's metrics reach its last step and its final evaluation."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    records = read_live_jsonl(path)
    return any(r.get("phase") == "rl" and r.get("step") == steps for r in records)


def launch(run_dir: Path, config: Path, overrides: list[str], steps: int, env_extra: dict, timeout: float) -> float:
    """One `megatron-pz train` under the launcher (1 trainer + 1 rollout rank); returns its wall seconds (stored
    in run_dir/wall.json, so a finished run read back reports the time it took)."""
    wall = run_dir / "wall.json"
    if finished(run_dir, steps) and wall.is_file():
        return json.loads(wall.read_text())["wall_s"]
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *LAUNCH, f"--master_port={free_port()}", "-m", "megatron_pz.cli", "train", str(config),
           *overrides, f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.save_interval={steps}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", **env_extra,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    load = os.getloadavg()
    print(f"  {run_dir.name}: started {time.strftime('%H:%M:%S')}, load {load[0]:.1f}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]
        raise RunFailed(f"{run_dir.name}: exit {result.returncode}\n{tail}")
    wall.write_text(json.dumps({"wall_s": seconds, "load_before": load, "load_after": os.getloadavg(),
                                "command": cmd}))
    print(f"  {run_dir.name}: {seconds:.0f} s, load after {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return seconds


def rl_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("phase") == "rl"]


def mean_interval(values: list[float]) -> str:
    """mean [95 % t-interval over the values]."""
    from scipy import stats

    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return f"{m:+.3f} (n=1)"
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"


def held_out(run_dir: Path) -> tuple[list[dict], list[dict], int, int]:
    """The run's first and last held-out evaluation records (eval_samples.jsonl)."""
    from megatron_pz.eval.folder import read_records

    samples = run_dir / "eval_samples.jsonl"
    steps = sorted({r["step"] for r in read_live_jsonl(samples)})
    return read_records(f"{samples}@{steps[0]}"), read_records(f"{samples}@{steps[-1]}"), steps[0], steps[-1]


def comparisons(runs: dict[str, Path], reference: str) -> list[str]:
    """Before/after of each run, and each run's after against the reference run's after (same items)."""
    from megatron_pz.eval.folder import format_comparison

    out = []
    evals = {name: held_out(d) for name, d in runs.items()}
    for name, (before, after, first, last) in evals.items():
        out.append(f"\n{name}: held-out, step {first} (before) vs step {last} (after)\n"
                   + format_comparison(before, after))
    ref_before, ref_after = evals[reference][0], evals[reference][1]
    for name, (before, after, _, _) in evals.items():
        if name == reference:
            continue
        same = [b == r for b, r in zip(before, ref_before)]
        out.append(f"\nafter RL: {reference} ('before' column) vs {name} ('after' column), same items "
                   f"(their 'before' evaluations identical: {all(same) and len(before) == len(ref_before)})\n"
                   + format_comparison(ref_after, after))
    return out


# ---------------------------------------------------------------------------------------------------- (A)

def part_a(args) -> None:
    modes = args.runs.split(",") if args.runs else A_MODES
    print(f"(A) mismatch as staleness grows: tiny RLP, hf engine, lr 1e-2, 16-token thoughts, {args.steps} steps; "
          "per lag L, means over the steps where lag L occurs (rollout_corr/lag{L}/...)\n")
    header = ["s", "mode", "lag", "steps"] + [c for c, _, _ in A_LAG_COLUMNS]
    lag_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    run_header = ["s", "mode", "wall s", "all-rejected steps", "k3 all", "max staleness",
                  *[k.split("/")[1] for k in STALE], *[k.split("/")[1] for k in UNITS], "windows/step",
                  "reward mean", "reward last 3"]
    run_lines = ["| " + " | ".join(run_header) + " |", "|" + "---|" * len(run_header)]
    for s, extra in A_STALENESS.items():
        for mode in modes:
            run_dir = args.out / f"A_s{s}_{mode}"
            try:
                wall = launch(run_dir, ROOT / "examples" / "tiny_cpu.yaml",
                              [*A_BASE, f"data.default_cache_dir={args.cache}", *extra, RC + MODES[mode]], args.steps,
                              {"OMP_NUM_THREADS": "1"}, timeout=3600)
            except (RunFailed, subprocess.TimeoutExpired) as err:  # the other runs still tell something
                print(f"FAILED {err}", file=sys.stderr, flush=True)
                run_lines.append(f"| {s} | {mode} | failed: {str(err).splitlines()[0]} |")
                continue
            everything = rl_records(run_dir)
            # a step whose every token was rejected runs no optimizer step (update/skipped_steps) and has no
            # token to train: left out of the means, counted
            rl = [r for r in everything if r.get("train_tokens", 1.0) > 0]
            all_rejected = len(everything) - len(rl)
            lags = sorted({int(k.split("/")[1][3:]) for r in rl for k in r if k.startswith("rollout_corr/lag")})
            for lag in lags:
                recs = [r for r in rl if f"rollout_corr/lag{lag}/k1" in r]
                cells = [fmt.format(statistics.fmean(r.get(f"rollout_corr/lag{lag}/{key}", 0.0) for r in recs))
                         for _, key, fmt in A_LAG_COLUMNS]
                lag_lines.append("| " + " | ".join([str(s), mode, str(lag), str(len(recs)), *cells]) + " |")
            rewards = [r["rlp/reward_mean"] for r in everything if "rlp/reward_mean" in r]
            stale = [f"{sum(r.get(k, 0.0) for r in everything):.0f}" for k in STALE]
            units = [f"{sum(r.get(k, 0.0) for r in everything):.0f}" for k in UNITS]
            run_lines.append("| " + " | ".join([
                str(s), mode, f"{wall:.0f}", str(all_rejected),
                f"{statistics.fmean(r['rollout_corr/k3'] for r in rl):.2e}" if rl else "-",
                f"{max(r.get('stale/max_staleness', 0.0) for r in everything):.0f}", *stale, *units,
                f"{statistics.fmean(r.get('rollout/windows', 0.0) for r in everything):.1f}",
                f"{statistics.fmean(rewards):+.4f}", f"{statistics.fmean(rewards[-3:]):+.4f}"]) + " |")
    print("\n".join(lag_lines))
    print("\n(steps whose every token was rejected are left out of the lag means: no optimizer step ran, "
          "update/skipped_steps counts them)")
    print("\nper run: stale/* and deferred / late units summed over steps, rollout_corr/k3 over all tokens (mean over "
          "steps), RLP reward (mean over all steps, and over the last 3)\n")
    print("\n".join(run_lines))


# ---------------------------------------------------------------------------------------------------- (B)

def curve_table(runs: dict[str, Path], keys: list[str], last: int) -> list[str]:
    lines = [f"| run | wall s | RL step s (mean) | " + " | ".join(f"{k} (last {last})" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for name, run_dir in runs.items():
        rl = rl_records(run_dir)
        wall = json.loads((run_dir / "wall.json").read_text())["wall_s"]
        cells = [mean_interval([r[k] for r in rl[-last:] if k in r]) if any(k in r for r in rl) else "-" for k in keys]
        step_s = statistics.fmean(r["time/step_s"] for r in rl if "time/step_s" in r)
        lines.append(f"| {name} | {wall:.0f} | {step_s:.1f} | " + " | ".join(cells) + " |")
    return lines


def block_table(runs: dict[str, Path], key: str, block: int) -> list[str]:
    """The curve of ``key``: its mean over consecutive blocks of ``block`` steps (steps missing it skipped)."""
    curves = {name: rl_records(d) for name, d in runs.items()}
    last = max(r["step"] for rl in curves.values() for r in rl)
    edges = list(range(1, last + 1, block))
    lines = [f"| {key} | " + " | ".join(f"steps {a}-{min(a + block - 1, last)}" for a in edges) + " |",
             "|" + "---|" * (len(edges) + 1)]
    for name, rl in curves.items():
        cells = []
        for a in edges:
            vals = [r[key] for r in rl if a <= r["step"] < a + block and key in r]
            cells.append(f"{statistics.fmean(vals):+.3f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def stale_table(runs: dict[str, Path]) -> list[str]:
    lines = ["| run | lag-0 k3 | lag-1 k3 | lag-2 k3 | lag-3 k3 | lag-4 k3 | max staleness | " +
             " | ".join(k.split("/")[1] for k in STALE) + " | windows/step |", "|" + "---|" * (8 + len(STALE))]
    for name, run_dir in runs.items():
        rl = rl_records(run_dir)
        k3 = []
        for lag in (0, 1, 2, 3, 4):  # (steps where the lag occurs)
            vals = [r[f"rollout_corr/lag{lag}/k3"] for r in rl if f"rollout_corr/lag{lag}/k3" in r]
            k3.append(f"{statistics.fmean(vals):.2e} ({len(vals)})" if vals else "-")
        stale = [f"{sum(r.get(k, 0.0) for r in rl):.0f}" for k in STALE]
        windows = [r["rollout/windows"] for r in rl if "rollout/windows" in r]
        lines.append(f"| {name} | " + " | ".join(k3) + f" | {max(r.get('stale/max_staleness', 0) for r in rl):.0f} | "
                     + " | ".join(stale) + f" | {statistics.fmean(windows) if windows else 0:.1f} |")
    return lines


def part_b(args) -> None:
    names = args.runs.split(",") if args.runs else list(B_RUNS)
    base = [*B_BASE, f"data.default_cache_dir={args.cache}"]
    runs = {}
    for name in names:
        run_dir = args.out / f"B_{name}"
        if name != "s1" and not (run_dir / "warm_start").is_dir():  # the run reuses a warm start in its folder
            shutil.copytree(args.out / "B_s1" / "warm_start", run_dir / "warm_start")
        launch(run_dir, ROOT / "examples" / "tiny_cpu.yaml", [*base, *B_RUNS[name]], args.steps,
               {"OMP_NUM_THREADS": "1"}, timeout=3600)
        runs[name] = run_dir
    print(f"(B) tiny default (PretrainZero), disaggregated 1 + 1 ranks, hf engine, {args.steps} RL steps, same seed\n")
    print("\n".join(curve_table(runs, ["predictor/reward_mean", "generator/reward_mean", "predictor/accuracy"],
                                min(10, args.steps))))
    for key in ("predictor/reward_mean", "generator/reward_mean", "generator/valid_mask_rate"):
        print()
        print("\n".join(block_table(runs, key, 5)))
    print()
    print("\n".join(stale_table(runs)))
    print("\n".join(comparisons(runs, "s1")))


# ---------------------------------------------------------------------------------------------------- (C)

def part_c(args) -> None:
    work = args.work.resolve()
    missing = [d for d in ("hf", "wiki", "megatron") if not (work / d).is_dir()]
    if missing:
        raise SystemExit(f"--work {work}: missing {missing}; build them with bench/bench_learning.py (step 1)")
    os.environ["SMOLLM2_WORK"] = str(work)  # the config's paths, for the runs and the evaluations
    names = args.runs.split(",") if args.runs else list(C_RUNS)
    runs = {}
    for name in names:
        run_dir = args.out / f"C_{name}"
        launch(run_dir, C_CONFIG, [*C_BASE, *C_RUNS[name]], args.steps, {}, timeout=7200)
        runs[name] = run_dir
    print(f"(C) SmolLM2-135M-Instruct RLP, disaggregated 1 + 1 ranks (hf rollout engine), {args.steps} RL steps, "
          "8 passages x 4 thoughts of 32 tokens, lr 3e-5\n")
    print("\n".join(curve_table(runs, ["rlp/reward_mean", "rlp/positive_gain_fraction"], min(5, args.steps))))
    print()
    print("\n".join(block_table(runs, "rlp/reward_mean", 5)))
    print()
    print("\n".join(stale_table(runs)))
    for name, run_dir in runs.items():
        rl = rl_records(run_dir)
        step_s = [r["time/step_s"] for r in rl[1:] if "time/step_s" in r]
        if step_s:
            print(f"{name}: step time (steps 2..N) {statistics.fmean(step_s):.1f} s")
    print("\n".join(hf_comparisons(args, work, runs)))


def megatron_pz(*argv: str) -> list[str]:
    return [sys.executable, "-m", "megatron_pz.cli", *argv]


def sh(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - start


def hf_eval(ckpt: Path, folder: Path, out: Path, log: Path) -> list[dict]:
    """Export ``ckpt`` (a Megatron checkpoint folder) to ``folder`` and evaluate it with plain transformers."""
    from megatron_pz.eval.folder import read_records

    if not out.is_file():
        if not (folder / "config.json").is_file():
            sh(megatron_pz("convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(folder), "--overwrite"), log)
        seconds = sh(megatron_pz("eval", "--model", str(folder), "--run-config", str(C_CONFIG), *C_RLP, *C_EVAL,
                                 "--output", str(out)), log)
        print(f"  {out.name}: evaluated in {seconds:.0f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return read_records(out)


def hf_comparisons(args, work: Path, runs: dict[str, Path]) -> list[str]:
    """Held-out before (the export of the imported checkpoint RL starts from) and after each run (the export of
    its last checkpoint), the same items, plain transformers; and each run's after against s1's."""
    from megatron_pz.eval.folder import format_comparison, read_records

    log = args.out / "C_eval.log"
    after = {name: hf_eval(d / "checkpoints", d / "hf", d / "hf_after.jsonl", log) for name, d in runs.items()}
    before = (hf_eval(work / "megatron", args.out / "C_start_hf", args.out / "C_hf_before.jsonl", log)
              if args.c_before is None else read_records(args.c_before))
    out = []
    for name, records in after.items():
        out.append(f"\n{name}: held-out before RL vs after {args.steps} steps (exported folders, plain transformers)\n"
                   + format_comparison(before, records))
    if "s1" in after:
        for name, records in after.items():
            if name != "s1":
                out.append(f"\nafter RL: s1 ('before' column) vs {name} ('after' column), same items\n"
                           + format_comparison(after["s1"], records))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", required=True, choices=["A", "B", "C"])
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: A 8, B 30, C 10)")
    ap.add_argument("--runs", default="", help="a subset: A modes, B or C run names (comma-separated)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_staleness")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_cache")
    ap.add_argument("--c-before", type=Path, default=None,
                    help="(C) held-out records of the start folder already evaluated with the same settings")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SMOLLM2_WORK", "runs/smollm2_work")))
    args = ap.parse_args()
    args.steps = args.steps or {"A": 8, "B": 30, "C": 10}[args.part]
    args.out = args.out.resolve()
    args.cache = args.cache.resolve()
    print(f"machine load (1/5/15 min) at start: {os.getloadavg()}\n")
    {"A": part_a, "B": part_b, "C": part_c}[args.part](args)
    print(f"\nmachine load (1/5/15 min) at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
