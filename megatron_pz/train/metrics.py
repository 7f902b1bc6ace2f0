"""Step metrics: averaged over data-parallel ranks, printed on rank 0, written to TensorBoard and JSONL.

The JSONL file (``run_dir/metrics.jsonl``) is what ``tools/plot_run.py`` and tests read. A reader may look at it
while a record is being written, and a killed run may leave a record cut short: :func:`read_live_jsonl` returns
complete lines only, and the logger drops a cut-short last record when a run starts on the directory again (its
step is redone from the checkpoint), so a resumed run never appends to a broken line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average each key over the ranks that report it (model-parallel ranks report the same values)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(metrics))
    keys = sorted({k for ks in gathered for k in ks})
    values = torch.zeros(2 * len(keys), dtype=torch.float64)
    for i, k in enumerate(keys):
        if k in metrics:
            values[2 * i] = float(metrics[k])
            values[2 * i + 1] = 1.0
    dist.all_reduce(values)
    return {k: (values[2 * i] / values[2 * i + 1]).item() for i, k in enumerate(keys) if values[2 * i + 1] > 0}


class MetricsLogger:
    CONSOLE_KEYS = (
        "generator/reward_mean", "predictor/accuracy", "generator/valid_mask_rate", "generator/difficulty",
        "predictor/reward_mean", "rlp/reward_mean", "loss", "entropy", "generator/response_length_mean",
        "predictor/response_length_mean", "tokens_per_s", "time/rollout_s", "time/train_s", "padding_fraction",
        "eval/mask_accuracy", "eval/word_mask_accuracy", "eval/generator_valid_mask_rate",
        "rollout/routing_agreement", "rollout/logp_diff_mean", "rollout_corr/k3",
    )

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: Optional[bool] = None):
        self.enabled = (dist.get_rank() == 0) if enabled is None else enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = self.path.with_name("samples.jsonl")
        self.eval_samples_path = self.path.with_name("eval_samples.jsonl")
        self.writer = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for path in (self.path, self.samples_path, self.eval_samples_path):
                dropped = drop_torn_tail(path)
                if dropped:
                    print(f"{path}: dropped a last record cut short by an earlier stop ({dropped} bytes without "
                          f"their newline); the resumed run writes its step again", flush=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], phase: str = "rl") -> None:
        if not self.enabled:
            return
        record = {"phase": phase, "step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{phase}/{k}", float(v), step)
            self.writer.flush()
        shown = [f"{k.split('/')[-1] if k.count('/') == 1 and k.startswith('time') else k}={metrics[k]:.4g}"
                 for k in self.CONSOLE_KEYS if k in metrics]
        print(f"[{phase} step {step}] " + "  ".join(shown), flush=True)

    def log_samples(self, step: int, experiences: list, tokenizer, per_role: int) -> None:
        """Append the first ``per_role`` responses of each role (this rank's) to ``samples.jsonl``.

        The numbers say *that* a policy improves; the samples say *what* it learned (e.g. a generator
        that settled on masking "the"), which no scalar shows.
        """
        if not self.enabled or per_role <= 0:
            return
        taken: dict[str, int] = {}
        with open(self.samples_path, "a") as f:
            for e in experiences:
                if taken.get(e.role, 0) >= per_role:
                    continue
                taken[e.role] = taken.get(e.role, 0) + 1
                record = {"step": step, "role": e.role, "group": e.group, "reward": e.reward,
                          "trainable": e.trainable, "response": tokenizer.decode(e.response_ids),
                          "info": {k: v for k, v in e.info.items() if isinstance(v, (str, int, float, bool))}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def log_eval_samples(self, step: int, samples: list[dict]) -> None:
        """Append every held-out eval response of this rank (rank 0: its data-parallel slice) to
        ``eval_samples.jsonl``, so a before/after change can be read item by item."""
        if not self.enabled or not samples:
            return
        with open(self.eval_samples_path, "a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drop_torn_tail(path: Path) -> int:
    """Cut ``path`` back to its last newline; returns the bytes removed (0 when it ends in one or is absent).

    Only the writer calls this, before its first write to ``path``: the tail is a record a killed writer left
    without its newline, which the next append would otherwise join into one unreadable line."""
    if not path.is_file():
        return 0
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - (1 << 16))
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep < end:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return end - keep


def read_live_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON records of a JSONL file the run writes, complete lines only.

    A last line without its newline is a record still being written (or one a kill cut short, which the
    logger drops on the next start) and is left out; a complete line that is not JSON raises, naming it. Not for
    files a person hands in (``megatron-pz eval --compare``: :func:`megatron_pz.eval.folder.read_records`), where
    a last line without its newline is still a record."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the piece after the last newline is unfinished (or empty)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err}); the file was changed by something "
                             f"other than megatron-pz: remove or repair that line") from None
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every complete record of ``run_dir/metrics.jsonl``, in the order written."""
    return read_live_jsonl(Path(run_dir) / "metrics.jsonl")
