#!/usr/bin/env python
"""What a stop signal does to a 2-rank torchrun job of the tiny model, route by route.

usage: python bench/bench_preemption.py --cache DIR [--launcher pz|torchrun] [--repo PATH]
       [--routes agent:SIGTERM,tree:SIGUSR1,...] [--after-step 2] [--workdir DIR]

Each route starts a fresh run (a 3-step warm start, whose checkpoint is the run's first save, then RLP
RL steps; DP=2, gloo, ``train.save_interval`` 100), waits until RL step
``--after-step`` is in ``metrics.jsonl`` and sends the signal from outside, as SLURM or a person would:

* ``agent``: the launcher process only (``kill PID``);
* ``tree``: the launcher and every process below it at once (what ``scancel`` / a time limit / SLURM's
  ``--signal`` do to a job step: every process of the step is signalled);
* ``workers``: the ranks only (the launcher's direct children);
* ``save``: like ``tree``, but at the moment a checkpoint save is under way (a ``.tmp_iter_*`` directory
  exists; the run saves every step).

``agent:SIGKILL`` kills the agent outright; its seconds are those until its ranks are gone (the agent's
exit code is then -9 whatever they did). ``rank:SIGKILL`` kills one rank (a dead rank).

Prints one row per route: exit code, seconds from the signal to the launcher's exit, the step of the
newest complete checkpoint, and processes of the job still alive afterwards (then killed). ``--repo``
runs another checkout (e.g. the commit before a change, with ``--launcher torchrun``). Timing depends on
the load of the machine; the signal lands wherever the run is, so the step numbers vary by one.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from megatron_pz.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.architecture.vocab_size=1024", "model.architecture.hidden_size=64",
    "model.architecture.intermediate_size=128", "model.architecture.num_hidden_layers=2",
    "model.architecture.head_dim=16", "data.default_vocab_size=1024", "data.default_passage_tokens=64",
    "train.passages_per_step=4", "train.eval_passages=4", "train.eval_max_new_tokens=6",
    "train.max_prompt_tokens=400", "train.tensorboard=false", "warm_start.steps=3", "warm_start.rows_per_step=4",
    "objective.name=rlp", "objective.rlp_group=2", "objective.rlp_thought_max_tokens=4", "optimizer.lr=1e-3",
]
ROUTES = ["agent:SIGTERM", "tree:SIGTERM", "workers:SIGTERM", "agent:SIGUSR1", "tree:SIGUSR1",
          "workers:SIGUSR1", "save:SIGTERM", "agent:SIGKILL", "rank:SIGKILL"]


def launch_command(launcher: str, repo: Path, nproc: int, port: int, train_args: list[str]) -> list[str]:
    module = "megatron_pz.runtime.launcher" if launcher == "pz" else "torch.distributed.run"
    return [sys.executable, "-m", module, f"--nproc_per_node={nproc}", "--nnodes=1", "--master_addr=127.0.0.1",
            f"--master_port={port}", "--max_restarts=0", str(repo / "tests" / "workers" / "train_cli.py"),
            *train_args]


def rl_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in read_metrics(run_dir) if r["phase"] == "rl"]  # complete lines: the run may be writing


def checkpoint_step(run_dir: Path):
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(latest.read_text()) if latest.is_file() else None


def job_processes(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def ranks_of(run_dir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and f"train.run_dir={run_dir}" in (p.info["cmdline"] or []) \
                and "--nproc_per_node=2" not in p.info["cmdline"]:
            out.append(p)
    return out


def send(route: str, sig: signal.Signals, root: psutil.Process) -> None:
    if route == "agent":
        targets = [root]
    elif route == "workers":
        targets = root.children(recursive=False)
    elif route == "rank":
        targets = root.children(recursive=False)[:1]
    else:  # tree, save
        targets = job_processes(root)
    for p in targets:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_route(spec: str, args, port: int) -> dict:
    route, sig_name = spec.split(":")
    sig = signal.Signals[sig_name]
    run_dir = Path(args.workdir) / f"{route}_{sig_name}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    train_args = ["train", str(args.repo / "examples" / "tiny_cpu.yaml"), *TINY, f"data.default_cache_dir={args.cache}",
                  f"train.run_dir={run_dir}", f"train.steps={args.steps}",
                  f"train.save_interval={1 if route == 'save' else 100}"]
    env = {**os.environ, "PYTHONPATH": str(args.repo), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    log = open(Path(args.workdir) / f"{route}_{sig_name}.log", "w")
    proc = subprocess.Popen(launch_command(args.launcher, args.repo, 2, port, train_args), stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=args.repo, start_new_session=True)
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + args.timeout
    sent_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        done = max(rl_steps(run_dir), default=0)
        if route == "save":
            ready = done >= args.after_step and any((run_dir / "checkpoints").glob(".tmp_iter_*"))
        else:
            ready = done >= args.after_step
        if ready:
            sent_at = time.monotonic()
            send(route, sig, root)
            break
        time.sleep(0.005 if route == "save" else 0.05)
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    if sig == signal.SIGKILL:  # the agent is gone at once: time its ranks instead
        while ranks_of(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
    exited = time.monotonic()
    left = [p for p in job_processes(root) if p.pid != proc.pid and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    # ranks run in sessions of their own: an agent that died leaves them behind; find them by run dir
    left += [p for p in ranks_of(run_dir) if p not in left]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    return {"route": spec, "exit": proc.returncode, "seconds": None if sent_at is None else exited - sent_at,
            "signal_after_step": max(rl_steps(run_dir), default=0) if sent_at is None else args.after_step,
            "checkpoint": checkpoint_step(run_dir), "last_logged": max(rl_steps(run_dir), default=0),
            "left_alive": len(left), "log": log.name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="data.default_cache_dir (built on first use)")
    parser.add_argument("--launcher", choices=("pz", "torchrun"), default="pz")
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--after-step", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--workdir", default="/tmp/bench_preemption")
    args = parser.parse_args(argv)
    args.repo = args.repo.resolve()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    from megatron_pz.runtime.distributed import _free_port

    print(f"launcher: {args.launcher}   repo: {args.repo}")
    print(f"{'route':<18}{'exit':>6}{'seconds':>9}{'checkpoint':>12}{'last step':>11}{'left alive':>12}")
    for spec in args.routes.split(","):
        r = run_route(spec, args, _free_port())
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"{r['route']:<18}{r['exit']:>6}{seconds:>9}{str(r['checkpoint']):>12}{r['last_logged']:>11}"
              f"{r['left_alive']:>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
