"""Stop signals: SIGTERM (stop now) and SIGUSR1 (SLURM's early warning) end a run with one complete checkpoint.

A signal may reach any subset of a job's processes (the torchrun agent only, the agent and every rank at
once as ``scancel`` / a time limit / ``sbatch --signal`` do, or the ranks only). A rank never acts on it
where it lands: the handler only records it, and the training loop asks at its **agreement points**
(:meth:`StopSignals.agreed`, one all-reduce over the world) whether any rank has seen one. Every rank
gets the same answer at the same point, so all of them finish or abandon the same step, write one
checkpoint together and exit with :data:`EXIT_STOPPED`.

Why a flag and nothing more: a rank may be inside a collective, a checkpoint write or a CUDA call when the
signal lands; acting there (raising, exiting) leaves the other ranks hanging and a checkpoint half
written. Handlers are installed with ``SA_RESTART`` (``signal.siginterrupt(sig, False)``) so that system
calls of native code (gloo sockets, file writes) are restarted instead of failing with ``EINTR``; the
checkpoint writer's forked helper processes inherit the handler, so a signal sent to every process of
the job does not kill them mid-write (see :mod:`megatron_pz.checkpoint` for the writer's other helper).

A rank started by :mod:`megatron_pz.runtime.launcher` begins with both signals blocked, so one that arrives while
it imports, builds its model or loads a checkpoint is held by the kernel, not fatal; installing the handlers
unblocks them, and the rank stops at its first agreement point ("before the run started" when nothing has
run yet).

A rank started by a torchrun agent also asks the kernel for SIGTERM when the agent dies
(``PR_SET_PDEATHSIG``): without it, ``kill -9`` of the agent leaves the ranks training on, each in a
session of its own, and writing into a run directory that a resubmitted job then writes too.

Used by the RL loop (:func:`megatron_pz.train.trainer.train`) and meant for any other loop that runs
ranks of a job:

* ``stop = install_stop_signals()`` once, first thing in the process (under the launcher, until then the
  stop signals are held, blocked);
* ``stop.agreed(group)`` at the loop's consistent points (every rank of ``group`` calls it at the same
  point); when it returns a signal, write what must be kept and raise :class:`Stopped`
  (``stop_if_agreed(stop, where)`` when there is nothing to write);
* the caller turns :class:`Stopped` into ``write_stop_record`` (rank 0) and ``ignore_stop_signals()``,
  then exits with :data:`EXIT_STOPPED`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_pz.config import ConfigError

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run stopped on a signal
# after writing a complete checkpoint (or with nothing new to write). Resubmitting continues it. Any
# other non-zero code is a failure.
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# when ranks saw different signals, the agreed one is the strongest: SIGTERM (the job is ending)
# outranks SIGUSR1 (an early warning, after which the job is requeued)
_RANK = {signal.SIGUSR1: 1, signal.SIGTERM: 2}
STOP_RECORD = "stop.json"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class PreemptionConfig:
    """How early SLURM must warn a job (``sbatch --signal=B:USR1@LEAD``), for ``megatron-pz plan``:
    ``LEAD = phase_seconds + save_margin x (checkpoint bytes per node / save_bytes_per_s)``
    (:mod:`megatron_pz.memory_plan.checkpoint_time`). Planning only: the ranks stop on any signal."""

    # bytes/s one node writes a checkpoint at. Default: measured on this project's 2-core CPU machine
    # (bench/bench_checkpoint_save.py, 0.44B model, one process: 104-448 MB/s over three rounds, the lowest
    # rounded down); a cluster's file system is usually faster: measure it there with the same script.
    save_bytes_per_s: float = 1.0e8
    # the longest rollout or update phase of one RL step (the ranks finish the phase they are in before
    # they agree to stop); a run logs both as time/rollout_s and time/train_s
    phase_seconds: float = 300.0
    save_margin: float = 2.0  # the write may take this many times the estimate
    # from a job's start to its first RL step (plan, HF import on the first job, imports, model build, checkpoint
    # load, rollout engine start-up): the time limit must leave this much before the early warning, or every
    # attempt is warned before it trains (`megatron-pz plan --time-limit`, slurm/launch.sh); measure it as the
    # seconds from a job's "launch.sh: job ... attempt" line to its first "[rl step" line
    startup_seconds: float = 600.0

    def validate(self) -> None:
        for name in ("save_bytes_per_s", "phase_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"preemption.{name} must be > 0, got {getattr(self, name)}")
        if not self.startup_seconds >= 0:
            raise ConfigError(f"preemption.startup_seconds must be >= 0, got {self.startup_seconds}")
        if not self.save_margin >= 1.0:
            raise ConfigError(f"preemption.save_margin must be >= 1 (a factor on the write estimate), "
                              f"got {self.save_margin}")


class StopSignals:
    """The stop signals this process has received (first arrival time per signal)."""

    def __init__(self):
        self.received: dict[signal.Signals, float] = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
            signal.siginterrupt(sig, False)
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # a rank of a torchrun agent
            _die_with_parent(signal.SIGTERM)
        # A rank of megatron_pz.runtime.launcher starts with the stop signals blocked (held by the kernel while
        # it imports and builds): the handlers are in place now, so take them, and any that came meanwhile.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def _on_signal(self, signum, _frame) -> None:
        # Runs between two bytecodes of the main thread: record only (no I/O, no locks).
        self.received.setdefault(signal.Signals(signum), time.time())

    def requested(self) -> Optional[signal.Signals]:
        """The strongest stop signal this process has seen (None: none)."""
        return max(self.received, key=_RANK.get, default=None)

    def agreed(self, group=None) -> Optional[signal.Signals]:
        """The strongest stop signal any rank of ``group`` (default: the world) has seen. Collective:
        every rank of the group calls it at the same point of its loop, and all get the same answer."""
        import torch
        import torch.distributed as dist

        mine = self.requested()
        if not dist.is_initialized():
            return mine
        value = torch.tensor([_RANK[mine] if mine else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        code = int(value.item())
        return next((s for s, r in _RANK.items() if r == code), None)


def stop_if_agreed(stop: StopSignals, where: str, group=None) -> None:
    """An agreement point with nothing to save: raise :class:`Stopped` on every rank once a stop is agreed."""
    sig = stop.agreed(group)
    if sig:
        raise Stopped(sig, where=where)


_installed: Optional[StopSignals] = None


def install_stop_signals() -> StopSignals:
    """Install the handlers once per process (later calls return the same object), and unblock the stop
    signals. Call it before any work: before it, SIGUSR1's default action ends the process, unless the
    process started with the signals blocked (a rank of :mod:`megatron_pz.runtime.launcher`), which holds
    them until this call."""
    global _installed
    if _installed is None:
        _installed = StopSignals().install()
    return _installed


def ignore_stop_signals() -> None:
    """This rank is on its way out with its work saved: let no stop signal turn that exit into a death.

    Once one rank exits non-zero, torch's agent sends SIGTERM to the others (``PContext._poll`` ->
    ``close``, torch 2.13), which may be in interpreter shutdown by then; CPython restores the default
    action of every signal with a Python handler at shutdown, but leaves SIG_IGN in place."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _die_with_parent(sig: signal.Signals) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the agent's death then leaves the ranks running
        pass


