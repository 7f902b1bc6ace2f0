"""A rollout rank's stream (megatron_pz/disagg/stream.py) on the real `hf` engine, in one process, and the
staleness policy (megatron_pz/rl/staleness.py) by hand.

The stream runs each unit's objective half in a thread against the engine's rows API and decodes all units'
rows in windows; these tests check it against the objective run directly on the engine (same tokens), that
weights loaded between windows take effect on the tokens after and are recorded per token, and that a
snapshot taken mid-sample restores into a fresh stream that finishes exactly as the uninterrupted one.
"""

import pickle

import pytest
import torch

from test_objectives_support import make_passage, tiny_tokenizer

from megatron_pz.disagg.stream import Stream
from megatron_pz.objectives import split
from megatron_pz.objectives.composite import build_training_objective
from megatron_pz.objectives.config import ObjectiveComponent, ObjectiveConfig
from megatron_pz.rl.staleness import apply_staleness
from megatron_pz.rl.types import Experience
from megatron_pz.rollout.hf_engine import HFRolloutEngine

TEXT = ("Paris is the capital of France, and Berlin is the capital of Germany. The Seine flows through Paris "
        "while the Spree flows through Berlin.")


def tiny_engine(tok, seed=0):
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=False)
    engine = HFRolloutEngine(tok, cfg, max_batch_size=8)
    with torch.no_grad():  # widen the head so samples differ visibly from position to position
        torch.manual_seed(seed)
        engine.model.lm_head.weight.normal_(0.0, 1.0)
    return engine


def objective_of(tok, name="rlp"):
    if name == "mixture":  # PretrainZero's two stages (generator, then predictor on its masks) + RLP
        cfg = ObjectiveConfig(generator_group=2, predictor_group=2, rlp_group=2, rlp_min_context_tokens=4,
                              generator_max_tokens=12, predictor_max_tokens=10, rlp_thought_max_tokens=9,
                              mixture=[ObjectiveComponent(weight=0.5),
                                       ObjectiveComponent(weight=0.5, overrides={"name": "rlp"})])
    else:
        cfg = ObjectiveConfig(name="rlp", rlp_group=3, rlp_min_context_tokens=4, rlp_thought_max_tokens=11)
    return build_training_objective(cfg, tok)


def passages_of(tok, count=4):
    return [make_passage(tok, i, TEXT, ["Paris", "Berlin"]) for i in range(count)]


def run_to_end(stream, version=0, on_window=None):
    """Windows until every unit is done; ``on_window(i)`` after window i."""
    i = 0
    while stream.pending_rows():
        stream.window(version)
        if on_window:
            on_window(i)
        i += 1
    return i


def draft_rows(draft):
    """Every completion a draft holds, in order, as (tokens, logprobs, versions)."""
    out = []

    def walk(x):
        if hasattr(x, "token_ids") and hasattr(x, "logprobs"):
            out.append((list(x.token_ids), list(x.logprobs or []), list(x.versions or [])))
        elif isinstance(x, Experience):  # PretrainZero's drafts hold experiences (its whole collect ran)
            out.append((list(x.response_ids), list(x.rollout_logprobs or []), list(x.versions or [])))
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif hasattr(x, "__dict__"):
            for y in vars(x).values():
                walk(y)
    walk(draft)
    return out


@pytest.mark.parametrize("name", ["rlp", "mixture"])
def test_windows_give_what_one_call_gives(name):
    """Units of two steps decoded together in windows of 3 tokens equal each unit's objective run directly on
    the engine (tokens equal, log-probs within 1e-5); every token is tagged version 0; more than one window ran."""
    tok = tiny_tokenizer()
    engine, objective, passages = tiny_engine(tok), objective_of(tok, name), passages_of(tok)
    stream = Stream(engine, objective, tok, passages, window_tokens=3)
    stream.add(0, 0, [0, 1])
    stream.add(1, 0, [2, 3])
    stream.settle()
    windows = run_to_end(stream)
    assert windows >= 3
    got = stream.pop([(0, 0), (1, 0)])
    for (step, _), idx in (((0, 0), [0, 1]), ((1, 0), [2, 3])):
        direct = split.generate(objective, [passages[i] for i in idx], engine, step)
        a, b = draft_rows(got[(step, 0)]), draft_rows(direct)
        assert len(a) == len(b) > 0
        for (ta, la, va), (tb, lb, _) in zip(a, b):
            assert ta == tb
            assert la == pytest.approx(lb, abs=1e-5)
            assert va == [0] * len(ta)


