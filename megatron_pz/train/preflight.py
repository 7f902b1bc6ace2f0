"""What a run is checked for before any work, and the checkpoint it starts from.

:func:`preflight` runs on every rank before the process group, any model or any write exists (so bad input
costs seconds, not a start-up and a queue):

* ``train.run_dir`` is a folder (or not there yet);
* the data folder: manifest, every indexed file as long as its index says, text shards as the manifest
  records (:func:`megatron_pz.data.dataset.check_dataset`; the embedded default is checked once built);
* the checkpoint the run starts from: the one it resumes (``run_dir/checkpoints``, falling back past a
  damaged one, see :mod:`megatron_pz.checkpoint_integrity`), a finished warm start, or
  ``train.init_checkpoint``; complete and readable;
* checkpoint, data and model agree: the checkpoint's model has the tensor shapes ``model.*`` gives, its
  tokenizer has the vocabulary the data was built with, a resumed one holds the optimizer state and extra
  models (RLP's EMA teacher) this run builds, in the same layout (``optimizer.use_distributed_optimizer``);
  ``train.resume=false`` never starts over on top of a run's checkpoints.

:func:`settle` finishes the job once the world is up: every rank agrees on the checkpoint to resume from
(the newest one all of them find complete), rank 0 renames the damaged ones passed over and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from tokenizers import Tokenizer

from megatron_pz.checkpoint import HF_CONFIG_FILE, TOKENIZER_DIR, resolve_checkpoint_dir
from megatron_pz.checkpoint_integrity import (
    LATEST_FILE, META_FILE, CheckpointError, ResumePoint, agree_on_resume, find_resume, iteration_steps, optimizer_layout,
    set_aside,
)
from megatron_pz.config import ConfigError
from megatron_pz.convert.mapping import expected_hf_tensors
from megatron_pz.data.dataset import DatasetFormatError, check_dataset
from megatron_pz.data.default import configured_data_dir
from megatron_pz.model.provider import load_hf_config
from megatron_pz.run_config import RunConfig

# config keys that say nothing about a model's shape (left out of a mismatch report)
_NOT_SHAPE = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache"}


@dataclass
class StartPoint:
    """Where a run starts: ``resume`` (the run's own checkpoint to continue; None: a fresh start) or
    ``init`` (weights to start from: a finished warm start or ``train.init_checkpoint``); ``data``: the data
    folder checked (None: the embedded default, built at start-up and checked then)."""

    resume: Optional[ResumePoint]
    init: Optional[Path]
    data: Optional[Path]

    def describe(self) -> list[str]:
        lines = [f"data: {self.data}" if self.data else "data: the embedded default, built at start-up"]
        if self.resume is not None and self.resume.path is not None:
            lines += self.resume.report(dry_run=True)
            lines.append(f"start: resume from {self.resume.path}")
        else:
            lines.append(f"start: weights of {self.init}" if self.init else "start: a fresh model")
        return lines


def preflight(cfg: RunConfig, hf_config) -> StartPoint:
    """Every check a run can make before any work (see the module docstring); raises naming the key / file."""
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={run_dir} is a file", remedy="name a folder (created if missing)")
    data = configured_data_dir(cfg.data)
    if data is not None:
        try:
            check_dataset(data)
        except DatasetFormatError as exc:
            where = "data.path" if cfg.data.path else "data (the embedded default; deleting its folder rebuilds it)"
            raise DatasetFormatError(f"{where}: {exc}") from exc
    resume = init = None
    if cfg.train.resume:
        resume = resume_point(run_dir / "checkpoints", cfg.train.resume_fallback)
    else:
        refuse_fresh_start_over(run_dir / "checkpoints")
    if resume is not None and resume.path is not None:
        check_resumable(resume.path, cfg)
        check_matches(resume.path, f"train.run_dir={run_dir}", hf_config, data)
    else:
        resume = None
        init = start_weights(cfg)
        if init is not None:
            check_matches(init, "train.init_checkpoint" if cfg.train.init_checkpoint else "warm_start",
                          hf_config, data)
    return StartPoint(resume, init, data)


def settle(start: StartPoint, cfg: RunConfig, hf_config, data_path: Path) -> StartPoint:
    """After the process group and the run lock: every rank takes the same checkpoint (a collective), the
    data's tokenizer is checked when the data was built just now, and rank 0 renames the damaged
    checkpoints passed over and reports them."""
    if cfg.train.resume:
        point = agree_on_resume(Path(cfg.train.run_dir) / "checkpoints")
        refuse_damaged(point, cfg.train.resume_fallback)
        if point.path is not None and (start.resume is None or point.path != start.resume.path):
            check_resumable(point.path, cfg)  # another rank's view moved the choice
            check_matches(point.path, f"train.run_dir={cfg.train.run_dir}", hf_config, data_path)
        start.resume = point if point.path is not None else None
    if start.data is None:  # the embedded default, built a moment ago
        for ckpt in (start.resume.path if start.resume else None, start.init):
            if ckpt is not None:
                check_tokenizer(ckpt, "the start checkpoint", data_path)
        start.data = data_path
    if start.resume is not None and dist.get_rank() == 0:
        set_aside(start.resume)
        for line in start.resume.report():
            print(line, flush=True)
    return start


def resume_point(root: Path, fallback: bool) -> ResumePoint:
    point = find_resume(root)
    refuse_damaged(point, fallback)
    return point


def refuse_damaged(point: ResumePoint, fallback: bool) -> None:
    if not point.damaged:
        return
    if point.path is None:
        raise CheckpointError(f"{point.what_is_wrong()}; no complete checkpoint is left to resume from",
                              remedy=f"move {point.root} aside to start the run over")
    if not fallback:
        raise CheckpointError(f"{point.what_is_wrong()}; train.resume_fallback=false refuses to go back to "
                              f"{point.path}", remedy="set train.resume_fallback=true to resume from it")


def refuse_fresh_start_over(root: Path) -> None:
    steps = iteration_steps(root)
    if steps:
        raise ConfigError(f"train.resume=false, but {root} holds this run's checkpoints (up to step {steps[0]}), "
                          "which a fresh start would overwrite",
                          remedy="use a new train.run_dir (start from them with train.init_checkpoint), "
                                 "or move them aside")


def start_weights(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint a fresh start loads weights from, checked: a finished warm start of this run, or
    ``train.init_checkpoint``. None: the warm start runs, or random init."""
    if cfg.warm_start.enabled:
        warm = Path(cfg.train.run_dir) / "warm_start"
        if not (warm / LATEST_FILE).is_file() and not iteration_steps(warm):
            return None  # runs first
        try:
            return resolve_checkpoint_dir(warm)
        except CheckpointError as exc:
            raise CheckpointError(f"the warm start's checkpoint: {exc}",
                                  remedy=f"move {warm} aside to run the warm start again") from exc
    if cfg.train.init_checkpoint:
        path = Path(cfg.train.init_checkpoint)
        if not path.exists():
            raise ConfigError(f"train.init_checkpoint={path} does not exist",
                              remedy="import a Hugging Face model with `megatron-pz convert hf-to-megatron --out` "
                                     "and give that folder")
        try:
            return resolve_checkpoint_dir(path)
        except CheckpointError as exc:
            raise CheckpointError(f"train.init_checkpoint: {exc}") from exc
    return None


def check_resumable(ckpt: Path, cfg: RunConfig) -> None:
    """A checkpoint this run can continue: optimizer state of the layout it builds, the extra models it needs."""
    meta = _meta(ckpt)
    if not meta.get("has_optimizer"):
        raise CheckpointError(f"{ckpt} holds weights only, no optimizer state (an HF import or a warm start "
                              "copied into the run's checkpoints)",
                              remedy="start a run from it with train.init_checkpoint, in a run_dir of its own")
    layout = optimizer_layout(ckpt, meta)
    mine = "distributed" if cfg.optimizer.use_distributed_optimizer else "local"
    if layout and layout != mine:
        raise ConfigError(f"optimizer.use_distributed_optimizer={str(mine == 'distributed').lower()}, but {ckpt} "
                          f"holds a {layout} optimizer's state",
                          remedy=f"set optimizer.use_distributed_optimizer={str(layout == 'distributed').lower()} "
                                 "to resume it (or start a new run_dir from it with train.init_checkpoint)")
    if cfg.objective.uses_rlp() and "ema" not in meta.get("extra_models", []):
        raise ConfigError(f"objective: RLP needs its EMA teacher, but {ckpt} was saved without one (another "
                          "objective)", remedy="resume with the objective the run was saved with, or start a new "
                                               "run_dir from it with train.init_checkpoint")


def check_matches(ckpt: Path, key: str, hf_config, data: Optional[Path]) -> None:
    """``ckpt`` (named by config ``key``) holds the model ``hf_config`` describes and the data's tokenizer."""
    check_architecture(ckpt, key, hf_config)
    if data is not None:
        check_tokenizer(ckpt, key, data)


def check_architecture(ckpt: Path, key: str, hf_config) -> None:
    """Every tensor of the checkpoint's model has the shape the run's model config gives it."""
    if not (ckpt / HF_CONFIG_FILE).is_file():
        return  # saved without its config: the load itself compares shapes
    saved = load_hf_config(ckpt / HF_CONFIG_FILE)
    theirs, ours = expected_hf_tensors(saved), expected_hf_tensors(hf_config)
    if theirs == ours:
        return
    a, b = saved.to_dict(), hf_config.to_dict()
    keys = [k for k in sorted(set(a) | set(b)) if k not in _NOT_SHAPE and a.get(k) != b.get(k)
            and isinstance(a.get(k, b.get(k)), (int, float, str, bool))]
    fields = ", ".join(f"{k} {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (config)" for k in keys[:6])
    tensor = next((n for n in sorted(set(theirs) | set(ours)) if theirs.get(n) != ours.get(n)), None)
    raise ConfigError(f"{key}: {ckpt} holds a model of another shape than model.* gives: {fields or 'see tensors'}; "
                      f"e.g. {tensor} {theirs.get(tensor)} vs {ours.get(tensor)}",
                      remedy="set model.* as the checkpoint was saved (its hf_config.json), or start from a "
                             "checkpoint of this model")


def check_tokenizer(ckpt: Path, key: str, data: Path) -> None:
    """The checkpoint's tokenizer (copied in at save) has the vocabulary the data's token ids come from."""
    theirs_file = ckpt / TOKENIZER_DIR / "tokenizer.json"
    ours_file = data / "tokenizer" / "tokenizer.json"
    if not theirs_file.is_file() or not ours_file.is_file():
        return  # a checkpoint saved without tokenizer files: nothing to compare
    theirs = Tokenizer.from_file(str(theirs_file)).get_vocab(with_added_tokens=True)
    ours = Tokenizer.from_file(str(ours_file)).get_vocab(with_added_tokens=True)
    if theirs == ours:
        return
    differ = sum(1 for token in set(theirs) | set(ours) if theirs.get(token) != ours.get(token))
    raise ConfigError(f"{key}: the tokenizer of {ckpt} ({len(theirs)} tokens) is not the one {data} was built "
                      f"with ({len(ours)} tokens; {differ} token ids differ)",
                      remedy="use data preprocessed with the checkpoint's tokenizer (`megatron-pz preprocess "
                             f"--tokenizer {ckpt / TOKENIZER_DIR}`), or a checkpoint of the data's tokenizer")


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META_FILE).read_text())
