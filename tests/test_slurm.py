"""The project's sbatch scripts on a real SLURM: a one-node slurmctld + slurmd of the test run's own
(``slurm_cluster`` in conftest.py, tests/slurm_cluster.py), jobs submitted as a user would.

From the repository root, ``sbatch`` of ``slurm/pretrainzero_30b.sh`` (``pretrainzero_30b_async.sh`` for the
split) with command-line overrides for this CPU node (``--nodes=1 --gpus-per-node=0 --exclusive=user
--time=... --signal=B:USR1@90 --output=...``) and the environment a user sets: ``GPUS_PER_NODE=2``, ``CONFIG``
the tiny default with the test shapes in ``EXTRA_OVERRIDES``, ``MODEL_DIR`` an HF folder exported here (a
random-initialised Qwen3 of the test shapes), ``RUN_DIR`` in a temporary folder. Every job goes through
``slurm/launch.sh``: the run lock, ``megatron-pz plan`` with the job's time left, the HF import (the reference
job's; the other run directories get a copy of it), the launcher under ``srun``, and
``python -m megatron_pz.runtime.requeue``. Assertions read the run directory, the job's ``--output`` file
(appended by every attempt) and ``scontrol show job`` (no accounting database here: ``Restarts``,
``JobState``, ``ExitCode``).

The scenarios run at the same time on the one node (the cluster declares 8 CPUs; the ranks share the host's
real cores), each in a thread of :func:`runs`; the tests below assert on what each left. Time is compressed:
SLURM checks time limits and early warnings on a 30 s tick, so the early-warning scenario shortens its
job's time limit with ``scontrol update`` once it trains (the warning then comes at the next tick), holds its
ranks still meanwhile (SIGSTOP: a step that takes long, so that the warning lands mid-run however fast the
tiny steps are) and gives the time back once the warning is on its way (each attempt of a requeued job has
the whole limit again); a requeue waits ``cred_expire`` = 10 s here (120 s by default).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from megatron_pz.train.metrics import read_metrics
from multiproc import REPO_ROOT
from test_trainer import RLP, TINY

# slow: in CI. The first test's setup runs every scenario: about 400 CPU-s, 7.5-10 min on this project's machine
# with other jobs on its 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = "examples/tiny_cpu.yaml"  # relative: submitted from the repository root, as the README says
STEPS = 30  # RL steps of every run
LEAD = 90  # --signal=B:USR1@LEAD, and the plan's lead below (preemption.phase_seconds=80 + 2 x ~0 s write)
STARTUP = 60  # preemption.startup_seconds: the time limit must exceed LEAD + STARTUP (launch.sh's check)
COMPARED = ("loss", "grad_norm", "rlp/reward_mean", "rlp/response_length_mean")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def overrides(cache: Path, steps: int, *more: str) -> list[str]:
    return [*TINY, *RLP, "warm_start.enabled=false", f"data.default_cache_dir={cache}", f"train.steps={steps}",
            "train.save_interval=1000", f"preemption.phase_seconds={LEAD - 10}",
            f"preemption.startup_seconds={STARTUP}", *more]


class Cluster:
    """sbatch / scontrol / scancel against the test cluster, from the repository root."""

    def __init__(self, slurm, root: Path, model_dir: Path):
        self.slurm, self.root, self.model_dir = slurm, root, model_dir

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=self.slurm.env(), capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr}")
        return out

    def sbatch(self, run_dir: Path, extra: list[str], *args: str, script: str = "slurm/pretrainzero_30b.sh",
               time_limit: int = 10) -> str:
        env = self.slurm.env()
        env.update({
            "CONFIG": CONFIG, "MODEL_DIR": str(self.model_dir), "RUN_DIR": str(run_dir), "GPUS_PER_NODE": "2",
            "EXTRA_OVERRIDES": " ".join(extra), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this env's megatron-pz
        })
        cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--exclusive=user", f"--time={time_limit}",
               f"--signal=B:USR1@{LEAD}", f"--output={self.root}/slurm-%j.out", f"--job-name={run_dir.name}",
               *args, script]
        out = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        for attempt in range(5):  # slurmctld may drop a connection on a loaded machine (scontrol dies of SIGPIPE)
            out = self.run("scontrol", "show", "job", "-o", job_id, check=attempt == 4)
            if out.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", out.stdout))
            time.sleep(1)

    def output(self, job_id: str) -> str:
        path = self.root / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait(self, job_id: str, restarts: int = 0, timeout: float = 600) -> dict:
        """The job once it has ended, after ``restarts`` requeues."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL and int(info["Restarts"]) >= restarts:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {self.job(job_id)}\n"
                             f"{self.output(job_id)[-6000:]}")

    def wait_for(self, what: str, predicate, job_id: str, timeout: float = 400, poll: float = 0.1):
        """``predicate()``'s first true value, polled every ``poll`` s; fails once the job has ended without it
        (asked of slurmctld once a second)."""
        deadline = time.time() + timeout
        next_look = time.time() + 1.0
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            if time.time() >= next_look:
                next_look = time.time() + 1.0
                if self.job(job_id)["JobState"] in TERMINAL:
                    value = predicate()
                    if value:
                        return value
                    raise AssertionError(f"job {job_id} ended before {what}:\n{self.output(job_id)[-6000:]}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what} (job {job_id}):\n{self.output(job_id)[-6000:]}")


