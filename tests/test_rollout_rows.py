"""Rows generated over several engine calls (windows), the API a disaggregated stream drives
(:meth:`megatron_pz.rollout.base.RolloutEngine.generate_rows`), on the ``hf`` engine with a tiny random fp32
model in this process, and on the real vLLM 0.32.0 (its CPU build) in a worker.

A row continued over windows under unchanged weights must draw what one call draws (the noise of response
position p is stream (row seed, p)); weights loaded between windows must take effect for the later tokens
and be recorded per token; ``until`` ends a window between decode steps; eos / stop strings / the length
budget are judged on the whole response, earlier windows included.
"""

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from rollout_common import byte_tokenizer, tiny_hf_config  # noqa: E402

from megatron_pz.rollout.base import Row, SamplingParams  # noqa: E402
from megatron_pz.rollout.common import StopChecker, request_completions, request_rows, row_completion  # noqa: E402
from megatron_pz.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from megatron_pz.rollout.weight_sync import pack_buckets  # noqa: E402

SEED = 11
PROMPTS = ["hello world", "ab", "the quick brown fox", "xyz!"]


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    cfg = tiny_hf_config()
    engine = HFRolloutEngine(tok, cfg, max_batch_size=3, seed=3)
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(4.0)  # spread the logits of the random init
    return tok, cfg, engine, [tok.encode(t) for t in PROMPTS]


def windows(engine, rows, size, first=None, version=0, bump=True, limit=50):
    """Run windows of ``size`` new tokens (the first of ``first``) until every row is done; returns the
    versions used (one per window)."""
    used = []
    while not all(r.done for r in rows):
        assert len(used) < limit
        engine.generate_rows(rows, version, max_new=first if first and not used else size)
        used.append(version)
        version += bump
    return used


def key(groups):
    return [[(c.token_ids, c.text, c.finish_reason) for c in g] for g in groups]


def test_hf_rows_over_windows_equal_one_call(setup):
    """Windows of 3 tokens under unchanged weights give one call's tokens and finish states, log-probs
    within 1e-6 (a prefill of prompt + prefix instead of incremental decoding); every token carries its
    window's version. Two requests with different sampling settings share the windows' batches."""
    tok, _, engine, prompts = setup
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=SEED)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, n=1, seed=0)
    rows_s, rows_g = request_rows(prompts, sampled, SEED), request_rows(prompts[:2], greedy, 0)
    mixed = [rows_s[0], rows_g[0], *rows_s[1:], rows_g[1]]  # batches of 3 mix the two settings
    assert windows(engine, mixed, 3, version=4) == [4, 5, 6, 7]
    for rows, params, sub in ((rows_s, sampled, prompts), (rows_g, greedy, prompts[:2])):
        one = engine.generate(sub, params)
        windowed = request_completions(rows, params.n, tok)
        assert key(windowed) == key(one)
        for a, b in zip(sum(windowed, []), sum(one, [])):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-6
            assert b.versions is None and a.versions is None  # one generate call: one version
    for row in rows_s + rows_g:  # a row keeps every window's version, per token
        assert row.versions == [4 + k // 3 for k in range(len(row.token_ids))]
        completion = row_completion(row, StopChecker(tok, row.params.stop))
        assert completion.versions == row.versions and completion.token_ids == row.token_ids
    assert len({tuple(r.token_ids) for r in rows_s}) == len(rows_s)  # the rows really sample


def test_hf_weights_loaded_between_windows_take_effect(setup):
    """Window 1 under weights W0 (version 0) equals a one-shot run under W0; new weights W1 loaded through
    the engine's bucket path change the later tokens, which carry version 1, and the first token of window 2
    is the argmax of plain transformers' W1 logits on prompt + window 1's tokens (greedy)."""
    tok, cfg, _, prompts = setup
    engine = HFRolloutEngine(tok, cfg, max_batch_size=4, seed=3)
    w0 = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    w1 = {n: (t + 0.5 * torch.randn(t.shape, generator=generator)) for n, t in w0.items()}
    greedy = SamplingParams(max_new_tokens=9, temperature=0.0, seed=0)
    before = engine.generate(prompts, greedy)
    rows = request_rows(prompts, greedy, 0)
    engine.generate_rows(rows, 0, max_new=3)
    assert [r.token_ids for r in rows] == [g[0].token_ids[:3] for g in before]
    engine.load_weight_buckets(pack_buckets(w1.items(), 64 * 1024))
    prefixes = [list(r.token_ids) for r in rows]
    windows(engine, rows, 3, version=1, bump=False)
    assert all(r.versions == [0, 0, 0] + [1] * (len(r.token_ids) - 3) for r in rows)
    assert any(r.token_ids != g[0].token_ids for r, g in zip(rows, before))
    for row, prompt, prefix in zip(rows, prompts, prefixes):
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([prompt + prefix])).logits[0, -1]
        assert row.token_ids[3] == int(logits.argmax())
        assert math.isclose(row.logprobs[3], float(torch.log_softmax(logits, -1).max()), abs_tol=1e-5)
    engine.load_weight_buckets(pack_buckets(w0.items(), 64 * 1024))  # W0 again: one call's tokens again
    assert key(engine.generate(prompts, greedy)) == key(before)


