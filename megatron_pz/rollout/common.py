"""What every rollout engine shares: request checks and batching, the noise stream of each sampled row,
EOS ids and stop strings, and the dtype/device an engine's own copy of the weights takes.

The three engines (:mod:`.megatron_engine`, :mod:`.hf_engine`, :mod:`.vllm_engine`) draw the same samples for
the same request because they share these rules: one noise stream per (seed, prompt, sample index)
(:func:`row_seed`), whose k-th sampled token uses generator :func:`seeded_generator` ``(row seed, k)``, whatever
the batching or the data-parallel layout. A sample generated over several calls (windows) is a
:class:`~megatron_pz.rollout.base.Row`: :func:`request_rows` makes a call's rows, :func:`row_completion` turns a
finished one into a :class:`~megatron_pz.rollout.base.Completion`.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

from megatron_pz.rollout.base import Completion, Row, SamplingParams


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


def window_seed(row_seed: int, offset: int) -> int:
    """An engine-side seed for a row resumed after ``offset`` generated tokens (vLLM seeds a request, not a
    token): the row's own stream when it starts (``offset`` 0, what ``generate`` uses), a fixed function of
    (row stream, offset) otherwise, so a continued row is as deterministic as a fresh one."""
    if offset == 0:
        return int(row_seed)
    digest = hashlib.blake2b(repr((int(row_seed), int(offset))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**62)


# ------------------------------------------------------------------ rows: samples generated over windows


def request_rows(prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int,
                 seeds: Optional[Sequence[Sequence[int]]] = None) -> list[Row]:
    """The rows of one ``generate(prompts, params)`` call seeded ``seed``: sample j of prompt i is row
    ``i * n + j``, its noise stream :func:`row_seed` ``(seed, prompt, j)`` (``seeds[i][j]`` overrides it)."""
    return [Row(prompt_ids=list(map(int, p)), params=params,
                seed=int(seeds[i][j]) if seeds is not None else row_seed(seed, list(map(int, p)), j))
            for i, p in enumerate(prompts) for j in range(params.n)]


def shortest_first(rows: Sequence[Row]) -> list[Row]:
    """Rows by prompt + generated length, stable (neighbours in length share a batch: less padding)."""
    return sorted(rows, key=lambda r: len(r.prompt_ids) + len(r.token_ids))


def validate_rows(rows: Sequence[Row], vocab_size: int, max_new: Optional[int]) -> None:
    """:func:`validate_request` for every distinct request among ``rows``, and the window budget."""
    if max_new is not None and max_new < 1:
        raise ValueError(f"generate_rows: max_new must be >= 1 (None: no window budget), got {max_new}")
    for k, row in enumerate(rows):
        if not row.done:
            validate_request([row.prompt_ids], row.params, vocab_size)
            if any(not 0 <= int(t) < vocab_size for t in row.token_ids):
                raise ValueError(f"row {k} has generated token ids outside [0, {vocab_size})")


def finish_at_length(row: Row) -> bool:
    """Mark an unfinished row that already holds its ``max_new_tokens`` as finished by length; True if so."""
    if not row.done and len(row.token_ids) >= row.params.max_new_tokens:
        row.finish_reason = "length"
    return row.done


def row_completion(row: Row, stops: StopChecker) -> Completion:
    """The :class:`Completion` of a finished ``row``: its text decoded and, when a stop string ended it, cut
    right after the earliest stop (the token ids keep the whole token that completed it). ``stops``: a
    :class:`StopChecker` of the row's ``params.stop``."""
    if not row.done:
        raise ValueError("row_completion: the row is unfinished (continue it with generate_rows first)")
    text = stops.decode(row.token_ids)
    if row.finish_reason == "stop":
        text = stops.cut(text)
    return Completion(prompt_ids=list(row.prompt_ids), token_ids=list(row.token_ids), text=text,
                      logprobs=list(row.logprobs), finish_reason=row.finish_reason, routes=row.routes,
                      versions=list(row.versions))


def request_completions(rows: Sequence[Row], n: int, tokenizer) -> list[list[Completion]]:
    """The result of one ``generate`` call from its finished :func:`request_rows`: ``n`` completions per prompt.
    One call samples under one version of the weights, so ``versions`` stays None."""
    completions = []
    for row in rows:
        completion = row_completion(row, StopChecker(tokenizer, row.params.stop))
        completion.versions = None
        completions.append(completion)
    return [completions[s: s + n] for s in range(0, len(completions), n)]


def broadcast_rows(group, rows: Sequence[Row], steps: Optional[int]) -> int:
    """After the leader of ``group`` (:class:`~megatron_pz.rollout.groups.GenerationGroup`) continued ``rows``
    (``steps``: its decode steps; None elsewhere): the rows' new state on every rank of the group."""
    if group.group is None:
        return steps
    state = group.broadcast_from_leader(
        (steps, [(r.token_ids, r.logprobs, r.versions, r.finish_reason, r.routes) for r in rows])
        if group.is_leader() else None)
    if not group.is_leader():
        for row, (token_ids, logprobs, versions, reason, routes) in zip(rows, state[1]):
            row.token_ids[:], row.logprobs[:], row.versions[:] = token_ids, logprobs, versions
            row.finish_reason, row.routes = reason, routes
    return state[0]


def param_dtype_and_device(model_chunks):
    """The dtype/device of the actor's parameters (what the export hands to an engine's own copy)."""
    for chunk in model_chunks:
        for p in chunk.parameters():
            return p.dtype, p.device
    raise ValueError("the actor has no parameters")
