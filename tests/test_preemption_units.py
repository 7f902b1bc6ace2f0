"""The pieces of preemption handling one by one: the run-dir lock, the stop flag, the launcher's and the
SLURM job's exit codes, the early-warning lead of the shipped SLURM scripts and the time limit it needs,
signals during start-up. The 2-rank end-to-end runs are in tests/test_preemption.py; the sbatch scripts on a
real SLURM in tests/test_slurm.py."""

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

from multiproc import free_port

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
        # squeue -h [--states=all] -j ID -o %T, as SLURM 22.05 answers (measured on tests/slurm_cluster.py): a job
        # that ended is listed with its end state under --states=all only; a job slurmctld forgot is an error
        [[ "$2" == --states=all ]] && all=1 && shift
        case "$3" in
          111) echo RUNNING ;;
          222) [[ -n "${all:-}" ]] && echo FAILED ;;
          444) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
        esac
    """)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "333")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_lock(run_dir, host="node7", pid=12, slurm_job_id="111")  # another host, a running job
    with pytest.raises(run_lock.RunDirLocked, match="pid 12 on host node7, SLURM job 111"):
        run_lock.acquire(run_dir)
    write_lock(run_dir, host="node7", pid=12, slurm_job_id="222")  # a job that failed
    lock = run_lock.acquire(run_dir)
    assert "SLURM job 222 is no longer running (FAILED)" in lock.took_over
    lock.release()
    write_lock(run_dir, host="node7", pid=12, slurm_job_id="444")  # a job SLURM no longer lists
    lock = run_lock.acquire(run_dir)
    assert "SLURM job 444 is no longer in the queue" in lock.took_over
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


def test_a_requeue_loop_without_progress_stops(tmp_path, monkeypatch):
    """The early warning requeues an attempt that finished a step past where it began, not one that did not
    (a time limit that leaves no time to train would otherwise requeue forever)."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)  # a first attempt: SLURM leaves it unset
    env = {"SLURM_JOB_ID": "42"}
    write_stop_record(tmp_path, signal.SIGUSR1, 7, "ckpt/iter_0000007", False, 3.0)
    assert job_outcome(tmp_path, EXIT_STOPPED, env, start_step=6)[:2] == (EXIT_STOPPED, True)
    code, requeue, line = job_outcome(tmp_path, EXIT_STOPPED, env, start_step=7)  # resumed at 7, abandoned 8
    assert (code, requeue) == (EXIT_STOPPED, False)
    assert "before finishing an RL step (attempt 1 began at step 7" in line
    assert "longer --time or a shorter --signal" in line
    write_stop_record(tmp_path, signal.SIGUSR1, None, None, False, 0.0)  # stopped before step 1
    assert job_outcome(tmp_path, EXIT_STOPPED, env, start_step=0)[:2] == (EXIT_STOPPED, False)
    out = subprocess.run([sys.executable, "-m", "megatron_pz.runtime.requeue", str(tmp_path), "75", "0"],
                         env={**ENV, **env}, capture_output=True, text=True)  # scontrol is never called
    assert out.returncode == EXIT_STOPPED and "not requeued" in out.stdout, out.stderr


def test_slurm_times_and_the_time_limit_check():
    from megatron_pz.memory_plan.checkpoint_time import slurm_seconds, time_limit_problem

    cases = {"10": 600, "1:58": 118, "48:00:00": 172800, "2-00:00:00": 172800, "1-2": 93600, "1-2:03": 93780,
             "0:30": 30, "UNLIMITED": None, "INFINITE": None}
    assert {k: slurm_seconds(k) for k in cases} == cases
    with pytest.raises(ValueError):
        slurm_seconds("INVALID")
    assert time_limit_problem(3441, 2840, 600) is None
    problem = time_limit_problem(600, 2840, 600)  # the job: --time=10 with the 30B's lead
    assert "leaves 600 s" in problem and "--signal=B:USR1@2840" in problem and "(600 s, preemption.startup_seconds)"\
        in problem and "--time=59 or more" in problem


def test_plan_refuses_a_time_limit_shorter_than_the_warning_and_start_up(capsys, monkeypatch):
    from megatron_pz.cli import main

    monkeypatch.delenv("MODEL_DIR", raising=False)
    config = str(ROOT / "examples" / "pretrainzero_qwen3_30b_a3b.yaml")
    assert main(["plan", config, "--nodes", "4", "--time-limit", "10"]) == 2
    out = capsys.readouterr()
    assert "SLURM early warning: #SBATCH --signal=B:USR1@2840" in out.out  # the plan's lines come first
    assert "megatron-pz plan: error: the job's time limit leaves 600 s" in out.err and "--time=59 or more" in out.err
    assert main(["plan", config, "--nodes", "4", "--time-limit", "48:00:00"]) == 0
    assert "time limit: 172800 s; the early warning comes 169960 s after the start" in capsys.readouterr().out
    assert main(["plan", config, "--nodes", "4", "--time-limit", "soon"]) == 2
    assert "--time-limit 'soon': not a SLURM time" in capsys.readouterr().err


