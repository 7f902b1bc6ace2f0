"""The run config (what ``megatron-pz train`` and ``megatron-pz plan`` read): the base tree of
:mod:`megatron_pz.config` (model / parallel / optimizer / runtime) plus every subsystem's section, the
training ones (``train``, ``grpo``, ``warm_start``) defined here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_pz.config import Config, ConfigError, OptimizerConfig, check_range, load_config, validate_static
from megatron_pz.data.config import DataConfig
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.split import check_disaggregated
from megatron_pz.rl.config import RolloutCorrectionConfig
from megatron_pz.rollout.config import RolloutConfig
from megatron_pz.runtime.preemption import PreemptionConfig

@dataclass
class HeldoutEvalConfig:
    """The ``eval:`` section of a run (ours): which held-out figures beyond the greedy task accuracy are
    measured at every evaluation, and on how many items. 0 turns a figure off."""

    nll_passages: int = 0  # held-out passages scored for next-token NLL (no thought)
    info_gain_positions: int = 0  # held-out passages with one RLP position each
    info_gain_thoughts: int = 4  # thoughts sampled per position (their mean gain is the item's value)
    # tokens of an evaluation thought (None: objective.rlp_thought_max_tokens of the run's RLP config)
    info_gain_thought_tokens: Optional[int] = None
    generator_reward_samples: int = 0  # predictions sampled per greedy held-out mask (0: no generator reward)
    seed: int = 0  # items and random streams; the same for every evaluation of every model

    def validate(self) -> None:
        for key in ("nll_passages", "info_gain_positions", "generator_reward_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        if self.info_gain_thoughts < 1:
            raise ConfigError(f"eval.info_gain_thoughts must be >= 1, got {self.info_gain_thoughts}")
        if self.info_gain_thought_tokens is not None and self.info_gain_thought_tokens < 1:
            raise ConfigError(f"eval.info_gain_thought_tokens must be >= 1 (or null), got {self.info_gain_thought_tokens}")


@dataclass
class GrpoConfig:
    """The policy update. Paper defaults: clip-higher (PretrainZero §4.1 follows DAPO), no KL term
    (PZ §4.1 "GRPO without KL regularization"; RLP §9 "KL coefficient to 0"), one update per rollout
    batch (mini_batches = epochs = 1: RLP Algorithm 1 snapshots theta_old, samples, and updates once;
    PZ is silent), so the ratio is 1 and the clip inactive. Ours: the rollout correction (truncated IS against
    the rollout log-probs by default, :mod:`megatron_pz.rl.rollout_correction`), dual_clip (verl 0.9.1's
    default c = 3).
    The loss aggregation over tokens is each objective's (``objective.loss_agg``).
    """

    clip_low: float = 0.2  # PPO clip below 1 (ratio >= 1 - clip_low)
    clip_high: float = 0.28  # clip-higher (DAPO; PZ §4.1): ratio <= 1 + clip_high
    # Only 0 is accepted: no KL term is implemented (PZ §4.1 and RLP §9 train without one); a non-zero
    # value is rejected before work starts instead of being silently ignored.
    kl_coef: float = 0.0
    # what the loss does about rollout log-probs that are not the trainer's: IS weights, rejection, decoupled
    # or bypass PPO (default: token-level IS weights truncated at 2, the former tis_cap: 2.0)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    # PPO schedule: the rollout batch is split into `mini_batches` optimizer steps, repeated `epochs`
    # times; old log-probs are computed once before the first update, so later updates see a live
    # ratio and the clip engages. 1 x 1 (paper-silent default): one on-policy step, ratio 1.
    mini_batches: int = 1
    epochs: int = 1
    # dual-clip PPO: a negative-advantage token's loss is bounded by c * |A| (verl 0.9.1 default c = 3,
    # actor.clip_ratio_c); null: off. Only acts when the ratio exceeds c, i.e. with mini_batches/epochs > 1.
    dual_clip: Optional[float] = 3.0

    # keys of older configs -> what replaced them (megatron_pz.config.from_dict names the new key)
    RENAMED_KEYS = {
        "tis_cap": "grpo.tis_cap was replaced by grpo.rollout_correction, whose default is the old tis_cap: 2.0 "
                   "(weights: token, weight_cap: 2.0): remove tis_cap, or set grpo.rollout_correction.weight_cap "
                   "to another cap, grpo.rollout_correction.weights: none for tis_cap: null",
    }


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
    # the newest checkpoint is damaged (a shard cut short, a file missing, a bad latest pointer): true: resume
    # from the newest complete one before it (the damaged one is kept, renamed damaged_iter_*); false: refuse
    resume_fallback: bool = True
    init_checkpoint: Optional[str] = None  # start weights (e.g. from `megatron-pz convert hf-to-megatron`)
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate only before and after training
    eval_passages: int = 64  # held-out passages for the mask-prediction eval
    eval_max_new_tokens: int = 64
    tensorboard: bool = True
    log_samples: int = 2  # responses per role per step written to run_dir/samples.jsonl (0: none)


@dataclass
class WarmStartConfig:
    """Next-token pretraining + task-format teaching, from scratch (the tiny CPU default) or from
    ``train.init_checkpoint`` (a *format warm start* of a pretrained model: ``format_fraction: 1``,
    ``answer_only_loss: true``, a few dozen steps at a fine-tuning learning rate).

    A model this small cannot follow instructions, so besides plain passages it learns both answer
    formats from the passages themselves: a random span candidate as the generator's ``\\mask{}``
    answer and the true span as the predictor's ``\\boxed{}`` answer (PretrainZero's Random-RLPT
    cold start idea). SmolLM2-135M-Instruct writes neither format from the paper's prompts (README "A
    real model on a CPU"), which is why its example can start with one.
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
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    eval: HeldoutEvalConfig = field(default_factory=HeldoutEvalConfig)  # held-out figures beyond task accuracy


