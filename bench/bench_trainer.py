#!/usr/bin/env python
"""Trainer step time broken down (rollout vs update) from a run's metrics.jsonl.

usage: python bench/bench_trainer.py [RUN_DIR]   (default runs/tiny_cpu, made by
`megatron-pz train examples/tiny_cpu.yaml`). Prints per-phase seconds, their ratio, throughput and
padding waste, averaged over the RL steps (the first step is reported apart: it includes warm-up).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0] if argv else "runs/tiny_cpu")
    from megatron_pz.train.metrics import read_metrics

    records = read_metrics(run_dir)
    rl = [r for r in records if r["phase"] == "rl"]
    warm = [r for r in records if r["phase"] == "warm_start" and "tokens_per_s" in r]
    if not rl:
        print(f"{run_dir}: no RL steps logged", file=sys.stderr)
        return 2
    steady = rl[1:] or rl
    mean = lambda k: statistics.fmean(r[k] for r in steady if k in r)  # noqa: E731
    rollout, update = mean("time/rollout_s"), mean("time/train_s")
    print(f"run: {run_dir}   RL steps: {len(rl)} (first step: rollout {rl[0]['time/rollout_s']:.2f}s, "
          f"update {rl[0]['time/train_s']:.2f}s)")
    print(f"{'phase':<28}{'seconds/step':>14}{'share':>9}")
    for name, value in (("rollout + rewards", rollout), ("GRPO update (fwd+bwd+opt)", update)):
        print(f"{name:<28}{value:>14.3f}{value / (rollout + update):>9.1%}")
    print(f"rollout/update time ratio: {rollout / update:.2f}")
    print(f"tokens/s (rollout + trained): {mean('tokens_per_s'):.1f}   rollout tokens/step: "
          f"{mean('rollout_tokens'):.0f}   trained tokens/step: {mean('train_tokens'):.0f}   "
          f"padding: {mean('padding_fraction'):.1%}")
    if warm:
        pads = [r["padding_fraction"] for r in warm if "padding_fraction" in r]
        padding = f", padding {statistics.fmean(pads):.1%}" if pads else ""
        print(f"warm start: {warm[-1]['tokens_per_s']:.0f} tokens/s over {len(warm)} logged steps{padding}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
