"""Held-out mask-prediction accuracy: PretrainZero's predictor task as an eval, no harness needed.

For each held-out passage, a few span candidates (chosen by a seeded RNG, so runs compare) are masked
exactly as in training (:func:`mask_passage`), the predictor prompt is greedy-decoded by the exported
Hugging Face model, and the answer is scored with the training reward (:func:`predictor_reward`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_pz.config import ConfigError
from megatron_pz.objectives.config import ObjectiveConfig


@dataclass
class MaskItem:
    passage_index: int
    span: str
    prompt: str


SPAN_SOURCES = ("candidates", "words")


def build_mask_items(passages, spans_per_passage: int = 1, max_passages: Optional[int] = None,
                     seed: int = 0, spans: str = "candidates", rules: Optional[ObjectiveConfig] = None
                     ) -> tuple[list[MaskItem], dict]:
    """Prompts for held-out passages; returns (items, counts of passages used/skipped and why).

    ``spans="candidates"``: the preprocessor's span candidates (content words, 1..K words: the hard
    task). ``spans="words"``: any single word that ``rules`` (the run's ObjectiveConfig: occurrence
    limit, whole-word matching, replace-all; default the paper's) accept as a mask, function words
    included (what the generator may legally mask). Both are drawn by a seeded RNG per passage, so every
    evaluation of a run scores the same items.
    """
    # lazy (this and the other two below): eval/cli.py imports this module for `megatron-pz --help`
    from megatron_pz.objectives.pretrainzero import build_predictor_prompt, mask_passage, valid_single_words  # lazy

    rules = rules or ObjectiveConfig()

    if spans not in SPAN_SOURCES:
        raise ConfigError(f"mask accuracy: spans must be one of {SPAN_SOURCES}, got {spans!r}")
    items: list[MaskItem] = []
    counts = {"passages": 0, "skipped_no_candidates": 0, "skipped_span_absent": 0}
    for i in range(len(passages)):
        if max_passages is not None and counts["passages"] >= max_passages:
            break
        passage = passages[i]
        pool = [c.text for c in passage.candidates] if spans == "candidates" else \
            valid_single_words(passage.text, rules)
        if not pool:
            counts["skipped_no_candidates"] += 1
            continue
        counts["passages"] += 1
        rng = random.Random(seed * 1_000_003 + passage.index)
        for span in rng.sample(pool, min(spans_per_passage, len(pool))):
            try:
                masked = mask_passage(passage.text, span, rules.replace_all, rules.whole_words_only)
            except ValueError:  # e.g. a span whose edge is not a word boundary under whole-word matching
                counts["skipped_span_absent"] += 1
                continue
            items.append(MaskItem(passage.index, span, build_predictor_prompt(masked, rules.prompt_style)))
    return items, counts


def hf_greedy_generator(model_dir, device: str = "cpu", dtype: str = "float32",
                        max_new_tokens: int = 32) -> Callable[[list[str]], list[str]]:
    """Greedy completions from a Hugging Face folder (one prompt at a time: no padding effects)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()

    def generate(prompts: list[str]) -> list[str]:
        outs = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                                     if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
            outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return outs

    return generate


def mask_prediction_accuracy(items: list[MaskItem], generate: Callable[[list[str]], list[str]],
                             normalize: bool = False, batch: int = 8) -> dict:
    """Exact-match accuracy of ``generate`` on the items (the training predictor reward)."""
    from megatron_pz.objectives.pretrainzero import predictor_reward  # lazy: see build_mask_items

    if not items:
        raise ConfigError("mask accuracy: no held-out passage with a usable span candidate")
    rewards, samples = [], []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        responses = generate([it.prompt for it in chunk])
        if len(responses) != len(chunk):
            raise RuntimeError(f"generator returned {len(responses)} responses for {len(chunk)} prompts")
        for it, resp in zip(chunk, responses):
            r = predictor_reward(resp, it.span, normalize=normalize)
            rewards.append(r)
            samples.append({"passage": it.passage_index, "span": it.span, "response": resp, "reward": r})
    return {"accuracy": sum(rewards) / len(rewards), "num_spans": len(rewards), "samples": samples}


def run_mask_accuracy(model_dir, data_path, output=None, spans_per_passage: int = 1,
                      max_passages: Optional[int] = 100, heldout_fraction: float = 0.02,
                      max_new_tokens: int = 32, normalize: bool = False, seed: int = 0,
                      device: str = "cpu", dtype: str = "float32", spans: str = "candidates") -> dict:
    from megatron_pz.data.dataset import PassageDataset  # lazy: see build_mask_items
    from megatron_pz.eval.lm_eval_runner import write_json_atomic  # lazy: see build_mask_items

    passages = PassageDataset(data_path, split="heldout", heldout_fraction=heldout_fraction)
    items, counts = build_mask_items(passages, spans_per_passage, max_passages, seed, spans=spans)
    result = mask_prediction_accuracy(items, hf_greedy_generator(model_dir, device, dtype, max_new_tokens),
                                      normalize=normalize)
    result.update(counts, model=str(model_dir), data=str(Path(data_path)), seed=seed, spans=spans)
    if output is not None:
        write_json_atomic(output, result)
    return result
