import subprocess
import sys

import pytest
import torch

from megatron_pz.config import ConfigError, ModelConfig
from megatron_pz.model import load_hf_config, transformer_config_from_hf


def test_import_pulls_no_gpu_stack():
    code = (
        "import sys, megatron_pz, megatron_pz.cli, megatron_pz.model, megatron_pz.runtime, megatron_pz.config;"
        "megatron_pz.cli.build_parser();"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('transformer_engine','vllm','apex')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_compat_maps_cuda_assumptions():
    from multiproc import REPO_ROOT, WORKERS

    result = subprocess.run([sys.executable, str(WORKERS / "cpu_compat_check.py")], capture_output=True,
                            text=True, timeout=300, cwd=REPO_ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0 and "cpu-compat ok" in result.stdout, result.stderr[-4000:]


def test_transformer_config_mapping():
    hf = load_hf_config(dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                             moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False, mlp_only_layers=[0], rms_norm_eps=1e-5,
                             rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    cfg = transformer_config_from_hf(hf, ModelConfig())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (4, 64, 8, 2)
    assert cfg.kv_channels == 32 and cfg.qk_layernorm and cfg.normalization == "RMSNorm"
    assert cfg.layernorm_epsilon == 1e-5 and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.num_moe_experts == 8 and cfg.moe_router_topk == 2 and cfg.moe_ffn_hidden_size == 48
    assert cfg.moe_router_pre_softmax  # norm_topk_prob=False: softmax over all experts, no renorm
    assert cfg.moe_layer_freq == [0, 1, 1, 1]
    assert cfg.params_dtype == torch.float32 and cfg.calculate_per_token_loss
    llama = load_hf_config(dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    assert not transformer_config_from_hf(llama).qk_layernorm


def test_bad_hf_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        load_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_hf_config(tmp_path / "missing")
    with pytest.raises(ConfigError, match="fp8"):
        from megatron_pz.config import Config, load_config
        load_config(None, ["model.fp8=hybrid", "model.spec=local"], cls=Config)


def test_world_backend_serves_cpu_tensors_on_every_device():
    """A GPU world must also carry the host-side collectives (metrics, flags, *_object): NCCL alone
    fails them with "No backend type associated with device type cpu"."""
    from megatron_pz.config import RuntimeConfig, load_config
    from megatron_pz.runtime.distributed import world_backend

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert world_backend(cuda) == "cpu:gloo,cuda:nccl" and world_backend(cpu) == "gloo"
    assert world_backend(cuda, "cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    with pytest.raises(ConfigError, match="needs a CPU backend"):
        world_backend(cuda, "nccl")
    with pytest.raises(ConfigError, match="only gloo"):
        world_backend(cpu, "nccl")
    with pytest.raises(ConfigError, match="runtime.backend must be"):
        load_config(None, ["runtime.backend=nccl"])
    assert RuntimeConfig().backend == "auto"


def test_slurm_import_builds_the_model_on_cpu():
    """The one-time HF import reshards to TP=PP=EP=1 in one process: on a GPU node without
    ``--device cpu`` it would build all 30B parameters on one GPU."""
    from multiproc import REPO_ROOT

    from megatron_pz.cli import build_parser

    script = (REPO_ROOT / "slurm" / "launch.sh").read_text().replace("\\\n", " ")  # join continued lines
    imports = [line for line in script.splitlines() if "convert hf-to-megatron" in line]
    assert imports and all("--device cpu" in line for line in imports), imports
    args = build_parser().parse_args(["convert", "hf-to-megatron", "--hf", "x", "--out", "y"])
    assert args.device == "cpu"  # the command's own default, for anyone running it by hand
    args = build_parser().parse_args(["convert", "megatron-to-hf", "--ckpt", "x", "--out", "y"])
    assert args.device == "cpu"  # export reshards to one process too


def _smollm3(overrides=None, **kw):
    base = dict(model_type="smollm3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)
    base.update(kw)
    return load_hf_config(base, overrides)


def test_smollm3_nope_layers_become_megatron_no_rope_freq():
    """HF no_rope_layers (1 = uses RoPE, transformers 5.24) -> Megatron no_rope_freq (1 = skips RoPE)."""
    cfg = transformer_config_from_hf(_smollm3())  # interval 4 (SmolLM3-3B): layers 4 and 8 (1-based) NoPE
    assert cfg.no_rope_freq == [0, 0, 0, 1, 0, 0, 0, 1]
    assert not cfg.qk_layernorm and not cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.kv_channels == 16
    explicit = _smollm3(no_rope_layers=[0, 1, 1, 1, 1, 1, 1, 0, 1, 1])  # longer than the layers: HF allows it
    assert transformer_config_from_hf(explicit).no_rope_freq == [1, 0, 0, 0, 0, 0, 0, 1]
    assert transformer_config_from_hf(_smollm3(no_rope_layers=[1] * 8)).no_rope_freq is None
    llama = load_hf_config(dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4))
    assert transformer_config_from_hf(llama).no_rope_freq is None


def test_smollm3_unsupported_features_are_refused_by_name():
    with pytest.raises(ConfigError, match="no_rope_layers must list 0 or 1"):
        transformer_config_from_hf(_smollm3(no_rope_layers=[1, 2, 1, 0, 1, 1, 1, 0]))
    with pytest.raises(ConfigError, match="no_rope_layers must list 0 or 1 for each of the 8 layers"):
        # a short list cannot come through SmolLM3Config itself, but can through model.hf_overrides
        transformer_config_from_hf(_smollm3({"no_rope_layers": [1, 1, 1, 0]}))
    with pytest.raises(ConfigError, match="use_sliding_window=true"):
        transformer_config_from_hf(_smollm3(use_sliding_window=True, sliding_window=64))
    with pytest.raises(ConfigError, match="attention_bias=True with mlp_bias=False"):
        transformer_config_from_hf(_smollm3(attention_bias=True))
