r"""The baselines PretrainZero compares against, on the same objective interface.

- ``random_rlpt``: Random RLPT. A span drawn uniformly from the passage's preprocessed span
  candidates (those that pass the mask-validity rule) is masked, then PretrainZero's prediction task
  and reward run unchanged. The paper's main RL baseline (and SmolLM3's 100-step cold start).
- ``random_ntr`` / ``entropy_ntr``: next-token reasoning. The passage is truncated after a position
  and the policy reasons about the continuation, answering in ``\boxed{}``. The position is uniform
  (random) or drawn among the top-``entropy_top_fraction`` (20%) positions by the current policy's
  next-token entropy (``Scorer.token_entropies``).
- ``rpt``: Reinforcement Pre-Training (arXiv 2506.08007). Think, close with ``</think>``, answer in
  ``\boxed{}``. Position: ``rpt_position`` (default entropy; the paper filtered tokens with a proxy
  model's entropy, here the current policy is the proxy, *paper-silent substitute*).

Rewards. ``random_ntr`` / ``entropy_ntr`` get PretrainZero's eq. 5 (§3.1): r = 1 iff the answer is
exactly the single masked token x_t (its text; see :func:`ntr_exact_reward`), else 0, so a
multi-token answer that merely starts right earns 0. ``rpt`` keeps RPT's prefix reward: r = 1 iff the
answer's UTF-8 bytes are a prefix of the ground-truth continuation's bytes *and* the answer's length
is one of the continuation's token boundaries (so it covers whole tokens), else 0.
"""

from __future__ import annotations

import math
from collections import Counter

from megatron_pz.objectives.answers import extract_boxed
from megatron_pz.objectives.base import (
    count_metrics,
    encode,
    fill_group_advantages,
    mean,
    passage_rng,
    role_metrics,
    sample,
    to_experiences,
    token_list,
)
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.pretrainzero import (
    MaskTask,
    mask_passage,
    prediction_metrics,
    run_predictions,
    validate_mask,
)
from megatron_pz.objectives.prompts import THINK_CLOSE, build_ntr_prompt, build_rpt_prompt
from megatron_pz.rl.types import Experience

# ------------------------------------------------------------------ RPT prefix reward


def rpt_prefix_reward(answer: str | None, continuation_text: str, boundaries, *,
                      ignore_leading_whitespace: bool = True) -> float:
    """1.0 iff bytes(answer) is a prefix of bytes(continuation) ending on a token boundary.

    ``boundaries``: byte lengths (within ``continuation_text``'s UTF-8) at which a ground-truth
    token ends (see :func:`continuation_boundaries`). With ``ignore_leading_whitespace`` the
    leading whitespace of both strings is dropped first and the boundaries shifted accordingly
    (paper-silent: BPE glues the space to the next word, models rarely box it).
    """
    if not answer:
        return 0.0
    cont = continuation_text.encode("utf-8")
    ans = answer.encode("utf-8")
    bounds = set(int(b) for b in boundaries)
    if ignore_leading_whitespace:
        ans = answer.lstrip().encode("utf-8")
        stripped = continuation_text.lstrip().encode("utf-8")
        shift = len(cont) - len(stripped)
        cont = stripped
        bounds = {b - shift for b in bounds if b > shift}
        if not ans:
            return 0.0
    return float(cont.startswith(ans) and len(ans) in bounds)


def ntr_exact_reward(answer: str | None, target_text: str | None, *, ignore_leading_whitespace: bool = True) -> float:
    """PretrainZero eq. 5: 1.0 iff the answer is exactly the masked token's text, else 0.0.

    ``ignore_leading_whitespace`` (paper-silent, as for RPT): BPE glues the space to the next word
    (" Paris"), so leading whitespace of both is dropped before comparing.
    """
    if answer is None or target_text is None:
        return 0.0
    if ignore_leading_whitespace:
        answer, target_text = answer.lstrip(), target_text.lstrip()
    return float(bool(answer) and answer == target_text)


def target_token_text(tokenizer, token_ids: list[int], start: int) -> str | None:
    """Text of the single token ``token_ids[start]`` after its context (decode-difference, as in
    :func:`continuation_boundaries`); None when it is part of a multi-byte character (no text of
    its own, so no answer can match it)."""
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    context, full = decode(token_ids[:start]), decode(token_ids[: start + 1])
    if not full.startswith(context) or "\ufffd" in full[len(context):]:
        return None
    return full[len(context):]


def continuation_boundaries(tokenizer, token_ids: list[int], start: int, max_tokens: int
                            ) -> tuple[str, str, list[int]]:
    """(context text, continuation text, token-boundary byte offsets) for a cut before ``start``.

    Token texts come from decoding growing prefixes and subtracting the context's text, which is
    exact for byte-level BPE and for tokenizers that drop a leading space when decoding a lone
    token. A boundary falling inside a multi-byte character (the decode shows U+FFFD) is skipped.
    """
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    context = decode(token_ids[:start])
    pieces = []
    for k in range(1, min(max_tokens, len(token_ids) - start) + 1):
        full = decode(token_ids[: start + k])
        if full.startswith(context) and "\ufffd" not in full[len(context):]:
            pieces.append(full[len(context):])
    continuation = pieces[-1] if pieces else ""
    boundaries = sorted({len(p.encode("utf-8")) for p in pieces if continuation.startswith(p) and p})
    return context, continuation, boundaries


# ------------------------------------------------------------------ Random RLPT


