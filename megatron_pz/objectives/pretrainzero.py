r"""PretrainZero (arXiv 2512.03442): one policy plays mask generator and mask predictor.

Per step, for B passages:
1. *Generation*: G_gen samples of the generator prompt (Figure 5) per passage; each writes a span in
   ``\mask{...}``. A span is valid iff it occurs in the passage, and fewer than
   ``max_mask_occurrences`` (8) times (§4.4); every occurrence is then replaced by ``[mask]``
   (§4.4; OneMask ablation: one occurrence drawn at random). Occurrences may cut words (§4.4).
2. *Prediction*: every valid mask gets G_pred samples of the prediction prompt. Predictor reward
   r = 1 if the last ``\boxed{}`` equals the span (exact match; optional normalisation), else 0.
3. *Generator reward*: with acc = mean predictor reward of its mask,
   r_gen = 1 - acc if acc > 0 else 0 (0 at acc 0 and 1: an unpredictable or trivial mask earns
   nothing; 3/4 at acc 1/4). Invalid/unparseable masks earn ``invalid_mask_reward`` (0) and get
   no predictor rollouts.
4. Generator groups (per passage) and predictor groups (per mask) are concatenated into one GRPO
   update with group-normalised advantages. Dynamic sampling (DAPO) marks predictor groups with
   acc exactly 0 or 1 untrainable (their advantages are all 0; dropping them keeps the token
   normalisation on informative samples).

Paper-silent choices are fields of :class:`ObjectiveConfig` (see there).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megatron_pz.objectives.answers import extract_boxed, normalize_answer, parse_mask  # noqa: F401
from megatron_pz.objectives.base import (
    count_metrics,
    encode,
    fill_group_advantages,
    mean,
    role_metrics,
    sample,
    to_experiences,
)
from megatron_pz.data.spans import STOPWORDS, word_keys
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.prompts import (  # noqa: F401
    MASK_TOKEN,
    build_generator_prompt,
    build_predictor_prompt,
)
from megatron_pz.rl.types import Experience

# ------------------------------------------------------------------ pure functions


def span_pattern(span: str, whole_words_only: bool = False) -> re.Pattern:
    """Regex for the span's occurrences; whole-word boundaries only where the span edge is a word char."""
    left = r"(?<!\w)" if whole_words_only and re.match(r"\w", span[:1]) else ""
    right = r"(?!\w)" if whole_words_only and re.match(r"\w", span[-1:]) else ""
    return re.compile(left + re.escape(span) + right)


def count_occurrences(text: str, span: str, whole_words_only: bool = False) -> int:
    return sum(1 for _ in span_pattern(span, whole_words_only).finditer(text))


def validate_mask(passage_text: str, span: str | None, cfg: ObjectiveConfig) -> tuple[bool, str]:
    """(ok, reason): 'ok', 'unparseable', 'empty', 'stopwords_only', 'absent' or 'too_frequent'."""
    if span is None:
        return False, "unparseable"
    if not span.strip():
        return False, "empty"
    if cfg.content_words_only and all(word in STOPWORDS for word in word_keys(span)):
        return False, "stopwords_only"
    n = count_occurrences(passage_text, span, cfg.whole_words_only)
    if n == 0:
        return False, "absent"
    if n >= cfg.max_mask_occurrences:
        return False, "too_frequent"
    return True, "ok"


SINGLE_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")


def valid_single_words(passage_text: str, cfg: ObjectiveConfig) -> list[str]:
    """Distinct words of the passage (in order of first use) that :func:`validate_mask` accepts: the
    generator's legal one-word masks, function words included unless ``content_words_only``."""
    words = dict.fromkeys(m.group(0) for m in SINGLE_WORD_RE.finditer(passage_text))
    return [w for w in words if validate_mask(passage_text, w, cfg)[0]]


def mask_passage(text: str, span: str, replace_all: bool = True, whole_words_only: bool = False,
                 rng: random.Random | None = None) -> str:
    """Replace every occurrence of ``span`` by ``[mask]`` (PZ §4.4), or only one of them.

    ``replace_all=False`` is PZ §4.4's OneMask ablation: the occurrence is drawn by ``rng`` ("we
    randomly replace only one occurrence"); without an ``rng`` the first is taken (deterministic
    evaluation items).
    """
    matches = list(span_pattern(span, whole_words_only).finditer(text))
    if not matches:
        raise ValueError(f"mask_passage: span {span!r} does not occur in the passage (validate first)")
    chosen = matches if replace_all else [matches[rng.randrange(len(matches)) if rng is not None else 0]]
    pieces, pos = [], 0
    for m in chosen:
        pieces += [text[pos:m.start()], MASK_TOKEN]
        pos = m.end()
    return "".join(pieces) + text[pos:]


