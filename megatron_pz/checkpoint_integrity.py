"""Is a checkpoint complete and readable; which one a run resumes from when the newest is not.

A checkpoint folder (``iter_*``, see :mod:`megatron_pz.checkpoint` for the layout) is complete when

* ``pz_checkpoint.json``, written last by a save, is there and parses;
* every file it records (``files``: path -> bytes, recorded at save since this check exists) has that size;
* Megatron's ``metadata.json``, torch's ``.metadata`` and ``common.pt`` are there and readable;
* every shard (``*.distcp``) that ``.metadata`` names is there and at least as long as the data it places
  in it (torch's ``.metadata`` records the offset and length of everything it wrote: a cut-short shard shows).

A byte changed inside a shard of the right length is beyond this check (saves write no checksums).

:func:`find_resume` picks what a run continues from: the checkpoint the latest pointer names, or, when it is
damaged or the pointer itself is (unreadable, naming a missing step, gone while checkpoints are there), the
newest complete one at or below the pointer's step, reporting each one passed over and why. The caller
decides whether to go on from there (``train.resume_fallback``) or to refuse. With several ranks,
:func:`agree_on_resume` settles on the newest checkpoint every rank finds complete, and :func:`set_aside`
renames the damaged ones ``damaged_iter_*`` instead of letting a later save of the same step replace
them: nothing damaged is deleted.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from megatron_pz.errors import BadInput

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "pz_checkpoint.json"
ITER_DIR = re.compile(r"iter_(\d{7})")
DAMAGED_PREFIX = "damaged_"
SHARD_SUFFIX = ".distcp"
# written by rank 0 during a save, so their sizes are known to it (shards of other ranks may live on other
# nodes' view of a shared file system; .metadata records those)
FIXED_FILES = ("metadata.json", ".metadata", "common.pt")


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the path."""


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def iteration_steps(root: Path) -> list[int]:
    """Steps of the ``iter_*`` folders under ``root``, complete or not, newest first."""
    if not root.is_dir():
        return []
    found = (ITER_DIR.fullmatch(p.name) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def recorded_files(folder: Path) -> dict[str, int]:
    """Sizes of a finished save's files other than the shards, for ``pz_checkpoint.json``'s ``files``."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != META_FILE and not p.name.endswith(SHARD_SUFFIX)}


def problems(ckpt: Path) -> list[str]:
    """What makes ``ckpt`` incomplete or unreadable (empty: complete)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return ["missing"]
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        return [f"no {META_FILE}: the save that wrote it did not finish"]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{META_FILE} unreadable ({exc})"]
    found = []
    for name, size in sorted((meta.get("files") or {}).items()):
        path = ckpt / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            found.append(f"{name} missing" if actual is None else f"{name} is {actual} bytes, {size} when saved")
    for name in FIXED_FILES:
        if not (ckpt / name).is_file() and f"{name} missing" not in found:
            found.append(f"{name} missing")
    if (ckpt / "metadata.json").is_file():
        try:
            json.loads((ckpt / "metadata.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            found.append(f"metadata.json unreadable ({exc})")
    if (ckpt / ".metadata").is_file():
        found += _shard_problems(ckpt)
    return found


def _shard_problems(ckpt: Path) -> list[str]:
    stat = (ckpt / ".metadata").stat()
    extent = _shard_extents(str(ckpt), stat.st_size, stat.st_mtime_ns)
    if isinstance(extent, str):
        return [extent]
    found = []
    for name, needed in sorted(extent.items()):
        path = ckpt / name
        if not path.is_file():
            found.append(f"shard {name} missing")
        elif path.stat().st_size < needed:
            found.append(f"shard {name} is {path.stat().st_size} bytes, .metadata places {needed} in it")
    return found


@functools.lru_cache(maxsize=8)
def _shard_extents(folder: str, size: int, mtime_ns: int):
    """Shard file -> the bytes ``.metadata`` places in it (or what makes ``.metadata`` unreadable). Read once per
    process and version of the file (start-up checks it, every rank agrees on it, the load checks it again),
    like torch's own load, which reads it on every rank too."""
    try:
        storage = FileSystemReader(folder).read_metadata().storage_data
    except Exception as exc:  # an unpickling error of any kind: the file is cut short or overwritten
        return f".metadata unreadable ({type(exc).__name__}: {exc})"
    extent: dict[str, int] = {}
    for info in storage.values():
        extent[info.relative_path] = max(extent.get(info.relative_path, 0), info.offset + info.length)
    return extent


def optimizer_layout(ckpt: Path, meta: dict) -> Optional[str]:
    """"distributed" | "local" | None (no optimizer state, or unknown): recorded at save, or for checkpoints
    saved before it was, read off ``.metadata``'s keys (Megatron's distributed optimizer in its default
    ``dp_reshardable`` format keys its state ``optimizer.distributed.*``)."""
    if not meta.get("has_optimizer"):
        return None
    if meta.get("optimizer_layout"):
        return meta["optimizer_layout"]
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return "distributed" if any(k.startswith("optimizer.distributed.") for k in keys) else None


def describe(found: list[str], limit: int = 3) -> str:
    return "; ".join(found[:limit]) + (f" (and {len(found) - limit} more)" if len(found) > limit else "")


@dataclass
class ResumePoint:
    """What a checkpoint root offers to resume from: ``path`` (None: nothing, a fresh start), the damaged
    checkpoints passed over on the way (newest first, with why), and what is wrong with the latest pointer."""

    root: Path
    path: Optional[Path] = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    pointer: Optional[str] = None  # None: the pointer names ``path``
    set_aside: dict[Path, Path] = field(default_factory=dict)  # damaged folder -> its new name

    @property
    def step(self) -> Optional[int]:
        return None if self.path is None else int(ITER_DIR.fullmatch(self.path.name).group(1))

    @property
    def damaged(self) -> bool:
        return bool(self.skipped or self.pointer)

    def what_is_wrong(self) -> str:
        parts = [f"{self.root / LATEST_FILE} {self.pointer}"] if self.pointer else []
        parts += [f"{path} is damaged ({why})" for path, why in self.skipped]
        return "; ".join(parts)

    def report(self, dry_run: bool = False) -> list[str]:
        """Lines saying what was passed over (for rank 0 to print); ``dry_run``: what a run would do."""
        lines = [f"resume: {self.root / LATEST_FILE} {self.pointer}"] if self.pointer else []
        for path, why in self.skipped:
            kept = self.set_aside.get(path, path.with_name(DAMAGED_PREFIX + path.name))
            lines.append(f"resume: {'would skip' if dry_run else 'skipped'} {path} ({why}); "
                         f"{'to be kept' if dry_run else 'kept'} as {kept}")
        if self.damaged:
            lines.append(f"resume: {'would continue' if dry_run else 'continuing'} from {self.path}, the newest "
                         "complete checkpoint (train.resume_fallback=false refuses instead)")
        return lines


def read_pointer(root: Path) -> tuple[Optional[int], Optional[str]]:
    """(the step the latest pointer names, what is wrong with it); (None, None) when there is none."""
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None, None
    text = latest.read_text().strip()
    try:
        return int(text), None
    except ValueError:
        return None, f"holds {text[:40]!r}, not a step number"


def find_resume(root, below: Optional[int] = None) -> ResumePoint:
    """The newest complete checkpoint under ``root`` the latest pointer allows (at most ``below`` too)."""
    root = Path(root)
    steps = iteration_steps(root)
    step, pointer = read_pointer(root)
    if step is None and pointer is None:
        if not steps:
            return ResumePoint(root)  # nothing saved yet
        pointer = f"is missing, although {len(steps)} checkpoint folder(s) are there"
    if step is not None and step not in steps:
        pointer = f"names step {step}, but {iter_dir_name(step)} is not there"
    point = ResumePoint(root, pointer=pointer)
    for s in steps:
        if (step is not None and s > step) or (below is not None and s > below):
            continue
        found = problems(root / iter_dir_name(s))
        if not found:
            point.path = root / iter_dir_name(s)
            break
        point.skipped.append((root / iter_dir_name(s), describe(found)))
    return point


def agree_on_resume(root, group=None) -> ResumePoint:
    """:func:`find_resume` agreed by every rank of ``group``: the newest checkpoint all of them find complete
    (a rank that sees a shard cut short where another does not pulls everyone back to an older one). A
    collective; every rank returns the same ``path``."""
    point = find_resume(root)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return point
    passed_over: dict[Path, tuple[int, str]] = {}  # by any rank, in any round: the first rank that did, why
    while True:
        views: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(views, (point.step, point.skipped), group=group)
        for rank, (_, skipped) in enumerate(views):
            for path, why in skipped:
                passed_over.setdefault(path, (rank, why))
        lowest = min((-1 if s is None else s) for s, _ in views)
        if all((-1 if s is None else s) == lowest for s, _ in views):
            break
        point = find_resume(root, below=lowest)  # below -1: none (some rank finds nothing complete)
    mine = {path for path, _ in point.skipped}
    point.skipped += [(path, f"on rank {rank}: {why}") for path, (rank, why) in sorted(passed_over.items(), reverse=True)
                      if path not in mine]
    return point


def set_aside(point: ResumePoint) -> None:
    """Rename the damaged checkpoints passed over ``damaged_iter_*`` (rank 0, once every rank has chosen):
    a save of their step would replace them otherwise, and pruning would count them."""
    for path, _ in point.skipped:
        if not path.is_dir():
            continue
        target, n = path.with_name(DAMAGED_PREFIX + path.name), 1
        while target.exists():
            target, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{n}"), n + 1
        path.rename(target)
        point.set_aside[path] = target