def rl_steps(run_dir: Path) -> list[dict]:
    """Every RL record of the run's metrics, in the order written (a step redone after a resume twice)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_metrics(run_dir) if r["phase"] == "rl"]  # complete lines: the job may be writing


def last_step(run_dir: Path) -> int:
    steps = rl_steps(run_dir)
    return steps[-1]["step"] if steps else 0


def checkpoint_step(run_dir: Path):
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(latest.read_text()) if latest.is_file() else None


def iter_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"iter_{step:07d}"


def stop_record(run_dir: Path):
    path = run_dir / "stop.json"
    return json.loads(path.read_text()) if path.is_file() else None


def job_lines(text: str) -> list[str]:
    """The line each attempt ends with (python -m megatron_pz.runtime.requeue, or launch.sh before the ranks)."""
    return [line for line in text.splitlines() if line.startswith("job: ")]


def ranks_of(job_id: str) -> list:
    """The rank processes of a job's training step on this host (children of its launcher), by rank."""
    import psutil

    ranks = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "megatron_pz.runtime.launcher" in cmd and f"--rdzv_id={job_id}" in cmd:
            try:
                ranks += proc.children(recursive=False)
            except psutil.NoSuchProcess:
                pass
    return sorted(ranks, key=lambda p: int(p.environ().get("RANK", 0)))


