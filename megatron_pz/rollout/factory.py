"""Pick the rollout engine a run's config asks for."""

from __future__ import annotations

from typing import Optional

from megatron_pz.config import ConfigError
from megatron_pz.model.routes import RouteShape
from megatron_pz.rollout.common import param_dtype_and_device
from megatron_pz.rollout.config import OWN_WEIGHT_ENGINES, RolloutConfig
from megatron_pz.rollout.hf_engine import HFRolloutEngine
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine
from megatron_pz.rollout.vllm_engine import VLLMRolloutEngine  # imports vLLM itself only when one is built


def build_rollout_engine(cfg: RolloutConfig, model_chunks, tokenizer, hf_config, max_model_len: Optional[int] = None,
                         capture_routes: bool = False):
    """The configured :class:`~megatron_pz.rollout.base.RolloutEngine`.

    ``megatron``: decodes on ``model_chunks`` themselves (weights shared). ``hf`` and ``vllm`` hold
    their own copy of the weights, which :class:`~megatron_pz.rollout.phase.RolloutPhases` pushes at
    the start of each rollout phase after an update (vLLM itself is imported when its engine is built).
    ``max_model_len``: the run's prompt + response budget (vLLM's context length when
    ``rollout.max_model_len`` is unset). ``capture_routes``: every completion carries its MoE routes
    (:mod:`megatron_pz.model.routes`; see :func:`~megatron_pz.rollout.config.engine_captures_routes`).
    Call after :func:`megatron_pz.runtime.initialize`; collective over the whole world for ``hf`` and ``vllm``.
    """
    cfg.validate()
    if capture_routes and cfg.engine == "hf":
        raise ValueError("the hf rollout engine runs dense models only and cannot capture MoE routes")
    if cfg.engine == "megatron":
        return MegatronRolloutEngine(model_chunks, tokenizer, hf_config,
                                     max_batch_size=cfg.max_batch_size, seed=cfg.seed,
                                     route_shape=RouteShape.from_hf(hf_config) if capture_routes else None)
    dtype, device = param_dtype_and_device(model_chunks)
    return build_own_weights_engine(cfg, tokenizer, hf_config, dtype, device, max_model_len, capture_routes)


def build_own_weights_engine(cfg: RolloutConfig, tokenizer, hf_config, dtype, device,
                             max_model_len: Optional[int] = None, capture_routes: bool = False):
    """An engine with its own copy of the weights (``hf`` in ``dtype`` on ``device``, or vLLM), which the
    caller fills through ``load_weight_buckets`` / ``update_weights``. What a rollout rank of a
    disaggregated run builds (it has no actor to take the dtype from)."""
    if cfg.engine not in OWN_WEIGHT_ENGINES:
        raise ConfigError(f"rollout.engine={cfg.engine} does not hold its own weights ({'|'.join(OWN_WEIGHT_ENGINES)} do)")
    if cfg.engine == "hf":
        return HFRolloutEngine(tokenizer, hf_config, max_batch_size=cfg.max_batch_size, seed=cfg.seed,
                               bucket_mb=cfg.bucket_mb, dtype=dtype, device=device)
    return VLLMRolloutEngine(cfg, tokenizer, hf_config, max_model_len=cfg.max_model_len or max_model_len,
                             actor_dtype=dtype, capture_routes=capture_routes)
