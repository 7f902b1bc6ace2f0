"""Settings of the rollout engines (the ``rollout:`` section of a run's YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_pz.config import ConfigError, num_experts_of

ENGINES = ("megatron", "hf", "vllm")
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
ROUTING_REPLAY = ("auto", "off", "r3")
PLACEMENTS = ("colocated", "disaggregated")
STALE_SAMPLES = ("drop", "mask")  # what happens to a sample staler than rollout.max_staleness
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
    # MoE routing replay (R3, arXiv 2510.11370): r3 = every Megatron forward on a sample (old log-probs,
    # the GRPO update and its recompute, RLP's policy scoring) uses the experts its rollout chose; off =
    # native routing (agreement with the rollout is still measured where the engine captures routes);
    # auto = r3 for MoE models whose engine can capture them, off otherwise (resolve_routing_replay).
    # (Typed Any: YAML reads a bare `off` as false, which validate() turns back into "off".)
    routing_replay: Any = "auto"
    # Where rollouts run (ours, past the papers; see README "Rollouts on their own ranks").
    # colocated: on the training ranks, between updates (the engine sleeps while the actor trains).
    # disaggregated: on the job's last `ranks` ranks, which hold only an engine (hf | vllm) and receive
    # the weights over a bridge group after each update; the training ranks never generate.
    placement: str = "colocated"
    ranks: int = 0  # rollout ranks (disaggregated only): the last `ranks` ranks of the torchrun job
    # disaggregated only: how many RL steps ahead the trainers request batches (N, any N >= 0). 0: batch k is
    # generated from v_k, the weights trained on (on-policy, the papers' setting). N >= 1: batch k+N is
    # requested as soon as batch k arrives, so generation overlaps the next N updates and the rollout ranks
    # load each new version between decode windows while samples are in flight (megatron_pz/disagg/stream.py);
    # every token records the version that sampled it, and a sample's staleness (the trainer's version minus
    # its oldest token's) is at most N unless partial rollouts defer it (then `stale_samples` applies).
    max_staleness: int = 0
    # disaggregated, max_staleness >= 1 only; 0 = off. Partial rollouts: a rollout rank decodes at most this
    # many tokens per in-flight sample between two weight versions; a sample cut at the budget continues
    # from its prefix under the next weights, and a step's batch takes the units that finished (the others are
    # deferred to a later batch, so the long tail of a batch no longer holds the trainers).
    partial_rollout_tokens: int = 0
    # samples staler than max_staleness (partial rollouts defer them): drop (the whole sample leaves the
    # loss, numerator and denominator) | mask (only its tokens older than max_staleness leave it). Counted
    # and logged (stale/*). NeMo-RL's async GRPO drops trajectories older than max_trajectory_age_steps.
    stale_samples: str = "drop"
    # partial rollouts: the tokens a sample got from earlier weight versions than its last leave the loss
    # (slime's --mask-offpolicy-in-partial-rollout; off by default there and here)
    mask_offpolicy_prefix: bool = False
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
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"rollout.kv_cache_memory_bytes must be >= 1 (or unset), got {self.kv_cache_memory_bytes}")
        if self.dtype not in VLLM_DTYPES:
            raise ConfigError(f"rollout.dtype must be one of {'|'.join(VLLM_DTYPES)}, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.routing_replay is False:
            self.routing_replay = "off"
        if not isinstance(self.routing_replay, str) or self.routing_replay not in ROUTING_REPLAY:
            raise ConfigError(f"rollout.routing_replay must be one of {'|'.join(ROUTING_REPLAY)}, "
                              f"got {self.routing_replay!r}")
        self._validate_placement()

    @property
    def disaggregated(self) -> bool:
        return self.placement == "disaggregated"

    def _validate_placement(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"rollout.placement must be one of {'|'.join(PLACEMENTS)}, got {self.placement!r}")
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        if not isinstance(self.partial_rollout_tokens, int) or self.partial_rollout_tokens < 0:
            raise ConfigError(f"rollout.partial_rollout_tokens must be an integer >= 0 (0: off), got "
                              f"{self.partial_rollout_tokens!r}")
        if self.stale_samples not in STALE_SAMPLES:
            raise ConfigError(f"rollout.stale_samples must be one of {'|'.join(STALE_SAMPLES)}, got "
                              f"{self.stale_samples!r}")
        if not self.disaggregated:
            if self.ranks:
                raise ConfigError(f"rollout.ranks={self.ranks} needs rollout.placement=disaggregated (colocated "
                                  "rollouts run on the training ranks)")
            if self.max_staleness:
                raise ConfigError(f"rollout.max_staleness={self.max_staleness} needs rollout.placement=disaggregated "
                                  "(colocated rollouts and updates share the ranks, so nothing overlaps)")
            if self.partial_rollout_tokens:
                raise ConfigError("rollout.partial_rollout_tokens needs rollout.placement=disaggregated with "
                                  "rollout.max_staleness >= 1")
            return
        if self.partial_rollout_tokens and self.engine == "vllm" and self.tensor_parallel_size > 1:
            raise ConfigError(f"rollout.partial_rollout_tokens needs one-rank vLLM engines (a sample is cut and continued "
                              f"between decode steps): set rollout.tensor_parallel_size=1 (got "
                              f"{self.tensor_parallel_size}; more rollout.ranks instead) or rollout.engine=hf")
        if self.partial_rollout_tokens and not self.max_staleness:
            raise ConfigError("rollout.partial_rollout_tokens needs rollout.max_staleness >= 1 (a sample cut at the "
                              "budget finishes under later weights, i.e. off-policy)")
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
    if cfg.engine == "hf" and num_experts_of(hf_config):
        raise ConfigError("rollout.engine=hf supports dense models only: transformers 5 fuses MoE experts "
                          "in memory while the weight sync sends them one by one (use megatron or vllm)")


# vLLM 0.32.0 ``VllmConfig._verify_aux_output_compatibility``: route capture needs Model Runner V2, and the
# CPU build has no Triton, without which ``use_v2_model_runner`` falls back to V1. Tried on the CPU build
# (one process, a tiny Qwen3-MoE): as is, "AuxOutput Connector requires Model Runner V2"; with
# VLLM_USE_V2_MODEL_RUNNER=1, "Model Runner V2 requires Triton".
VLLM_CPU_CANNOT_CAPTURE = ("vLLM's CPU build runs the V1 model runner (Model Runner V2 needs Triton), and vLLM "
                           "0.32.0 returns routed experts only on Model Runner V2")


def engine_captures_routes(cfg: RolloutConfig, device: str) -> bool:
    """Whether ``cfg.engine`` can record an MoE rollout's expert choices on ``device`` ("cpu" | "cuda"):
    the Megatron engine always; vLLM on GPU with prefix caching (0.32.0 refuses capture without it); the
    ``hf`` engine never (it runs dense models only)."""
    if cfg.engine == "megatron":
        return True
    return cfg.engine == "vllm" and device == "cuda" and cfg.enable_prefix_caching


def resolve_routing_replay(cfg: RolloutConfig, hf_config, device: str) -> str:
    """``rollout.routing_replay`` resolved for this model and device: "r3" or "off"; refuses what cannot run.

    auto: r3 for an MoE model whose engine captures routes, off otherwise (dense, or vLLM's CPU build).
    """
    cfg.validate()
    moe = bool(num_experts_of(hf_config))
    captures = engine_captures_routes(cfg, device)
    if cfg.routing_replay == "auto":
        return "r3" if moe and captures else "off"
    if cfg.routing_replay == "off":
        return "off"
    if not moe:
        raise ConfigError(f"rollout.routing_replay=r3 replays MoE routes, but the model ({hf_config.model_type}) "
                          "has no experts; set rollout.routing_replay: off (or auto)")
    if cfg.engine == "vllm" and device != "cuda":
        raise ConfigError(f"rollout.routing_replay=r3 with rollout.engine=vllm on {device}: {VLLM_CPU_CANNOT_CAPTURE}; "
                          "use rollout.engine=megatron on CPU, or rollout.routing_replay: off")
    if cfg.engine == "vllm" and not cfg.enable_prefix_caching:
        raise ConfigError("rollout.routing_replay=r3 with rollout.engine=vllm needs rollout.enable_prefix_caching: "
                          "true (vLLM 0.32.0 returns routed experts only with prefix caching on)")
    return "r3"