def signal_state(pid: int) -> dict:
    """The masks of /proc/PID/status: blocked, pending (thread and process) and caught signals."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {k: int(fields[k].strip(), 16) for k in ("SigBlk", "SigPnd", "ShdPnd", "SigCgt")}


def ended(info: dict) -> tuple[str, str, str]:
    """How a job ended, as scontrol shows it: (JobState, ExitCode, Restarts)."""
    return info["JobState"], info["ExitCode"], info["Restarts"]


def started_at(info: dict) -> float:
    return datetime.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S").timestamp()


# ------------------------------------------------------------------ the scenarios (each in a thread)


def reference(c: Cluster, cache: Path) -> dict:
    """A job that runs to the end: plan, HF import under the lock, every step, exit 0."""
    run_dir = c.root / "reference"
    holders, job = [], c.sbatch(run_dir, overrides(cache, STEPS))
    while c.job(job)["JobState"] not in TERMINAL:  # who holds the run lock, while the job runs
        try:
            holder = json.loads((run_dir / "run.lock").read_text())
            if holder not in holders:
                holders.append(holder)
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    info = c.wait(job)
    return {"job": job, "run_dir": run_dir, "holders": holders, "info": info, "out": c.output(job),
            "summary": [f"runs to the end: {ended(info)}, {last_step(run_dir)} steps"]}


def warning_then_requeue(c: Cluster, init: Path, cache: Path) -> dict:
    """Attempt 1: SLURM's own early warning (--signal=B:USR1@LEAD before the time limit) while the job trains:
    checkpoint, exit 75, requeued by launch.sh. The ranks are held still (SIGSTOP, a step that takes long) from
    the moment the time limit is shortened until the warning has reached them, so that it lands mid-run however
    fast the steps are; meanwhile a second job on the same run directory is refused. Attempt 2: a
    preemption-style scontrol requeue while it trains (SIGTERM to every process of the job, requeued by SLURM).
    Attempt 3 resumes and finishes."""
    run_dir = prepared(c, "warning", init)
    job = c.sbatch(run_dir, overrides(cache, STEPS))
    c.wait_for("RL step 2", lambda: last_step(run_dir) >= 2, job)
    ranks = ranks_of(job)
    for rank in ranks:
        rank.suspend()
    try:
        step_then = last_step(run_dir)
        elapsed = time.time() - started_at(c.job(job))
        minutes = math.floor((elapsed + LEAD + 30) / 60)  # end - now <= LEAD + 30 s: warned at SLURM's next tick
        c.run("scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}")
        shortened = time.time()
        holder = json.loads((run_dir / "run.lock").read_text())
        second = c.sbatch(run_dir, overrides(cache, STEPS))  # while the first job holds the directory
        second = {"job": second, "info": c.wait(second), "out": c.output(second), "holder": holder}
        warned = c.wait_for("the early warning", lambda: "SIGUSR1 forwarded" in c.output(job) and time.time(), job,
                            timeout=90)
        c.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")  # sent; the next attempt has the whole limit
        usr1 = 1 << (signal.SIGUSR1 - 1)
        c.wait_for("the warning to reach the ranks (pending while they are stopped)", lambda: all(
            (st := signal_state(rank.pid))["SigPnd"] & usr1 or st["ShdPnd"] & usr1 for rank in ranks), job, timeout=60)
    finally:
        for rank in ranks:
            rank.resume()
    resumed = time.time()
    stop_seen = c.wait_for("the stop record", lambda: stop_record(run_dir) and time.time(), job, poll=0.05)
    exit_seen = c.wait_for("attempt 1's end", lambda: job_lines(c.output(job)) and time.time(), job, poll=0.05)
    first = {"stop": stop_record(run_dir), "checkpoint": checkpoint_step(run_dir), "logged": last_step(run_dir),
             "seconds": exit_seen - resumed}
    c.wait_for("attempt 2's second RL step", lambda: int(c.job(job)["Restarts"]) == 1
               and last_step(run_dir) >= first["checkpoint"] + 2, job, poll=0.5)
    sent = time.time()
    c.run("scontrol", "requeue", job)
    exit_seen = c.wait_for("attempt 2's end", lambda: len(job_lines(c.output(job))) >= 2 and time.time(), job,
                           poll=0.05)
    requeued = {"stop": stop_record(run_dir), "checkpoint": checkpoint_step(run_dir), "seconds": exit_seen - sent}
    info = c.wait(job, restarts=2)
    return {"job": job, "run_dir": run_dir, "info": info, "out": c.output(job), "first": first, "second": second,
            "requeued": requeued, "tick_wait": warned - shortened, "step_at_update": step_then, "summary": [
                f"early warning: {warned - shortened:.1f} s after the time limit was shortened to {minutes} min "
                f"(ranks stopped after step {step_then}); from their resumption: stop record after "
                f"{stop_seen - resumed:.1f} s, exit after {first['seconds']:.1f} s; checkpoint step "
                f"{first['checkpoint']}",
                f"scontrol requeue: exit after {requeued['seconds']:.1f} s, checkpoint step {requeued['checkpoint']}; "
                f"job {ended(info)}",
                f"second job on the run directory: {ended(second['info'])}"]}


def usr1_cancel_dead_rank(c: Cluster, init: Path, cache: Path) -> dict:
    """Job A: scancel --signal=USR1 while it trains (to every process of the step, not to the batch script):
    checkpoint, exit 75, requeued by launch.sh; its second attempt: scancel while it trains (checkpoint, exit 75,
    CANCELLED, not requeued). Job B, resubmitted, resumes, and loses rank 0 to kill -9 after a periodic
    checkpoint: it fails, not requeued, with rank 0's lock left behind. Job C takes the stale lock over, resumes
    from that periodic checkpoint and finishes."""
    run_dir = prepared(c, "cancel_kill", init)
    extra = overrides(cache, STEPS, "train.save_interval=5")
    job = c.sbatch(run_dir, extra)
    c.wait_for("RL step 2", lambda: last_step(run_dir) >= 2, job)
    sent = time.time()
    c.run("scancel", "--signal=USR1", job)
    exit_seen = c.wait_for("attempt 1's end", lambda: job_lines(c.output(job)) and time.time(), job, poll=0.05)
    usr1 = {"stop": stop_record(run_dir), "checkpoint": checkpoint_step(run_dir), "seconds": exit_seen - sent}
    c.wait_for("attempt 2's second RL step", lambda: int(c.job(job)["Restarts"]) == 1
               and last_step(run_dir) >= usr1["checkpoint"] + 2, job, poll=0.5)
    sent = time.time()
    c.run("scancel", job)
    exit_seen = c.wait_for("attempt 2's end", lambda: len(job_lines(c.output(job))) >= 2 and time.time(), job,
                           poll=0.05)
    cancelled = {"job": job, "info": c.wait(job, restarts=1), "out": c.output(job), "stop": stop_record(run_dir),
                 "checkpoint": checkpoint_step(run_dir), "seconds": exit_seen - sent, "usr1": usr1}

    job = c.sbatch(run_dir, extra)
    periodic = c.wait_for("a periodic checkpoint past the stop and a step after it", lambda: (
        (step := checkpoint_step(run_dir)) and step % 5 == 0 and step > cancelled["checkpoint"]
        and last_step(run_dir) > step and step), job)
    ranks = ranks_of(job)
    assert len(ranks) == 2, ranks
    sent = time.time()
    ranks[0].kill()  # SIGKILL of rank 0, the holder of the run lock
    exit_seen = c.wait_for("the failed job's end", lambda: job_lines(c.output(job)) and time.time(), job, poll=0.05)
    killed = {"job": job, "info": c.wait(job), "out": c.output(job), "periodic": periodic,
              "logged": last_step(run_dir), "lock": json.loads((run_dir / "run.lock").read_text()),
              "seconds": exit_seen - sent}

    job = c.sbatch(run_dir, extra)
    resumed = {"job": job, "info": c.wait(job), "out": c.output(job)}
    return {"run_dir": run_dir, "cancelled": cancelled, "killed": killed, "resumed": resumed, "summary": [
        f"scancel --signal=USR1: exit after {usr1['seconds']:.1f} s, checkpoint step {usr1['checkpoint']}; scancel: "
        f"exit after {cancelled['seconds']:.1f} s, checkpoint step {cancelled['checkpoint']}, job "
        f"{ended(cancelled['info'])}", f"kill -9 of rank 0 at step {killed['logged']}: exit after "
        f"{killed['seconds']:.1f} s, job {ended(killed['info'])}; resubmitted: resumed from step {periodic}, job "
        f"{ended(resumed['info'])}"]}


def signal_at_start_up(c: Cluster, init: Path, cache: Path) -> dict:
    """scancel --signal=USR1 to the training step as its ranks start (before they can handle it): held, acted
    on at their first agreement point (exit 75, nothing trained), and not requeued: no progress."""
    run_dir = prepared(c, "start_up", init)
    job = c.sbatch(run_dir, overrides(cache, STEPS))
    ranks = c.wait_for("the ranks to start", lambda: r if len(r := ranks_of(job)) == 2 else None, job, poll=0.05)
    sent = time.time()
    c.run("scancel", "--signal=USR1", job)
    time.sleep(0.5)
    states = []
    for rank in ranks:
        try:
            states.append(signal_state(rank.pid))
        except FileNotFoundError:  # the rank died of it
            states.append(None)
    exit_seen = c.wait_for("the attempt's end", lambda: job_lines(c.output(job)) and time.time(), job, poll=0.05)
    info = c.wait(job)
    return {"job": job, "run_dir": run_dir, "states": states, "info": info, "out": c.output(job), "summary": [
        f"SIGUSR1 at start-up: exit after {exit_seen - sent:.1f} s, job {ended(info)}; the ranks' masks then: {states}"]}


def refused(c: Cluster, cache: Path) -> dict:
    """Jobs stopped before the GPUs are taken: the disaggregated script with a split that does not add up, a time
    limit not longer than the early warning's lead plus start-up, and a job whose batch script gets the warning
    (scancel --batch --signal=USR1) while it plans: held until the plan returns, then the ranks are not started."""
    split_dir, short_dir, held_dir = c.root / "bad_split", c.root / "short_limit", c.root / "held"
    split = c.sbatch(split_dir, overrides(cache, STEPS, "rollout.placement=disaggregated", "rollout.ranks=2"),
                     script="slurm/pretrainzero_30b_async.sh")
    short = c.sbatch(short_dir, overrides(cache, STEPS), time_limit=2)
    held = c.sbatch(held_dir, overrides(cache, STEPS))
    c.wait_for("the batch script to start", lambda: f"launch.sh: job {held} attempt 1" in c.output(held), held,
               poll=0.02)
    c.run("scancel", "--batch", "--signal=USR1", held)
    result = {name: {"job": job, "info": c.wait(job), "out": c.output(job), "run_dir": run_dir}
              for name, job, run_dir in (("split", split, split_dir), ("short", short, short_dir),
                                         ("held", held, held_dir))}
    result["summary"] = [f"{name}: job {ended(result[name]['info'])}" for name in ("split", "short", "held")]
    return result


def prepared(c: Cluster, name: str, init: Path) -> Path:
    """A run directory whose HF import is done: a copy of the reference job's, once it has written it."""
    deadline = time.time() + 600
    while not (init / "latest_checkpointed_iteration.txt").is_file():  # written last by the import
        assert time.time() < deadline, f"no HF import in {init} after 600 s"
        time.sleep(0.5)
    run_dir = c.root / name
    shutil.copytree(init, run_dir / "init")
    return run_dir


