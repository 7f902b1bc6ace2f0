"""The objectives' collect() flows: scripted rollouts in, hand-computed rewards/advantages/metrics out.

The rollout engine is scripted (it returns given texts), so every reward and advantage below is
known exactly; the entropy baseline's scorer is a real tiny ``transformers`` Qwen3.
"""

import math

import pytest
import torch

from megatron_pz.objectives.composite import build_objective
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.hf_scorer import HFScorer
from megatron_pz.objectives.prompts import build_generator_prompt, build_predictor_prompt
from test_objectives_support import ScriptedEngine, make_passage, tiny_qwen3, tiny_tokenizer

CAT = "The cat sat on the mat. The cat was happy."
PARIS = "Paris is the capital of France, and Berlin is the capital of Germany."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def by_group(exps):
    out = {}
    for e in exps:
        out.setdefault(e.group, []).append(e)
    return out


GEN = {
    CAT: ["thinking... \\mask{cat}", "\\mask{dog}", "I cannot decide", "so \\mask{mat}"],
    PARIS: ["\\mask{Paris}", "\\mask{capital}", "\\mask{}", "hmm \\mask{x} no: \\mask{Paris}"],
}
PRED = {  # masked passage -> 4 predictor answers
    "The [mask] sat on the mat. The [mask] was happy.":
        ["\\boxed{cat}", "\\boxed{dog}", "\\boxed{Cat}", "it is a cat"],           # acc 1/4
    "The cat sat on the [mask]. The cat was happy.": ["\\boxed{mat}"] * 4,       # acc 1
    "[mask] is the capital of France, and Berlin is the capital of Germany.":
        ["\\boxed{Paris}", "\\boxed{Lyon}", "\\boxed{Paris}", "\\boxed{Rome}"],  # acc 1/2
    "Paris is the [mask] of France, and Berlin is the [mask] of Germany.": ["\\boxed{city}"] * 4,  # acc 0
}


def pz_script(prompt, n):
    assert n == 4
    for text, responses in GEN.items():
        if prompt == build_generator_prompt(text):
            return responses
    for masked, responses in PRED.items():
        if prompt == build_predictor_prompt(masked):
            return responses
    raise AssertionError(f"unexpected prompt {prompt!r}")


def test_pretrainzero_collect_rewards_advantages_metrics(tok):
    cfg = ObjectiveConfig(name="pretrainzero", generator_group=4, predictor_group=4,
                          generator_max_tokens=64, predictor_max_tokens=32)
    passages = [make_passage(tok, 10, CAT), make_passage(tok, 11, PARIS)]
    engine = ScriptedEngine(tok, pz_script)
    exps, m = build_objective(cfg, tok).collect(passages, engine, scorer=None, step=3)

    # one generator call (2 prompts x 4), one predictor call (5 valid masks x 4)
    assert [len(texts) for texts, _ in engine.calls] == [2, 5]
    assert [params.n for _, params in engine.calls] == [4, 4]
    assert engine.calls[0][1].max_new_tokens == 64 and engine.calls[1][1].max_new_tokens == 32

    groups = by_group(exps)
    gen_cat, gen_paris = groups["gen/3/0/10"], groups["gen/3/1/11"]
    assert [e.reward for e in gen_cat] == [0.75, 0.0, 0.0, 0.0]  # 1 - 1/4; absent; unparseable; acc 1
    assert [e.reward for e in gen_paris] == [0.5, 0.0, 0.0, 0.5]  # 1 - 1/2; acc 0; empty; last \mask
    # unbiased group std: cat rewards -> std 0.375; paris -> std sqrt(1/12)
    assert [e.advantage for e in gen_cat] == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    s = math.sqrt(1 / 12)
    assert [e.advantage for e in gen_paris] == pytest.approx([0.25 / s, -0.25 / s, -0.25 / s, 0.25 / s], rel=1e-5)
    assert tok.decode(gen_cat[0].prompt_ids) == build_generator_prompt(CAT)
    assert gen_cat[1].info["valid"] is False and gen_cat[1].info["span"] == "dog"

    pred_cat = groups["pred/3/0/10/0"]
    assert [e.reward for e in pred_cat] == [1.0, 0.0, 0.0, 0.0]  # exact match: "Cat" is wrong
    assert [e.advantage for e in pred_cat] == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    assert all(e.trainable for e in pred_cat)
    # DAPO: acc 1 (mat) and acc 0 (capital) groups leave the loss, with zero advantage
    for g in ("pred/3/0/10/3", "pred/3/1/11/1"):
        assert all(not e.trainable and e.advantage == 0.0 for e in groups[g])
    for g in ("pred/3/1/11/0", "pred/3/1/11/3"):
        assert [e.reward for e in groups[g]] == [1.0, 0.0, 1.0, 0.0]
    assert set(groups) == {"gen/3/0/10", "gen/3/1/11", "pred/3/0/10/0", "pred/3/0/10/3", "pred/3/1/11/0",
                           "pred/3/1/11/1", "pred/3/1/11/3"}

    assert m["generator/valid_mask_rate"] == pytest.approx(5 / 8)
    assert m["generator/masks/absent"] == 1 and m["generator/masks/unparseable"] == 1
    assert m["generator/masks/empty"] == 1 and m["generator/masks/ok"] == 5
    assert m["generator/reward_mean"] == pytest.approx((0.75 + 0.5 + 0.5) / 8)
    assert m["generator/difficulty"] == pytest.approx((0.75 + 0 + 0.5 + 1 + 0.5) / 5)
    assert m["predictor/accuracy"] == pytest.approx(9 / 20)
    assert m["dynamic_sampling/dropped_groups"] == 2 and m["dynamic_sampling/kept_groups"] == 3
    assert m["predictor/num_trainable"] == 12 and m["predictor/num_samples"] == 20
    assert m["predictor/boxed_rate"] == pytest.approx(19 / 20)


