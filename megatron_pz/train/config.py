"""The run config: the base tree (model/parallel/optimizer/runtime) plus every subsystem's section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_pz.config import Config, ConfigError, load_config, validate_static
from megatron_pz.data.config import DataConfig
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.rollout.config import RolloutConfig


@dataclass
class GrpoConfig:
    clip_low: float = 0.2  # PPO clip below 1 (ratio >= 1 - clip_low)
    clip_high: float = 0.28  # clip-higher (DAPO): ratio <= 1 + clip_high
    kl_coef: float = 0.0  # k3 KL to the initial policy; PretrainZero and RLP use none
    tis_cap: Optional[float] = 2.0  # truncated IS weight cap on rollout/train log-prob mismatch; null: off


@dataclass
class TrainConfig:
    steps: int = 2000
    passages_per_step: int = 32  # global batch B (split over data-parallel ranks)
    max_tokens_per_micro_batch: int = 16384  # padded tokens per micro-batch (length-bucketed)
    max_prompt_tokens: int = 1536  # passages whose prompt would exceed this are skipped (and counted)
    run_dir: str = "runs/pretrainzero"
    save_interval: int = 100  # steps; a checkpoint is also written at the end
    keep_last: int = 2  # older RL checkpoints are pruned (0: keep all)
    resume: bool = True  # continue from run_dir/checkpoints when one exists
    init_checkpoint: Optional[str] = None  # start weights (e.g. from `megatron-pz convert hf-to-megatron`)
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate only before and after training
    eval_passages: int = 64  # held-out passages for the mask-prediction eval
    eval_max_new_tokens: int = 64
    tensorboard: bool = True
    log_samples: int = 2  # responses per role per step written to run_dir/samples.jsonl (0: none)


@dataclass
class WarmStartConfig:
    """Next-token pretraining + task-format teaching from scratch (the tiny CPU default).

    A model this small cannot follow instructions, so besides plain passages it learns both answer
    formats from the passages themselves: a random span candidate as the generator's ``\\mask{}``
    answer and the true span as the predictor's ``\\boxed{}`` answer (PretrainZero's Random-RLPT
    cold start idea).
    """

    enabled: bool = False
    steps: int = 300
    rows_per_step: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    format_fraction: float = 0.5  # share of rows that are task-format examples (half each role)
    space_in_answer: bool = False  # write answers as \boxed{ span} (see warm_start.format_rows)
    answer_only_loss: bool = False  # True: format examples train on their answer tokens only (SFT-style)


@dataclass
class RunConfig(Config):
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


def load_run_config(path=None, overrides=None) -> RunConfig:
    """YAML + overrides -> validated RunConfig; every error names its field before any work starts."""
    cfg = load_config(path, overrides, cls=RunConfig)
    validate_run(cfg)
    return cfg


def validate_run(cfg: RunConfig) -> None:
    validate_static(cfg)
    cfg.objective.validate()
    cfg.rollout.validate()
    t = cfg.train
    for name in ("steps", "passages_per_step", "max_tokens_per_micro_batch", "max_prompt_tokens",
                 "save_interval", "log_interval"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if cfg.model.hf_config is None and not cfg.model.architecture:
        raise ConfigError("set model.hf_config (an HF model folder) or model.architecture (an HF config dict)")
    if cfg.warm_start.enabled and cfg.train.init_checkpoint:
        raise ConfigError("warm_start.enabled and train.init_checkpoint exclude each other")
    if not 0.0 <= cfg.warm_start.format_fraction <= 1.0:
        raise ConfigError(f"warm_start.format_fraction must be in [0, 1], got {cfg.warm_start.format_fraction}")