@pytest.fixture(scope="module")
def runs(slurm_cluster, pz_data_cache, tmp_path_factory):
    """Every scenario, run at once on the cluster; {name: result, or the exception it raised}."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # the test's model folder (the tiny default's shapes with TINY's overrides)
    subprocess.run([sys.executable, "-c", EXPORT, str(root / "model"), str(pz_data_cache)], check=True, env=env,
                   cwd=REPO_ROOT, timeout=600)
    c = Cluster(slurm_cluster, root, root / "model")
    init = root / "reference" / "init"  # the reference job's HF import, copied into the other run directories
    scenarios = {
        "reference": lambda: reference(c, pz_data_cache),
        "warning_then_requeue": lambda: warning_then_requeue(c, init, pz_data_cache),
        "usr1_cancel_dead_rank": lambda: usr1_cancel_dead_rank(c, init, pz_data_cache),
        "signal_at_start_up": lambda: signal_at_start_up(c, init, pz_data_cache),
        "refused": lambda: refused(c, pz_data_cache),
    }
    started = time.time()

    def guarded(fn):
        try:
            return fn()
        except BaseException as exc:  # reported by the test that reads this scenario
            exc.add_note(traceback.format_exc())
            return exc

    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {name: pool.submit(guarded, fn) for name, fn in scenarios.items()}
        results = {name: f.result() for name, f in futures.items()}
    print(f"SLURM scenarios: {time.time() - started:.0f} s for all")
    for name, result in results.items():  # the figures README's table gives
        for line in (result["summary"] if isinstance(result, dict) else [f"failed: {result!r}"]):
            print(f"  {name}: {line}")
    return results


EXPORT = """
import sys
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from megatron_pz.data.default import ensure_default_dataset
torch.manual_seed(0)
config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
                     rms_norm_eps=1e-6, rope_theta=10000.0)
