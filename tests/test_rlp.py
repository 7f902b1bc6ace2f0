"""RLP: rewards equal the two log-likelihoods computed separately with real (tiny) models."""

import pytest
import torch

from megatron_pz.objectives.composite import build_objective
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.hf_scorer import HFScorer
from megatron_pz.objectives.prompts import RLP_THINK_CLOSE, RLP_THINK_OPEN
from megatron_pz.objectives.rlp import rlp_advantages
from test_objectives_support import ScriptedEngine, make_passage, tiny_qwen3, tiny_tokenizer

THOUGHTS = [" the capital is next</think>", " hmm", " France</think>", " Berlin, Germany</think>"]


def next_token_logprob(model, ids: list[int]) -> float:
    """log p(ids[-1] | ids[:-1]) by one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -2]
    return torch.log_softmax(logits.float(), -1)[ids[-1]].item()


def test_rlp_reward_is_policy_with_thought_minus_ema_without():
    tok = tiny_tokenizer()
    policy, ema = tiny_qwen3(len(tok), seed=0), tiny_qwen3(len(tok), seed=1)
    passages = [make_passage(tok, 7, "Paris is the capital of France, and Berlin is the capital of Germany."),
                make_passage(tok, 8, "In 1905 Albert Einstein published four papers on physics."),
                make_passage(tok, 9, "Hi.")]
    cfg = ObjectiveConfig(name="rlp", rlp_group=4, rlp_min_context_tokens=6, rlp_thought_max_tokens=16)
    engine = ScriptedEngine(tok, lambda prompt, n: THOUGHTS[:n])
    exps, m = build_objective(cfg, tok).collect(passages, engine, HFScorer(policy, ema), step=1)

    (texts, params), = engine.calls
    assert params.n == 4 and params.temperature == 0.7 and params.stop == [RLP_THINK_CLOSE]
    assert len(exps) == 8 and m["rlp/skipped_too_short"] == 1
    open_ids, close_ids = tok.encode(RLP_THINK_OPEN), tok.encode(RLP_THINK_CLOSE)
    for k, p in enumerate(passages[:2]):
        group = exps[4 * k:4 * k + 4]
        t = group[0].info["position"]
        assert 6 <= t < len(p.token_ids)
        context, target = p.token_ids[:t].tolist(), int(p.token_ids[t])
        assert group[0].prompt_ids == context + open_ids
        ema_lp = next_token_logprob(ema, context + [target])
        rewards = []
        for e, thought in zip(group, THOUGHTS):
            ids = tok.encode(thought)
            assert e.response_ids == ids  # only the sampled thought is trained on
            closing = [] if thought.endswith(RLP_THINK_CLOSE) else close_ids  # " hmm" gets closed for scoring
            pol_lp = next_token_logprob(policy, context + open_ids + ids + closing + [target])
            assert e.reward == pytest.approx(pol_lp - ema_lp, abs=1e-5)
            rewards.append(pol_lp - ema_lp)
        mean = sum(rewards) / 4
        assert [e.advantage for e in group] == pytest.approx([4 / 3 * (r - mean) for r in rewards], abs=1e-5)
        assert len(set(round(r, 4) for r in rewards)) == 4  # the thoughts really change the prediction
    assert m["rlp/thought_closed_rate"] == pytest.approx(0.75)


def test_rlp_advantages_hand_numbers():
    # mean 3: deviations -2, -1, 0, 3, times G/(G-1) = 4/3
    assert rlp_advantages([1.0, 2.0, 3.0, 6.0]) == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    assert rlp_advantages([0.5, -0.5]) == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError):
        rlp_advantages([1.0])
