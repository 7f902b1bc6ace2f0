"""Build a Megatron-Core ``GPTModel`` from a Hugging Face config (Qwen3, Qwen3-MoE, Llama, SmolLM3).

The HF config is the single source of truth for architecture, so a checkpoint imported from the hub
and the model trained here agree by construction. The layer spec is Transformer Engine's on GPU
(FP8 switchable) and Megatron's local (plain PyTorch) spec on CPU; ``transformer_engine`` is imported
only when the TE spec is chosen.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_pz.config import ConfigError, ModelConfig, ParallelConfig, num_experts_of
from megatron_pz.model.sp_norm import use_sequence_parallel_norms

SUPPORTED_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_config(source: Any, overrides: Optional[dict] = None):
    """Return a ``transformers.PretrainedConfig`` from a folder, a config.json path, a dict or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        cfg = source
    elif isinstance(source, dict):
        data = dict(source)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ConfigError("an HF config dict needs a 'model_type' field")
        cfg = AutoConfig.for_model(model_type, **data)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.hf_config: {path} not found (expected a folder with config.json)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model.hf_config: {path} is not valid JSON: {exc}") from exc
        model_type = data.pop("model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model.hf_config: {path} has model_type={model_type!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        cfg = AutoConfig.for_model(model_type, **data)
    if cfg.model_type not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"unsupported model_type {cfg.model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    return cfg


def resolve_hf_config(cfg):
    """The run's HF config (``cfg``: a RunConfig): ``model.hf_config`` or the inline ``model.architecture``, with
    ``model.hf_overrides``; a folder whose shapes disagree with the ``model.architecture`` the YAML states is
    refused, naming the field."""
    source = cfg.model.hf_config or dict(cfg.model.architecture)
    hf = load_hf_config(source, cfg.model.hf_overrides)
    if cfg.model.hf_config and cfg.model.architecture:  # the YAML states the shapes it was sized for
        for key, expected in cfg.model.architecture.items():
            actual = getattr(hf, key, None)
            if key != "model_type" and actual != expected and not (key == "num_experts" and
                                                                    getattr(hf, "num_local_experts", None) == expected):
                raise ConfigError(f"model.architecture.{key}={expected!r} but {cfg.model.hf_config} has {actual!r}")
    return hf


def causal_lm_architecture(hf_config) -> str:
    """The ``transformers`` / vLLM class name of the config's causal LM (e.g. ``Qwen3ForCausalLM``).

    A config given inline (``model.architecture``) has no ``architectures`` field; vLLM resolves the
    model class from it, so it is derived here from ``model_type``.
    """
    listed = getattr(hf_config, "architectures", None)
    if listed:
        return listed[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", None))
    if name is None:
        raise ConfigError(f"no causal-LM class is known for model_type={getattr(hf_config, 'model_type', None)!r}")
    return name


def rope_settings(hf_config) -> tuple[float, bool, float]:
    """(rope_theta, llama3-style scaling on, scaling factor). transformers 5 keeps these in rope_parameters."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), False, 1.0
    if rope_type == "llama3":
        factor = params.get("factor", scaling.get("factor", 8.0))
        return float(theta), True, float(factor)
    raise ConfigError(f"rope type {rope_type!r} is not supported (default, llama3)")


def resolve_spec(model_cfg: ModelConfig, device: torch.device) -> str:
    if model_cfg.spec != "auto":
        return model_cfg.spec
    if device.type != "cuda":
        return "local"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        warnings.warn("Transformer Engine is not installed: model.spec=auto falls back to the local layer spec on "
                      "this GPU (no FP8, unfused norms, torch Adam); install megatron-pz[gpu] or set model.spec: local "
                      "to silence this", stacklevel=2)
        return "local"
    return "te"


def no_rope_pattern(hf_config) -> Optional[list[int]]:
    """Megatron's ``no_rope_freq`` list (1 = this layer skips RoPE) from SmolLM3's ``no_rope_layers``.

    transformers 5.24 ``SmolLM3Config``: ``no_rope_layers[i] == 1`` means layer ``i`` *uses* RoPE (0 = NoPE),
    derived as ``int((i + 1) % no_rope_layer_interval != 0)`` when absent (every 4th layer NoPE in the 3B);
    ``SmolLM3Attention`` rotates q/k iff ``config.no_rope_layers[layer_idx]``. megatron-core 0.16.1
    ``TransformerConfig.no_rope_freq`` is the opposite flag (1 = skip), indexed by the *global* layer
    number (``Attention.forward``: ``no_rope_freq[self.layer_number - 1]``; ``TransformerLayer`` adds the
    pipeline offset to ``layer_number``), so the list is ``1 - no_rope_layers``. None when every layer
    uses RoPE (other architectures).
    """
    uses_rope = getattr(hf_config, "no_rope_layers", None)
    if hf_config.model_type != "smollm3" or uses_rope is None:
        return None
    layers = hf_config.num_hidden_layers
    uses_rope = list(uses_rope)
    if len(uses_rope) < layers or any(v not in (0, 1) for v in uses_rope[:layers]):
        raise ConfigError(f"no_rope_layers must list 0 or 1 for each of the {layers} layers "
                          f"(1 = the layer uses RoPE), got {uses_rope}")
    skip = [1 - int(v) for v in uses_rope[:layers]]  # HF allows a longer list; the first `layers` count
    return skip if any(skip) else None


def check_supported_features(hf_config) -> None:
    """Refuse HF features this provider cannot build, naming the field, before any work starts."""
    if getattr(hf_config, "use_sliding_window", False) and getattr(hf_config, "sliding_window", None) is not None \
            and hf_config.model_type == "smollm3":
        # transformers 5.24 SmolLM3: sliding-window attention on the NoPE layers when use_sliding_window
        raise ConfigError(f"use_sliding_window=true (sliding_window={hf_config.sliding_window}) is not supported; "
                          "set use_sliding_window: false (SmolLM3-3B's own config has it off)")
    if hf_config.model_type in ("llama", "smollm3") and \
            bool(getattr(hf_config, "attention_bias", False)) != bool(getattr(hf_config, "mlp_bias", False)):
        # HF puts attention_bias on o_proj too; Megatron has one add_bias_linear for o_proj and the MLP
        raise ConfigError(f"attention_bias={hf_config.attention_bias} with mlp_bias={hf_config.mlp_bias} is not "
                          "supported (o_proj and MLP biases share Megatron's add_bias_linear); they must be equal")


def moe_layer_pattern(hf_config) -> Optional[list[int]]:
    if not num_experts_of(hf_config):
        return None
    only_dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    return [
        0 if (i in only_dense or (i + 1) % step != 0) else 1 for i in range(hf_config.num_hidden_layers)
    ]


def transformer_config_from_hf(
    hf_config,
    model_cfg: Optional[ModelConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    device: torch.device = torch.device("cpu"),
):
    """Translate HF fields into a Megatron ``TransformerConfig`` (one place for every mapping)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_cfg = model_cfg or ModelConfig()
    parallel = parallel or ParallelConfig()
    check_supported_features(hf_config)
    if model_cfg.params_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[model_cfg.params_dtype]
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    experts = num_experts_of(hf_config)
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=bool(getattr(hf_config, "mlp_bias", False)),
        no_rope_freq=no_rope_pattern(hf_config),  # SmolLM3's NoPE layers; None elsewhere
        add_qkv_bias=bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type in ("qwen3", "qwen3_moe"),
        attention_dropout=model_cfg.attention_dropout,
        hidden_dropout=model_cfg.hidden_dropout,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device.type != "cuda",
        # Pipeline p2p as single isend/irecv pairs on CPU. megatron-core 0.16.1's batched form posts
        # [send_prev, recv_prev, send_next, recv_next] on every rank; gloo matches a pair's messages in
        # posting order, so with PP=2 (prev == next) the interleaved schedule's forward activation and
        # backward gradient cross over (wrong losses after the warm-up micro-batches). NCCL groups them.
        batch_p2p_comm=device.type == "cuda",
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        perform_initialization=model_cfg.init_weights,
        # Rollout batches have varying lengths; Megatron's allgather dispatcher cannot handle that.
        # The interleaved (virtual pipeline) schedule gets fixed shapes instead (equalize_micro_batches).
        variable_seq_lengths=model_cfg.moe_token_dispatcher != "allgather" and not parallel.virtual_pp,
        # Loss = sum over tokens; Megatron divides grads by the token count summed over
        # micro-batches and DP ranks (one global count: a batch split differently trains the same).
        calculate_per_token_loss=True,
        moe_token_dispatcher_type=model_cfg.moe_token_dispatcher,
        deallocate_pipeline_outputs=True,
        # No CUDA graphs. An empty scope is megatron-core 0.16.1's spelling of "whole layer"; its default
        # "full" only raises a deprecation warning at every config built.
        cuda_graph_scope=[],
    )
    if model_cfg.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    if experts:
        if getattr(hf_config, "shared_expert_intermediate_size", 0):
            raise ConfigError("shared experts are not supported (Qwen3-MoE has none)")
        aux = model_cfg.moe_aux_loss_coeff
        if aux is None:
            aux = float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0)
        kwargs.update(
            num_moe_experts=experts,
            moe_router_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=getattr(hf_config, "moe_intermediate_size", hf_config.intermediate_size),
            moe_router_score_function="softmax",
            # HF Qwen3-MoE: softmax over all experts, top-k, renormalise iff norm_topk_prob.
            # Megatron: pre_softmax=False is top-k then softmax over the k (== renormalised);
            # pre_softmax=True is softmax over all then top-k (== not renormalised).
            moe_router_pre_softmax=not bool(getattr(hf_config, "norm_topk_prob", True)),
            moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
            moe_aux_loss_coeff=aux,
            moe_grouped_gemm=model_cfg.moe_grouped_gemm,
            moe_layer_freq=moe_layer_pattern(hf_config),
            moe_router_dtype="fp32",
            # one RouterReplay per router (megatron-core 0.16.1), inert until routing replay
            # (megatron_pz.train.routing_replay) or route recording (rollout.route_recorder) sets an action
            moe_enable_routing_replay=True,
        )
    if model_cfg.fp8:
        kwargs.update(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe)
    return TransformerConfig(**kwargs)


