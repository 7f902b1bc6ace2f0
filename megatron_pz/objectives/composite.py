"""Schedules and mixtures of objectives (past the papers), on the objective interface the trainer drives.

- :class:`TaggedObjective`: one objective whose experiences carry their loss component, aggregation
  and weight (what :func:`megatron_pz.rl.grpo.aggregation_weights` needs).
- :class:`MixtureObjective`: one step's passages split among components in proportion to their
  weights; each component collects with its own config (groups, rewards, temperatures, aggregation)
  and the update minimises sum_k lambda_k L_k in one GRPO step. Metrics are per component
  (``<label>/...``).
- :class:`ScheduledObjective`: phases of (mixtures of) objectives by RL step, e.g. PretrainZero §4.1's
  SmolLM3 recipe (Random RLPT for 100 steps, then PretrainZero). The phase is a function of the step
  alone, so a run resumed mid-phase from a checkpoint continues in the same phase.

Each also forwards the two halves of a step (``generate`` on a rollout rank, ``score`` on the trainers;
:mod:`megatron_pz.objectives.split`) to its parts, for rollouts on their own ranks.

:func:`build_objective` builds one objective by name; :func:`build_training_objective` builds what the trainer
drives (a schedule, a mixture or one objective, tagged) from ``ObjectiveConfig``.
"""

from __future__ import annotations

from megatron_pz.objectives import split
from megatron_pz.objectives.baselines import NextTokenReasoningObjective, RandomRLPTObjective
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.pretrainzero import PretrainZeroObjective
from megatron_pz.objectives.rlp import RLPObjective
from megatron_pz.rl.types import Experience


def build_objective(cfg: ObjectiveConfig, tokenizer):
    """The one objective named by ``cfg.name``, with prompts encoded by ``tokenizer`` (a HF tokenizer)."""
    cfg.validate()
    if cfg.name == "pretrainzero":
        return PretrainZeroObjective(cfg, tokenizer)
    if cfg.name == "random_rlpt":
        return RandomRLPTObjective(cfg, tokenizer)
    if cfg.name in ("random_ntr", "entropy_ntr", "rpt"):
        return NextTokenReasoningObjective(cfg, tokenizer)
    return RLPObjective(cfg, tokenizer)


def component_labels(configs: list[ObjectiveConfig]) -> list[str]:
    """The objective name, suffixed with its position when two components share a name."""
    names = [c.name for c in configs]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of ``total`` passages by ``weights`` (ties to the earlier component)."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: total - sum(counts)]:
        counts[k] += 1
    return counts


class TaggedObjective:
    def __init__(self, objective, label: str, loss_agg: str, weight: float = 1.0, prefix: str = ""):
        self.objective, self.label, self.loss_agg, self.weight, self.prefix = objective, label, loss_agg, weight, prefix

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        return self._tagged(*(self.objective.collect(passages, engine, scorer, step) if passages else ([], {})))

    def generate(self, passages: list, engine, step: int):
        return split.generate(self.objective, passages, engine, step) if passages else split.Collected()

    def score(self, draft, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        return self._tagged(*split.score(self.objective, draft, scorer, step))

    def _tagged(self, experiences, metrics):
        for e in experiences:
            e.component, e.loss_agg, e.mix_weight = self.label, self.loss_agg, self.weight
        return experiences, {f"{self.prefix}{k}": v for k, v in metrics.items()}


class MixtureObjective:
    def __init__(self, configs: list[ObjectiveConfig], weights: list[float], tokenizer):
        norm = sum(weights)
        self.weights = [w / norm for w in weights]
        self.labels = component_labels(configs)
        self.parts = [TaggedObjective(build_objective(c, tokenizer), label, c.resolved_loss_agg(), w, f"{label}/")
                      for c, label, w in zip(configs, self.labels, self.weights)]

    def _shares(self, passages: list) -> list[list]:
        counts, start, shares = split_counts(len(passages), self.weights), 0, []
        for n in counts:
            shares.append(passages[start:start + n])
            start += n
        return shares

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        shares = self._shares(passages)
        return self._merged([part.collect(s, engine, scorer, step) for part, s in zip(self.parts, shares)],
                            [len(s) for s in shares])

    def generate(self, passages: list, engine, step: int):
        shares = self._shares(passages)
        return [len(s) for s in shares], [part.generate(s, engine, step) for part, s in zip(self.parts, shares)]

    def score(self, draft, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        counts, drafts = draft
        return self._merged([part.score(d, scorer, step) for part, d in zip(self.parts, drafts)], counts)

    def _merged(self, results, counts):
        experiences, metrics = [], {}
        for part, (exps, m), n in zip(self.parts, results, counts):
            experiences += exps
            metrics.update(m)
            metrics[f"{part.label}/passages"] = float(n)
            metrics[f"{part.label}/mix_weight"] = part.weight
        return experiences, metrics


def build_single(cfg: ObjectiveConfig, tokenizer):
    """One phase: a mixture when it has components, else the one objective (tagged)."""
    if cfg.mixture:
        return MixtureObjective([cfg.derive(c.overrides, f"objective.mixture[{i}].overrides", False)
                                 for i, c in enumerate(cfg.mixture)], [c.weight for c in cfg.mixture], tokenizer)
    return TaggedObjective(build_objective(cfg, tokenizer), cfg.name, cfg.resolved_loss_agg())


class ScheduledObjective:
    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        self.phases, start = [], 0
        for i, phase in enumerate(cfg.schedule):
            end = None if phase.steps is None else start + phase.steps
            derived = cfg.derive(phase.overrides, f"objective.schedule[{i}].overrides", True)
            self.phases.append((start, end, build_single(derived, tokenizer)))
            start = end if end is not None else start

    def phase_at(self, step: int) -> int:
        """Index of the phase that trains RL step ``step`` (0-based); the last one runs on past its end."""
        for i, (start, end, _) in enumerate(self.phases):
            if end is None or step < end:
                return i
        return len(self.phases) - 1

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        index = self.phase_at(step)
        experiences, metrics = self.phases[index][2].collect(passages, engine, scorer, step)
        metrics["objective/phase"] = float(index)
        return experiences, metrics

    def generate(self, passages: list, engine, step: int):
        return split.generate(self.phases[self.phase_at(step)][2], passages, engine, step)

    def score(self, draft, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        index = self.phase_at(step)
        experiences, metrics = split.score(self.phases[index][2], draft, scorer, step)
        metrics["objective/phase"] = float(index)
        return experiences, metrics


def build_training_objective(cfg: ObjectiveConfig, tokenizer):
    """What the trainer drives: a schedule, a mixture or a single objective, experiences tagged."""
    cfg.validate()
    if cfg.schedule:
        return ScheduledObjective(cfg, tokenizer)
    return build_single(cfg, tokenizer)
