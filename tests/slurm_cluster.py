"""A one-node SLURM cluster of its own, for the tests that submit the project's sbatch scripts.

Debian's packages (``apt-get install slurmctld slurmd slurm-client munge``: SLURM 22.05) started on this host
with every file they write in one folder: the munge key, socket, pid, log and seed files, ``slurm.conf``,
slurmctld's state and slurmd's spool, logs and pid files, on ports picked free at start. Nothing of a SLURM the
machine may already run is read or touched (its ``/etc/slurm``, ``/etc/munge``, ``/run/munge``, default ports);
the client commands reach this cluster through ``SLURM_CONF`` (:meth:`SlurmCluster.env`), and the munge
socket is named in ``slurm.conf`` (``AuthInfo=socket=...``). The three daemons run in the foreground as
children of the test process, so they are stopped by the pids this module started, never by name.

Runs as root (``SlurmUser=root``): jobs run as the submitting user, and a one-node cluster here has no other.
``python tests/slurm_cluster.py DIR`` starts one and waits (Ctrl-C or SIGTERM stops it and its daemons), to try
commands by hand.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
PACKAGES = "slurmctld slurmd slurm-client munge"


def missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every address of this host now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def total_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


class SlurmCluster:
    """``slurmctld`` + ``slurmd`` (+ ``munged``) on this host, configured and run from ``root``.

    ``cpus``: what ``slurm.conf`` declares for the node (``CPUs=``); SLURM hands out that many CPUs to jobs
    (one per task by default), so more than the host's cores lets several one-task jobs run at once, sharing
    the real cores (``SlurmdParameters=config_overrides`` makes slurmd accept the declared count).
    ``kill_wait``: seconds between SIGTERM and SIGKILL when a job ends (``KillWait``, SLURM's default 30 s).
    """

    def __init__(self, root: Path, cpus: int = 8, kill_wait: int = 30):
        self.root = Path(root)
        self.cpus, self.kill_wait = cpus, kill_wait
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # ------------------------------------------------------------------ configuration

    def env(self, base: Optional[dict] = None) -> dict:
        """The environment a client command (or a job submitted from it) needs to reach this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[key]  # a test run inside a SLURM job must not pass that job's settings on
        return env

    def write_config(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True, mode=0o755)
        ctld_port, slurmd_port = free_ports(2)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=pztest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a job step credential's lifetime, and how long a requeued job waits before it may
            # start again (begin time = requeue + cred_expire + 1 s; default 120 s): 10 s keeps requeues quick
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups here
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            f"KillWait={self.kill_wait}",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay visible to scontrol (no accounting database here)
            "InactiveLimit=0",
            "SlurmdParameters=config_overrides",  # slurmd accepts the declared CPUs=, whatever the host has
            # schedule pending jobs (a requeued one, once eligible) every 2 s, not every 60 s
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={total_memory_mib() // 2} "
            f"State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        (r / "plugstack.conf").write_text("")

    # ------------------------------------------------------------------ daemons

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        log.close()

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.write_config()
        m = self.root / "munge"
        self._start("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to open its socket")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait(lambda: self._client("scontrol", "ping").returncode == 0, timeout, "slurmctld to answer")
        self._start("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self._client("sinfo", "-h", "-N", "-o", "%T").stdout.strip() == "idle", timeout,
                   "the node to be idle in sinfo")
        return self

    def _client(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=30)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited ({self.procs[dead[0]].returncode}) while waiting for "
                                   f"{what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel what still runs on the cluster, then stop the daemons this object started (by pid)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._client("scancel", "--full", "--user", str(os.getuid()))
            deadline = time.time() + timeout
            while time.time() < deadline and self._client("squeue", "-h", "-t", "running,completing").stdout.strip():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