Qwen3ForCausalLM(config).save_pretrained(sys.argv[1])
ensure_default_dataset(sys.argv[2], 1024, 64)  # built once here, not by several jobs at once
"""


def scenario(runs, name):
    result = runs[name]
    if isinstance(result, BaseException):
        raise result
    return result


def assert_equal_to_reference(run_dir: Path, reference: dict, steps: int) -> None:
    """Every RL record the run wrote (a step redone after a resume twice) equals the reference's step, and
    together they are steps 1..steps."""
    ref = {r["step"]: r for r in rl_steps(reference["run_dir"])}
    mine = rl_steps(run_dir)
    assert sorted({r["step"] for r in mine}) == list(range(1, steps + 1))
    for r in mine:
        for key in COMPARED:
            assert r[key] == ref[r["step"]][key], (run_dir.name, r["step"], key, r[key], ref[r["step"]][key])


# ------------------------------------------------------------------ the tests


def test_a_job_runs_to_the_end(runs):
    r = scenario(runs, "reference")
    info, out, run_dir = r["info"], r["out"], r["run_dir"]
    assert ended(info) == ("COMPLETED", "0:0", "0"), out[-6000:]
    assert f"launch.sh: job {r['job']} attempt 1 on" in out
    assert f"memory plan of {CONFIG}" in out and f"SLURM early warning: #SBATCH --signal=B:USR1@{LEAD}" in out
    left = int(re.search(r"time limit: (\d+) s; the early warning comes", out).group(1))  # squeue's time left
    assert 540 <= left <= 600
    assert f"wrote {run_dir / 'init' / 'iter_0000000'}" in out
    # the HF import ran under the run lock (its srun step), then rank 0 of the training step took it
    convert = [h for h in r["holders"] if "hf-to-megatron" in h["command"]]
    train = [h for h in r["holders"] if "train" in h["command"].split()]
    assert convert and train and {h["slurm_job_id"] for h in convert + train} == {r["job"]}, r["holders"]
    assert [s["step"] for s in rl_steps(run_dir)] == list(range(1, STEPS + 1))
    assert all(s["grad_norm"] > 1e-3 for s in rl_steps(run_dir))  # the updates compared elsewhere are not trivial
    assert job_lines(out) == ["job: finished: every step ran"]
    assert not (run_dir / "stop.json").exists() and not (run_dir / "run.lock").exists()


def test_a_second_job_on_the_run_directory_is_refused(runs):
    r = scenario(runs, "warning_then_requeue")
    second, holder = r["second"], r["second"]["holder"]
    info, out = second["info"], second["out"]
    assert holder["slurm_job_id"] == r["job"] and "train" in holder["command"].split()
    assert ended(info) == ("FAILED", "2:0", "0"), out[-6000:]
    assert (f"run_lock: error: run directory {r['run_dir']} is in use by pid {holder['pid']} on host "
            f"{holder['host']}, SLURM job {r['job']}, started") in out
    assert "memory plan" not in out and not (r["run_dir"] / "logs" / f"plan-{second['job']}.txt").exists()
    assert r["info"]["JobState"] == "COMPLETED"  # the first job ran on undisturbed


def test_the_early_warning_and_a_preemption_requeue(runs):
    """Each stop writes a checkpoint and exits 75; launch.sh requeues on the warning, SLURM on scontrol requeue;
    the three attempts' metrics join into the uninterrupted run."""
    ref, r = scenario(runs, "reference"), scenario(runs, "warning_then_requeue")
    info, out, first, requeued, run_dir = r["info"], r["out"], r["first"], r["requeued"], r["run_dir"]
    assert r["tick_wait"] <= 35  # SLURM's 30 s tick
    assert first["stop"]["signal"] == "SIGUSR1" and first["stop"]["exit_code"] == 75
    assert first["stop"]["slurm_job_id"] == r["job"] and first["stop"]["slurm_restart_count"] == "0"
    # mid-run: the step the ranks were in when they were held still is abandoned or finished
    assert first["checkpoint"] == first["stop"]["step"] in (r["step_at_update"], r["step_at_update"] + 1)
    assert requeued["stop"]["signal"] == "SIGTERM" and requeued["stop"]["slurm_restart_count"] == "1"
    assert first["checkpoint"] < requeued["checkpoint"] == requeued["stop"]["step"] < STEPS
    assert ended(info) == ("COMPLETED", "0:0", "2"), out[-6000:]
    assert job_lines(out) == [
        f"job: stopped on SLURM's early warning (SIGUSR1): checkpoint of step {first['checkpoint']} at "
        f"{iter_dir(run_dir, first['checkpoint'])}; requeueing job {r['job']} to continue",
        f"job: stopped on SIGTERM: checkpoint of step {requeued['checkpoint']} at "
        f"{iter_dir(run_dir, requeued['checkpoint'])}; SLURM requeues a preempted job (--requeue), otherwise "
        f"resubmit to continue",
        "job: finished: every step ran"]
    attempts = out.split(f"launch.sh: job {r['job']} attempt ")  # --open-mode=append: every attempt's output
    assert [a[:2] for a in attempts[1:]] == ["1 ", "2 ", "3 "]
    assert f"resumed from {iter_dir(run_dir, first['checkpoint'])}" in attempts[2]
    assert f"resumed from {iter_dir(run_dir, requeued['checkpoint'])}" in attempts[3]
    log = (run_dir / "logs" / f"train-{r['job']}.log").read_text()  # the train log is appended by each attempt too
    assert len(re.findall(rf"launch.sh: job {r['job']} attempt", log)) == 3
    assert_equal_to_reference(run_dir, ref, STEPS)
    assert [s["step"] for s in rl_steps(run_dir)] == list(range(1, STEPS + 1))  # each step logged once


