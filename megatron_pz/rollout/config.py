"""Settings of the rollout engines (the ``rollout:`` section of a run's YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_pz.config import ConfigError

ENGINES = ("megatron", "hf", "vllm")
PLACEMENTS = ("colocated", "disaggregated")
OWN_WEIGHT_ENGINES = ("hf", "vllm")  # engines that can run on rollout ranks (they hold their own weights)


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
    tensor_parallel_size: int = 1  # vLLM's own TP (independent of the actor's layout)
    enforce_eager: bool = False  # True: no CUDA graphs (slower decode, faster start, less memory)
    # 2: drop weights and KV cache while the actor trains (the weights are resent every step anyway);
    # 1: also keeps a host copy of the weights (needed only with refresh_weights: false).
    sleep_level: int = 2
    max_model_len: Optional[int] = None  # None: the run's prompt + response budget (not the model's 40,960)
    dtype: str = "bfloat16"
    enable_prefix_caching: bool = True
    # Where rollouts run (ours, past the papers; see README "Rollouts on their own ranks").
    # colocated: on the training ranks, between updates (the engine sleeps while the actor trains).
    # disaggregated: on the job's last `ranks` ranks, which hold only an engine (hf | vllm) and receive
    # the weights over a bridge group after each update; the training ranks never generate.
    placement: str = "colocated"
    ranks: int = 0  # rollout ranks (disaggregated only): the last `ranks` ranks of the torchrun job
    # disaggregated only. 0: the batch of step k is generated from the weights trained on (on-policy, the
    # papers' setting). 1: generation of batch k+1 (from v_k) overlaps the update on batch k, so each
    # batch is trained one version later than it was sampled (TIS against the rollout log-probs corrects it).
    max_staleness: int = 0
    # disaggregated only: a rank whose heartbeat stalls this long fails the job, naming it; every
    # transfer over the bridge (weights, batches) must finish within bridge_timeout_s.
    heartbeat_timeout_s: float = 60.0
    bridge_timeout_s: float = 600.0

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
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        self._validate_placement()

    @property
    def disaggregated(self) -> bool:
        return self.placement == "disaggregated"

    def _validate_placement(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"rollout.placement must be one of {'|'.join(PLACEMENTS)}, got {self.placement!r}")
        if self.max_staleness not in (0, 1):
            raise ConfigError(f"rollout.max_staleness must be 0 or 1, got {self.max_staleness}")
        if not self.disaggregated:
            if self.ranks:
                raise ConfigError(f"rollout.ranks={self.ranks} needs rollout.placement=disaggregated (colocated "
                                  "rollouts run on the training ranks)")
            if self.max_staleness:
                raise ConfigError("rollout.max_staleness=1 needs rollout.placement=disaggregated (colocated "
                                  "rollouts and updates share the ranks, so nothing overlaps)")
            return
        if self.engine not in OWN_WEIGHT_ENGINES:
            raise ConfigError(f"rollout.placement=disaggregated needs an engine that holds its own weights "
                              f"({'|'.join(OWN_WEIGHT_ENGINES)}); rollout.engine={self.engine} decodes on the "
                              "actor's modules, which rollout ranks do not have")
        if self.ranks < 1:
            raise ConfigError(f"rollout.ranks must be >= 1 with rollout.placement=disaggregated, got {self.ranks}")
        if self.engine == "vllm" and self.ranks % self.tensor_parallel_size:
            raise ConfigError(f"rollout.ranks={self.ranks} must be a multiple of rollout.tensor_parallel_size="
                              f"{self.tensor_parallel_size} (each vLLM engine spans that many rollout ranks)")
        if not self.refresh_weights:
            raise ConfigError("rollout.refresh_weights=false is a colocated diagnostic; rollout ranks always "
                              "receive the weights after every update")
        for key in ("heartbeat_timeout_s", "bridge_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"rollout.{key} must be > 0, got {getattr(self, key)}")


def check_engine_for_model(cfg: RolloutConfig, hf_config) -> None:
    """What the chosen engine cannot run, refused before any work (the hf engine builds later)."""
    from megatron_pz.config import num_experts_of

    if cfg.engine == "hf" and num_experts_of(hf_config):
        raise ConfigError("rollout.engine=hf supports dense models only: transformers 5 fuses MoE experts "
                          "in memory while the weight sync sends them one by one (use megatron or vllm)")
