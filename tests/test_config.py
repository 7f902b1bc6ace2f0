import pytest

from megatron_pz.config import (
    Config,
    ConfigError,
    ParallelConfig,
    apply_overrides,
    from_dict,
    load_config,
    validate_parallel_sizes,
)
from megatron_pz.model import load_hf_config


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  tp: 2\noptimizer:\n  lr: 1e-6\n")
    cfg = load_config(path, ["parallel.pp=2", "optimizer.lr_schedule=cosine", "runtime.seed=7"], cls=Config)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.optimizer.lr == 1e-6 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.lr_schedule == "cosine" and cfg.runtime.seed == 7


def test_unknown_key_names_the_section():
    with pytest.raises(ConfigError, match=r"'tpp'.*section 'parallel'"):
        from_dict(Config, {"parallel": {"tpp": 2}})
    with pytest.raises(ConfigError, match=r"'paralel'.*top level"):
        from_dict(Config, {"paralel": {}})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"parallel\.tp.*integer"):
        from_dict(Config, {"parallel": {"tp": "two"}})
    with pytest.raises(ConfigError, match="optimizer.use_distributed_optimizer"):
        from_dict(Config, {"optimizer": {"use_distributed_optimizer": "yes"}})


def test_bad_override_and_enum():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["parallel.tp"])
    with pytest.raises(ConfigError, match="model.fp8"):
        load_config(None, ["model.fp8=e5m2"], cls=Config)
    with pytest.raises(ConfigError, match="model.local_attention must be sdpa\\|megatron, got 'flash'"):
        load_config(None, ["model.local_attention=flash"], cls=Config)
    with pytest.raises(ConfigError, match="model.fp8_recipe must be delayed\\|tensorwise\\|mxfp8\\|blockwise, got 'nvfp4'"):
        load_config(None, ["model.fp8_recipe=nvfp4"], cls=Config)


def test_parallel_sizes_must_divide_the_model():
    hf = load_hf_config(dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    validate_parallel_sizes(ParallelConfig(tp=2), hf, world_size=2)
    with pytest.raises(ConfigError, match="num_hidden_layers=3"):
        validate_parallel_sizes(ParallelConfig(pp=2), hf, world_size=2)
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        validate_parallel_sizes(ParallelConfig(tp=4), hf, world_size=4)
    with pytest.raises(ConfigError, match="world size 3"):
        validate_parallel_sizes(ParallelConfig(tp=2), hf, world_size=3)
    with pytest.raises(ConfigError, match="no experts"):
        validate_parallel_sizes(ParallelConfig(ep=2), hf, world_size=2)
    moe = load_hf_config(dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2))
    with pytest.raises(ConfigError, match="experts=6"):
        validate_parallel_sizes(ParallelConfig(ep=4), moe, world_size=4)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        validate_parallel_sizes(ParallelConfig(tp=2), moe, world_size=2)