def test_pretrainzero_all_masks_invalid_never_calls_predictor(tok):
    cfg = ObjectiveConfig(name="pretrainzero", generator_group=3, predictor_group=4, invalid_mask_reward=-0.5)
    engine = ScriptedEngine(tok, lambda prompt, n: ["no mask", "\\mask{zebra}", "\\mask{unclosed"])
    exps, m = build_objective(cfg, tok).collect([make_passage(tok, 0, CAT)], engine, None, step=0)
    assert len(engine.calls) == 1
    assert [e.reward for e in exps] == [-0.5] * 3 and [e.advantage for e in exps] == [0.0] * 3
    assert m["generator/valid_mask_rate"] == 0.0 and m["generator/masks/unparseable"] == 2
    assert m["generator/masks/absent"] == 1 and m["dynamic_sampling/dropped_groups"] == 0


def test_pretrainzero_options_replace_one_and_normalize(tok):
    cfg = ObjectiveConfig(name="pretrainzero", generator_group=1, predictor_group=2, replace_all=False,
                          normalize_answer=True, dynamic_sampling=False)
    seen = []

    def script(prompt, n):
        if prompt == build_generator_prompt(CAT):
            return ["\\mask{cat}"]
        seen.append(prompt)
        return ["\\boxed{ CAT }", "\\boxed{dog}"]

    exps, m = build_objective(cfg, tok).collect([make_passage(tok, 0, CAT)], ScriptedEngine(tok, script), None, 0)
    # OneMask (PZ §4.4): one of the two occurrences, drawn by (seed, step, passage, sample)
    from megatron_pz.objectives.pretrainzero import mask_passage, occurrence_rng

    expected = mask_passage(CAT, "cat", replace_all=False, rng=occurrence_rng(cfg, 0, 0, 0))
    assert expected in ("The [mask] sat on the mat. The cat was happy.", "The cat sat on the mat. The [mask] was happy.")
    assert seen == [build_predictor_prompt(expected)]
    pred = [e for e in exps if e.role == "predictor"]
    assert [e.reward for e in pred] == [1.0, 0.0]
    assert [e.reward for e in exps if e.role == "generator"] == [0.5]


def test_random_rlpt_picks_a_valid_candidate(tok):
    cfg = ObjectiveConfig(name="random_rlpt", predictor_group=2)
    many = "x " * 9 + "end"
    passages = [make_passage(tok, 0, CAT, ["cat", "happy", "mat"]), make_passage(tok, 1, many, ["x"])]
    prompts = []

    def script(prompt, n):
        prompts.append(prompt)
        return ["\\boxed{cat}", "\\boxed{happy}"]

    obj = build_objective(cfg, tok)
    exps, m = obj.collect(passages, ScriptedEngine(tok, script), None, step=5)
    assert m["random_rlpt/skipped/no_valid_candidate"] == 1  # "x" occurs 9 times
    (span,) = {e.info["span"] for e in exps}
    assert span in ("cat", "happy", "mat")
    from megatron_pz.objectives.pretrainzero import mask_passage

    assert prompts == [build_predictor_prompt(mask_passage(CAT, span))]
    assert [e.reward for e in exps] == [float(span == "cat"), float(span == "happy")]
    again, _ = obj.collect(passages, ScriptedEngine(tok, script), None, step=5)
    assert {e.info["span"] for e in again} == {span}  # (seed, step, passage) fixes the choice
    spans = {obj.collect(passages, ScriptedEngine(tok, script), None, step=s)[0][0].info["span"]
             for s in range(12)}
    assert len(spans) > 1  # ...and different steps draw differently


