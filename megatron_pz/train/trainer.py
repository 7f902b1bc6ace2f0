"""The RL loop (read this first): passages -> a batch of experiences -> one GRPO update -> EMA -> metrics ->
stop / save -> held-out eval. One loop for both placements of the rollouts.

Read :func:`rl_loop` top to bottom: it is the algorithm's schedule. Parallelism lives in
:class:`~megatron_pz.train.actor.Actor`, the update in :mod:`megatron_pz.train.update` (the loss in
:mod:`megatron_pz.rl.grpo`), the run's setup and checkpoints in :mod:`megatron_pz.train.run`, the objectives in
:mod:`megatron_pz.objectives`, the rollout engines in :mod:`megatron_pz.rollout`.

Where a step's batch comes from is what the two placements disagree on, and it is behind a *batch source*
(:class:`BatchSource`), chosen once in :func:`train`:

* colocated (:class:`~megatron_pz.train.colocated.ColocatedSource`): the engine wakes on the training ranks
  between updates and the objective's whole ``collect`` runs there, on-policy;
* disaggregated (:class:`~megatron_pz.train.disaggregated.DisaggregatedSource`): the rollout ranks generate
  (:mod:`megatron_pz.disagg`), one step ahead at ``rollout.max_staleness: 1``, and the trainers only score.

Everything else that differs is a method of the source, not a branch of the loop: what a checkpoint stores
about the data (``checkpoint_state``: the sampler's position, a batch in flight), when the actor's weights
reach the engine (``weights_updated``: at the next rollout phase, or with the schedule's next request), how a
stop is agreed (``agree_stop`` before the first step, and inside ``batch``: colocated abandons a step stopped
after its rollout), how the held-out eval runs (``evaluate``), what the step's timing means (``timing``) and
how the run ends (``finish``: the rollout ranks are told to stop).

Why one loop with two sources rather than two top-level loops over one shared library object (slime's
``train.py`` / ``train_async.py``): the two loops would be the same schedule line for line (update, EMA,
metrics, stop / save, eval); only where the batch comes from differs. The next capabilities of the
disaggregated placement (weights updated while a batch is generated, partial rollouts, staleness above 1)
change where and when batches are made, not the update: each is a change to one source class, and the loop
that every placement shares stays the one place to read the algorithm.
"""

from __future__ import annotations

import functools
import time
from typing import Optional, Protocol

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_pz.disagg.roles import start_roles
from megatron_pz.disagg.server import serve
from megatron_pz.errors import during_work
from megatron_pz.model.provider import resolve_hf_config
from megatron_pz.run_config import RunConfig
from megatron_pz.runtime.host_memory import host_memory_metrics
from megatron_pz.runtime.preemption import Stopped, install_stop_signals, write_stop_record
from megatron_pz.train.colocated import ColocatedSource
from megatron_pz.train.disaggregated import DisaggregatedSource
from megatron_pz.train.preflight import preflight
from megatron_pz.train.run import Checkpoints, Policy, Run
from megatron_pz.train.timing import update_metrics
from megatron_pz.train.update import grpo_update, make_grpo_loss_fn, step_metrics


class BatchSource(Protocol):
    """Where a step's experiences come from; built before the policy, started once it exists."""

    stop_note: str  # what a stop after a step says it saved besides the trainer's state

    def start(self, policy: Policy, checkpoints: Checkpoints) -> None:
        """Build what the source needs from the policy (engine or rollout client) and resume its data position."""

    def agree_stop(self, where: str) -> None:
        """An agreement point before the first step: raise ``Stopped`` on every rank once a stop is agreed."""

    def batch(self, step: int) -> tuple[list, dict[str, float]]:
        """This rank's experiences of RL step ``step`` (0-based) and the objective's metrics."""

    def weights_updated(self) -> None:
        """The actor finished the step's optimizer steps."""

    def timing(self, started: float, updated: float) -> dict[str, float]:
        """The step's time/* metrics, from its start and the end of its update (perf_counter seconds)."""

    def checkpoint_state(self) -> dict:
        """What a save stores beside the policy."""

    def evaluate(self, step: int) -> tuple[dict, list]:
        """The held-out eval with the current weights: (eval/* metrics on every rank, this rank's samples)."""

    def finish(self, sig=None) -> None:
        """The run ends, finished or stopped by ``sig``."""


def train(cfg: RunConfig) -> dict:
    """Warm start (if configured), then the RL loop; resumes from ``run_dir/checkpoints``.

    ``rollout.placement: disaggregated``: every rank of the job calls this; the first ranks train, the last
    ``rollout.ranks`` serve rollouts (:func:`megatron_pz.disagg.server.serve`) until the trainers stop them.
    A stop signal (:mod:`megatron_pz.runtime.preemption`) is agreed across the training ranks after each update
    (the step is finished and saved) and, colocated, after each rollout too (the step is abandoned: its update
    has not started, so the state it started from is saved); the result then has ``stopped`` set.
    """
    stop = install_stop_signals()  # before any work: SIGUSR1's default action ends a process
    # every rank (rollout ones too) refuses bad input first, before any process group, model or write
    start = preflight(cfg, resolve_hf_config(cfg))
    if not cfg.rollout.disaggregated:
        return run_until_stopped(cfg, start, stop, ColocatedSource)
    roles = start_roles(cfg.rollout, cfg.runtime)  # collective over the job, before anything else
    if not roles.is_trainer:
        return serve(cfg, roles)
    with roles.reporting_errors():  # the rollout ranks stop, naming this rank
        return run_until_stopped(cfg, start, stop, functools.partial(DisaggregatedSource, roles))


def run_until_stopped(cfg: RunConfig, start, stop, source_type) -> dict:
    """:func:`rl_loop`'s result, or after a :class:`~megatron_pz.runtime.preemption.Stopped` the stop record
    (rank 0) and a result that says so; the run is closed either way (engine, logger, lock). ``start``:
    :func:`~megatron_pz.train.preflight.preflight`'s answer."""
    run = Run(cfg, start)
    try:
        with during_work():  # an error from here on is a failure during work (exit 1), not bad input
            return rl_loop(run, stop, source_type(run, stop))
    except Stopped as stopped:
        if dist.get_rank() == 0:
            write_stop_record(run.run_dir, stopped.signal, stopped.step, stopped.checkpoint, stopped.abandoned,
                              stopped.save_seconds)
            print(f"stopped on {stopped.describe()}; resubmit to continue", flush=True)
        dist.barrier()  # the record is written before any rank exits
        return {"before": None, "after": None, "step": stopped.step, "stopped": stopped.signal.name}
    finally:
        run.close()


def rl_loop(run: Run, stop, source: BatchSource) -> dict:
    """The RL steps from the policy's step to ``train.steps``, with held-out evals before, every
    ``train.eval_interval`` steps and after."""
    cfg, t = run.cfg, run.cfg.train
    policy = Policy(run, stop)
    checkpoints = Checkpoints(run, policy)
    source.start(policy, checkpoints)
    actor, ema, step = policy.actor, policy.ema, policy.step
    loss_fn, dp_group = make_grpo_loss_fn(cfg.grpo), ps.get_data_parallel_group()
    before = None
    if policy.resumed_from is None:  # no RL state to save before the first step
        source.agree_stop("before the evaluation before RL")
        before = log_eval(run, source, step)
    source.agree_stop("before the first RL step")
    last_metrics: dict = {}
    while step < t.steps:
        started = time.perf_counter()
        experiences, metrics = source.batch(step)
        update_started = time.perf_counter()
        # one or more optimizer steps (grpo.mini_batches x grpo.epochs); a colocated engine is asleep meanwhile
        summed, result, batches = grpo_update(actor, experiences, cfg.grpo, loss_fn, t.max_tokens_per_micro_batch,
                                              run.pad_id, dp_group)
        actor.finish_param_sync()  # overlap_param_gather: the EMA and the next weight sync read fresh values
        source.weights_updated()
        if ema is not None:
            ema.update(actor.chunks)
        updated = time.perf_counter()
        step += 1
        metrics.update({**source.timing(started, updated), **update_metrics(updated - update_started, batches, run.dp_size),
                        **host_memory_metrics()})
        metrics = last_metrics = step_metrics(metrics, experiences, batches, summed, result, updated - started,
                                              run.dp_size, actor)
        if step % t.log_interval == 0 or step == t.steps:
            run.logger.log(step, metrics)
            run.logger.log_samples(step, experiences, run.tokenizer, t.log_samples)
        sig = stop.agreed()  # over the training ranks (the default world)
        if step % t.save_interval == 0 or step == t.steps or sig:
            seconds = checkpoints.save(step, source.checkpoint_state)
        if sig:  # the step is finished and saved
            source.finish(sig)
            raise Stopped(sig, step, checkpoints.path(step), False, seconds, where=f"in step {step}{source.stop_note}")
        if t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
            log_eval(run, source, step)
    after = log_eval(run, source, step)
    source.finish()
    return {"before": before, "after": after, "last": last_metrics, "step": step}


def log_eval(run: Run, source: BatchSource, step: int) -> Optional[dict]:
    """The held-out eval at ``step``, logged (metrics, and every response in ``eval_samples.jsonl``)."""
    metrics, samples = source.evaluate(step)
    run.logger.log(step, metrics, phase="eval")
    run.logger.log_eval_samples(step, samples)
    return metrics
