"""The disaggregated batch source: a step's batch comes from the rollout ranks, the trainers only score it.

The rollout ranks (:mod:`megatron_pz.disagg.server`) generate; :class:`~megatron_pz.disagg.client.RolloutSchedule`
decides which batch is requested when and with which weights (up to ``rollout.max_staleness`` steps ahead)
and hands over the drafts of this data-parallel replica's units; the trainers turn them into experiences with the
objective's scoring half (:func:`megatron_pz.objectives.split.score`: RLP's policy and EMA-teacher log-probs,
nothing more for the others), set each token's weight-version lag and apply the staleness policy
(:func:`megatron_pz.rl.staleness.apply_staleness`). Weights are pushed when the schedule requests a batch or an
evaluation, never in the update.

The stop rule of this placement: the trainers agree on a stop after each update only (the RL loop's agreement);
the save that follows first receives the batch in flight and stores it with the checkpoint, then the rollout
ranks are told to stop. Before the first step there is no agreement point: a stop signal that arrives then is
acted on after step 1, when the rollout ranks can be told.
"""

from __future__ import annotations

import time

from megatron_pz.disagg.client import RolloutClient, RolloutSchedule
from megatron_pz.objectives import split
from megatron_pz.objectives.composite import build_training_objective
from megatron_pz.rl.staleness import apply_staleness
from megatron_pz.train.run import Checkpoints, Policy, Run, usable_passages
from megatron_pz.train.sampler import PassageSampler
from megatron_pz.train.scorer import MegatronScorer


class DisaggregatedSource:
    """Batches made on the rollout ranks (see the module docstring); ``roles``: this training rank's role."""

    stop_note = " (the batch in flight saved, with the partial samples)"

    def __init__(self, roles, run: Run, stop):
        self.roles, self.run, self.stop, self.cfg = roles, run, stop, run.cfg

    def start(self, policy: Policy, checkpoints: Checkpoints) -> None:
        """The global sampler at the saved position, the client (it says Hello), the schedule with the saved batch
        in flight, the objective, the scorer."""
        run, cfg, t = self.run, self.cfg, self.cfg.train
        # global batches (every replica's share, in order): training rank 0 sends them whole to the rollout ranks;
        # its position is the colocated samplers' (a checkpoint resumes under either placement)
        self.sampler = PassageSampler(run.dataset, t.passages_per_step, 0, 1, cfg.runtime.seed,
                                      usable=usable_passages(run))
        if policy.state is not None:
            self.sampler.load_state_dict(policy.state["sampler"])
        self.client = RolloutClient(self.roles, run, policy.actor)
        self.schedule = RolloutSchedule(self.client, self.sampler, cfg.rollout.max_staleness, t.steps)
        self.schedule.restore(policy.state)
        self.objective = build_training_objective(cfg.objective, run.tokenizer)
        self.scorer = MegatronScorer(policy.actor, policy.teacher, run.pad_id, t.max_tokens_per_micro_batch)

    def agree_stop(self, where: str) -> None:
        """No agreement before the first step (see the module docstring)."""

    def batch(self, step: int):
        """This replica's experiences of step ``step``: wait for its batch (at staleness 1 also request the next
        one), then score it."""
        batch = self.schedule.batch_for(step)
        self.ready = time.perf_counter()
        experiences, metrics = score_units(self.objective, batch.drafts, self.scorer, step)
        r = self.cfg.rollout  # per-token lags (the rollout correction's metrics are keyed by them: rollout_corr/lag1/...)
        metrics.update(apply_staleness(experiences, step, batch.version, r.max_staleness, r.stale_samples,
                                       r.mask_offpolicy_prefix))
        metrics.update({"rollout/staleness": float(step - batch.version), "rollout/weight_version": float(batch.version),
                        "rollout/units": float(len(batch.drafts)),
                        "time/push_s": 0.0, "time/wait_rollout_s": 0.0, **self.schedule.timing, **batch.stats})
        return experiences, metrics

    def weights_updated(self) -> None:
        """Nothing here: the schedule pushes the new weights with its next request."""

    def timing(self, started: float, updated: float) -> dict[str, float]:
        return {"time/train_s": updated - self.ready, "time/step_s": updated - started}  # train: scoring + update

    def checkpoint_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), **self.schedule.checkpoint_state()}

    def evaluate(self, step: int) -> tuple[dict, list]:
        return self.schedule.evaluate(step)

    def finish(self, sig=None) -> None:
        """Tell the rollout ranks to stop (``sig``: the run stopped on that signal; they exit 75 too)."""
        if sig:
            self.client.stop("stop signal", signal=sig.name)
        else:
            self.client.stop("training finished")


def score_units(objective, drafts: list, scorer, step: int) -> tuple[list, dict[str, float]]:
    """The trainers' half of a step over this replica's units: experiences in unit order, metrics averaged
    over the units that report them."""
    experiences, sums, counts = [], {}, {}
    for draft in drafts:
        exps, metrics = split.score(objective, draft, scorer, step)
        experiences += exps
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return experiences, {key: sums[key] / counts[key] for key in sums}
