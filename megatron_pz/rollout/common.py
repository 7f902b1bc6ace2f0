"""What every rollout engine shares: request checks and batching, the noise stream of each sampled row,
EOS ids and stop strings, and the dtype/device an engine's own copy of the weights takes.

The three engines (:mod:`.megatron_engine`, :mod:`.hf_engine`, :mod:`.vllm_engine`) draw the same samples for
the same request because they share these rules: one noise stream per (seed, prompt, sample index)
(:func:`row_seed`), whose k-th sampled token uses generator :func:`seeded_generator` ``(row seed, k)``, whatever
the batching or the data-parallel layout.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from megatron_pz.rollout.base import SamplingParams


def eos_ids_of(tokenizer, hf_config) -> set[int]:
    """EOS ids from the tokenizer and the HF config (Qwen configs list several)."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([int(source)] if isinstance(source, int) else [int(x) for x in source])
    return ids


def request_batches(prompts: Sequence[Sequence[int]], n: int, max_batch_size: int
                    ) -> tuple[list[tuple[int, int, list[int]]], list[list[int]]]:
    """The rows of one ``generate`` call, ``(prompt index, sample index, prompt)`` for each of the ``n``
    samples of each prompt, and batches of at most ``max_batch_size`` row indices, shortest prompts
    first (neighbours in length share a batch: less padding and cache length)."""
    items = [(i, j, list(map(int, p))) for i, p in enumerate(prompts) for j in range(n)]
    order = sorted(range(len(items)), key=lambda k: len(items[k][2]))
    return items, [order[s: s + max_batch_size] for s in range(0, len(order), max_batch_size)]


def validate_request(prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: int) -> None:
    """Reject bad requests before any forward pass, naming the offending field."""
    if params.n < 1:
        raise ValueError(f"SamplingParams.n must be >= 1, got {params.n}")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {params.top_k}")
    if any(not s for s in params.stop):
        raise ValueError("SamplingParams.stop may not contain empty strings")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


class StopChecker:
    """Finds stop strings in the decoded tail of a growing completion.

    Only the last few tokens are decoded per step (a stop string ends inside the newest token the first
    time it appears); the full text is decoded once, when a stop is seen, to cut it right after the
    earliest complete stop string. The completion keeps the stop text; its token ids keep the whole
    token that completed it (as vLLM does).
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.window = (max(len(s) for s in self.stop) + 4) if self.stop else 0

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def hit(self, ids: Sequence[int]) -> bool:
        if not self.stop:
            return False
        tail = self.decode(ids[-self.window:])
        return any(s in tail for s in self.stop)

    def cut(self, text: str) -> str:
        ends = [text.find(s) + len(s) for s in self.stop if s in text]
        return text[: min(ends)] if ends else text


def row_seed(seed: int, prompt: list[int], sample_index: int) -> int:
    """The noise stream of sample ``sample_index`` of ``prompt`` in a call seeded ``seed``: what is sampled for a
    prompt does not depend on its batch-mates, the batch size or the data-parallel layout."""
    digest = hashlib.blake2b(repr((int(seed), sample_index, prompt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**62)


def seeded_generator(row_seed: int, index: int, device) -> torch.Generator:
    """The generator of the ``index``-th sampled token of the row whose stream is ``row_seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed((row_seed * 1_000_003 + index) % (2**63))
    return generator


def param_dtype_and_device(model_chunks):
    """The dtype/device of the actor's parameters (what the export hands to an engine's own copy)."""
    for chunk in model_chunks:
        for p in chunk.parameters():
            return p.dtype, p.device
    raise ValueError("the actor has no parameters")
