"""Settings of the rollout engines (the ``rollout:`` section of a run's YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_pz.config import ConfigError

ENGINES = ("megatron", "hf", "vllm")
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RolloutConfig:
    # megatron: in-process KV-cache decoding on the actor's own modules (no weight copy);
    # hf: its own transformers copy of the model, refreshed after every update (vLLM's twin on CPU);
    # vllm: GPU, colocated, its own weights refreshed after every update.
    engine: str = "megatron"
    # Megatron / hf engine: sequences decoded together (prompts x n samples, sorted by prompt length).
    max_batch_size: int = 32
    seed: int = 1234  # base of the sampling stream when SamplingParams.seed is None
    # Weight sync (hf, vLLM): tensors are pushed in flat buckets of at most this many MiB.
    bucket_mb: int = 512
    # Diagnostic only: false keeps the engine's first weights for the whole run (hf, vLLM), to
    # measure what a missing refresh costs (rollout/logp_diff_mean grows). Never for training.
    refresh_weights: bool = True
    # vLLM settings.
    gpu_memory_utilization: float = 0.5  # fraction of the GPU vLLM may take (the actor shares it)
    # vLLM's KV cache per rank in bytes; null: the rest of gpu_memory_utilization on a GPU, and on CPU
    # (where that fraction would be of the node's whole RAM per rank) rollout.max_batch_size sequences of
    # max_model_len tokens (megatron_pz/rollout/budget.py; the memory plan counts the same bytes)
    kv_cache_memory_bytes: Optional[int] = None
    tensor_parallel_size: int = 1  # vLLM's own TP (independent of the actor's layout)
    # True: no CUDA graphs (slower decode, faster start, less memory). On CPU always eager: vLLM's CPU
    # compile mode runs inductor (minutes to start, needs a C++ compiler).
    enforce_eager: bool = False
    # 2: drop weights and KV cache while the actor trains (the weights are resent every step anyway);
    # 1: also keeps a host copy of the weights (needed only with refresh_weights: false).
    sleep_level: int = 2
    max_model_len: Optional[int] = None  # None: the run's prompt + response budget (not the model's 40,960)
    dtype: str = "auto"  # vLLM's weights and KV cache; auto: the actor's parameter dtype (what the sync sends)
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"rollout.engine must be one of {'|'.join(ENGINES)}, got {self.engine!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"rollout.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.bucket_mb < 1:
            raise ConfigError(f"rollout.bucket_mb must be >= 1, got {self.bucket_mb}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"rollout.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.engine == "vllm" and not self.refresh_weights and self.sleep_level == 2:
            raise ConfigError("rollout.refresh_weights=false with rollout.engine=vllm needs rollout.sleep_level=1 "
                              "(level 2 discards the weights that would not be resent)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"rollout.max_model_len must be >= 2 (or unset), got {self.max_model_len}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"rollout.kv_cache_memory_bytes must be >= 1 (or unset), got {self.kv_cache_memory_bytes}")
        if self.dtype not in VLLM_DTYPES:
            raise ConfigError(f"rollout.dtype must be one of {'|'.join(VLLM_DTYPES)}, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


def check_engine_for_model(cfg: RolloutConfig, hf_config) -> None:
    """What the chosen engine cannot run, refused before any work (the hf engine builds later)."""
    from megatron_pz.config import num_experts_of

    if cfg.engine == "hf" and num_experts_of(hf_config):
        raise ConfigError("rollout.engine=hf supports dense models only: transformers 5 fuses MoE experts "
                          "in memory while the weight sync sends them one by one (use megatron or vllm)")
