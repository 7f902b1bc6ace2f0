"""Objective schedules and mixtures (past the papers): config checks, phase by step, split and tags."""

import pytest

from megatron_pz.config import ConfigError
from megatron_pz.objectives.composite import (
    MixtureObjective,
    ScheduledObjective,
    TaggedObjective,
    build_training_objective,
    split_counts,
)
from megatron_pz.objectives.config import ObjectiveComponent, ObjectiveConfig, ObjectivePhase
from test_objectives_support import ScriptedEngine, make_passage, tiny_tokenizer

CAT = "The cat sat on the mat. The cat was happy."


def test_split_counts_largest_remainder():
    assert split_counts(8, [0.75, 0.25]) == [6, 2]
    assert split_counts(5, [0.75, 0.25]) == [4, 1]  # 3.75 / 1.25: the larger remainder gets the spare
    assert split_counts(3, [1.0, 1.0, 1.0]) == [1, 1, 1]
    assert split_counts(1, [1.0, 1.0]) == [1, 0]  # ties go to the earlier component
    assert sum(split_counts(7, [0.2, 0.3, 0.5])) == 7


def test_schedule_phase_by_step_is_resumable():
    """PZ §4.1's SmolLM3 recipe: Random RLPT for 100 steps, then PretrainZero until the end."""
    cfg = ObjectiveConfig(schedule=[ObjectivePhase(steps=100, overrides={"name": "random_rlpt"}),
                                    ObjectivePhase(overrides={"name": "pretrainzero"})])
    sched = build_training_objective(cfg, tiny_tokenizer())
    assert isinstance(sched, ScheduledObjective)
    assert [sched.phase_at(s) for s in (0, 99, 100, 1999, 5000)] == [0, 0, 1, 1, 1]
    names = [type(p[2].objective).__name__ for p in sched.phases]
    assert names == ["RandomRLPTObjective", "PretrainZeroObjective"]
    # the phase is a function of the step alone: a run rebuilt after a checkpoint at step 57 is mid-phase 0
    assert build_training_objective(cfg, tiny_tokenizer()).phase_at(57) == 0
    assert not cfg.uses_rlp()


def test_schedule_and_mixture_config_errors_name_the_field():
    cases = [
        (dict(schedule=[ObjectivePhase(overrides={"name": "rlp"}), ObjectivePhase(steps=5)]),
         r"objective.schedule\[0\].steps must be set"),
        (dict(schedule=[ObjectivePhase(steps=0)]), r"objective.schedule\[0\].steps must be >= 1"),
        (dict(schedule=[ObjectivePhase(overrides={"nme": "rlp"})]), r"unknown config key.*nme.*schedule\[0\]"),
        (dict(schedule=[ObjectivePhase(overrides={"name": "magic"})]), "objective.name must be one of"),
        (dict(mixture=[ObjectiveComponent(weight=0.0)]), r"objective.mixture\[0\].weight must be > 0"),
        (dict(mixture=[ObjectiveComponent(overrides={"mixture": []})]), "may not set mixture"),
        (dict(schedule=[ObjectivePhase()], mixture=[ObjectiveComponent()]), "exclude each other"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            ObjectiveConfig(**kwargs).validate()


def test_mixture_splits_passages_and_tags_each_component():
    """Two Random RLPT components with their own temperature and aggregation; weights 3:1."""
    tok = tiny_tokenizer()
    cfg = ObjectiveConfig(name="pretrainzero", predictor_group=2, mixture=[
        ObjectiveComponent(weight=3.0, overrides={"name": "random_rlpt", "predictor_temperature": 0.5}),
        ObjectiveComponent(weight=1.0, overrides={"name": "random_rlpt", "loss_agg": "seq_mean_token_mean",
                                                  "predictor_group": 4}),
    ])
    assert cfg.uses_rlp() is False
    mix = build_training_objective(cfg, tok)
    assert isinstance(mix, MixtureObjective) and mix.labels == ["random_rlpt0", "random_rlpt1"]
    passages = [make_passage(tok, i, CAT, ["cat", "mat"]) for i in range(4)]
    engine = ScriptedEngine(tok, lambda prompt, n: ["\\boxed{cat}", "\\boxed{mat}", "x", "y"][:n])
    exps, metrics = mix.collect(passages, engine, None, step=0)
    first = [e for e in exps if e.component == "random_rlpt0"]
    second = [e for e in exps if e.component == "random_rlpt1"]
    assert len(first) == 3 * 2 and len(second) == 1 * 4  # 3 passages x G=2, 1 passage x G=4
    assert {(e.loss_agg, e.mix_weight, e.temperature) for e in first} == {("token_mean", 0.75, 0.5)}
    assert {(e.loss_agg, e.mix_weight, e.temperature) for e in second} == {("seq_mean_token_mean", 0.25, 1.0)}
    assert [p.temperature for _, p in engine.calls] == [0.5, 1.0]
    assert metrics["random_rlpt0/passages"] == 3.0 and metrics["random_rlpt1/passages"] == 1.0
    assert "random_rlpt0/random_rlpt/masked_passages" in metrics and "random_rlpt1/predictor/reward_mean" in metrics


def test_single_objective_is_tagged_with_its_paper_aggregation():
    obj = build_training_objective(ObjectiveConfig(name="rlp"), tiny_tokenizer())
    assert isinstance(obj, TaggedObjective) and (obj.label, obj.loss_agg, obj.weight) == ("rlp", "seq_mean_token_mean", 1.0)
    mixed = ObjectiveConfig(schedule=[ObjectivePhase(steps=10), ObjectivePhase(overrides={"mixture": [
        {"weight": 0.75}, {"weight": 0.25, "overrides": {"name": "rlp"}}]})])
    assert mixed.uses_rlp()  # the EMA teacher is built only when an RLP component is present
