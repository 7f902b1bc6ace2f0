"""`megatron-pz train` with a stop signal sent from inside the job at a chosen point (deterministic timing).

PZ_TEST_SIGNAL="ROUTE:SIGNAL:WHEN:STEP", acted on once by rank 0 (STEP is the 1-based RL step):

* WHEN ``rollout``: as rank 0's objective starts collecting step STEP's rollouts;
  ``update``: as its GRPO update of step STEP starts; ``save``: from one of the checkpoint writer
  processes megatron-core forks from rank 0, while it writes step STEP's checkpoint (before its write);
  ``warm``: as rank 0 builds the rows of warm-start step STEP.
* ROUTE ``agent``: the launcher (torchrun agent) only; ``tree``: the agent and every process below it
  at once (what SLURM does to a job step), this process and the writer included; ``workers``: the ranks.

The wall time of the send goes to $PZ_TEST_SIGNAL_LOG. PZ_TEST_GATE=PATH: rank 0 waits at the rollout of
RL step 1 (creating PATH.waiting) until PATH exists (a test holds a run there). Everything else is the real `megatron-pz train`.
"""

import os
import signal
import sys
import time

import psutil

from megatron_pz.cli import main


def job_root() -> psutil.Process:
    """The launcher above this process (a rank, or a writer forked from one)."""
    proc = psutil.Process()
    while proc is not None:
        if any("megatron_pz.runtime.launcher" in part for part in proc.cmdline()):
            return proc
        proc = proc.parent()
    raise RuntimeError("not under megatron_pz.runtime.launcher")


def send(route: str, sig: signal.Signals) -> None:
    root = job_root()
    if route == "agent":
        targets = [root]
    elif route == "workers":
        targets = root.children(recursive=False)
    else:
        targets = [root] + root.children(recursive=True)
    with open(os.environ["PZ_TEST_SIGNAL_LOG"], "w") as fh:
        fh.write(f"{time.time()}\n")
    for p in targets:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if psutil.Process().pid in {p.pid for p in psutil.Process(root.pid).children()}:  # a rank: wait until
        from megatron_pz.runtime.preemption import install_stop_signals  # the signal has reached it (the

        stop, deadline = install_stop_signals(), time.time() + 120  # agent forwards it a moment later)
        while stop.requested() is None and time.time() < deadline:
            time.sleep(0.01)


def install_hooks() -> None:
    spec = os.environ.get("PZ_TEST_SIGNAL")
    gate = os.environ.get("PZ_TEST_GATE")
    if os.environ.get("RANK", "0") != "0" or not (spec or gate):
        return
    route, sig_name, when, at = spec.split(":") if spec else ("", "SIGTERM", "", "0")
    sig, at = signal.Signals[sig_name], int(at)
    current = {"step": 0}

    import megatron_pz.train.colocated as colocated  # where the colocated loop builds its objective
    import megatron_pz.train.trainer as trainer

    build = colocated.build_training_objective

    def build_with_hook(*args, **kwargs):
        objective = build(*args, **kwargs)
        collect = objective.collect

        def collect_with_hook(passages, engine, scorer, step):
            current["step"] = step + 1
            if gate and step == 0:
                open(f"{gate}.waiting", "w").close()
                while not os.path.exists(gate):
                    time.sleep(0.05)
            if when == "rollout" and step + 1 == at:
                send(route, sig)
            return collect(passages, engine, scorer, step)

        objective.collect = collect_with_hook
        return objective

    colocated.build_training_objective = build_with_hook
    update = trainer.grpo_update

    def update_with_hook(*args, **kwargs):
        if when == "update" and current["step"] == at:
            send(route, sig)
        return update(*args, **kwargs)

    trainer.grpo_update = update_with_hook

    if when == "warm":
        import megatron_pz.train.warm_start as warm_start

        rows = warm_start.warm_start_rows

        def rows_with_hook(dataset, step, *args, **kwargs):
            if step + 1 == at:
                send(route, sig)
            return rows(dataset, step, *args, **kwargs)

        warm_start.warm_start_rows = rows_with_hook

    if when == "save":
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        write = FileSystemWriterAsync.write_preloaded_data

        def write_with_hook(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
            if local_proc_idx == 0 and f"iter_{at:07d}" in str(write_bucket[0]):  # runs in the forked writer
                send(route, sig)
            return write(transform_list, local_proc_idx, write_bucket, *args, **kwargs)

        FileSystemWriterAsync.write_preloaded_data = staticmethod(write_with_hook)


if __name__ == "__main__":
    install_hooks()
    sys.exit(main(sys.argv[1:]))