def _truth_script(tok, passage_text, prefix_marker, rpt):
    """Answer with the true next word (a token boundary), a wrong word, and format failures."""
    def script(prompt, n):
        start = prompt.index(prefix_marker) + len(prefix_marker)
        end = prompt.index("\nPlease reason") if not rpt else prompt.index("\n<think>")
        context = prompt[start:end]
        assert passage_text.startswith(context)
        word = passage_text[len(context):].split()[0]
        if not rpt:  # PZ eq. 5: the answer is the single next token (its text), not the next word
            ids = tok.encode(passage_text, add_special_tokens=False)
            k = next(k for k in range(len(ids)) if tok.decode(ids[:k]) == context)
            word = tok.decode(ids[:k + 1])[len(context):].strip()
        if rpt:
            return [f"ok</think> \\boxed{{{word}}}", f"\\boxed{{{word}}}", "</think>\\boxed{zzz}",
                    f"</think> maybe \\boxed{{{word}}}"]
        return [f"\\boxed{{{word}}}", "\\boxed{zzz}", "no box", f"\\boxed{{{word}}}"]
    return script


@pytest.mark.parametrize("name", ["random_ntr", "entropy_ntr", "rpt"])
def test_next_token_reasoning_flows(tok, name):
    cfg = ObjectiveConfig(name=name, ntr_group=4, ntr_min_context_tokens=8)
    model = tiny_qwen3(len(tok))
    passage = make_passage(tok, 4, PARIS)
    marker = "Text: " if name == "rpt" else "Here is the beginning of a text:\n"
    engine = ScriptedEngine(tok, _truth_script(tok, PARIS, marker, rpt=name == "rpt"))
    exps, m = build_objective(cfg, tok).collect([passage], engine, HFScorer(model), step=2)
    # true word (ntr: true token); (rpt: no </think> | ntr: wrong word); wrong word / no box; true word
    assert [e.reward for e in exps] == [1.0, 0.0, 0.0, 1.0]
    a = math.sqrt(0.75)  # (1 - 1/2) / unbiased std sqrt(1/3)
    assert [e.advantage for e in exps] == pytest.approx([a, -a, -a, a], rel=1e-5)
    cut = exps[0].info["cut"]
    assert 8 <= cut < len(passage.token_ids)
    assert m[f"{exps[0].role}/accuracy"] == 0.5
    if name in ("entropy_ntr", "rpt"):
        # the cut is among the top-20% next-token entropies, computed here straight from the model
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor(passage.token_ids)[None]).logits[0], -1)
        ent = -(logp.exp() * logp).sum(-1)
        starts = list(range(8, len(passage.token_ids)))
        k = math.ceil(0.2 * len(starts))
        top = sorted(starts, key=lambda s: -ent[s - 1].item())[:k]
        assert cut in top
        assert m[f"{exps[0].role}/cut_entropy_mean"] == pytest.approx(ent[cut - 1].item(), rel=1e-4)


def test_ntr_skips_short_passages_and_counts_them(tok):
    cfg = ObjectiveConfig(name="random_ntr", ntr_group=2, ntr_min_context_tokens=1000)
    engine = ScriptedEngine(tok, lambda p, n: ["x"] * n)
    exps, m = build_objective(cfg, tok).collect([make_passage(tok, 0, CAT)], engine, None, 0)
    assert exps == [] and engine.calls == [] and m["ntr/skipped/too_short"] == 1


def test_same_passage_twice_in_a_batch_keeps_separate_groups(tok):
    cfg = ObjectiveConfig(name="pretrainzero", generator_group=2, predictor_group=4)
    p = make_passage(tok, 10, CAT)
    engine = ScriptedEngine(tok, lambda prompt, n: ["\\mask{cat}", "no"] if n == 2 else pz_script(prompt, n))
    exps, _ = build_objective(cfg, tok).collect([p, p], engine, None, step=0)
    groups = by_group(exps)
    assert sorted(groups) == ["gen/0/0/10", "gen/0/1/10", "pred/0/0/10/0", "pred/0/1/10/0"]
    assert all(len(g) == (2 if k.startswith("gen") else 4) for k, g in groups.items())
