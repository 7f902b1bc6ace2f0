"""The pieces of preemption handling one by one: the run-dir lock, the stop flag, the launcher's and the
SLURM job's exit codes, the early-warning lead of the shipped SLURM scripts, and launch.sh's signal
handling (with stand-ins for srun/scontrol/squeue: no SLURM here). The 2-rank end-to-end runs are in
tests/test_preemption.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_pz.config import ConfigError
from megatron_pz.runtime import run_lock
from megatron_pz.runtime.launcher import exit_code
from megatron_pz.runtime.preemption import EXIT_STOPPED, write_stop_record
from megatron_pz.runtime.requeue import job_outcome

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def stand_in(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(script))
    path.chmod(0o755)


# ------------------------------------------------------------------ run-dir lock


def test_lock_names_its_holder_and_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-m", "megatron_pz.runtime.run_lock", str(tmp_path), "--",
                               "sleep", "60"], env=ENV)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(run_lock.RunDirLocked, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}"):
            run_lock.acquire(tmp_path)
    finally:
        holder.kill()  # like kill -9: no chance to remove its lock
        holder.wait()
    lock = run_lock.acquire(tmp_path)
    assert lock.took_over and f"from pid {holder.pid} on host" in lock.took_over and "is not running" in lock.took_over
    assert run_lock.read_holder(tmp_path / "run.lock").pid == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_lock_command_runs_under_the_lock_and_releases_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_pz.runtime.run_lock", str(tmp_path), "--", "cat",
                          str(tmp_path / "run.lock")], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["host"] == socket.gethostname()
    assert not (tmp_path / "run.lock").exists()


def write_lock(run_dir: Path, **fields) -> None:
    data = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(), **fields}
    (run_dir / "run.lock").write_text(json.dumps(data))


def test_a_reused_pid_is_not_the_holder(tmp_path):
    write_lock(tmp_path, start_time=time.time() - 10 ** 7)  # this pid, but this process is younger than the lock
    other = subprocess.run([sys.executable, "-c", "from megatron_pz.runtime import run_lock as r; "
                            f"print(r.acquire({str(tmp_path)!r}).took_over)"], env=ENV, capture_output=True, text=True)
    assert f"pid {os.getpid()} is not running" in other.stdout, other.stderr


def test_slurm_decides_for_a_holder_in_a_slurm_job(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "squeue", """
        # squeue -h -j ID -o %T
        case "$3" in 111) echo RUNNING ;; 222) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;; esac
    """)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "333")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_lock(run_dir, host="node7", pid=12, slurm_job_id="111")  # another host, a running job
    with pytest.raises(run_lock.RunDirLocked, match="pid 12 on host node7, SLURM job 111"):
        run_lock.acquire(run_dir)
    write_lock(run_dir, host="node7", pid=12, slurm_job_id="222")  # a job SLURM no longer lists
    lock = run_lock.acquire(run_dir)
    assert "SLURM job 222 is no longer in the queue" in lock.took_over
    lock.release()
    write_lock(run_dir, host="node7", pid=12, slurm_job_id="333", slurm_restart_count=1)  # this job, requeued
    lock = run_lock.acquire(run_dir)
    assert "earlier attempt (1) of this SLURM job" in lock.took_over
    assert run_lock.read_holder(run_dir / "run.lock").slurm_restart_count == 2
    lock.release()


def test_an_unreadable_lock_is_not_taken(tmp_path):
    (tmp_path / "run.lock").write_text("{half")
    with pytest.raises(run_lock.RunDirLocked, match="cannot read its lock file .* delete it if no job"):
        run_lock.acquire(tmp_path)


# ------------------------------------------------------------------ stop flag, exit codes


def test_stop_signals_are_recorded_not_acted_on():
    script = textwrap.dedent("""
        import os, signal
        from megatron_pz.runtime.preemption import install_stop_signals
        stop = install_stop_signals()
        assert stop.requested() is None and stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        print(stop.requested().name)
        os.kill(os.getpid(), signal.SIGTERM)
        print(stop.agreed().name)  # no process group: the local answer
    """)
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["SIGUSR1", "SIGTERM"], out.stderr


def test_launcher_exit_code():
    fail = lambda code: SimpleNamespace(exitcode=code)  # noqa: E731
    assert exit_code({0: fail(EXIT_STOPPED), 1: fail(EXIT_STOPPED)}) == EXIT_STOPPED
    assert exit_code({0: fail(2), 1: fail(2)}) == 2
    assert exit_code({0: fail(2), 1: fail(-15)}) == 2  # refused; the agent stopped the other rank first
    assert exit_code({0: fail(2), 1: fail(1)}) == 1
    assert exit_code({0: fail(EXIT_STOPPED), 1: fail(-15)}) == 1  # a rank killed: not a clean stop
    assert exit_code({0: fail(-9)}) == 1


def test_job_outcome(tmp_path, monkeypatch):
    env = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job_outcome(tmp_path, 0, env)[:2] == (0, False)
    assert job_outcome(tmp_path, 1, env)[:2] == (1, False)
    write_stop_record(tmp_path, signal.SIGUSR1, 7, "ckpt/iter_0000007", False, 3.0)
    assert job_outcome(tmp_path, 137, env)[:2] == (EXIT_STOPPED, True)  # srun's code aside: the record says
    write_stop_record(tmp_path, signal.SIGTERM, 7, "ckpt/iter_0000007", False, 3.0)
    assert job_outcome(tmp_path, EXIT_STOPPED, env)[:2] == (EXIT_STOPPED, False)  # SLURM decides on SIGTERM
    assert job_outcome(tmp_path, 1, {**env, "SLURM_RESTART_COUNT": "2"})[:2] == (1, False)  # an earlier attempt's


def test_preemption_config_is_checked():
    from megatron_pz.run_config import load_run_config

    with pytest.raises(ConfigError, match="preemption.save_bytes_per_s must be > 0"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["preemption.save_bytes_per_s=0"])
    with pytest.raises(ConfigError, match="preemption.save_margin must be >= 1"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["preemption.save_margin=0.5"])


# ------------------------------------------------------------------ SLURM scripts


def script_configs(script: Path) -> list[str]:
    """The script's default config, and the others the README runs with it (CONFIG=... sbatch SCRIPT)."""
    configs = [re.search(r"CONFIG:-(examples/[\w.]+\.yaml)", script.read_text()).group(1)]
    readme = (ROOT / "README.md").read_text()
    configs += re.findall(rf"CONFIG=(examples/[\w.]+\.yaml) sbatch slurm/{script.name}", readme)
    return configs


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("pretrainzero_*.sh")), ids=lambda p: p.stem)
def test_slurm_scripts_ask_for_the_planned_early_warning(script, monkeypatch):
    from megatron_pz.memory_plan.cli import checkpoint_lines

    monkeypatch.delenv("MODEL_DIR", raising=False)
    text = script.read_text()
    lead = int(re.search(r"#SBATCH --signal=USR1@(\d+)\n", text).group(1))
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
    for config in script_configs(script):
        lines = checkpoint_lines(str(ROOT / config), [], nodes=nodes, gpus_per_node=8)
        planned = int(re.search(r"--signal=USR1@(\d+)", lines[1]).group(1))
        assert lead >= planned, (config, lead, planned)
        assert f"{lead} s before the time limit" in text