def layer_spec(config, spec: str, vp_stage: Optional[int] = None, local_attention: str = "sdpa"):
    """Decoder block spec for this pipeline stage; ``spec`` is 'te' or 'local'."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )

    use_te = spec == "te"
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
    if config.num_moe_experts or (not use_te and config.sequence_parallel):  # a block spec: its final norm too
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
        )
        layers = block.layer_specs
    elif use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        block = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
        layers = [block]
    if not use_te and local_attention == "sdpa":
        # lazy: it subclasses megatron-core's attention at import (4 s), which `megatron-pz --help` must not load
        from megatron_pz.model.sdpa_attention import SdpaDotProductAttention  # lazy: see the line above

        for layer in layers:
            layer.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    if not use_te and config.sequence_parallel:  # torch's norm refuses SP; this one all-reduces its grad

        use_sequence_parallel_norms(block)
    return block


def build_model(
    hf_config,
    model_cfg: Optional[ModelConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    device: Optional[torch.device] = None,
    max_sequence_length: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
):
    """Return this rank's ``GPTModel`` stage. Call after :func:`megatron_pz.runtime.initialize`.

    Logits are vocab-parallel (``parallel_output=True``): each TP rank holds vocab/TP columns, and
    log-probs are computed without gathering them (see :mod:`megatron_pz.rl.logprobs`).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model_cfg = model_cfg or ModelConfig()
    parallel = parallel or ParallelConfig()
    if parallel_state.model_parallel_is_initialized():  # a mismatch would silently build wrong stages
        actual = (parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_expert_model_parallel_world_size())
        if actual != (parallel.tp, parallel.pp, parallel.ep):
            raise ConfigError(f"build_model: parallel tp/pp/ep={(parallel.tp, parallel.pp, parallel.ep)} but the "
                              f"runtime was initialised with {actual}; pass the same ParallelConfig")
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    config = transformer_config_from_hf(hf_config, model_cfg, parallel, device)
    spec = resolve_spec(model_cfg, device)
    if spec == "te" and device.type != "cuda":
        raise ConfigError("model.spec='te' needs a CUDA device; use model.spec: local on CPU")
    theta, rope_scaling, rope_factor = rope_settings(hf_config)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, spec, vp_stage, model_cfg.local_attention),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=max_sequence_length or getattr(hf_config, "max_position_embeddings", 4096),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        vp_stage=vp_stage,
    )
    # One dtype for every weight, as Megatron-LM's Float16Module casts the whole module: the local spec's
    # norms (torch.nn.RMSNorm) are otherwise created in fp32 inside a bf16 model, and torch's fused
    # rms_norm refuses mixed input/weight dtypes (slow path, and a warning at every forward).
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)
    if device.type == "cuda":
        model.cuda(device)
    return model