def test_scancel_usr1_then_scancel_then_a_dead_rank_then_a_stale_lock(runs):
    ref, r = scenario(runs, "reference"), scenario(runs, "usr1_cancel_dead_rank")
    cancelled, killed, resumed, run_dir = r["cancelled"], r["killed"], r["resumed"], r["run_dir"]
    c, usr1 = cancelled, cancelled["usr1"]
    # scancel --signal=USR1 reaches the step's processes (not the batch script): stop, 75, requeued by launch.sh
    assert usr1["stop"]["signal"] == "SIGUSR1" and usr1["stop"]["step"] == usr1["checkpoint"] >= 2
    # scancel: SIGTERM to every process of the job; the ranks write a checkpoint and exit 75; SLURM ends the job
    assert ended(c["info"])[::2] == ("CANCELLED", "1"), c["out"][-6000:]
    assert c["stop"]["signal"] == "SIGTERM" and c["stop"]["step"] == c["checkpoint"] > usr1["checkpoint"]
    assert job_lines(c["out"]) == [
        f"job: stopped on SLURM's early warning (SIGUSR1): checkpoint of step {usr1['checkpoint']} at "
        f"{iter_dir(run_dir, usr1['checkpoint'])}; requeueing job {c['job']} to continue",
        f"job: stopped on SIGTERM: checkpoint of step {c['checkpoint']} at {iter_dir(run_dir, c['checkpoint'])}; "
        f"SLURM requeues a preempted job (--requeue), otherwise resubmit to continue"]
    # kill -9 of a rank: the job fails, not requeued; rank 0's lock is left behind
    k = killed
    assert ended(k["info"]) == ("FAILED", "1:0", "0"), k["out"][-6000:]
    assert f"resumed from {iter_dir(run_dir, c['checkpoint'])}" in k["out"]
    assert job_lines(k["out"]) == [f"job: failed (srun exit code 1): not requeued; the latest checkpoint in "
                                   f"{run_dir}/checkpoints is where a resubmitted job resumes"]
    assert k["lock"]["slurm_job_id"] == k["job"] and k["logged"] > k["periodic"]
    # the resubmission takes the stale lock over, saying why, and resumes from the periodic checkpoint
    s = resumed
    assert ended(s["info"]) == ("COMPLETED", "0:0", "0"), s["out"][-6000:]
    assert (f"run_lock: took over the lock of {run_dir} from pid {k['lock']['pid']} on host {k['lock']['host']}, "
            f"SLURM job {k['job']}") in s["out"]
    assert f"SLURM job {k['job']} is no longer running (FAILED)" in s["out"]
    assert f"resumed from {iter_dir(run_dir, k['periodic'])}" in s["out"]
    assert_equal_to_reference(run_dir, ref, STEPS)  # steps redone after the periodic checkpoint included
    assert not (run_dir / "run.lock").exists()