def test_weights_loaded_between_windows_take_effect_per_token():
    """After the first window the engine's weights change (version 1): the first 4 tokens of each thought are
    what the old weights sample (= the uninterrupted old-weight run's first 4), the rest are tagged 1 and differ
    somewhere from the old-weight continuation."""
    tok = tiny_tokenizer()
    objective, passages = objective_of(tok), passages_of(tok, 2)
    old = tiny_engine(tok)
    reference = draft_rows(split.generate(objective, passages, old, 0))
    engine = tiny_engine(tok)
    stream = Stream(engine, objective, tok, passages, window_tokens=4)
    stream.add(0, 0, [0, 1])
    stream.settle()
    stream.window(0)
    with torch.no_grad():
        torch.manual_seed(7)
        engine.model.lm_head.weight.normal_(0.0, 1.0)
    while stream.pending_rows():
        stream.window(1)
    got = draft_rows(stream.pop([(0, 0)])[(0, 0)])
    assert len(got) == len(reference)
    changed = 0
    for (tokens, _, versions), (ref, _, _) in zip(got, reference):
        assert tokens[:4] == ref[:4] and versions[:4] == [0] * min(4, len(tokens))
        assert versions[4:] == [1] * (len(tokens) - 4)
        changed += tokens != ref
    assert changed > 0


@pytest.mark.parametrize("name", ["rlp", "mixture"])
def test_snapshot_mid_sample_restores_exactly(name):
    """A snapshot after 2 windows (rows part-generated; for the mixture, PretrainZero's generator stage done on
    some units), pickled as a checkpoint stores it, restored into a fresh stream on a fresh engine with the
    same weights: both finish with identical drafts, versions included."""
    tok = tiny_tokenizer()
    objective, passages = objective_of(tok, name), passages_of(tok)

    def started(engine):
        stream = Stream(engine, objective, tok, passages, window_tokens=3)
        stream.add(0, 0, [0, 1])
        stream.add(1, 0, [2, 3])
        stream.settle()
        return stream

    first = started(tiny_engine(tok))
    first.window(0)
    first.window(1)
    saved = pickle.loads(pickle.dumps(first.snapshot()))
    assert any(r.token_ids and not r.done for u in saved.values() for call in u["calls"] for r in call)
    run_to_end(first, version=2)
    second = Stream(tiny_engine(tok), objective, tok, passages, window_tokens=3)
    second.restore(saved)
    run_to_end(second, version=2)
    a, b = first.pop([(0, 0), (1, 0)]), second.pop([(0, 0), (1, 0)])
    for key in a:
        assert draft_rows(a[key]) == draft_rows(b[key])
    assert {v for rows in map(draft_rows, a.values()) for _, _, vs in rows for v in vs} >= {0, 1, 2}


def test_a_failing_unit_fails_the_stream_naming_it():
    tok = tiny_tokenizer()

    class Broken:
        def generate(self, passages, engine, step):
            raise ValueError("no thoughts today")

    stream = Stream(tiny_engine(tok), Broken(), tok, passages_of(tok, 1))
    stream.add(3, 1, [0])
    with pytest.raises(RuntimeError, match="unit 1 of step 3 failed on the rollout rank: ValueError: no thoughts"):
        stream.settle()


# ====================================================================== staleness by hand


