"""Experience: what objectives hand to the trainer after rollouts and rewards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class Experience:
    """One sampled response with its reward, ready for a GRPO update.

    ``group`` identifies the GRPO group (responses to the same prompt); ``role`` is e.g.
    'generator', 'predictor', 'rlp', 'rpt' and only feeds metrics. ``advantage`` is filled by
    :func:`megatron_pz.rl.grpo.group_advantages` (or directly by objectives with their own rule,
    as RLP does). ``rollout_logprobs`` are the engine's per-token log-probs (for IS correction).
    ``trainable`` False keeps the sample for metrics but out of the loss (e.g. DAPO-filtered groups).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: str
    role: str
    advantage: Optional[float] = None
    rollout_logprobs: Optional[list[float]] = None
    trainable: bool = True
    # the temperature the response was sampled at: training log-probs are taken at it
    # (megatron_pz.rl.logprobs.logits_at_temperature), as the engine's rollout_logprobs are
    temperature: float = 1.0
    # the loss component it belongs to (objective mixtures), that component's aggregation over tokens
    # ('token_mean' | 'seq_mean_token_mean') and its weight lambda_k; set by objectives/composite.py
    component: str = ""
    loss_agg: str = "token_mean"
    mix_weight: float = 1.0
    info: dict = field(default_factory=dict)  # parsed answer, mask text, correctness...
    # MoE routing replay (R3): the rollout's experts for prompt + response[:-1], [tokens, moe_layers, topk]
    # uint8/uint16 on the host (megatron_pz.model.routes); every Megatron forward on this sample uses them
    routes: Optional[Any] = None
    # response tokens that enter the loss (1.0) or not (0.0); None: all of them. Rollout-correction rejection
    # (megatron_pz.rl.rollout_correction.reject_before_update) cuts tokens here before the update's token counts
    # are taken, and marks them in ``rejected``, so they leave the loss's numerator and denominator alike
    token_mask: Optional[list[float]] = None
    rejected: Optional[list[float]] = None
    # weight-version lag at the update that trains on it: the trainer's version minus the version that sampled
    # the token (0: colocated, the weights being trained sampled it; disaggregated: step - the batch's version).
    # One int for the whole response, or one per response token (tokens sampled under several versions); a
    # sample's lag is its oldest token's. The rollout-correction metrics are keyed by it.
    lag: Union[int, list[int]] = 0
    # the weight version that sampled each response token (one per token; a disaggregated stream's rows may
    # continue across weight loads, :class:`megatron_pz.rollout.base.Row`); None: one version, the batch's.
    # The trainer turns it into the per-token ``lag`` (its version minus each token's).
    versions: Optional[list[int]] = None
