"""Warm-start rows: the task-format examples, their loss masks, and the plain language-model rows."""

from __future__ import annotations

import random

import numpy as np

from megatron_pz.data.dataset import Passage, SpanCandidate
from megatron_pz.objectives.base import encode
from megatron_pz.objectives.pretrainzero import build_generator_prompt, build_predictor_prompt
from megatron_pz.run_config import RunConfig
from megatron_pz.train.warm_start import format_rows, warm_start_rows
from test_objectives_support import tiny_tokenizer

TEXT = "The cat sat on the mat. Dogs bark at night."


def passage(index: int, tokenizer) -> Passage:
    start = TEXT.index("mat")
    cand = SpanCandidate("mat", start, start + 3, 0, 1, 1, 5.0)
    ids = np.array(encode(tokenizer, TEXT), dtype=np.int64)
    return Passage(index=index, title=f"t{index}", text=TEXT, token_ids=ids, candidates=[cand])


def test_format_rows_spell_both_answers():
    tok = tiny_tokenizer()
    cfg = RunConfig()
    (gen, gen_len), (pred, pred_len) = format_rows(passage(0, tok), random.Random(0), tok, cfg.objective)
    assert gen[:gen_len] == encode(tok, build_generator_prompt(TEXT))
    assert tok.decode(gen[gen_len:]) == "\\mask{mat}" + tok.eos_token
    masked = "The cat sat on the [mask]. Dogs bark at night."
    assert pred[:pred_len] == encode(tok, build_predictor_prompt(masked))
    assert tok.decode(pred[pred_len:]) == " \\boxed{mat}" + tok.eos_token
    spaced = format_rows(passage(0, tok), random.Random(0), tok, cfg.objective, space_in_answer=True)
    assert tok.decode(spaced[1][0][spaced[1][1]:]) == " \\boxed{ mat}" + tok.eos_token


def test_answer_only_loss_masks_the_prompt():
    tok = tiny_tokenizer()
    dataset = [passage(i, tok) for i in range(4)]
    cfg = RunConfig()
    cfg.warm_start.rows_per_step, cfg.warm_start.format_fraction = 4, 0.5
    for answer_only in (False, True):
        cfg.warm_start.answer_only_loss = answer_only
        rows = warm_start_rows(dataset, 0, cfg, tok, seed=1, dp_rank=0, dp_size=1)
        assert [r.index for r in rows] == [0, 1, 2, 3]
        # rows 0/1: generator and predictor examples; rows 2/3: plain passages + EOS, all trained on
        for row in rows[2:]:
            assert row.tokens == [int(t) for t in dataset[0].token_ids] + [tok.eos_token_id]
            assert row.loss_mask == [1.0] * len(row.tokens)
        gen_prompt = len(encode(tok, build_generator_prompt(TEXT)))
        answer = len(rows[0].tokens) - gen_prompt
        expected = [0.0] * gen_prompt + [1.0] * answer if answer_only else [1.0] * len(rows[0].tokens)
        assert rows[0].loss_mask == expected
        assert tok.decode([t for t, m in zip(rows[0].tokens, rows[0].loss_mask) if m]).endswith("\\mask{mat}"
                                                                                               + tok.eos_token)
    # data-parallel ranks take disjoint rows and re-index them from 0
    halves = [warm_start_rows(dataset, 0, cfg, tok, seed=1, dp_rank=r, dp_size=2) for r in (0, 1)]
    assert [len(h) for h in halves] == [2, 2] and [r.index for r in halves[1]] == [0, 1]
    assert halves[1][0].tokens == rows[1].tokens