def exp(versions, trainable=True, mask=None):
    return Experience(prompt_ids=[1], response_ids=list(range(len(versions))), reward=0.0, group="g", role="rlp",
                      trainable=trainable, versions=list(versions), token_mask=mask)


def test_staleness_drop_mask_and_offpolicy_prefix_by_hand():
    """Step 5, N = 2. Versions [3, 3, 4] (staleness 2) pass; [1, 2, 4] (staleness 4) is dropped whole (drop)
    or loses its tokens of lag > 2 (mask: versions 1 and 2, lags 4 and 3); the prefix option masks tokens older
    than a sample's newest version; an already masked token is not counted twice."""
    fresh, stale, masked_before = exp([3, 3, 4]), exp([1, 2, 4]), exp([1, 4, 4], mask=[0.0, 1.0, 1.0])
    m = apply_staleness([fresh, stale, masked_before], 5, 0, 2, "drop")
    assert fresh.lag == [2, 2, 1] and stale.lag == [4, 3, 1]
    assert fresh.trainable and not stale.trainable and not masked_before.trainable
    assert m == {"stale/max_staleness": 4.0, "stale/samples_over": 2.0, "stale/dropped_samples": 2.0,
                 "stale/masked_tokens": 0.0, "stale/offpolicy_prefix_tokens": 0.0}

    fresh, stale, masked_before = exp([3, 3, 4]), exp([1, 2, 4]), exp([1, 4, 4], mask=[0.0, 1.0, 1.0])
    m = apply_staleness([fresh, stale, masked_before], 5, 0, 2, "mask")
    assert stale.trainable and stale.token_mask == [0.0, 0.0, 1.0] and stale.rejected == [1.0, 1.0, 0.0]
    assert masked_before.token_mask == [0.0, 1.0, 1.0] and fresh.token_mask is None  # untouched
    assert m["stale/masked_tokens"] == 2.0 and m["stale/dropped_samples"] == 0.0

    fresh = exp([3, 3, 4])
    m = apply_staleness([fresh], 5, 0, 2, "drop", mask_offpolicy_prefix=True)
    assert fresh.token_mask == [0.0, 0.0, 1.0] and m["stale/offpolicy_prefix_tokens"] == 2.0


def test_staleness_without_versions_uses_the_batch_version():
    e = Experience(prompt_ids=[1], response_ids=[5, 6], reward=0.0, group="g", role="rlp")
    m = apply_staleness([e], 4, 3, 1)
    assert e.lag == [1, 1] and e.trainable and m["stale/max_staleness"] == 1.0
    bad = exp([1, 2])
    bad.response_ids = [1, 2, 3]
    with pytest.raises(ValueError, match="2 token versions for 3 response tokens"):
        apply_staleness([bad], 4, 3, 1)


def test_engines_that_cannot_cut_rows_run_each_call_whole():
    """An engine whose rows cannot be cut (vLLM over several ranks or capturing MoE routes says so with
    ``rows_in_windows = False``) gets each unit's engine call as one ``generate``: the drafts equal the direct
    run, one version per sample; partial rollouts are refused with that engine."""
    from megatron_pz.config import ConfigError

    tok = tiny_tokenizer()
    engine, objective, passages = tiny_engine(tok), objective_of(tok, "mixture"), passages_of(tok)
    engine.rows_in_windows = False
    stream = Stream(engine, objective, tok, passages)
    stream.add(5, 0, [0, 1, 2, 3])
    stream.settle()
    run_to_end(stream, version=3)
    got = draft_rows(stream.pop([(5, 0)])[(5, 0)])
    direct = draft_rows(split.generate(objective, passages, engine, 5))
    assert [(t, lp) for t, lp, _ in got] == [(t, lp) for t, lp, _ in direct] and got
    assert all(v == [3] * len(t) for t, _, v in got)
    with pytest.raises(ConfigError, match="rollout.partial_rollout_tokens needs a rollout engine that continues"):
        Stream(engine, objective, tok, passages, window_tokens=4)
