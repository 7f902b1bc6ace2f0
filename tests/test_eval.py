"""Held-out mask-prediction accuracy: prompts built like training, scored with the training reward."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_pz.data.dataset import Passage, SpanCandidate
from megatron_pz.eval.mask_accuracy import build_mask_items, hf_greedy_generator, mask_prediction_accuracy
from megatron_pz.objectives.prompts import MASK_TOKEN


def _passage(index, text, spans):
    cands = []
    for span in spans:
        start = text.index(span)
        cands.append(SpanCandidate(span, start, start + len(span), 0, 1, len(span.split()), 5.0))
    return Passage(index=index, title=f"t{index}", text=text, token_ids=np.zeros(3, dtype=np.int64), candidates=cands)


PASSAGES = [
    _passage(0, "Paris is the capital of France. Paris has museums.", ["Paris", "France"]),
    _passage(1, "The Danube flows through Vienna.", ["Danube"]),
    _passage(2, "No candidates here.", []),
]


def test_items_mask_every_occurrence_and_are_deterministic():
    items, counts = build_mask_items(PASSAGES, spans_per_passage=2, seed=3)
    assert counts == {"passages": 2, "skipped_no_candidates": 1, "skipped_span_absent": 0}
    assert sorted((it.passage_index, it.span) for it in items) == [(0, "France"), (0, "Paris"), (1, "Danube")]
    for it in items:  # the passage appears with every occurrence of the span masked
        assert PASSAGES[it.passage_index].text.replace(it.span, MASK_TOKEN) in it.prompt
    paris = next(it for it in items if it.span == "Paris")
    assert "Paris" not in paris.prompt.split(MASK_TOKEN, 1)[1]
    assert build_mask_items(PASSAGES, spans_per_passage=2, seed=3)[0] == items  # deterministic


def test_word_items_take_any_valid_word_including_function_words():
    from megatron_pz.objectives.config import ObjectiveConfig
    from megatron_pz.objectives.pretrainzero import valid_single_words

    text = "the cat and the dog and the bird saw the fish and the cow and the hen and the ox and the pig"
    # "the" occurs 8 times: too frequent under the paper's rule (< 8); "and" (6 times) is valid
    rules = ObjectiveConfig()
    assert valid_single_words(text, rules) == ["cat", "and", "dog", "bird", "saw", "fish", "cow", "hen", "ox", "pig"]
    assert "the" in valid_single_words(text, ObjectiveConfig(max_mask_occurrences=9))
    assert valid_single_words(text, ObjectiveConfig(content_words_only=True)) == [
        "cat", "dog", "bird", "saw", "fish", "cow", "hen", "ox", "pig"]
    items, counts = build_mask_items(PASSAGES, spans_per_passage=50, seed=1, spans="words")
    assert counts == {"passages": 3, "skipped_no_candidates": 0, "skipped_span_absent": 0}
    assert {it.span for it in items if it.passage_index == 0} == {
        "Paris", "is", "the", "capital", "of", "France", "has", "museums"}
    assert {it.span for it in items if it.passage_index == 2} == {"No", "candidates", "here"}
    the = next(it for it in items if it.span == "the")
    assert "Paris is [mask] capital of France" in the.prompt
    with pytest.raises(Exception, match="spans must be one of"):
        build_mask_items(PASSAGES, spans="tokens")


def test_accuracy_is_the_exact_match_rate():
    items, _ = build_mask_items(PASSAGES, spans_per_passage=2, seed=0)
    oracle = lambda prompts: [f"It is \\boxed{{{next(i.span for i in items if i.prompt == p)}}}" for p in prompts]
    assert mask_prediction_accuracy(items, oracle)["accuracy"] == 1.0
    wrong = lambda prompts: ["\\boxed{London}" for _ in prompts]
    assert mask_prediction_accuracy(items, wrong)["accuracy"] == 0.0
    # one of three right -> 1/3; lower-case answer counts only with normalisation
    first = items[0].span
    mixed = lambda prompts: [f"\\boxed{{{first.lower()}}}" for _ in prompts]
    assert mask_prediction_accuracy(items, mixed)["accuracy"] == 0.0
    assert mask_prediction_accuracy(items, mixed, normalize=True)["accuracy"] == pytest.approx(1 / 3)



def test_in_run_eval_rates_and_empty_item_sets():
    """The trainer's eval: rates over the items it has; a kind with no items is absent, not 0."""
    from types import SimpleNamespace

    from megatron_pz.run_config import RunConfig
    from megatron_pz.eval.heldout import evaluate
    from test_objectives_support import tiny_tokenizer

    tok = tiny_tokenizer()
    items, _ = build_mask_items(PASSAGES, spans_per_passage=2, seed=0)  # France, Paris, Danube

    class Engine:  # answers "Paris" to every predictor prompt, masks "Vienna" for the generator
        def generate(self, prompts, params):
            text = "\\mask{Vienna}" if params.stop == ["}"] and "Generate a mask" in tok.decode(prompts[0]) \
                else "\\boxed{Paris}"
            return [[SimpleNamespace(text=text)] for _ in prompts]

    cfg = RunConfig()
    cfg.objective.generator_stop = cfg.objective.predictor_stop = ["}"]
    metrics, samples = evaluate(Engine(), tok, PASSAGES, {"candidates": items, "words": []}, cfg, 0, 1)
    assert metrics["eval/mask_accuracy"] == pytest.approx(1 / 3) and metrics["eval/num_spans"] == 3
    assert "eval/word_mask_accuracy" not in metrics and metrics["eval/num_words"] == 0
    # "Vienna" occurs in passage 1 only: valid there, absent from passages 0 and 2
    assert metrics["eval/generator_valid_mask_rate"] == pytest.approx(1 / 3)
    assert len(samples) == 3 + 3
    cfg.train.eval_passages = 0
    metrics, samples = evaluate(Engine(), tok, PASSAGES, {"candidates": [], "words": []}, cfg, 0, 1)
    assert metrics == {"eval/num_spans": 0.0, "eval/num_words": 0.0} and samples == []