class RandomRLPTObjective:
    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        cfg = self.cfg
        tasks, skipped = [], Counter()
        for i, p in enumerate(passages):
            valid = [c for c in p.candidates if validate_mask(p.text, c.text, cfg)[0]]
            if not valid:
                skipped["no_valid_candidate"] += 1
                continue
            rng = passage_rng(cfg, step, p.index)
            span = rng.choice(valid).text
            masked = mask_passage(p.text, span, cfg.replace_all, cfg.whole_words_only, rng)
            tasks.append(MaskTask(f"pred/{step}/{i}/{p.index}", span, masked, p.index))
        groups, pred_metrics = run_predictions(tasks, cfg, self.tokenizer, engine, step)
        experiences = [e for g in groups for e in g]
        fill_group_advantages(experiences, cfg.std_scale, cfg.adv_eps)
        metrics = {
            "random_rlpt/masked_passages": float(len(tasks)),
            **count_metrics("random_rlpt/skipped", skipped),
            **role_metrics(experiences, "predictor"),
            **prediction_metrics(groups),
            **pred_metrics,
        }
        return experiences, metrics


# ------------------------------------------------------------------ next-token reasoning and RPT


class NextTokenReasoningObjective:
    """random_ntr, entropy_ntr and rpt: predict the continuation after a chosen cut."""

    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.is_rpt = cfg.name == "rpt"
        self.position_rule = (cfg.rpt_position if self.is_rpt
                              else "entropy" if cfg.name == "entropy_ntr" else "random")
        self.role = "rpt" if self.is_rpt else "ntr"

    def choose_cuts(self, passages: list, scorer, step: int) -> tuple[dict[int, int], dict[int, float], Counter]:
        """passage position -> cut ``start`` (context = token_ids[:start], target = token_ids[start])."""
        cfg, skipped = self.cfg, Counter()
        eligible = [i for i, p in enumerate(passages) if len(p.token_ids) > cfg.ntr_min_context_tokens]
        skipped["too_short"] = len(passages) - len(eligible)
        cuts, cut_entropy = {}, {}
        if self.position_rule == "entropy" and eligible:
            entropies = scorer.token_entropies([token_list(passages[i]) for i in eligible])
        for n, i in enumerate(eligible):
            p = passages[i]
            rng = passage_rng(cfg, step, p.index)
            starts = list(range(cfg.ntr_min_context_tokens, len(p.token_ids)))
            if self.position_rule == "random":
                cuts[i] = rng.choice(starts)
                continue
            ent = entropies[n]  # ent[s - 1]: entropy of the distribution that predicts token s
            if len(ent) != len(p.token_ids):
                raise RuntimeError(f"scorer.token_entropies gave {len(ent)} values for {len(p.token_ids)} tokens")
            k = max(1, math.ceil(cfg.entropy_top_fraction * len(starts)))
            top = sorted(starts, key=lambda s: (-ent[s - 1], s))[:k]
            cuts[i] = rng.choice(top)
            cut_entropy[i] = float(ent[cuts[i] - 1])
        return cuts, cut_entropy, skipped

    def answer_of(self, response: str) -> str | None:
        if self.is_rpt and self.cfg.rpt_require_think_close:
            if THINK_CLOSE not in response:
                return None
            response = response.rsplit(THINK_CLOSE, 1)[1]
        return extract_boxed(response)

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        cfg = self.cfg
        cuts, cut_entropy, skipped = self.choose_cuts(passages, scorer, step)
        build = build_rpt_prompt if self.is_rpt else build_ntr_prompt
        order = sorted(cuts)
        targets, prompts = [], []
        for i in order:
            context, continuation, bounds = continuation_boundaries(
                self.tokenizer, token_list(passages[i]), cuts[i], cfg.rpt_max_answer_tokens)
            targets.append((continuation, bounds))
            prompts.append(encode(self.tokenizer, build(context), cfg.chat_template))
        outputs = sample(engine, prompts, cfg.ntr_group, cfg.ntr_max_tokens, cfg.ntr_temperature,
                         cfg.top_p, cfg.ntr_stop, seed=cfg.seed + step)
        experiences, answered = [], []
        for i, prompt, (continuation, bounds), completions in zip(order, prompts, targets, outputs):
            p = passages[i]
            answers = [self.answer_of(c.text) for c in completions]
            answered += [a is not None for a in answers]
            if self.is_rpt:
                rewards = [rpt_prefix_reward(a, continuation, bounds,
                                             ignore_leading_whitespace=cfg.rpt_ignore_leading_whitespace)
                           for a in answers]
            else:  # PZ eq. 5: exact match of the single token x_t
                target = target_token_text(self.tokenizer, token_list(p), cuts[i])
                rewards = [ntr_exact_reward(a, target, ignore_leading_whitespace=cfg.rpt_ignore_leading_whitespace)
                           for a in answers]
            infos = [{"answer": a, "continuation": continuation[:64], "cut": cuts[i], "passage_index": p.index}
                     for a in answers]
            exps = to_experiences(prompt, completions, rewards, f"{self.role}/{step}/{i}/{p.index}", self.role, infos,
                                  cfg.ntr_temperature)
            if cfg.dynamic_sampling and mean(rewards) in (0.0, 1.0):
                for e in exps:
                    e.trainable = False
            experiences += exps
        fill_group_advantages(experiences, cfg.std_scale, cfg.adv_eps)
        metrics = {
            f"{self.role}/accuracy": mean(e.reward for e in experiences),
            f"{self.role}/answer_rate": mean(answered),
            f"{self.role}/cut_entropy_mean": mean(cut_entropy.values()),
            "dynamic_sampling/dropped_groups": float(len({e.group for e in experiences if not e.trainable})),
            **count_metrics(f"{self.role}/skipped", skipped),
            **role_metrics(experiences, self.role),
        }
        return experiences, metrics
