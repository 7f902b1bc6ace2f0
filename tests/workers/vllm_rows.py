"""Rows over windows on the real vLLM 0.32.0 (its CPU build), one process (world of one).

``VLLMRolloutEngine.generate_rows`` steps vLLM's engine: a row in one call equals ``generate`` (same seed);
greedy rows over windows of 3 tokens reach one call's tokens and finish states; every token carries its
window's version; weights pushed between windows take effect for the later tokens (they equal vLLM's own
greedy continuation of prompt + prefix under the new weights, and differ from the old weights' run);
``until`` ends a window between steps, leaving no request inside vLLM; a stop string spanning two windows
is found. Prints VLLM_ROWS_OK.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.common import request_completions, request_rows  # noqa: E402
from megatron_pz.rollout.config import RolloutConfig  # noqa: E402
from megatron_pz.rollout.factory import build_rollout_engine  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402


def key(groups):
    """What a row must reproduce. Not the text: a row's is ``tokenizer.decode`` of its tokens
    (rollout.common.row_completion), while vLLM's detokenizer holds back a trailing incomplete UTF-8
    sequence, which the random byte-level samples end on."""
    return [[(c.token_ids, c.finish_reason) for c in g] for g in groups]


def windows(engine, rows, size, first=None, version=0):
    used = []
    while not all(r.done for r in rows):
        assert len(used) < 20
        engine.generate_rows(rows, version + len(used), max_new=first if first and not used else size)
        used.append(version + len(used))
    return used


def main():
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
    tok = byte_tokenizer()
    hf_config = tiny_hf_config()
    model = build_model(hf_config)
    model.eval()
    sharpen(model, 2.0)
    engine = build_rollout_engine(RolloutConfig(engine="vllm", seed=5, bucket_mb=1), [model], tok, hf_config,
                                  max_model_len=96)
    engine.update_weights([model])
    llm_engine = engine.llm.llm_engine
    prompts = [tok.encode(t) for t in ("The city of", "ab", "hello world, this is")]
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=3)
    greedy = SamplingParams(max_new_tokens=9, temperature=0.0, seed=0)

    # one call without a window budget: generate's requests and seeds, so generate's samples
    one = engine.generate(prompts, sampled)
    rows = request_rows(prompts, sampled, 3)
    assert engine.generate_rows(rows, 7) > 0 and all(r.done and r.versions == [7] * len(r.token_ids) for r in rows)
    assert key(request_completions(rows, 2, tok)) == key(one)
    for row, c in zip(rows, sum(one, [])):
        assert max(abs(a - b) for a, b in zip(row.logprobs, c.logprobs)) < 1e-5

    # greedy over windows of 3: one call's tokens and finish states, a version per window; sampled: deterministic
    one = engine.generate(prompts, greedy)
    rows = request_rows(prompts, greedy, 0)
    assert windows(engine, rows, 3, version=2) == [2, 3, 4]
    assert key(request_completions(rows, 1, tok)) == key(one)
    assert all(r.versions == [2, 2, 2, 3, 3, 3, 4, 4, 4] for r in rows)
    twice = [request_rows(prompts, sampled, 3) for _ in range(2)]
    for rows_s in twice:
        windows(engine, rows_s, 4)
    assert [r.token_ids for r in twice[0]] == [r.token_ids for r in twice[1]]
    assert all(r.finish_reason in ("eos", "stop", "length") for r in twice[0])
    print("rows over windows: one call's greedy tokens and finish states, a version per window", flush=True)

    # until: True at its third question (before the first step, after steps 1 and 2) -> two steps, no request left
    asked = []
    rows = request_rows(prompts, greedy, 0)
    assert engine.generate_rows(rows, 0, until=lambda: asked.append(1) or len(asked) >= 3) == 2
    assert [len(r.token_ids) for r in rows] == [2, 2, 2] and not any(r.done for r in rows)
    assert not llm_engine.has_unfinished_requests()
    windows(engine, rows, 5)
    assert key(request_completions(rows, 1, tok)) == key(one)

    # a stop string of two one-byte characters split over windows 1 and 2
    flat = [g[0] for g in one]
    r, k = next((r, k) for r, c in enumerate(flat) for k in range(1, 7)
                if all(32 < t < 127 for t in c.token_ids[k: k + 2]) and k + 2 <= len(c.token_ids)
                and bytes(c.token_ids[k: k + 2]).decode() not in bytes(c.token_ids[:k + 1]).decode("latin-1"))
    stop = bytes(flat[r].token_ids[k: k + 2]).decode()
    rows = request_rows(prompts, dataclasses.replace(greedy, stop=[stop]), 0)
    windows(engine, rows, 3, first=k + 1)
    assert rows[r].finish_reason == "stop" and rows[r].token_ids == flat[r].token_ids[:k + 2], (rows[r], stop)
    assert request_completions(rows, 1, tok)[r][0].text.endswith(stop)
    print(f"until between steps; stop {stop!r} across a window boundary", flush=True)

    # new weights between windows: the later tokens are the new weights' (vLLM's one call on prompt + prefix)
    rows = request_rows(prompts, greedy, 0)
    engine.generate_rows(rows, 0, max_new=3)
    assert [r.token_ids for r in rows] == [c.token_ids[:3] for c in flat]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    engine.update_weights([model])
    windows(engine, rows, 3, version=1)
    assert all(r.versions[:3] == [0, 0, 0] and set(r.versions[3:]) <= {1, 2} for r in rows)
    assert any(r.token_ids != c.token_ids for r, c in zip(rows, flat)), "new weights changed nothing"
    for row, prompt in zip(rows, prompts):
        rest = engine.generate([prompt + row.token_ids[:3]], dataclasses.replace(greedy, max_new_tokens=6))[0][0]
        assert row.token_ids[3:] == rest.token_ids, (row.token_ids, rest.token_ids)
    print("weights pushed between windows take effect for the later tokens", flush=True)
    engine.close()
    print("VLLM_ROWS_OK", flush=True)


if __name__ == "__main__":
    main()
