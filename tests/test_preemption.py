"""Stop signals and the run-dir lock on a real 2-rank job (launcher + torchrun agent, gloo, CPU).

Every interrupted run here must exit with 75 (EXIT_STOPPED) leaving one complete checkpoint of the step
the stop rule gives (abandon the step when the stop is agreed after its rollout, finish it when agreed
after its update) and a resume from it must reproduce an uninterrupted run bit for bit (losses, gradient
norms, rewards, response lengths). The signals are sent from inside the job at a chosen point
(tests/workers/train_signal.py) along the route SLURM or a person would use, so the outcome is exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiproc import REPO_ROOT, WORKERS, free_port, kill_tree
from test_trainer import CONFIG, RLP, TINY, rl_records

from megatron_pz.runtime.preemption import EXIT_STOPPED

pytestmark = pytest.mark.slow

STEPS = 3
ARGS = [*TINY, *RLP, "warm_start.enabled=false", f"train.steps={STEPS}", "train.save_interval=10"]
COMPARED = ("loss", "grad_norm", "rlp/reward_mean", "rlp/response_length_mean")


def launch(run_dir, cache, *overrides, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_pz.runtime.launcher", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0",
           str(WORKERS / "train_signal.py"), "train", CONFIG, *ARGS, f"data.default_cache_dir={cache}",
           f"train.run_dir={run_dir}", *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT,
                            start_new_session=True, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, float]:
    """(exit code, output, wall time of the exit)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"job did not finish within {timeout}s:\n{out[-8000:]}")
    return proc.returncode, out, time.time()


def train(run_dir, cache, *overrides, env=None) -> tuple[int, str, float]:
    return finish(launch(run_dir, cache, *overrides, env=env))


def checkpoint_step(run_dir):
    latest = Path(run_dir) / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(latest.read_text()) if latest.is_file() else None


def planned_checkpoint_bytes() -> int:
    from megatron_pz.memory_plan.checkpoint_time import plan_checkpoint
    from megatron_pz.memory_plan.cli import hf_config_for_planning
    from megatron_pz.run_config import load_run_config

    cfg = load_run_config(CONFIG, ARGS)
    return plan_checkpoint(cfg, hf_config_for_planning(cfg)[0], world=2, device="cpu", ranks_per_node=2).total


def assert_matches(run_dir, reference, steps):
    _, rl = rl_records(run_dir)
    for step in steps:
        for key in COMPARED:
            assert rl[step][key] == reference[step][key], (step, key, rl[step][key], reference[step][key])


@pytest.fixture(scope="module")
def cache(pz_data_cache):
    return pz_data_cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The uninterrupted run every interrupted one is compared with. While it is held at its first
    rollout (holding the run-dir lock), a second job is started on the same run directory."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, gate = root / "run", root / "gate"
    first = launch(run_dir, cache, env={"PZ_TEST_GATE": str(gate)})
    deadline = time.time() + 300
    while not Path(f"{gate}.waiting").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # rank 0 holds the lock and waits at the gate, in the rollout of RL step 1
    holder = json.loads((run_dir / "run.lock").read_text())
    before = {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    second = train(run_dir, cache)
    after = {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    gate.touch()
    code, out, _ = finish(first)
    assert code == 0, out[-8000:]
    _, rl = rl_records(run_dir)
    assert sorted(rl) == list(range(1, STEPS + 1)) and checkpoint_step(run_dir) == STEPS
    assert all(rl[s]["grad_norm"] > 1e-6 for s in rl)  # the updates compared below are not trivial
    return {"rl": rl, "holder": holder, "second": second, "untouched": before == after, "run_dir": run_dir}


def interrupted(tmp_path, cache, spec, *overrides, plant_stale_lock=False):
    """Run with PZ_TEST_SIGNAL=spec, then resume; return what each left behind."""
    run_dir, sent = tmp_path / "run", tmp_path / "sent"
    code, out, exited = train(run_dir, cache, *overrides,
                              env={"PZ_TEST_SIGNAL": spec, "PZ_TEST_SIGNAL_LOG": str(sent)})
    step = checkpoint_step(run_dir)
    ckpt = run_dir / "checkpoints" / f"iter_{step or 0:07d}"
    meta = ckpt / "pz_checkpoint.json"  # written last by a save
    result = {"code": code, "out": out, "seconds": exited - float(sent.read_text()), "step": step,
              "complete_step": json.loads(meta.read_text())["step"] if meta.is_file() else None,
              "stop": json.loads((run_dir / "stop.json").read_text()),
              "distcp_bytes": sum(p.stat().st_size for p in ckpt.glob("*.distcp")),
              "lock_left": (run_dir / "run.lock").exists(), "logged": sorted(rl_records(run_dir)[1])}
    print(f"{spec}: exit {code} after {result['seconds']:.1f} s, checkpoint step {result['step']}")
    if plant_stale_lock:
        dead = subprocess.Popen(["true"])
        dead.wait()
        result["dead_pid"] = dead.pid
        (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                      "start_time": time.time() - 60, "slurm_job_id": None}))
    result["resume_code"], result["resume_out"], _ = train(run_dir, cache, *overrides)
    result["run_dir"] = run_dir
    return result


