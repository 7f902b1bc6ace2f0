"""Launch a worker script under torchrun (gloo, CPU) and fail loudly instead of hanging.

Every multi-process test goes through :func:`run_torchrun`: a hard timeout kills the whole process
group, and a failure raises with the ranks' tracebacks (torchrun prefixes them with ``[rankN]:``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedTestFailure(AssertionError):
    pass


def start_torchrun(script: str | Path, *args: str, nproc: int = 2, env: dict | None = None,
                   launcher: bool = False) -> subprocess.Popen:
    """Start ``script`` (a path, or a file name under tests/workers) on ``nproc`` ranks in a session of its
    own, output (stdout and stderr together) on a pipe; :func:`kill_tree` ends it. ``launcher``: through
    ``megatron_pz.runtime.launcher`` (torchrun that forwards stop signals and passes the ranks' exit 75 on)."""
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = [
        sys.executable, "-m", "megatron_pz.runtime.launcher" if launcher else "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "--max_restarts=0", str(script), *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "CUDA_VISIBLE_DEVICES": "",
    })
    full_env.update(env or {})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
                            cwd=REPO_ROOT, start_new_session=True, text=True)


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300,
                 env: dict | None = None) -> str:
    """Run ``script`` (a path, or a file name under tests/workers) on ``nproc`` ranks; return output."""
    script = Path(script)
    proc = start_torchrun(script, *args, nproc=nproc, env=env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        raise DistributedTestFailure(
            f"{script.name} on {nproc} ranks did not finish within {timeout}s (killed). Output:\n"
            + _tail(output)
        )
    if proc.returncode != 0:
        raise DistributedTestFailure(
            f"{script.name} on {nproc} ranks exited with {proc.returncode}. Output:\n" + _tail(output)
        )
    return output


def kill_tree(pid: int) -> None:
    """torchrun starts ranks in their own sessions: kill every descendant, not just the group."""
    import psutil

    try:
        root = psutil.Process(pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _tail(text: str, limit: int = 12000) -> str:
    lines = [l for l in text.splitlines() if "warnings.warn" not in l and "UserWarning" not in l]
    text = "\n".join(lines)
    return text[-limit:]
