#!/usr/bin/env python
"""Render a run's reward and accuracy curves to PNG from RUN_DIR/metrics.jsonl.

usage: python tools/plot_run.py RUN_DIR [--out curves.png]
Panels: role rewards, predictor accuracy / generator valid-mask rate / difficulty, held-out eval,
loss and entropy, throughput and rollout-vs-train time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PANELS = [
    ("rewards", ["generator/reward_mean", "predictor/reward_mean", "rlp/reward_mean", "rpt/reward_mean"]),
    ("predictor / generator", ["predictor/accuracy", "generator/valid_mask_rate", "generator/difficulty"]),
    ("held-out eval", ["eval/mask_accuracy", "eval/generator_valid_mask_rate"]),
    ("loss / entropy", ["loss", "entropy"]),
    ("throughput (tokens/s)", ["tokens_per_s"]),
    ("time per step (s)", ["time/rollout_s", "time/train_s"]),
]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_pz.train.metrics import read_metrics

    records = read_metrics(run_dir)
    if not records:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no records")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r.get("phase") in ("rl", "eval")]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}/metrics.jsonl not found (is it a megatron-pz run dir?)", file=sys.stderr)
        return 2
    print(plot(args.run_dir, args.out or args.run_dir / "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
