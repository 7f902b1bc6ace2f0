"""ObjectiveConfig: paper defaults, validation naming the field, and build_objective dispatch."""

import pytest

from megatron_pz.config import ConfigError, from_dict
from megatron_pz.objectives.composite import build_objective
from megatron_pz.objectives.baselines import NextTokenReasoningObjective, RandomRLPTObjective
from megatron_pz.objectives.config import OBJECTIVE_NAMES, ObjectiveConfig
from megatron_pz.objectives.pretrainzero import PretrainZeroObjective
from megatron_pz.objectives.rlp import RLPObjective
from test_objectives_support import tiny_tokenizer


def test_paper_defaults():
    cfg = ObjectiveConfig()
    assert (cfg.generator_group, cfg.predictor_group, cfg.rlp_group) == (8, 8, 16)
    assert cfg.max_mask_occurrences == 8 and cfg.replace_all and cfg.invalid_mask_reward == 0.0
    assert not cfg.normalize_answer and cfg.dynamic_sampling and cfg.ema_tau == 0.999
    assert cfg.rlp_temperature == 0.7 and cfg.rlp_thought_max_tokens == 2048
    assert cfg.generator_max_tokens == cfg.predictor_max_tokens == 4096


def test_from_yaml_dict_and_validation_errors():
    cfg = from_dict(ObjectiveConfig, {"name": "rlp", "rlp_group": 4, "ema_tau": 0.99}, "objective")
    assert cfg.rlp_group == 4 and cfg.ema_tau == 0.99
    with pytest.raises(ConfigError, match="unknown config key.*'rlp_groups'"):
        from_dict(ObjectiveConfig, {"rlp_groups": 4}, "objective")
    with pytest.raises(ConfigError, match="objective.name must be one of"):
        ObjectiveConfig(name="ppo").validate()
    with pytest.raises(ConfigError, match="objective.rlp_group must be >= 2"):
        ObjectiveConfig(rlp_group=1).validate()
    with pytest.raises(ConfigError, match="objective.mask_pick"):
        ObjectiveConfig(mask_pick="middle").validate()


@pytest.mark.parametrize("name, cls", [
    ("pretrainzero", PretrainZeroObjective), ("random_rlpt", RandomRLPTObjective),
    ("random_ntr", NextTokenReasoningObjective), ("entropy_ntr", NextTokenReasoningObjective),
    ("rpt", NextTokenReasoningObjective), ("rlp", RLPObjective),
])
def test_build_objective(name, cls):
    assert name in OBJECTIVE_NAMES
    assert isinstance(build_objective(ObjectiveConfig(name=name), tiny_tokenizer()), cls)