def test_a_stop_signal_during_start_up_is_held(runs):
    r = scenario(runs, "signal_at_start_up")
    info, out, run_dir = r["info"], r["out"], r["run_dir"]
    usr1 = 1 << (signal.SIGUSR1 - 1)
    # it reached both ranks before their handlers were up: blocked, pending, not caught yet, and not fatal
    for state in r["states"]:
        assert state is not None and state["SigBlk"] & usr1 and (state["SigPnd"] | state["ShdPnd"]) & usr1
        assert not state["SigCgt"] & usr1
    stop = stop_record(run_dir)
    assert stop["signal"] == "SIGUSR1" and stop["step"] is None and stop["checkpoint"] is None
    assert "SIGUSR1 before the run started: no RL step to save yet" in out
    assert ended(info) == ("FAILED", "75:0", "0"), out[-6000:]
    assert job_lines(out) == [
        "job: stopped on SLURM's early warning (SIGUSR1) before finishing an RL step (attempt 1 began at step 0; "
        "no RL step to save yet): not requeued, since the next attempt would be warned the same way. The time "
        "limit leaves too little time after start-up before the warning: resubmit with a longer --time or a "
        "shorter --signal lead"]
    assert rl_steps(run_dir) == [] and not (run_dir / "run.lock").exists()


