"""Pick the rollout engine a run's config asks for."""

from __future__ import annotations

from megatron_pz.rollout.config import RolloutConfig


def build_rollout_engine(cfg: RolloutConfig, model_chunks, tokenizer, hf_config):
    """The configured :class:`~megatron_pz.rollout.base.RolloutEngine`.

    ``megatron``: decodes on ``model_chunks`` themselves (weights shared). ``vllm``: a colocated vLLM
    engine that starts with the actor's current weights (vLLM is imported only here, lazily).
    Call after :func:`megatron_pz.runtime.initialize`; collective over the whole world for vLLM.
    """
    cfg.validate()
    if cfg.engine == "megatron":
        from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine

        return MegatronRolloutEngine(model_chunks, tokenizer, hf_config,
                                     max_batch_size=cfg.max_batch_size, seed=cfg.seed)
    from megatron_pz.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(cfg, tokenizer, hf_config, model_chunks=model_chunks)