def assert_stopped_and_resumed(r, reference, step, sig, abandoned):
    assert r["code"] == EXIT_STOPPED, r["out"][-8000:]
    assert r["step"] == r["complete_step"] == step and r["logged"] == list(range(1, step + 1))
    assert r["stop"]["signal"] == sig and r["stop"]["step"] == step and r["stop"]["abandoned_step"] is abandoned
    assert not r["lock_left"]
    assert r["resume_code"] == 0, r["resume_out"][-8000:]
    assert f"resumed from {r['run_dir'] / 'checkpoints' / f'iter_{step:07d}'}" in r["resume_out"]
    assert_matches(r["run_dir"], reference["rl"], range(1, STEPS + 1))


@pytest.fixture(scope="module")
def agent_sigterm(tmp_path_factory, cache):
    # in the rollout of step 2: the step is abandoned and the state it started from (step 1) is saved
    return interrupted(tmp_path_factory.mktemp("agent_sigterm"), cache, "agent:SIGTERM:rollout:2",
                       plant_stale_lock=True)


def test_sigterm_to_the_agent(agent_sigterm, reference):
    """The launcher forwards SIGTERM to the ranks and waits for them; it does not kill them."""
    assert "launcher: SIGTERM forwarded to ranks" in agent_sigterm["out"]
    assert_stopped_and_resumed(agent_sigterm, reference, step=1, sig="SIGTERM", abandoned=True)
    assert agent_sigterm["stop"]["save_seconds"] > 0  # a checkpoint of step 1 was written for the stop


def test_stale_lock_is_taken_over(agent_sigterm, reference):
    """The resume finds a lock whose pid is dead on this host, says so, takes it, and resumes exactly."""
    pid = agent_sigterm["dead_pid"]
    assert f"run lock: took over the lock of {agent_sigterm['run_dir']} from pid {pid} on host" in agent_sigterm["resume_out"]
    assert f"pid {pid} is not running on {socket.gethostname()}" in agent_sigterm["resume_out"]
    assert_stopped_and_resumed(agent_sigterm, reference, step=1, sig="SIGTERM", abandoned=True)
    assert not (agent_sigterm["run_dir"] / "run.lock").exists()  # released at the end


def test_sigterm_to_the_whole_job(tmp_path, cache, reference):
    """SIGTERM to the agent and every process below it during the update of step 2: the step is finished."""
    r = interrupted(tmp_path, cache, "tree:SIGTERM:update:2")
    assert_stopped_and_resumed(r, reference, step=2, sig="SIGTERM", abandoned=False)
    # what the plan says a checkpoint of this run weighs (its early-warning lead is derived from it): the
    # tensors written, within the per-tensor overhead that tiny shapes make visible (0.03 % at 0.44B)
    assert 1.0 <= r["distcp_bytes"] / planned_checkpoint_bytes() < 1.15


def test_sigusr1_to_the_whole_job(tmp_path, cache, reference):
    """SLURM's early warning to every process of the job: the agent survives it (torchrun's default action
    would end it), the ranks finish step 1, save and exit; the record names SIGUSR1 (requeue)."""
    r = interrupted(tmp_path, cache, "tree:SIGUSR1:update:1")
    assert "launcher: SIGUSR1 forwarded to ranks" in r["out"]
    assert_stopped_and_resumed(r, reference, step=1, sig="SIGUSR1", abandoned=False)


def test_signal_during_a_save(tmp_path, cache, reference):
    """SIGTERM to every process of the job, sent by one of megatron-core's writer processes while it writes
    step 1's checkpoint: the writers survive, the save completes, step 2 is abandoned after its rollout and
    nothing more needs writing."""
    r = interrupted(tmp_path, cache, "tree:SIGTERM:save:1", "train.save_interval=1")
    assert_stopped_and_resumed(r, reference, step=1, sig="SIGTERM", abandoned=True)
    assert r["stop"]["save_seconds"] == 0.0 and "written before the signal" in r["out"]


def test_signal_during_the_warm_start(tmp_path, cache):
    """A stop agreed between two warm-start steps abandons the warm start: nothing of it is saved (the next
    job runs it again), the run exits 75 and frees the run directory."""
    run_dir, sent = tmp_path / "run", tmp_path / "sent"
    code, out, _ = train(run_dir, cache, "warm_start.enabled=true",
                         env={"PZ_TEST_SIGNAL": "tree:SIGUSR1:warm:2", "PZ_TEST_SIGNAL_LOG": str(sent)})
    assert code == EXIT_STOPPED, out[-8000:]
    assert "stopped on SIGUSR1 in warm-start step 3 (abandoned" in out
    assert not (run_dir / "warm_start" / "latest_checkpointed_iteration.txt").exists()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "run.lock").exists()
    stop = json.loads((run_dir / "stop.json").read_text())
    assert stop["signal"] == "SIGUSR1" and stop["step"] is None and stop["checkpoint"] is None


def test_second_job_on_a_locked_run_dir(reference):
    """A second job on a run directory in use stops before writing anything, naming the holder; the first
    job runs on undisturbed (its metrics are the reference every other test here matches)."""
    code, out, _ = reference["second"]
    holder = reference["holder"]
    assert code == 2, out[-8000:]
    assert (f"run directory {reference['run_dir']} is in use by pid {holder['pid']} on host {holder['host']}"
            in out), out[-8000:]
    assert reference["untouched"]  # nothing in the run directory was written or touched by the second job
    assert holder["host"] == socket.gethostname() and holder["start_time"] > 0
    assert sorted(reference["rl"]) == [1, 2, 3]
