"""Held-out figures with intervals: the bootstrap, per-item records, the before/after comparison, the
budgets the evaluation sizes vLLM for, and the plain-transformers backend on a small Llama folder."""

import json

import numpy as np
import pytest
import torch

from megatron_pz.eval.records import compare, item_values, summary_metrics
from megatron_pz.rollout.budget import eval_response_budget
from megatron_pz.run_config import HeldoutEvalConfig
from megatron_pz.eval.intervals import bootstrap, paired_difference

def test_bootstrap_mean_matches_scipy_percentile_interval():
    from scipy.stats import bootstrap as scipy_bootstrap

    rng = np.random.default_rng(3)
    values = (rng.random(400) < 0.3).astype(float)
    ours = bootstrap(values, resamples=20000, seed=1)
    ref = scipy_bootstrap((values,), np.mean, n_resamples=20000, method="percentile", random_state=1)
    assert ours.value == pytest.approx(values.mean())
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.006)
    assert ours.n == 400

def test_ratio_of_sums_is_per_token_nll():
    nll, tokens = [10.0, 30.0, 2.0], [5, 10, 1]
    ci = bootstrap(nll, tokens)
    assert ci.value == pytest.approx(42.0 / 16)
    assert ci.low <= ci.value <= ci.high

def test_paired_difference_sees_what_two_intervals_hide():
    rng = np.random.default_rng(0)
    difficulty = rng.random(300)
    before = (difficulty < 0.4).astype(float)
    after = (difficulty < 0.45).astype(float)  # the same items, 5 points easier
    b, a = bootstrap(before), bootstrap(after)
    assert a.low < b.high  # the two intervals overlap ...
    diff = paired_difference(before, after)
    assert diff.value == pytest.approx(after.mean() - before.mean())
    assert diff.excludes_zero() and diff.low > 0  # ... the paired difference does not
    same = paired_difference(before, before)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)

def test_paired_difference_refuses_different_items():
    with pytest.raises(ValueError, match="same"):
        paired_difference([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="weights"):
        paired_difference([1.0], [1.0], [2.0], None)

def _records(correct: list[int], nll: list[float]) -> list[dict]:
    out = [{"eval": "candidates", "passage": i, "span": "x", "response": "\\boxed{x}" if c else "no", "reward": float(c)}
           for i, c in enumerate(correct)]
    out += [{"eval": "nll", "passage": i, "nll": v, "tokens": 10} for i, v in enumerate(nll)]
    out += [{"eval": "info_gain", "passage": i, "position": 20, "gain": -1.0 + i, "closed": 0.5} for i in range(3)]
    return out

def test_item_values_and_compare_pair_items_by_key():
    before = _records([0, 1, 0, 0], [20.0, 30.0, 25.0, 25.0])
    after = list(reversed(_records([1, 1, 0, 1], [19.0, 29.0, 24.0, 24.0])))  # order does not matter
    values = item_values(before)
    assert values["mask_accuracy"][("candidates", 1, "x", None)] == (1.0, None)
    assert values["predictor_answer_rate"][("candidates", 0, "x", None)] == (0.0, None)
    assert values["nll_per_token"][("nll", 2, None, None)] == (25.0, 10.0)
    table = compare(before, after)
    assert table["mask_accuracy"]["difference"].value == pytest.approx(0.5)
    assert table["nll_per_token"]["difference"].value == pytest.approx(-0.1)
    assert table["nll_per_token"]["items"] == 4
    assert table["info_gain"]["difference"].value == 0.0
    metrics = summary_metrics(before)
    assert metrics["eval/mask_accuracy"] == 0.25
    assert metrics["eval/perplexity"] == pytest.approx(np.exp(2.5))
    assert metrics["eval/info_gain_low"] <= metrics["eval/info_gain"] <= metrics["eval/info_gain_high"]

def test_eval_response_budget_counts_what_the_evaluation_generates():
    """An RLP run's evaluation generates at train.eval_max_new_tokens and its thoughts' budget, never at
    PretrainZero's 4096-token defaults (the SmolLM2 RLP run whose vLLM KV cache was sized for them)."""
    from megatron_pz.rollout.budget import rollout_context_length
    from megatron_pz.run_config import load_run_config

    cfg = load_run_config(None, ["model.architecture={model_type: qwen3}", "objective.name=rlp",
                                 "objective.rlp_thought_max_tokens=32", "train.max_prompt_tokens=512",
                                 "train.eval_max_new_tokens=16"])
    assert cfg.objective.generator_max_tokens == 4096  # the defaults an RLP run never uses
    assert eval_response_budget(cfg) == 16
    assert rollout_context_length(cfg) == 512 + 34 + 8  # the thought + </think> + target
    cfg.eval = HeldoutEvalConfig(info_gain_positions=10, info_gain_thought_tokens=64)
    assert rollout_context_length(cfg) == 512 + 66 + 8
    cfg.eval.generator_reward_samples = 4  # its predictions run at the predictor's budget
    assert rollout_context_length(cfg) == 512 + 4096 + 8

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_pz.data.default import ensure_default_dataset  # noqa: F401  (tokenizer below)

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=0,
                         pad_token_id=0, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(33 + i): i + 1 for i in range(94)}
    vocab["<eos>"] = 0
    vocab["Ġ"] = 95
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(folder)
    return folder

def test_transformers_backend_scores_like_a_plain_forward_and_generates_repeatably(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from megatron_pz.eval.transformers_backend import TransformersBackend
    from megatron_pz.rollout.base import SamplingParams

    backend = TransformersBackend(tiny_llama_dir, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    seqs = [[5, 9, 13, 2, 7], [3, 4], [8, 8, 8]]
    got = backend.token_logprobs(seqs)
    for seq, lps in zip(seqs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), -1)
        ref = logp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert len(lps) == len(seq) - 1
        assert torch.allclose(torch.tensor(lps), ref, atol=1e-5)
    greedy = backend.generate([[5, 9, 13], [3, 4]], SamplingParams(max_new_tokens=4, temperature=0.0, seed=0))
    for prompt, (completion,) in zip([[5, 9, 13], [3, 4]], greedy):  # left padding leaves greedy unchanged
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=4, eos_token_id=0,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert completion.token_ids == ref[:len(completion.token_ids)]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3, seed=7)
    first, again = backend.generate([[5, 9]], params), backend.generate([[5, 9]], params)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in again[0]]
    with pytest.raises(ValueError, match="policy"):
        backend.token_logprobs(seqs, model="ema")

def test_cut_at_stop_keeps_the_stop_text():
    from megatron_pz.eval.transformers_backend import cut_at_stop

    assert cut_at_stop("a \\boxed{x} tail}", ["}"]) == "a \\boxed{x}"
    assert cut_at_stop("thinking </think> more", ["</think>", "zz"]) == "thinking </think>"
    assert cut_at_stop("nothing", ["}"]) is None

def test_records_round_trip_through_a_run_log(tmp_path):
    from megatron_pz.eval.folder import format_comparison, read_records

    log = tmp_path / "eval_samples.jsonl"
    with open(log, "w") as f:
        for step, correct in ((0, [0, 1, 0, 0]), (10, [1, 1, 0, 1])):
            for r in _records(correct, [20.0, 30.0, 25.0, 25.0]):
                f.write(json.dumps({"step": step, **r}) + "\n")
    before, after = read_records(f"{log}@0"), read_records(log)
    assert len(before) == len(after) == 11
    table = format_comparison(before, after)
    assert "predictor accuracy, span candidates | 4 | 0.250" in table
    assert "0.500 [" in table
