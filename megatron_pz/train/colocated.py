"""The colocated batch source: rollouts between updates, on the training ranks themselves.

Each step draws this data-parallel rank's share of the passages (:class:`~megatron_pz.train.sampler.PassageSampler`),
wakes the rollout engine, brings it up to the actor's weights (:class:`~megatron_pz.rollout.phase.RolloutPhases`),
runs the objective's whole ``collect`` (rollouts, rewards, and the scorer's forward passes on the actor), and puts
the engine back to sleep before the update. Every batch is sampled from the weights it is trained at (on-policy).

The stop rule of this placement: a stop signal is agreed after each rollout too. A step stopped there is
abandoned (its update has not started), and the state it started from (data position, RNG streams) is saved,
unless a checkpoint of that step is on disk already. The RL loop (:mod:`megatron_pz.train.trainer`) agrees
after each update as well, for both placements.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from megatron_pz.checkpoint import capture_rng_state
from megatron_pz.eval.heldout import build_eval_items, evaluate
from megatron_pz.objectives.composite import build_training_objective
from megatron_pz.rollout.budget import rollout_context_length
from megatron_pz.rollout.factory import build_rollout_engine
from megatron_pz.rollout.phase import RolloutPhases
from megatron_pz.runtime.preemption import Stopped, clear_stop_record, stop_if_agreed
from megatron_pz.train.run import Checkpoints, Policy, Run, usable_passages
from megatron_pz.train.sampler import PassageSampler
from megatron_pz.train.scorer import MegatronScorer
from megatron_pz.train.timing import RolloutClock


class ColocatedSource:
    """Batches made on the training ranks (see the module docstring). Built before the policy: a new run of the
    directory clears the previous run's stop record and agrees on a stop before any model is built."""

    stop_note = ""  # a stop after a step saves nothing but the trainer's state

    def __init__(self, run: Run, stop):
        self.run, self.stop, self.cfg = run, stop, run.cfg
        if dist.get_rank() == 0:
            clear_stop_record(run.run_dir)
        stop_if_agreed(stop, "before the run started")

    def start(self, policy: Policy, checkpoints: Checkpoints) -> None:
        """The sampler at the saved position, the engine and its phases, the objective, the scorer, the eval items."""
        run, cfg, t = self.run, self.cfg, self.cfg.train
        self.checkpoints = checkpoints
        self.sampler = PassageSampler(run.dataset, t.passages_per_step, run.dp_rank, run.dp_size, cfg.runtime.seed,
                                      usable=usable_passages(run))
        if policy.state is not None:
            self.sampler.load_state_dict(policy.state["sampler"])
            rewind_for_batch_in_flight(self.sampler, policy.state)
        engine = run.engine = build_rollout_engine(cfg.rollout, policy.actor.chunks, run.tokenizer, run.hf_config,
                                                   max_model_len=rollout_context_length(cfg),
                                                   capture_routes=run.capture_routes)
        self.phases = RolloutPhases(engine, policy.actor, refresh=cfg.rollout.refresh_weights)  # wake, sync, generate, sleep
        self.objective = build_training_objective(cfg.objective, run.tokenizer)
        self.scorer = MegatronScorer(policy.actor, policy.teacher, run.pad_id, t.max_tokens_per_micro_batch)
        self.eval_items = build_eval_items(run.heldout, cfg)
        self.clock = RolloutClock(self.phases, self.scorer)  # generation / scoring / weight sync of each step

    def agree_stop(self, where: str) -> None:
        stop_if_agreed(self.stop, where)

    def batch(self, step: int):
        """This rank's experiences of step ``step`` and the objective's metrics; a stop agreed after the rollout
        abandons the step (``Stopped``)."""
        start_state = self.sampler.state_dict(), capture_rng_state()  # what a step abandoned below resumes from
        passages = self.sampler.next_batch()
        self.clock.start()
        with self.phases.generating() as engine:
            experiences, metrics = self.objective.collect(passages, engine, self.scorer, step)
        self.ready = time.perf_counter()
        metrics.update(self.clock.finish(experiences, self.run.dp_size))
        sig = self.stop.agreed()
        if sig:  # abandon this step: nothing has changed but the data position and the RNG streams
            # saved already when a checkpoint of this step is on disk (at step 0: RL starts over next time)
            seconds = (self.checkpoints.save(step, lambda: {"sampler": start_state[0]}, rng_state=start_state[1])
                       if step != self.checkpoints.saved_step else 0.0)
            raise Stopped(sig, step, self.checkpoints.path(step) if step else None, True, seconds,
                          where=f"in the rollout of step {step + 1} (abandoned)")
        metrics["rollout/weight_syncs"] = float(self.phases.syncs)
        return experiences, metrics

    def weights_updated(self) -> None:
        self.phases.weights_updated()  # the next rollout phase syncs the engine first

    def timing(self, started: float, updated: float) -> dict[str, float]:
        return {"time/rollout_s": self.ready - started, "time/train_s": updated - self.ready}

    def checkpoint_state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def evaluate(self, step: int) -> tuple[dict, list]:
        run = self.run
        return evaluate(self.phases, run.tokenizer, run.heldout, self.eval_items, self.cfg, run.dp_rank, run.dp_size,
                        self.scorer)

    def finish(self, sig=None) -> None:
        """Nothing to tell: the engine is closed with the run."""


def rewind_for_batch_in_flight(sampler, state: dict) -> None:
    """A disaggregated run's checkpoint may hold batches in flight (passages drawn, not trained yet: the batch
    received and the steps requested ahead). Resumed colocated, those passages are drawn again and generated
    on-policy rather than skipped."""
    pending = state.get("rollout_batch")
    if pending:
        steps = sorted(int(s) for s in (pending.get("requested") or {}))
        drawn = sum(len(ps) for _, ps in (pending.get("requested") or {}).values())
        if pending.get("step") is not None:
            steps.insert(0, int(pending["step"]))
            drawn += len(pending["passages"])
        sampler.consumed -= drawn
        if dist.get_rank() == 0 and steps:
            print(f"resume: the checkpoint's batch in flight (steps {', '.join(str(s + 1) for s in steps)}) is "
                  "generated again here, from the current weights", flush=True)
