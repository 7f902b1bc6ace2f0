"""The ``grpo.rollout_correction`` section of a run config: what the loss does about rollout log-probs that are
not the trainer's (the modes: :mod:`megatron_pz.rl.rollout_correction`, README "Rollout correction")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_pz.errors import ConfigError

CORRECTION_MODES = ("decoupled", "bypass")
WEIGHT_LEVELS = ("token", "sequence", "geometric", "none")
REJECT_LEVELS = ("token", "sequence", "geometric", "max_token")


@dataclass
class RejectionConfig:
    """One rejection criterion of ``grpo.rollout_correction.reject`` (bounds on pi_T / pi_b)."""

    level: str = "token"  # token | sequence | geometric | max_token
    lower: float = 0.0  # 0: no lower bound
    upper: Optional[float] = None  # null: no upper bound
    negative_advantage_only: bool = False  # DeepSeek-V3.2's off-policy sequence masking (with level: geometric)


@dataclass
class RolloutCorrectionConfig:
    """``grpo.rollout_correction`` (the modes: :mod:`megatron_pz.rl.rollout_correction`, README "Rollout
    correction"). The default is the former ``grpo.tis_cap: 2.0``: decoupled, token-level IS weights truncated
    at 2, no rejection."""

    mode: str = "decoupled"  # decoupled | bypass: the policy the clip's ratio is taken against
    weights: str = "token"  # token | sequence | geometric | none
    weight_cap: float = 2.0  # truncation of the IS weight (TIS)
    reject: list[RejectionConfig] = field(default_factory=list)

    def validate(self, where: str = "grpo.rollout_correction") -> None:
        if self.mode not in CORRECTION_MODES:
            raise ConfigError(f"{where}.mode must be one of {'|'.join(CORRECTION_MODES)}, got {self.mode!r}")
        if self.weights not in WEIGHT_LEVELS:
            raise ConfigError(f"{where}.weights must be one of {'|'.join(WEIGHT_LEVELS)}, got {self.weights!r}")
        if not self.weight_cap > 0.0:
            raise ConfigError(f"{where}.weight_cap must be > 0, got {self.weight_cap}")
        if self.mode == "bypass" and self.weights != "none":
            raise ConfigError(f"{where}.mode=bypass centres the clip on the rollout log-probs, which already "
                              f"corrects the mismatch; weights={self.weights} would count it twice: set "
                              f"{where}.weights: none (verl 0.9.1's bypass ppo_clip applies none)")
        for i, r in enumerate(self.reject):
            at = f"{where}.reject[{i}]"
            if r.level not in REJECT_LEVELS:
                raise ConfigError(f"{at}.level must be one of {'|'.join(REJECT_LEVELS)}, got {r.level!r}")
            if r.lower < 0.0 or (r.upper is not None and r.upper <= r.lower):
                raise ConfigError(f"{at}: need 0 <= lower < upper, got lower={r.lower}, upper={r.upper}")
            if r.lower == 0.0 and r.upper is None:
                raise ConfigError(f"{at} rejects nothing: set lower (> 0) and/or upper")
