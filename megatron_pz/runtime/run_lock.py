"""One writer per run directory: ``RUN_DIR/run.lock`` names the process that writes there.

Rank 0 takes the lock before anything is written into the run directory (checkpoints, metrics) and
drops it when the run ends, however it ends short of ``kill -9``. A second job on the same directory
stops with a message naming the holder (host, pid, SLURM job, start time). A lock whose holder is gone
is taken over, and the log says so. A holder is gone when:

* it ran in a SLURM job that is no longer running (``squeue``), or in this very job's earlier attempt
  (same job id, lower ``SLURM_RESTART_COUNT``: a requeued job keeps its id);
* otherwise, it ran on this host and its pid is dead (or now belongs to a younger process).

A holder on another host without a SLURM job cannot be checked from here: the lock then holds, and the
message says which file to delete once that process is known to be gone.

Written by hand: ``fcntl``/``flock`` locks vanish with their holder but are not reliable on the shared
file systems runs live on (NFS, Lustre without ``-o flock``) and cannot say who holds them. The file is
created with ``link(2)`` from a complete temporary file (atomic on NFS too), so a reader never sees it
half written.

``python -m megatron_pz.runtime.run_lock RUN_DIR -- COMMAND ...`` runs a command under the lock (the SLURM
launcher converts the HF weights into ``RUN_DIR/init`` that way).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_pz.errors import BadInput

LOCK_FILE = "run.lock"
_ALIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT",
                       "SIGNALING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED"}


class RunDirLocked(BadInput, RuntimeError):
    """Another live process writes into this run directory; the message names it."""


@dataclass
class Holder:
    host: str
    pid: int
    start_time: float  # seconds since the epoch
    slurm_job_id: Optional[str] = None
    slurm_restart_count: Optional[int] = None
    command: str = ""

    @classmethod
    def me(cls) -> "Holder":
        job = os.environ.get("SLURM_JOB_ID")
        return cls(host=socket.gethostname(), pid=os.getpid(), start_time=time.time(), slurm_job_id=job,
                   slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")) if job else None,
                   command=" ".join(sys.argv)[:300])

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time))
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        if self.slurm_job_id and self.slurm_restart_count:
            job += f" (restart {self.slurm_restart_count})"
        return f"pid {self.pid} on host {self.host}{job}, started {started}"


def slurm_job_state(job_id: str) -> Optional[str]:
    """The job's state from ``squeue`` ("" when SLURM no longer lists it); None when squeue is not here. With
    ``--states=all``: a job that ended is listed with its end state (``FAILED``, ``CANCELLED``...) for
    ``MinJobAge`` (300 s by default) after it ended; without it squeue prints nothing for such a job."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # "Invalid job id specified": the job has left the queue
        return "" if "invalid job id" in (out.stderr or "").lower() else None
    return out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""


