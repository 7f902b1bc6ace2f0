"""What training rank 0 and the rollout ranks say to each other, and how a step's work is divided.

Messages are plain dataclasses, pickled over the bridge (:mod:`megatron_pz.disagg.bridge`). Training rank 0
sends :class:`Hello` once, then any sequence of :class:`PushWeights` (followed by the buckets of every
pipeline stage), :class:`Generate`, :class:`Evaluate`, :class:`Snapshot`, :class:`Restore` and
:class:`Resume`, and finally :class:`Stop`. It speaks only while the rollout ranks wait (after they delivered a
batch, or before the first): :class:`Resume` lets them generate until their next batch is deliverable, which
they send as :class:`Generated` (see :mod:`megatron_pz.disagg.stream`); :class:`Evaluate` is answered with
:class:`Evaluated`, :class:`Snapshot` with :class:`Snapshotted`. Because every message arrives while the
rollout ranks wait, what they generate does not depend on timing (a resumed run replays it exactly).

Work of one step (:class:`WorkSplit`): the global batch of B passages is cut into U = lcm(R, DP) *units*
of B / U consecutive passages (R rollout ranks, DP data-parallel training replicas). Rollout rank w
generates units [w U/R, (w+1) U/R); DP replica r trains on units [r U/DP, (r+1) U/DP). When R divides DP a
unit is exactly a DP rank's share of the colocated run, so both placements sample the same passages with the
same seeds and group them the same way (tests/test_disaggregated.py compares them sample for sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_pz.config import ConfigError


@dataclass
class Hello:
    tokenizer_dir: str
    data_path: str
    dtype: str  # the actor's parameter dtype: the hf engine's copy is made in it
    dp_size: int


@dataclass
class PushWeights:
    version: int  # optimizer updates the pushed weights have seen


@dataclass
class Generate:
    step: int
    version: int  # the weights the rollout rank must hold (checked there)
    passages: list[int]  # the global batch's dataset indices, in order


@dataclass
class Resume:
    """Generate (in windows) until the oldest requested step's batch is deliverable, send it, wait again."""


@dataclass
class Snapshot:
    """Send the partial samples in flight (:class:`Snapshotted`), for a checkpoint."""


@dataclass
class Restore:
    """A resumed run's partial samples in flight, one snapshot per rollout rank (``snapshots[worker]``)."""

    snapshots: dict[int, Any]


@dataclass
class Evaluate:
    step: int
    version: int


@dataclass
class Stop:
    reason: str
    signal: Optional[str] = None  # the stop signal's name when one ended the run (the rollout ranks exit 75 too)


@dataclass
class Generated:
    """One rollout rank's share of a step's batch: a draft per unit (see :mod:`megatron_pz.objectives.split`),
    keyed by (the step it was requested for, its unit); with partial rollouts a batch may hold units of
    earlier steps (deferred) and lack some of its own."""

    step: int
    version: int  # the weights this rank held when it delivered
    worker: int
    drafts: dict[tuple[int, int], Any]
    seconds: float  # generation wall time on this rollout rank since its last delivery
    push: Optional[dict] = None  # receive side of the last weight push: bytes, seconds, buckets
    stats: dict[str, float] = field(default_factory=dict)  # windows, tokens, idle time, deferred units


@dataclass
class Snapshotted:
    worker: int
    state: Any  # megatron_pz.disagg.stream.Stream.snapshot()


@dataclass
class Evaluated:
    totals: list[float]
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class WorkSplit:
    """Units of one step's passages, and which rollout rank makes / which DP replica trains each."""

    passages: int  # B, train.passages_per_step
    workers: int  # R, rollout ranks
    dp: int  # data-parallel replicas of the actor
    # partial rollouts: one passage per unit, so a step's batch can take the passages that finished and defer
    # the others one by one (units still divide evenly among rollout ranks and replicas)
    per_passage: bool = False

    def __post_init__(self):
        if self.passages % math.lcm(self.workers, self.dp):
            raise ConfigError(f"train.passages_per_step={self.passages} must be divisible by lcm(rollout.ranks="
                              f"{self.workers}, data-parallel size {self.dp}) = {math.lcm(self.workers, self.dp)}: each step's passages "
                              "are cut into that many equal units (one set per rollout rank and per DP replica)")

    @property
    def units(self) -> int:
        return self.passages if self.per_passage else math.lcm(self.workers, self.dp)

    def unit_slice(self, unit: int) -> slice:
        size = self.passages // self.units
        return slice(unit * size, (unit + 1) * size)

    def units_of_worker(self, worker: int) -> range:
        per = self.units // self.workers
        return range(worker * per, (worker + 1) * per)

    def units_of_replica(self, dp_rank: int) -> range:
        per = self.units // self.dp
        return range(dp_rank * per, (dp_rank + 1) * per)