def test_jobs_refused_before_taking_the_gpus(runs):
    r = scenario(runs, "refused")
    split, short = r["split"], r["short"]
    for job in (split, short):
        assert ended(job["info"]) == ("FAILED", "2:0", "0"), \
            job["out"][-6000:]
        assert "launch: examples/tiny_cpu.yaml on 1 x 2 GPUs refused before taking them (see above)" in job["out"]
        assert not (job["run_dir"] / "init").exists() and not (job["run_dir"] / "checkpoints").exists()
        assert "[rl step" not in job["out"] and "memory plan on cpu" not in job["out"]  # no rank started
    assert ("megatron-pz plan: error: rollout.ranks=2 leaves no training rank in a job of 2 ranks" in split["out"])
    out = short["out"]
    assert "megatron-pz plan: error: the job's time limit leaves 1" in out and f"(--signal=B:USR1@{LEAD}: " in out
    assert f"start-up ({STARTUP} s, preemption.startup_seconds) = {LEAD + STARTUP} s" in out
    assert "Submit with a longer time limit (--time=4 or more)" in out


def test_a_stop_signal_before_the_training_step_is_held_by_the_batch_script(runs):
    r = scenario(runs, "refused")["held"]
    out = r["out"]
    assert ended(r["info"]) == ("FAILED", "75:0", "0"), out[-6000:]
    assert "launch.sh: SIGUSR1 before the ranks started: holding it; they will not be started" in out
    assert "s; the early warning comes" in out  # the plan ran to its end (scancel --batch signals the shell only)
    assert job_lines(out) == ["job: stopped on SIGUSR1 before the ranks started (nothing trained in this attempt): "
                              "not requeued; resubmit to continue"]
    assert not (r["run_dir"] / "init").exists() and "[rl step" not in out and "memory plan on cpu" not in out