def load_run_config(path=None, overrides=None) -> RunConfig:
    """YAML + overrides -> validated RunConfig; every error names its field before any work starts."""
    cfg = load_config(path, overrides, cls=RunConfig)
    validate_run(cfg)
    return cfg


def validate_run(cfg: RunConfig) -> None:
    validate_static(cfg)
    cfg.objective.validate()
    cfg.rollout.validate()
    cfg.preemption.validate()
    cfg.eval.validate()
    if cfg.data.eval_split not in ("heldout", "validation"):
        raise ConfigError(f"data.eval_split must be heldout | validation, got {cfg.data.eval_split!r}")
    if cfg.data.eval_split == "validation" and cfg.data.validation_fraction <= 0.0:
        raise ConfigError("data.eval_split=validation needs data.validation_fraction > 0 (the share of articles "
                          "kept out of training to choose settings on)")
    if not 0.0 <= cfg.data.validation_fraction < 1.0 - cfg.data.heldout_fraction:
        raise ConfigError(f"data.validation_fraction must be in [0, 1 - data.heldout_fraction), "
                          f"got {cfg.data.validation_fraction}")
    if cfg.rollout.disaggregated:
        check_disaggregated(cfg.objective)
        if cfg.eval.nll_passages or cfg.eval.info_gain_positions or cfg.eval.generator_reward_samples:
            raise ConfigError("the eval section's figures (eval.nll_passages, eval.info_gain_positions, "
                              "eval.generator_reward_samples) run with colocated rollouts only; evaluate the exported "
                              "folder with `megatron-pz eval --run-config` instead")
    cfg.data.validate()
    t = cfg.train
    for name in ("steps", "passages_per_step", "max_tokens_per_micro_batch", "max_prompt_tokens",
                 "save_interval", "log_interval", "eval_max_new_tokens"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    for name in ("keep_last", "eval_interval", "eval_passages", "log_samples"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if not t.run_dir:
        raise ConfigError("train.run_dir must name a folder")
    ws = cfg.warm_start
    for name in ("steps", "rows_per_step"):
        if getattr(ws, name) < 1:
            raise ConfigError(f"warm_start.{name} must be >= 1, got {getattr(ws, name)}")
    OptimizerConfig(lr=ws.lr, min_lr=ws.min_lr, warmup_steps=ws.warmup_steps).validate("warm_start")
    if cfg.model.hf_config is None and not cfg.model.architecture:
        raise ConfigError("set model.hf_config (an HF model folder) or model.architecture (an HF config dict)")
    g = cfg.grpo
    if g.kl_coef != 0.0:
        raise ConfigError(f"grpo.kl_coef={g.kl_coef}: no KL-to-reference term is implemented (PretrainZero "
                          "§4.1 and RLP train without one); set grpo.kl_coef: 0.0")
    for name in ("mini_batches", "epochs"):
        if getattr(g, name) < 1:
            raise ConfigError(f"grpo.{name} must be >= 1, got {getattr(g, name)}")
    if g.dual_clip is not None and g.dual_clip <= 1.0:
        raise ConfigError(f"grpo.dual_clip must be > 1 (or null: off), got {g.dual_clip}")
    check_range("grpo.clip_low", g.clip_low, low=0.0, high=1.0, high_open=True)
    check_range("grpo.clip_high", g.clip_high, low=0.0)
    g.rollout_correction.validate()
    if not 0.0 <= cfg.warm_start.format_fraction <= 1.0:
        raise ConfigError(f"warm_start.format_fraction must be in [0, 1], got {cfg.warm_start.format_fraction}")