def _pid_alive(pid: int, since: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        # a pid reused by a process younger than the lock is not the holder
        return proc.create_time() <= since + 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def why_stale(holder: Holder, me: Optional[Holder] = None) -> Optional[str]:
    """Why ``holder`` no longer holds the lock, or None when it (maybe) still does."""
    me = me or Holder.me()
    if holder.slurm_job_id:
        if holder.slurm_job_id == me.slurm_job_id and (holder.slurm_restart_count or 0) < (me.slurm_restart_count or 0):
            return f"it belongs to an earlier attempt ({holder.slurm_restart_count or 0}) of this SLURM job"
        if holder.slurm_job_id != me.slurm_job_id:
            state = slurm_job_state(holder.slurm_job_id)
            if state:
                if state.split()[0] in _ALIVE_SLURM_STATES:
                    return None
                return f"SLURM job {holder.slurm_job_id} is no longer running ({state})"
            if state == "":
                return f"SLURM job {holder.slurm_job_id} is no longer in the queue"
    if holder.host == me.host:
        if holder.pid == me.pid:
            return None
        if not _pid_alive(holder.pid, holder.start_time):
            return f"pid {holder.pid} is not running on {holder.host}"
    return None


@dataclass
class RunLock:
    path: Path
    holder: Holder
    took_over: Optional[str] = None  # message when a stale lock was replaced

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        current = read_holder(self.path)
        if current is not None and current.pid == self.holder.pid and current.host == self.holder.host \
                and current.start_time == self.holder.start_time:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def read_holder(path: Path) -> Optional[Holder]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable (pid -1): refused rather than guessed about
        return Holder(host="?", pid=-1, start_time=0.0, command="not JSON")
    try:
        return Holder(**{k: data[k] for k in data if k in Holder.__dataclass_fields__})
    except TypeError as exc:
        return Holder(host="?", pid=-1, start_time=0.0, command=str(exc))


def _create(path: Path, holder: Holder) -> bool:
    """Create the lock file with ``holder`` in it, atomically; False when it already exists."""
    tmp = path.with_name(f".{path.name}.{holder.host}.{holder.pid}.tmp")
    tmp.write_text(json.dumps(asdict(holder), indent=2) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def acquire(run_dir) -> RunLock:
    """Take ``run_dir/run.lock`` (creating ``run_dir``), taking over a stale one; raise
    :class:`RunDirLocked` naming the holder when another live process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = Holder.me()
    took_over = None
    for _ in range(3):
        if _create(path, me):
            lock = RunLock(path, me, took_over)
            atexit.register(lock.release)  # an exception anywhere later still frees the directory
            return lock
        holder = read_holder(path)
        if holder is None:  # released between our two looks
            continue
        if holder.pid < 0:
            raise RunDirLocked(f"run directory {run_dir}: cannot read its lock file {path} ({holder.command}); "
                               f"delete it if no job writes into {run_dir}")
        reason = why_stale(holder, me)
        if reason is None:
            raise RunDirLocked(
                f"run directory {run_dir} is in use by {holder.describe()} (lock file {path}). One job "
                f"writes into a run directory at a time: wait for that job, or use another train.run_dir. If "
                f"that process is gone and this host cannot tell, delete {path}.")
        # Move the stale lock aside under a name of our own; only one taker can move a given file. If what
        # we moved is not the holder we judged (another job took over meanwhile), put it back and refuse.
        aside = path.with_name(f".{path.name}.stale.{me.host}.{me.pid}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        moved = read_holder(aside)
        if moved != holder:
            try:
                os.link(aside, path)
            finally:
                aside.unlink()
            continue
        aside.unlink()
        took_over = f"took over the lock of {run_dir} from {holder.describe()}: {reason}"
    raise RunDirLocked(f"could not take the lock {path}: other jobs keep taking it")


def acquire_on_rank0(run_dir) -> Optional[RunLock]:
    """Collective over the world: rank 0 takes the lock, every rank raises :class:`RunDirLocked` when it
    could not. Returns the lock on rank 0 (None elsewhere); rank 0 prints a take-over."""
    import torch.distributed as dist

    lock, verdict = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = acquire(run_dir)
            if lock.took_over:
                print(f"run lock: {lock.took_over}", flush=True)
        except RunDirLocked as exc:
            verdict = [str(exc)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RunDirLocked(verdict[0])
    return lock


def main(argv=None) -> int:
    """``python -m megatron_pz.runtime.run_lock RUN_DIR -- COMMAND ...``: COMMAND's exit code, 2 when the
    directory is in use. A stop signal never leaves the lock behind: SIGTERM ends COMMAND (it has the default
    action there) while this process outlives it and releases the lock; SIGUSR1 (SLURM's early warning) is
    ignored by both, so a one-off preparation such as the HF import finishes instead of failing the job
    (``slurm/launch.sh`` acts on the warning itself before the ranks start)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m megatron_pz.runtime.run_lock RUN_DIR -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: None)  # a handler: COMMAND gets the default action back at exec
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec: COMMAND ignores it too
    try:
        lock = acquire(argv[0])
    except RunDirLocked as exc:
        print(f"run_lock: error: {exc}", file=sys.stderr)
        return 2
    if lock.took_over:
        print(f"run_lock: {lock.took_over}", file=sys.stderr)
    try:
        code = subprocess.run(argv[2:]).returncode
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
