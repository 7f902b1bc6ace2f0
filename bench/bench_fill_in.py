#!/usr/bin/env python
"""Can a model of the tiny default's shape learn to fill in a masked word on CPU in minutes?

The tiny default's held-out predictor accuracy does not rise over RL (README). This measures why, on
the tiny default's own data (gensim excerpt, 96-token passages) and held-out word items (any valid
single word masked, ``eval/word_mask_accuracy``'s items):

1. count-based fill-in from the training passages: the constant answer "the", the word seen most often
   after the mask's left neighbour, and the word seen most often between both neighbours (backing off
   to the left one); exact-match accuracy. This is what context can give on this corpus.
2. a ``transformers`` Qwen3 of the tiny default's shape (plain PyTorch, faster on CPU than the Megatron
   actor) trained from scratch on predictor rows (passage with one random valid word masked, answer
   `` \\boxed{ word}``) mixed with plain passages, for ``--minutes``; every ``--eval-every`` seconds the
   greedy first answer token on the held-out items: its accuracy (an upper bound of the case-insensitive
   exact match the tiny default scores) and
   how many distinct answers the model gives (1 = it ignores the passage).

usage: python bench/bench_fill_in.py [--minutes 5] [--format-fraction 0.5] [--answer-only] [--threads 2]
Not a test: the figures depend on the machine and the time given.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def count_baselines(train, items) -> dict[str, float]:
    """Accuracy of count-based fill-in on single-word items (case-insensitive, as the tiny default scores)."""
    from megatron_pz.objectives.pretrainzero import SINGLE_WORD_RE, build_predictor_prompt
    from megatron_pz.objectives.prompts import MASK_TOKEN

    token_re = re.compile(SINGLE_WORD_RE.pattern + r"|[^\w\s]")  # the validity rule's words, and punctuation
    before, after = build_predictor_prompt("\0").split("\0")  # the template around the masked passage

    after_left = collections.defaultdict(collections.Counter)
    between = collections.defaultdict(collections.Counter)
    for i in range(len(train)):
        words = ["<s>"] + token_re.findall(train[i].text) + ["</s>"]
        for left, word, right in zip(words, words[1:], words[2:]):
            after_left[left][word] += 1
            between[(left, right)][word] += 1
    hits = collections.Counter()
    for item in items:
        masked = item.prompt.removeprefix(before).removesuffix(after)
        words = ["<s>"] + token_re.findall(masked.replace(MASK_TOKEN, " \0 ")) + ["</s>"]
        j = words.index("\0")
        left, right = words[j - 1], words[j + 1]
        by_left = after_left[left].most_common(1)[0][0] if after_left[left] else "the"
        both = between[(left, right)].most_common(1)[0][0] if between[(left, right)] else by_left
        gold = item.span.casefold()  # the tiny default's reward normalises case (normalize_answer)
        hits["constant 'the'"] += gold == "the"
        hits["left neighbour"] += gold == by_left.casefold()
        hits["both neighbours"] += gold == both.casefold()
    return {k: v / len(items) for k, v in hits.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--format-fraction", type=float, default=0.5, help="share of predictor rows")
    parser.add_argument("--answer-only", action="store_true", help="loss on the answer of predictor rows only")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rows", type=int, default=16, help="rows per optimizer step")
    parser.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from megatron_pz.data.dataset import PassageDataset
    from megatron_pz.data.default import ensure_default_dataset
    from megatron_pz.data.tokenizer import load_tokenizer
    from megatron_pz.eval.mask_accuracy import build_mask_items
    from megatron_pz.model.provider import load_hf_config
    from megatron_pz.objectives.pretrainzero import build_predictor_prompt, mask_passage, valid_single_words
    from megatron_pz.run_config import load_run_config

    cfg = load_run_config(REPO / "examples" / "tiny_cpu.yaml")
    data = ensure_default_dataset(vocab_size=cfg.data.default_vocab_size, passage_tokens=cfg.data.default_passage_tokens)
    train = PassageDataset(data, split="train")
    heldout = PassageDataset(data, split="heldout")
    tok = load_tokenizer(train.tokenizer_dir)
    rules = cfg.objective
    items, _ = build_mask_items(heldout, spans_per_passage=1, seed=rules.seed, spans="words", rules=rules)
    print(f"data: {len(train)} training passages, {len(items)} held-out word items")
    for name, acc in count_baselines(train, items).items():
        print(f"count-based fill-in, {name:<16} accuracy {acc:.3f}")

    torch.manual_seed(args.seed)
    hf_config = load_hf_config(dict(cfg.model.architecture))
    model = AutoModelForCausalLM.from_config(hf_config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (tiny_cpu.yaml's shape)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    eos = tok.eos_token_id
    rng = random.Random(args.seed)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    def row() -> tuple[list[int], int]:
        passage = train[rng.randrange(len(train))]
        words = valid_single_words(passage.text, rules) if rng.random() < args.format_fraction else []
        if not words:
            return [int(t) for t in passage.token_ids] + [eos], 0
        word = rng.choice(words)
        prompt = encode(build_predictor_prompt(mask_passage(passage.text, word)))
        return prompt + encode(f" \\boxed{{ {word}}}") + [eos], len(prompt) if args.answer_only else 0

    def batch():
        rows = [row() for _ in range(args.rows)]
        width = max(len(t) for t, _ in rows)
        ids = torch.full((len(rows), width), eos)
        weight = torch.zeros(len(rows), width - 1)
        for r, (tokens, skip) in enumerate(rows):
            ids[r, : len(tokens)] = torch.tensor(tokens)
            weight[r, max(skip - 1, 0): len(tokens) - 1] = 1.0  # predicting token j+1 at position j
        return ids, weight

    boxed = encode(" \\boxed{")

    @torch.no_grad()
    def evaluate() -> tuple[float, collections.Counter]:
        model.eval()
        answers, hits = collections.Counter(), 0
        for item in items:
            ids = torch.tensor([encode(item.prompt) + boxed])
            first = int(model(ids).logits[0, -1].argmax())
            hits += first in {encode(" " + form)[0] for form in (item.span, item.span.lower(), item.span.capitalize())}
            answers[tok.decode([first])] += 1
        model.train()
        return hits / len(items), answers

    start, trained, next_eval, step = time.perf_counter(), 0.0, 0.0, 0
    tokens = 0
    while True:
        if trained >= next_eval or trained >= args.minutes * 60:
            acc, answers = evaluate()
            top = ", ".join(f"{a!r} x{n}" for a, n in answers.most_common(4))
            print(f"trained {trained:5.0f} s  step {step:5d}  {tokens / 1e6:5.2f}M tokens  first-token accuracy "
                  f"{acc:.3f}  distinct answers {len(answers):3d}  ({top})", flush=True)
            next_eval += args.eval_every
            if trained >= args.minutes * 60:
                break
        t0 = time.perf_counter()
        ids, weight = batch()
        logits = model(ids).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll.view_as(weight) * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        trained += time.perf_counter() - t0
        tokens += ids.numel()
        step += 1
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
