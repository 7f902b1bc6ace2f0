"""The objective interface the trainer drives, the scorer it provides, and helpers every objective shares.

An objective turns a batch of passages into one GRPO update's worth of :class:`Experience`:
it builds prompts, samples through any :class:`RolloutEngine`, scores the samples (rewards and
advantages) and reports step metrics. It never touches parallelism: the trainer's
:class:`Scorer` hides the Megatron forward passes behind two list-in/list-out calls. The objectives are built
(by name, and composed into schedules and mixtures) in :mod:`megatron_pz.objectives.composite`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional, Protocol, Sequence

from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.rl.grpo import group_advantages
from megatron_pz.rl.types import Experience
from megatron_pz.rollout.base import Completion, RolloutEngine, SamplingParams


class Scorer(Protocol):
    def token_logprobs(self, sequences: list[list[int]], model: str = "policy",
                       routes: Optional[Sequence] = None) -> list[list[float]]:
        """Teacher-forced log p(seq[i] | seq[:i]) for i = 1..len-1 (len-1 values per sequence).

        ``model`` is "policy" (current weights) or "ema" (RLP's EMA teacher). No gradient.
        ``routes[i]``: the rollout's MoE routes of the first tokens of ``sequences[i]`` (a completion's
        ``routes``), replayed by the policy under R3; the rest, and the EMA teacher, route natively.
        """
        ...

    def token_entropies(self, sequences: list[list[int]]) -> list[list[float]]:
        """Entropy of the policy's next-token distribution after each prefix seq[:i+1] (len values)."""
        ...


class Objective(Protocol):
    def collect(self, passages: list, engine: RolloutEngine, scorer: Scorer,
                step: int) -> tuple[list[Experience], dict[str, float]]:
        ...


# ------------------------------------------------------------------ shared helpers


def encode(tokenizer, text: str, chat_template: bool = False) -> list[int]:
    """Prompt text -> token ids, no special tokens added by the tokenizer.

    Plain text (default): base models are prompted with the papers' text as it is. ``chat_template``
    (``objective.chat_template``, instruct checkpoints): the text becomes the user turn of the
    tokenizer's chat template, followed by the opening of the assistant turn, so the response is the
    assistant's and ends with the template's end-of-turn token (which the engines stop on: it is the
    tokenizer's EOS for ChatML-style instruct models such as SmolLM2-Instruct).
    """
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("objective.chat_template is true but the tokenizer has no chat template "
                             "(a base model's tokenizer: set objective.chat_template: false)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def token_list(passage) -> list[int]:
    """A passage's token ids as plain ints (the data pipeline stores them as a numpy array)."""
    return [int(t) for t in passage.token_ids]


def passage_rng(cfg: ObjectiveConfig, step: int, passage_index: int) -> random.Random:
    """A generator fixed by (seed, step, passage): span/position choices replay exactly on resume."""
    return random.Random(f"{cfg.seed}/{step}/{passage_index}")


def sample(engine: RolloutEngine, prompts: list[list[int]], n: int, max_new_tokens: int,
           temperature: float, top_p: float, stop: list, seed: int) -> list[list[Completion]]:
    """One engine call; checks the engine returned n completions for every prompt."""
    if not prompts:
        return []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=list(stop), n=n, seed=seed)
    out = engine.generate(prompts, params)
    if len(out) != len(prompts) or any(len(group) != n for group in out):
        raise RuntimeError(
            f"rollout engine returned {[len(g) for g in out]} completions for {len(prompts)} prompts, "
            f"expected {n} each"
        )
    return out


def to_experiences(prompt_ids: list[int], completions: Sequence[Completion], rewards: Sequence[float],
                   group: str, role: str, infos: Sequence[dict], temperature: float = 1.0) -> list[Experience]:
    return [
        Experience(prompt_ids=list(prompt_ids), response_ids=list(c.token_ids), reward=float(r),
                   group=group, role=role, rollout_logprobs=c.logprobs, temperature=float(temperature),
                   info={**info, "finish_reason": c.finish_reason}, routes=c.routes,
                   versions=list(c.versions) if c.versions is not None else None)
        for c, r, info in zip(completions, rewards, infos)
    ]


def fill_group_advantages(experiences: list[Experience], std_scale: bool, eps: float) -> None:
    """GRPO advantages within each group, over the trainable samples; others get 0."""
    trainable = [e for e in experiences if e.trainable]
    for e in experiences:
        e.advantage = 0.0
    if not trainable:
        return
    adv = group_advantages([e.reward for e in trainable], [e.group for e in trainable],
                           std_scale=std_scale, eps=eps)
    for e, a in zip(trainable, adv.tolist()):
        e.advantage = a


def mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def role_metrics(experiences: list[Experience], role: str) -> dict[str, float]:
    """Reward and response-length statistics of one role."""
    mine = [e for e in experiences if e.role == role]
    if not mine:
        return {}
    lengths = [len(e.response_ids) for e in mine]
    return {
        f"{role}/reward_mean": mean(e.reward for e in mine),
        f"{role}/num_samples": float(len(mine)),
        f"{role}/num_trainable": float(sum(e.trainable for e in mine)),
        f"{role}/response_length_mean": mean(lengths),
        f"{role}/response_length_max": float(max(lengths)),
        f"{role}/truncated_fraction": mean(e.info.get("finish_reason") == "length" for e in mine),
    }


def count_metrics(prefix: str, counts: Counter) -> dict[str, float]:
    return {f"{prefix}/{key}": float(value) for key, value in sorted(counts.items())}
