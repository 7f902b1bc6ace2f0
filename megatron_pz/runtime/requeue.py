"""``python -m megatron_pz.runtime.requeue RUN_DIR SRUN_EXIT_CODE [START_STEP]``: how a SLURM job ends once its
ranks exited.

Run by ``slurm/launch.sh`` after the training step (START_STEP: the step of the latest checkpoint when the
step began, 0 for none). It prints one line saying what happened and exits with the job's code:

* The ranks stopped on a signal after writing their checkpoint (``RUN_DIR/stop.json`` written by this
  job attempt: same ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT``, which SLURM leaves unset on a job's first
  attempt): exit 75 (:data:`~megatron_pz.runtime.preemption.EXIT_STOPPED`). srun's own code is not enough
  to tell: with ``--kill-on-bad-exit`` the first node to exit 75 gets the others' launchers killed on their
  way out. On **SIGUSR1**, the early warning SLURM sends ``--signal`` seconds before the time limit, the job
  is requeued (``scontrol requeue``: SLURM does not requeue a job at its time limit), **unless this attempt
  finished no RL step** (the record's step is not past START_STEP): the next attempt would start up and be
  warned the same way, a requeue loop that makes no progress, so the job ends with a line saying why and
  what to change (``--time``, the ``--signal`` lead). On **SIGTERM** SLURM has already decided: a
  preempted job with ``--requeue`` (or one given ``scontrol requeue``) is requeued by SLURM itself, a job
  cancelled by ``scancel`` stays cancelled, one past its time limit ends (resubmit it).
* Otherwise the srun code: 0 when every step ran; anything else is a failure, not requeued (a crash
  would otherwise loop); resubmitting resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Optional

from megatron_pz.runtime.preemption import EXIT_STOPPED, read_stop_record


def job_outcome(run_dir, srun_code: int, env: Mapping[str, str],
                start_step: Optional[int] = None) -> tuple[int, bool, str]:
    """(the job's exit code, whether to requeue it, a line for the log). ``start_step``: the latest
    checkpoint's step when the attempt began (None: unknown, taken as progress)."""
    record: Optional[dict] = read_stop_record(run_dir)
    job, restart = env.get("SLURM_JOB_ID"), env.get("SLURM_RESTART_COUNT", "0")
    if record and job and record.get("slurm_job_id") == job and str(record.get("slurm_restart_count")) == restart:
        where = (f"checkpoint of step {record['step']} at {record['checkpoint']}" if record.get("checkpoint")
                 else "no RL step to save yet")
        if record["signal"] == "SIGUSR1":
            if start_step is not None and (record.get("step") or 0) <= start_step:
                return EXIT_STOPPED, False, (
                    f"stopped on SLURM's early warning (SIGUSR1) before finishing an RL step (attempt "
                    f"{int(restart) + 1} began at step {start_step}; {where}): not requeued, since the next attempt "
                    f"would be warned the same way. The time limit leaves too little time after start-up before "
                    f"the warning: resubmit with a longer --time or a shorter --signal lead")
            return EXIT_STOPPED, True, (f"stopped on SLURM's early warning (SIGUSR1): {where}; requeueing job "
                                        f"{job} to continue")
        return EXIT_STOPPED, False, (f"stopped on {record['signal']}: {where}; SLURM requeues a preempted job "
                                     f"(--requeue), otherwise resubmit to continue")
    if srun_code == 0:
        return 0, False, "finished: every step ran"
    return srun_code, False, (f"failed (srun exit code {srun_code}): not requeued; the latest checkpoint in "
                              f"{run_dir}/checkpoints is where a resubmitted job resumes")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m megatron_pz.runtime.requeue RUN_DIR SRUN_EXIT_CODE [START_STEP]", file=sys.stderr)
        return 2
    start_step = int(argv[2]) if len(argv) == 3 else None
    code, requeue, message = job_outcome(argv[0], int(argv[1]), os.environ, start_step)
    print(f"job: {message}", flush=True)
    if requeue:
        # SLURM ends this batch script right away (SIGTERM) and puts the job back in the queue
        done = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])
        if done.returncode != 0:
            print(f"job: scontrol requeue failed ({done.returncode}); resubmit to continue", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
