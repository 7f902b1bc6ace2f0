"""One objective step in two halves, for rollouts on their own ranks (``rollout.placement: disaggregated``).

Colocated, an objective's ``collect(passages, engine, scorer, step)`` runs on the training ranks with both
the engine and the trainer's model at hand. Disaggregated, the engine lives on the rollout ranks and the
model on the training ranks, so a step is cut where an objective needs the model *after* generating:

* :func:`generate` runs on a rollout rank (engine only) and returns a *draft*, shipped over the bridge;
* :func:`score` runs on the training ranks (scorer only) and turns the draft into experiences + metrics.

Most objectives need no scorer at all: PretrainZero's two stages and their text rewards, Random RLPT, random
next-token reasoning. Their whole ``collect`` runs on the rollout side (so one batch never sees two weight
versions) and the draft is a :class:`Collected` (score only unpacks it). RLP is cut in two
(:meth:`~megatron_pz.objectives.rlp.RLPObjective.generate` / ``score``): thoughts on the rollout side, the
policy and EMA-teacher log-probs on the trainers. Composite objectives forward both halves to their parts.

Objectives that need the trainer's model *before* generating (entropy-chosen cuts: ``entropy_ntr``, ``rpt``
with ``rpt_position: entropy``) cannot run disaggregated: :func:`check_disaggregated` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_pz.config import ConfigError
from megatron_pz.rl.types import Experience


@dataclass
class Collected:
    """A draft that needs nothing more from the trainers: the objective's whole ``collect`` ran."""

    experiences: list[Experience] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class NoScorer:
    """What ``collect`` sees on a rollout rank: there is no trainer's model to score with."""

    def _refuse(self, *_args, **_kwargs):
        raise RuntimeError("an objective asked for the trainer's model on a rollout rank; it must be cut into "
                           "generate/score halves (megatron_pz/objectives/split.py) or run colocated")

    token_logprobs = token_entropies = _refuse


NO_SCORER = NoScorer()


def generate(objective, passages: list, engine, step: int):
    """Rollout-rank half of one step: the objective's own ``generate`` when it has one, else all of ``collect``."""
    if hasattr(objective, "generate"):
        return objective.generate(passages, engine, step)
    return Collected(*objective.collect(passages, engine, NO_SCORER, step))


def score(objective, draft, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
    """Training-rank half: experiences and metrics from a draft of :func:`generate`."""
    if isinstance(draft, Collected):
        return draft.experiences, draft.metrics
    return objective.score(draft, scorer, step)


def needs_model_before_generating(cfg) -> str:
    """Why a single objective config cannot run disaggregated ('' when it can)."""
    if cfg.name == "entropy_ntr" or (cfg.name == "rpt" and cfg.rpt_position == "entropy"):
        return (f"objective.name={cfg.name} draws its cut among the positions where the policy's next-token entropy "
                "is highest, a forward pass of the trainer's model before generating, which rollout ranks do not "
                "hold")
    return ""


def check_disaggregated(objective_cfg) -> None:
    """Refuse, naming the field, an objective tree that cannot run with rollouts on their own ranks."""
    for leaf in objective_cfg.leaves():
        reason = needs_model_before_generating(leaf)
        if reason:
            alternative = "objective.name=random_ntr" if leaf.name == "entropy_ntr" else "objective.rpt_position=random"
            raise ConfigError(f"rollout.placement=disaggregated: {reason}; use rollout.placement=colocated or "
                              f"{alternative}")