def test_plan_prints_checkpoint_size_and_lead(capsys, monkeypatch):
    from megatron_pz.cli import main

    monkeypatch.delenv("MODEL_DIR", raising=False)
    code = main(["plan", str(ROOT / "examples" / "pretrainzero_qwen3_8b.yaml"), "preemption.save_bytes_per_s=1e9",
                 "preemption.phase_seconds=100", "--nodes", "2"])
    out = SimpleNamespace(stdout=capsys.readouterr().out)
    assert code == 0
    size = re.search(r"a node writes at most ([\d.]+) GiB \(8 ranks\), (\d+) s", out.stdout)
    assert size, out.stdout
    gib, seconds = float(size.group(1)), int(size.group(2))
    assert abs(seconds - gib * 2**30 / 1e9) <= 0.06 * 2**30 / 1e9 + 0.5  # bytes per node / bytes per second
    lead = int(re.search(r"--signal=USR1@(\d+)", out.stdout).group(1))
    # phase + margin x write, rounded up to 10 s
    assert -(-(100 + 2 * (seconds - 0.5)) // 10) * 10 <= lead <= -(-(100 + 2 * (seconds + 0.5)) // 10) * 10


def test_launch_sh_waits_through_signals_and_requeues_on_the_early_warning(tmp_path):
    """launch.sh with stand-ins for srun and scontrol: the "ranks" stop on SIGUSR1 (stop record, exit 75)
    while the batch shell itself gets SIGTERM and SIGUSR1; it waits for them and requeues the job."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    (run_dir / "init").mkdir(parents=True)
    (run_dir / "init" / "latest_checkpointed_iteration.txt").write_text("0")  # HF import already done
    calls = tmp_path / "calls"
    stand_in(bin_dir, "scontrol", f"""
        echo "scontrol $*" >> {calls}
        [[ "$1" == show ]] && echo node1
        exit 0
    """)
    stand_in(bin_dir, "python", f"exec {sys.executable} \"$@\"\n")
    stand_in(bin_dir, "srun", f"""
        echo "srun $*" >> {calls}
        trap '' TERM USR1
        for _ in $(seq 600); do [[ -f {tmp_path / "signalled"} ]] && break; sleep 0.1; done  # the "ranks" run on
        {sys.executable} -c "import signal; from megatron_pz.runtime.preemption import write_stop_record; \\
write_stop_record('{run_dir}', signal.SIGUSR1, 5, 'checkpoints/iter_0000005', False, 1.0)"
        exit 75
    """)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CONFIG": "examples/tiny_cpu.yaml",
           "MODEL_DIR": str(tmp_path / "model"), "RUN_DIR": str(run_dir), "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0", "SLURM_SUBMIT_DIR": str(ROOT)}
    # a shell cannot trap signals it was started ignoring: start it with the default dispositions whatever
    # this test process inherited or set
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "launch.sh")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGUSR1)])
    deadline = time.time() + 180  # launch.sh prints the memory plan first (a minute on a loaded machine)
    while not (calls.exists() and "srun" in calls.read_text()) and time.time() < deadline:
        time.sleep(0.05)  # the step runs (the trap is set before it starts)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    (tmp_path / "signalled").touch()  # only now do the "ranks" finish (a loaded machine cannot reorder it)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, out
    assert "launch.sh: stop signal; waiting for the ranks" in out
    assert "requeueing job 77" in out
    log = calls.read_text()
    assert "scontrol requeue 77" in log and "megatron_pz.runtime.launcher" in log


def test_a_rank_is_stopped_when_its_agent_dies(tmp_path):
    """kill -9 of the torchrun agent: its ranks (each in a session of its own) get SIGTERM from the kernel
    (PR_SET_PDEATHSIG), i.e. they stop as on any stop signal instead of training on unwatched."""
    flag = tmp_path / "flag"
    rank = textwrap.dedent(f"""
        import time
        from megatron_pz.runtime.preemption import install_stop_signals
        stop = install_stop_signals()
        open({str(flag)!r} + ".ready", "w").close()
        deadline = time.time() + 60
        while stop.requested() is None and time.time() < deadline:
            time.sleep(0.02)
        open({str(flag)!r}, "w").write(stop.requested().name)
    """)
    agent = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {rank!r}], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", agent], env={**ENV, "TORCHELASTIC_RUN_ID": "test"},
                              stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not Path(f"{flag}.ready").exists() and time.time() < deadline:
        time.sleep(0.02)
    parent.kill()
    parent.wait()
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert flag.read_text() == "SIGTERM"
    with pytest.raises(ProcessLookupError):  # it then exited on its own
        for _ in range(100):
            os.kill(child_pid, 0)
            time.sleep(0.05)