def occurrence_rng(cfg: ObjectiveConfig, step: int, passage_index: int, sample: int) -> random.Random:
    """The OneMask occurrence choice of one generated mask, replayable from (seed, step, passage, sample)."""
    return random.Random(f"{cfg.seed}/{step}/{passage_index}/{sample}/occurrence")


def predictor_reward(response: str, span: str, normalize: bool = False) -> float:
    r"""1.0 iff the last ``\boxed{}`` of ``response`` equals ``span`` (exact, or normalised)."""
    answer = extract_boxed(response)
    if answer is None:
        return 0.0
    if normalize:
        return float(normalize_answer(answer) == normalize_answer(span))
    return float(answer == span)


def generator_reward(predictor_rewards: list[float]) -> float:
    """1 - acc over the predictor's samples, and 0 when acc == 0 (PretrainZero's min-max reward)."""
    if not predictor_rewards:
        raise ValueError("generator_reward needs at least one predictor reward")
    acc = sum(predictor_rewards) / len(predictor_rewards)
    return 0.0 if acc == 0.0 else 1.0 - acc


# ------------------------------------------------------------------ the prediction task


@dataclass
class MaskTask:
    """One masked passage to predict: ``group`` names its predictor GRPO group."""

    group: str
    span: str
    masked_text: str
    passage_index: int


def run_predictions(tasks: list[MaskTask], cfg: ObjectiveConfig, tokenizer, engine, step: int
                    ) -> tuple[list[list[Experience]], dict[str, float]]:
    """G_pred predictor samples per task, rewarded and DAPO-filtered (advantages filled later)."""
    prompts = [encode(tokenizer, build_predictor_prompt(t.masked_text, cfg.prompt_style), cfg.chat_template)
               for t in tasks]
    outputs = sample(engine, prompts, cfg.predictor_group, cfg.predictor_max_tokens,
                     cfg.predictor_temperature, cfg.top_p, cfg.predictor_stop, seed=cfg.seed + 2 * step + 1)
    groups, dropped, boxed = [], 0, []
    for task, prompt, completions in zip(tasks, prompts, outputs):
        rewards = [predictor_reward(c.text, task.span, cfg.normalize_answer) for c in completions]
        boxed += [extract_boxed(c.text) is not None for c in completions]
        infos = [{"span": task.span, "passage_index": task.passage_index, "correct": bool(r)} for r in rewards]
        exps = to_experiences(prompt, completions, rewards, task.group, "predictor", infos,
                              cfg.predictor_temperature)
        acc = mean(rewards)
        if cfg.dynamic_sampling and acc in (0.0, 1.0):
            dropped += 1
            for e in exps:
                e.trainable = False
        groups.append(exps)
    metrics = {
        "dynamic_sampling/dropped_groups": float(dropped),
        "dynamic_sampling/kept_groups": float(len(tasks) - dropped),
        "predictor/boxed_rate": mean(boxed),
    }
    return groups, metrics


def prediction_metrics(groups: list[list[Experience]]) -> dict[str, float]:
    accs = [mean(e.reward for e in g) for g in groups]
    out = {"predictor/accuracy": mean(e.reward for g in groups for e in g)} if groups else {}
    if accs:
        out["predictor/acc0_groups"] = float(sum(a == 0.0 for a in accs))
        out["predictor/acc1_groups"] = float(sum(a == 1.0 for a in accs))
    return out


# ------------------------------------------------------------------ the generator's side


@dataclass
class GeneratedMasks:
    """The generator's samples of one step, parsed and validated: each sample's span, the verdict counts, and the
    prediction task of each valid mask."""

    tasks: list[MaskTask]
    task_of: dict[tuple[int, int], int]  # (passage i, sample j) -> index in ``tasks``
    spans: dict[tuple[int, int], Optional[str]]  # (passage i, sample j) -> the parsed span (None: unparseable)
    reasons: Counter  # validate_mask's verdict -> count


def masks_to_tasks(passages: list, gen_outputs, cfg: ObjectiveConfig, step: int) -> GeneratedMasks:
    """Parse and validate every generated mask; the valid ones become prediction tasks (PZ §3.3, §4.4)."""
    masks = GeneratedMasks([], {}, {}, Counter())
    for i, (p, completions) in enumerate(zip(passages, gen_outputs)):
        for j, c in enumerate(completions):
            span = parse_mask(c.text, cfg.mask_pick)
            ok, reason = validate_mask(p.text, span, cfg)
            masks.reasons[reason] += 1
            masks.spans[i, j] = span
            if ok:
                masked = mask_passage(p.text, span, cfg.replace_all, cfg.whole_words_only,
                                      occurrence_rng(cfg, step, p.index, j))
                masks.task_of[i, j] = len(masks.tasks)
                masks.tasks.append(MaskTask(f"pred/{step}/{i}/{p.index}/{j}", span, masked, p.index))
    return masks


