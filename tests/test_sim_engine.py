"""The bench's simulated engine (bench/sim_engine.py): what its docstring promises, on a virtual clock."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sim_engine import LatencyModel, LengthModel, Row, SimEngine, VirtualClock, predict  # noqa: E402

from megatron_pz.rollout.base import SamplingParams  # noqa: E402


def engine(**kw):
    return SimEngine(clock=VirtualClock(), vocab_size=4096, **kw)


def rows(seeds, prompt_len=5, max_new=64):
    params = SamplingParams(max_new_tokens=max_new)
    return [Row(list(range(10, 10 + prompt_len)), params, seed) for seed in seeds]


def test_length_distribution_is_the_documented_one():
    lm = LengthModel()
    assert [lm.length(s, 512) for s in range(50)] == [lm.length(s, 512) for s in range(50)]
    q = lm.quantiles(512)
    assert q["p50"] == 47 and 240 <= q["p90"] <= 250 and q["p99"] == 512
    assert 0.028 < q["at_max"] < 0.033 and 90 < q["mean"] < 97
    assert all(1 <= lm.length(s, 16) <= 16 for s in range(200))


def test_windows_continue_a_row_as_one_call_does():
    one, windowed = rows(range(40)), rows(range(40))
    engine().generate_rows(one, version=3)
    sim = engine()
    calls = 0
    while not all(r.done for r in windowed):
        sim.generate_rows(windowed, version=calls, max_new=7)
        calls += 1
    assert calls > 1
    for a, b in zip(one, windowed):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.versions == [3] * len(a.token_ids)
        assert b.versions == [p // 7 for p in range(len(b.token_ids))]  # each token: its window's version
        expected = LengthModel().length(a.seed, 64)
        assert len(a.token_ids) == expected
        assert a.finish_reason == ("length" if expected == 64 else "eos")
        assert a.logprobs == [-math.log(4096)] * expected


def test_latency_is_prefill_plus_per_step_context():
    latency = LatencyModel(step_s=1.0, token_s=0.01, prefill_s_per_token=0.1)
    sim = engine(latency=latency)
    batch = rows([1, 2], prompt_len=5, max_new=512)
    n = [LengthModel().length(r.seed, 512) for r in batch]
    sim.generate_rows(batch, version=0)
    # prefill 2 x 5 tokens; decode step k (0-based) runs over the rows with length > k, each of context 5 + k
    expected = 0.1 * 10 + sum(1.0 + 0.01 * sum(5 + k for length in n if length > k) for k in range(max(n)))
    assert sim.clock.now() == pytest.approx(expected)
    assert sim.decode_steps == max(n)


def test_until_stops_between_decode_steps_and_chunks_follow_max_batch_size():
    sim = engine(max_batch_size=2, latency=LatencyModel(step_s=1.0, token_s=0.0, prefill_s_per_token=0.0))
    batch = rows(range(6), max_new=512)
    steps = sim.generate_rows(batch, version=0, until=lambda: sim.clock.now() >= 3.0)
    assert steps == 3 and sim.clock.now() == 3.0
    assert [len(r.token_ids) for r in batch] == [3, 3, 0, 0, 0, 0]  # first chunk only


def test_generate_groups_n_samples_per_prompt():
    sim = engine()
    out = sim.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=32, n=3, seed=11))
    assert [len(group) for group in out] == [3, 3]
    assert out[1][0].prompt_ids == [8, 9] and all(t in (8, 9, sim.eos_id) for t in out[1][0].token_ids)
    again = engine().generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=32, n=3, seed=11))
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in again]


def test_weights_are_consumed_and_counted():
    from megatron_pz.rollout.weight_sync import pack_buckets
    import torch

    consumed = []

    def stream():
        for bucket in pack_buckets([("a", torch.ones(4)), ("b", torch.zeros(3))], 16):
            consumed.append(bucket)
            yield bucket

    sim = engine()
    sim.load_weight_buckets(stream())
    assert len(consumed) == 2 and sim.version == 1 and sim.last_sync.num_tensors == 2


def test_model_periods():
    latency = LatencyModel(step_s=4e-3, token_s=1e-7, prefill_s_per_token=4e-7)
    common = dict(train_s=1.0, rows_per_step=32, prompt_tokens=256, max_new=512, lengths=LengthModel(),
                  latency=latency, max_batch_size=128, steps=60)
    s0, s1 = predict("s0", 0, 0, **common), predict("s1", 1, 0, **common)
    assert s0.period == pytest.approx(s0.rollout + 1.0)
    assert s1.rollout == pytest.approx(s0.rollout) and s1.period >= max(s1.rollout, 1.0)
    s4 = predict("s4", 4, 128, **common)
    assert s4.tokens == pytest.approx(s1.tokens, rel=0.15)  # the same batches, delivered in order
    assert s4.tokens_per_s > 1.3 * s1.tokens_per_s  # the bench's goal is reachable at these settings