# ------------------------------------------------------------------ what a stopped run leaves behind


def write_stop_record(run_dir, sig: signal.Signals, step: Optional[int], checkpoint: Optional[str], abandoned: bool,
                      save_seconds: float) -> Path:
    """``run_dir/stop.json``: why and where the run stopped, for a person and for the SLURM script
    (``python -m megatron_pz.runtime.requeue`` requeues on the early warning only): the signal, the exit
    code the ranks leave with (:data:`EXIT_STOPPED`), the step of the checkpoint, the SLURM job and attempt.
    Written by rank 0 after the checkpoint is complete."""
    record = {
        "signal": sig.name, "exit_code": EXIT_STOPPED, "step": step, "checkpoint": checkpoint,
        "abandoned_step": bool(abandoned),
        "save_seconds": round(float(save_seconds), 3), "host": socket.gethostname(), "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0") if os.environ.get("SLURM_JOB_ID") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(run_dir) / STOP_RECORD
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_stop_record(run_dir) -> Optional[dict]:
    path = Path(run_dir) / STOP_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def clear_stop_record(run_dir) -> None:
    """A new run of the directory starts: the previous run's record no longer describes it."""
    try:
        (Path(run_dir) / STOP_RECORD).unlink()
    except FileNotFoundError:
        pass


class Stopped(Exception):
    """Raised on every rank at the same agreement point once a stop signal is agreed (after the
    checkpoint, if one was due, is written); the loop's caller turns it into :data:`EXIT_STOPPED`."""

    def __init__(self, sig: signal.Signals, step: Optional[int] = None, checkpoint: Optional[str] = None,
                 abandoned: bool = False, save_seconds: float = 0.0, where: str = ""):
        self.signal, self.step, self.checkpoint = sig, step, checkpoint
        self.abandoned, self.save_seconds, self.where = abandoned, save_seconds, where
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"{self.signal.name} {self.where}: no RL step to save yet"
        written = f"{self.save_seconds:.1f} s to write" if self.save_seconds else "written before the signal"
        return f"{self.signal.name} {self.where}: checkpoint of step {self.step} at {self.checkpoint} ({written})"