def generator_experiences(passages: list, gen_prompts, gen_outputs, masks: GeneratedMasks,
                          pred_groups: list[list[Experience]], cfg: ObjectiveConfig, step: int
                          ) -> tuple[list[Experience], list[float]]:
    """The generator's samples rewarded by their masks' difficulty (:func:`generator_reward`, PZ eqs. 8-9; an
    invalid mask gets ``invalid_mask_reward``), one GRPO group per passage; and the difficulty 1 - acc of each
    valid mask."""
    generator_exps: list[Experience] = []
    difficulties = []
    for i, (p, prompt, completions) in enumerate(zip(passages, gen_prompts, gen_outputs)):
        rewards, infos = [], []
        for j in range(len(completions)):
            k = masks.task_of.get((i, j))
            if k is None:
                rewards.append(cfg.invalid_mask_reward)
                infos.append({"span": masks.spans[i, j], "valid": False, "passage_index": p.index})
                continue
            acc = mean(e.reward for e in pred_groups[k])
            difficulties.append(1.0 - acc)
            rewards.append(generator_reward([e.reward for e in pred_groups[k]]))
            infos.append({"span": masks.spans[i, j], "valid": True, "predictor_acc": acc,
                          "passage_index": p.index})
        exps = to_experiences(prompt, completions, rewards, f"gen/{step}/{i}/{p.index}", "generator", infos,
                              cfg.generator_temperature)
        if cfg.dynamic_sampling_generator and len(set(rewards)) == 1:
            for e in exps:
                e.trainable = False
        generator_exps += exps
    return generator_exps, difficulties


def collect_metrics(experiences: list[Experience], generator_exps: list[Experience], masks: GeneratedMasks,
                 pred_groups: list[list[Experience]], difficulties: list[float], pred_metrics: dict[str, float]
                 ) -> dict[str, float]:
    """A PretrainZero step's metrics: mask validity and difficulty, each role's rewards and lengths, the
    predictor's accuracy, groups without reward variance."""
    n_gen = len(generator_exps)
    metrics = {
        "generator/valid_mask_rate": masks.reasons["ok"] / n_gen if n_gen else 0.0,
        "generator/difficulty": mean(difficulties),
        "generator/mask_words_mean": mean(len(t.span.split()) for t in masks.tasks),
        **count_metrics("generator/masks", masks.reasons),
        **role_metrics(experiences, "generator"),
        **role_metrics(experiences, "predictor"),
        **prediction_metrics(pred_groups),
        **pred_metrics,
    }
    gen_rewards_by_group: dict[str, set] = {}
    for e in generator_exps:
        gen_rewards_by_group.setdefault(e.group, set()).add(e.reward)
    metrics["generator/zero_variance_groups"] = float(sum(len(r) == 1 for r in gen_rewards_by_group.values()))
    return metrics


# ------------------------------------------------------------------ the objective


class PretrainZeroObjective:
    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        """One step (PZ §3.3): the generator masks each passage (``generator_group`` samples), every valid mask
        becomes a prediction task (``predictor_group`` samples, exact-match reward), each mask is rewarded by
        how hard it was; GRPO advantages within each group."""
        cfg = self.cfg
        gen_prompts = [encode(self.tokenizer, build_generator_prompt(p.text, cfg.prompt_style), cfg.chat_template)
                       for p in passages]
        gen_outputs = sample(engine, gen_prompts, cfg.generator_group, cfg.generator_max_tokens,
                             cfg.generator_temperature, cfg.top_p, cfg.generator_stop, seed=cfg.seed + 2 * step)
        masks = masks_to_tasks(passages, gen_outputs, cfg, step)
        pred_groups, pred_metrics = run_predictions(masks.tasks, cfg, self.tokenizer, engine, step)
        generator_exps, difficulties = generator_experiences(passages, gen_prompts, gen_outputs, masks, pred_groups,
                                                             cfg, step)
        experiences = generator_exps + [e for g in pred_groups for e in g]
        fill_group_advantages(experiences, cfg.std_scale, cfg.adv_eps)
        return experiences, collect_metrics(experiences, generator_exps, masks, pred_groups, difficulties, pred_metrics)