def test_greedy_generation_with_a_real_hf_model(tmp_path):
    """A tiny random transformers model through the whole path: deterministic greedy outputs."""
    from workers.convert_models import write_hf_folder

    write_hf_folder("llama", tmp_path / "m")
    items, _ = build_mask_items(PASSAGES, spans_per_passage=1, seed=0)
    gen = hf_greedy_generator(tmp_path / "m", max_new_tokens=4)
    r1 = mask_prediction_accuracy(items, gen)
    r2 = mask_prediction_accuracy(items, gen)
    assert r1["num_spans"] == 2 and [s["response"] for s in r1["samples"]] == [s["response"] for s in r2["samples"]]
    assert all(isinstance(s["response"], str) and len(s["response"]) > 0 for s in r1["samples"])
    json.dumps(r1)  # serialisable as the CLI writes it


@pytest.mark.slow
def test_eval_cli_mask_accuracy_on_preprocessed_heldout(tmp_path):
    """`megatron-pz eval --mask-accuracy` end to end: gensim Wikipedia -> preprocess -> held-out split ->
    greedy predictions of a tiny HF model -> accuracy equal to the mean of the per-span rewards."""
    from megatron_pz.cli import main
    from megatron_pz.data.preprocess import preprocess
    from megatron_pz.data.sample import gensim_wiki_sample
    from workers.convert_models import write_hf_folder

    model_dir = tmp_path / "model"
    write_hf_folder("llama", model_dir)
    data = tmp_path / "data"
    preprocess([gensim_wiki_sample()], data, model_dir, workers=1, progress=False, max_pages=40, fit_pages=40,
               punkt_chars=200_000, passage_tokens=256, max_passage_tokens=512)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(model_dir), "--mask-accuracy", "--data", str(data), "--heldout-fraction",
               "0.5", "--max-passages", "3", "--max-new-tokens", "3", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())["mask_accuracy"]
    assert result["passages"] == 3 and result["num_spans"] + result["skipped_span_absent"] == 3
    rewards = [s["reward"] for s in result["samples"]]
    assert result["accuracy"] == pytest.approx(sum(rewards) / len(rewards))