def test_preemption_config_is_checked():
    from megatron_pz.run_config import load_run_config

    with pytest.raises(ConfigError, match="preemption.save_bytes_per_s must be > 0"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["preemption.save_bytes_per_s=0"])
    with pytest.raises(ConfigError, match="preemption.save_margin must be >= 1"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["preemption.save_margin=0.5"])
    with pytest.raises(ConfigError, match="preemption.startup_seconds must be >= 0"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["preemption.startup_seconds=-1"])


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
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)\n", text).group(1))  # to the batch shell (launch.sh)
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
    for config in script_configs(script):
        lines = checkpoint_lines(str(ROOT / config), [], nodes=nodes, gpus_per_node=8)
        planned = int(re.search(r"--signal=B:USR1@(\d+)", lines[1]).group(1))
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
    lead = int(re.search(r"--signal=B:USR1@(\d+)", out.stdout).group(1))
    # phase + margin x write, rounded up to 10 s
    assert -(-(100 + 2 * (seconds - 0.5)) // 10) * 10 <= lead <= -(-(100 + 2 * (seconds + 0.5)) // 10) * 10


def test_the_launcher_holds_stop_signals_before_it_imports_torch():
    """What runs before the launcher blocks the stop signals (the package imports and the module) imports no
    torch: a signal in that window ends the launcher, so it must stay milliseconds, not torch's 1-2 s."""
    code = ("import sys, megatron_pz.runtime.launcher, megatron_pz.runtime.requeue, megatron_pz.runtime.run_lock; "
            "print(sorted(m for m in ('torch', 'numpy', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_a_stop_signal_during_start_up_is_held_by_the_launcher_and_its_ranks(tmp_path):
    """SIGUSR1 to the launcher while it imports torch (no rank yet), then SIGTERM to the launcher and its ranks
    while they "import" (before their handlers are up, as SLURM signals every process of a step): neither is
    fatal. The launcher holds the first until the ranks exist; the ranks start with both blocked and take them
    when they install their handlers (tests/workers/held_signals.py); every rank exits 75, and so does the
    launcher."""
    proc = subprocess.Popen([sys.executable, "-m", "megatron_pz.runtime.launcher", "--nproc_per_node=2", "--nnodes=1",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0",
                             str(ROOT / "tests" / "workers" / "held_signals.py"), str(tmp_path)],
                            env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        usr1 = 1 << (signal.SIGUSR1 - 1)
        deadline = time.time() + 60
        while not (int(_status(proc.pid).get("SigBlk", "0"), 16) & usr1) and time.time() < deadline:
            time.sleep(0.002)  # from its first statement on, before torch is imported
        os.kill(proc.pid, signal.SIGUSR1)
        while len(list(tmp_path.glob("started.*"))) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        ranks = [int(p.read_text()) for p in sorted(tmp_path.glob("started.*"))]
        for pid in [proc.pid, *ranks]:
            os.kill(pid, signal.SIGTERM)
        (tmp_path / "go").touch()  # only now do the ranks install their handlers
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_STOPPED, out
    assert "launcher: SIGUSR1 before any rank started: held for the ranks" in out
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen.{rank}").read_text())
        assert seen["blocked_at_start"] == ["SIGTERM", "SIGUSR1"] and seen["received"] == ["SIGTERM", "SIGUSR1"], seen


def _status(pid: int) -> dict:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_a_stop_signal_never_leaves_the_run_lock_behind(tmp_path):
    """`python -m megatron_pz.runtime.run_lock RUN_DIR -- COMMAND` (launch.sh's HF import): SIGUSR1 to the whole
    step (SLURM's early warning, scancel --signal=USR1) is ignored by both; SIGTERM ends COMMAND, and the lock is
    released (a lock left by a live-looking pid would refuse every later job on this host)."""
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-m", "megatron_pz.runtime.run_lock", str(tmp_path / "run"), "--",
                               sys.executable, "-c", f"import time; open({str(ready)!r}, 'w').close(); time.sleep(60)"],
                              env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(holder.pid, signal.SIGUSR1)  # every process of the group, as SLURM signals a job step
        time.sleep(1.0)
        assert holder.poll() is None and (tmp_path / "run" / "run.lock").exists()
        os.killpg(holder.pid, signal.SIGTERM)
        assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
    assert not (tmp_path / "run" / "run.lock").exists()


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
