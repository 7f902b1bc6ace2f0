"""Warm start from scratch: next-token pretraining plus the two task formats (tiny CPU default).

Rows are plain passages (language modelling) or task-format examples built from the passages
themselves: the generator prompt answered with ``\\mask{<random span candidate>}`` and the predictor
prompt (that span masked) answered with ``\\boxed{<span>}``, each ended by EOS. After it, both roles'
outputs parse, so the RL phase starts from a policy that plays the game (badly).
"""

from __future__ import annotations

import random
import time

from megatron_pz.objectives.base import encode, token_list
from megatron_pz.objectives.pretrainzero import (build_generator_prompt, build_predictor_prompt, mask_passage,
                                                 validate_mask)
from megatron_pz.runtime.preemption import stop_if_agreed
from megatron_pz.train.batching import TokenSequence, padding_fraction
from megatron_pz.train.losses import next_token_loss


def _pick_span(passage, rng: random.Random, objective_cfg):
    candidates = list(passage.candidates)
    rng.shuffle(candidates)
    for cand in candidates[:8]:
        if validate_mask(passage.text, cand.text, objective_cfg)[0]:
            return cand.text
    return None


def format_rows(passage, rng: random.Random, tokenizer, objective_cfg, space_in_answer: bool = False
                ) -> list[tuple[list[int], int]]:
    """The generator and predictor examples of one passage as (tokens, prompt length); empty if it has
    no usable span.

    ``space_in_answer`` writes ``\\boxed{ span}``: byte-level BPEs tokenize a word after a space as
    the word's usual token, but right after ``{`` as rare space-less pieces (``{se|ver|al}``), which a
    tiny model cannot learn to spell in minutes. Parsed spans are stripped, so rewards are unchanged.
    """
    span = _pick_span(passage, rng, objective_cfg)
    if span is None:
        return []
    eos = [tokenizer.eos_token_id]
    answer = f" {span}" if space_in_answer else span
    chat = objective_cfg.chat_template  # the answer is the assistant turn; EOS is its end-of-turn token
    masked = mask_passage(passage.text, span, objective_cfg.replace_all, objective_cfg.whole_words_only)
    generator = encode(tokenizer, build_generator_prompt(passage.text, objective_cfg.prompt_style), chat)
    predictor = encode(tokenizer, build_predictor_prompt(masked, objective_cfg.prompt_style), chat)
    return [(generator + encode(tokenizer, f"\\mask{{{answer}}}") + eos, len(generator)),
            (predictor + encode(tokenizer, f"{'' if chat else ' '}\\boxed{{{answer}}}") + eos, len(predictor))]


def warm_start_rows(dataset, step: int, cfg, tokenizer, seed: int, dp_rank: int, dp_size: int) -> list[TokenSequence]:
    """This rank's rows of one warm-start step: plain passages (loss on every token) and task-format
    examples (loss on the answer only with ``answer_only_loss``, as in supervised fine-tuning: the
    prompt's ~150 tokens would otherwise drown the ~4 answer tokens whose copying is the skill taught).
    """
    ws = cfg.warm_start
    rng = random.Random(f"{seed}/warm/{step}")
    picks = [rng.randrange(len(dataset)) for _ in range(ws.rows_per_step)]
    rows: list[TokenSequence] = []
    n_format = int(round(ws.rows_per_step * ws.format_fraction))
    for i, idx in enumerate(picks):
        passage = dataset[idx]
        if i < n_format:
            examples = format_rows(passage, rng, tokenizer, cfg.objective, ws.space_in_answer)
            if examples:
                tokens, prompt_len = examples[i % 2]
                skip = prompt_len if ws.answer_only_loss else 0
                rows.append(TokenSequence(tokens, [0.0] * skip + [1.0] * (len(tokens) - skip)))
                continue
        tokens = token_list(passage) + [tokenizer.eos_token_id]
        rows.append(TokenSequence(tokens, [1.0] * len(tokens)))
    mine = rows[dp_rank::dp_size]
    for i, row in enumerate(mine):
        row.index = i
    return mine


def run_warm_start(actor, dataset, tokenizer, cfg, logger, dp_rank: int, dp_size: int, pad_id: int,
                   stop=None) -> dict:
    """Train ``actor`` (freshly initialised, with the warm-start LR) for ``warm_start.steps``. With
    ``stop`` (:class:`~megatron_pz.runtime.preemption.StopSignals`), a stop agreed before a step raises
    ``Stopped``."""
    first = last = None
    tokens = 0
    padding = []
    start = time.perf_counter()
    for step in range(cfg.warm_start.steps):
        if stop is not None:
            stop_if_agreed(stop, f"in warm-start step {step + 1} (abandoned; the next job runs the warm start again)")
        rows = warm_start_rows(dataset, step, cfg, tokenizer, cfg.runtime.seed, dp_rank, dp_size)
        batches = actor.micro_batches(rows, cfg.train.max_tokens_per_micro_batch, pad_id)
        padding.append(padding_fraction(batches))
        result = actor.train_step(batches, next_token_loss)
        loss = result.metrics["loss_sum"] / max(1.0, result.metrics["num_tokens"])
        first = loss if first is None else first
        last = loss
        tokens += result.num_tokens
        if step % cfg.train.log_interval == 0 or step == cfg.warm_start.steps - 1:
            elapsed = time.perf_counter() - start
            logger.log(step, {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm,
                              "tokens_per_s": tokens / max(elapsed, 1e-9), "padding_fraction": padding[-1]},
                       phase="warm_start")
    return {"warm_start/first_loss": first, "warm_start/last_loss": last,
            "warm_start/seconds": time.perf_counter() - start,
            "warm_start/padding_fraction": sum(padding) / max(1, len(padding))}
