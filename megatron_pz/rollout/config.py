"""Settings of the rollout engines (the ``rollout:`` section of a run's YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_pz.config import ConfigError

ENGINES = ("megatron", "vllm")


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron (in-process KV-cache decoding) | vllm (GPU, colocated)
    # Megatron engine: sequences decoded together (prompts x n samples, sorted by prompt length).
    max_batch_size: int = 32
    seed: int = 1234  # base of the sampling stream when SamplingParams.seed is None
    # Weight sync (vLLM): tensors are pushed in flat buckets of at most this many MiB.
    bucket_mb: int = 512
    # vLLM settings.
    gpu_memory_utilization: float = 0.5  # fraction of the GPU vLLM may take (the actor shares it)
    tensor_parallel_size: int = 1  # vLLM's own TP (independent of the actor's layout)
    enforce_eager: bool = False  # True: no CUDA graphs (slower decode, faster start, less memory)
    sleep_level: int = 1  # 1: offload weights to CPU, drop KV cache; 2: drop both
    max_model_len: Optional[int] = None  # None: prompt + response limit of the run, else vLLM's default
    dtype: str = "bfloat16"
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
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
