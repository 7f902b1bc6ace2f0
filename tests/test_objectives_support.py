"""Shared pieces for the objective tests: a real tiny byte-level BPE tokenizer, a tiny random Qwen3
from ``transformers``, passages shaped like the data pipeline's, and a scripted rollout engine.

The scripted engine returns given texts for given prompts: it exercises the objectives' logic
(parsing, rewards, grouping, advantages) deterministically; it stands in for sampling only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_pz.rollout.base import Completion, SamplingParams

CORPUS = [
    "Ralph Hanover won seventeen additional stakes events in his career as a pacer.",
    "The river flows through the old town of Heidelberg before it joins the Rhine.",
    "In 1905 Albert Einstein published four papers on physics, including special relativity.",
    "The cat sat on the mat. The cat was happy. The dog was not.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Think before you answer: <think> reasoning </think> then \\boxed{answer} and \\mask{span}.",
    "Über café naïve — unicode text with accents: é, ü, ï and the euro sign €.",
]


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_qwen3(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is near-uniform; widen it so log-probs differ visibly
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


@dataclass
class SpanCandidate:
    text: str
    char_start: int
    char_end: int
    token_start: int = 0
    token_end: int = 0
    num_words: int = 1
    idf: float = 1.0


@dataclass
class Passage:
    index: int
    title: str
    text: str
    token_ids: np.ndarray  # as in megatron_pz.data.dataset.Passage
    candidates: list = field(default_factory=list)


def make_passage(tokenizer, index: int, text: str, candidate_texts=()) -> Passage:
    cands = []
    for c in candidate_texts:
        start = text.index(c)
        cands.append(SpanCandidate(c, start, start + len(c), num_words=len(c.split())))
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    return Passage(index, f"title {index}", text, ids, cands)


class ScriptedEngine:
    """``script(prompt_text, n) -> list[str]``: the n completions for that prompt."""

    def __init__(self, tokenizer, script):
        self.tokenizer = tokenizer
        self.script = script
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def generate(self, prompts, params: SamplingParams):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.calls.append((texts, params))
        out = []
        for prompt_ids, text in zip(prompts, texts):
            responses = self.script(text, params.n)
            out.append([Completion(list(prompt_ids), self.tokenizer.encode(r, add_special_tokens=False), r,
                                   finish_reason="stop") for r in responses])
        return out

    def update_weights(self, model_chunks):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass
