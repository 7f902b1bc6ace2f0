"""Evaluate a Hugging Face folder on a run's held-out items, and print before/after tables with intervals.

``megatron-pz eval --model HF_DIR --run-config CONFIG.yaml`` runs exactly the evaluation a training run
runs before and after RL (:func:`megatron_pz.eval.heldout.evaluate`: the greedy PretrainZero tasks of
``train.eval_passages`` held-out passages, and the ``eval:`` section's figures), on the same items
(the config's data folder, held-out split, seeds), but through plain ``transformers``
(:class:`~megatron_pz.eval.transformers_backend.TransformersBackend`) instead of the run's engine and
actor. Its per-item records pair with a run's own (``eval_samples.jsonl``) or another folder's.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_pz.config import ConfigError
from megatron_pz.data.dataset import PassageDataset
from megatron_pz.eval.heldout import build_eval_items, evaluate
from megatron_pz.eval.records import compare
from megatron_pz.eval.transformers_backend import TransformersBackend


def evaluate_folder(model_dir, cfg, batch_size: int = 16) -> tuple[dict, list[dict]]:
    """(eval/* metrics with intervals, every item's record) of ``model_dir`` on ``cfg``'s held-out items."""
    if not cfg.data.path:
        raise ConfigError("eval --run-config: the config must name its data folder (data.path)")
    d = cfg.data
    heldout = PassageDataset(d.path, split=d.eval_split, heldout_fraction=d.heldout_fraction,
                             max_span_words=d.max_span_words, max_span_tokens=d.max_span_tokens,
                             validation_fraction=d.validation_fraction)
    backend = TransformersBackend(model_dir, batch_size=batch_size)
    return evaluate(backend, backend.tokenizer, heldout, build_eval_items(heldout, cfg), cfg, 0, 1, scorer=backend)


def read_records(path) -> list[dict]:
    """Records of one evaluation: a JSONL file of records (``megatron-pz eval --output``), or a run's
    ``eval_samples.jsonl`` at one step (``path@step``; default: its last evaluation)."""
    text, _, step = str(path).partition("@")
    rows = [json.loads(line) for line in Path(text).read_text().splitlines() if line.strip()]
    if rows and "step" in rows[0]:  # MetricsLogger.log_eval_samples: one evaluation per step
        wanted = int(step) if step else rows[-1]["step"]
        rows = [r for r in rows if r["step"] == wanted]
    return rows


ROWS = (
    ("mask_accuracy", "predictor accuracy, span candidates"),
    ("word_mask_accuracy", "predictor accuracy, single words"),
    ("predictor_answer_rate", "predictor answer-format rate (\\boxed{})"),
    ("generator_valid_mask_rate", "generator valid-mask rate"),
    ("generator_reward", "generator reward (PZ eq. 9)"),
    ("info_gain", "RLP information gain (nats)"),
    ("thought_closed_rate", "thoughts closed by the policy"),
    ("nll_per_token", "next-token NLL per token, no thought"),
)


def format_comparison(before: list[dict], after: list[dict], digits: int = 3) -> str:
    """A Markdown table: each figure before and after with 95 % intervals, the paired difference with its
    interval, the number of items."""
    table = compare(before, after)
    lines = ["| held-out figure | items | before | after | after - before |", "| --- | --- | --- | --- | --- |"]
    for name, label in ROWS:
        if name not in table:
            continue
        row = table[name]
        diff = row["difference"]
        mark = " *" if diff.excludes_zero() else ""
        lines.append(f"| {label} | {row['items']} | {row['before'].format(digits)} | {row['after'].format(digits)} | "
                     f"{diff.format(digits)}{mark} |")
    return "\n".join(lines) + "\n(95 % intervals, paired bootstrap over items; * the difference's interval excludes 0)"