def test_hf_until_stop_eos_and_length_across_windows(setup):
    """``until`` ends a call between decode steps (rows stay unfinished and continue later); a stop string
    split over two windows is found (the check reads the whole response); an eos at a window's first token
    ends the row; ``max_new_tokens`` counts the earlier windows' tokens."""
    tok, _, engine, prompts = setup
    free = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=SEED)
    one = engine.generate(prompts, free)
    # until: asked before the prefill and after every step; True at its third question -> two steps
    asked = []
    rows = request_rows(prompts, free, SEED)
    steps = engine.generate_rows(rows, 0, until=lambda: asked.append(1) or len(asked) >= 3)
    assert steps == 2 and len(asked) == 3  # the first batch of 3 rows only: the call ended inside it
    assert [len(r.token_ids) for r in rows] == [2, 2, 2] + [0] * 9 and not any(r.done for r in rows)
    assert engine.generate_rows(rows, 0, until=lambda: True) == 0 and len(rows[0].token_ids) == 2
    windows(engine, rows, 4)
    assert key(request_completions(rows, 3, tok)) == key(one)

    # a stop string of two one-byte characters whose first ends window 1 and second starts window 2
    flat = sum(one, [])
    r, k = next((r, k) for r, c in enumerate(flat) for k in range(1, 10)
                if all(32 < t < 127 for t in c.token_ids[k: k + 2]) and k + 2 <= len(c.token_ids)
                and bytes(c.token_ids[k: k + 2]).decode() not in bytes(c.token_ids[:k + 1]).decode("latin-1"))
    stop = bytes(flat[r].token_ids[k: k + 2]).decode()
    stopped = dataclasses.replace(free, stop=[stop])
    rows = request_rows(prompts, stopped, SEED)
    windows(engine, rows, 3, first=k + 1)
    assert rows[r].finish_reason == "stop" and rows[r].token_ids == flat[r].token_ids[:k + 2]
    assert key(request_completions(rows, 3, tok)) == key(engine.generate(prompts, stopped))
    assert request_completions(rows, 3, tok)[r // 3][r % 3].text.endswith(stop)

    # eos at the first token of window 2, and a length budget over windows
    eos_engine = HFRolloutEngine(tok, setup[1], max_batch_size=4, seed=3)
    eos_engine.model.load_state_dict(engine.model.state_dict())
    eos_engine.eos_ids = {flat[0].token_ids[3]}
    rows = request_rows(prompts[:1], dataclasses.replace(free, max_new_tokens=5), SEED)
    windows(eos_engine, rows, 3)
    assert rows[0].finish_reason == "eos" and rows[0].token_ids == flat[0].token_ids[:4]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 5 or r.finish_reason == "eos" for r in rows)
    assert any(r.finish_reason == "length" and r.versions == [0, 0, 0, 1, 1] for r in rows)  # 3 + 2: the total counts
    full = Row(prompt_ids=prompts[0], params=SamplingParams(max_new_tokens=2), seed=1, token_ids=[65, 66],
               logprobs=[-1.0, -1.0], versions=[0, 0])
    assert engine.generate_rows([full], 1) == 0 and full.finish_reason == "length" and full.versions == [0, 0]
    with pytest.raises(ValueError, match="max_new must be >= 1"):
        engine.generate_rows(request_rows(prompts, free, SEED), 0, max_new=0)
    with pytest.raises(ValueError, match="unfinished"):
        row_completion(request_rows(prompts, free, SEED)[0], StopChecker(tok, []))
