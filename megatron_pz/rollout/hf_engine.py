"""Rollouts on the engine's *own* ``transformers`` copy of the policy (``rollout.engine: hf``).

vLLM's twin on CPU: like vLLM it holds a separate copy of the weights, which must be refreshed after
every optimizer step through the same bucketed :func:`~megatron_pz.rollout.weight_sync.sync_weights`
/ ``load_weights(iterable of (hf_name, tensor))`` path (a stale copy shows up as rollout-vs-train
log-prob drift), and it is asleep while the actor trains (on a GPU its weights move to host memory).
Unlike the Megatron engine it does not decode on the actor's modules, so the CPU tests exercise the
refresh that the GPU runs depend on.

One generation per model-parallel group: only the group's leader holds the model and decodes; the
completions are broadcast to the group's other ranks (:mod:`megatron_pz.rollout.groups`), so every
rank of a TP/PP group trains on identical data. Every rank still takes part in the weight sync
(the export gathers TP shards and pipeline stages collectively).

Decoding: sequences sorted by prompt length, batches left-padded with an attention mask (one prefill,
then one forward per new token, as ``transformers`` batches; the Megatron engine instead teacher-forces
longer prompts, which costs a forward per prompt-length difference). Each sampled token uses the noise
stream of (seed, prompt, sample index, position) and the same Gumbel-max sampler as the Megatron engine
(:func:`~megatron_pz.rollout.sampling.sample_tokens`), so for equal logits both engines draw the same
tokens, whatever the batching or the data-parallel layout (padding changes logits only by rounding).

One decode loop (:func:`decode_batch`) on :class:`~megatron_pz.rollout.base.Row` s: ``generate`` makes a call's
rows and runs them to the end; ``generate_rows`` continues rows over windows (a disaggregated stream loads
new weights between them): prompt + the row's tokens so far are prefilled, positions continue, and the noise
of response position p is still stream (row seed, p), so under unchanged weights the windows draw what one
call draws.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch

from megatron_pz.rollout.base import Completion, Row, SamplingParams
from megatron_pz.rollout.common import (StopChecker, broadcast_rows, eos_ids_of, finish_at_length, param_dtype_and_device,
                                        request_completions, request_rows, seeded_generator, shortest_first,
                                        validate_request, validate_rows)
from megatron_pz.rollout.config import RolloutConfig, check_engine_for_model
from megatron_pz.rollout.groups import model_parallel_generation_group
from megatron_pz.rollout.sampling import SamplingSpec, sample_tokens
from megatron_pz.rollout.weight_sync import HFModelTarget, iter_model_buckets, load_buckets, stale_weights


def build_hf_model(hf_config, dtype: torch.dtype = torch.float32, device="cpu") -> torch.nn.Module:
    """A randomly initialised ``transformers`` causal LM of the run's architecture (weights come by sync)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # the random init must not move the run's RNG (resume replays it)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_batch(model, rows: list[Row], version: int, eos_ids: set[int], stops: list[StopChecker],
                 max_new: Optional[int] = None, until: Optional[Callable[[], bool]] = None) -> tuple[int, bool]:
    """Continue unfinished ``rows`` (one batch; they may differ in length) with ``model``'s KV cache.

    Each row's prompt + tokens so far are left-padded with an attention mask and per-row positions (one
    prefill, then exactly one forward per new token), the way ``transformers`` batches generation. A row
    takes at most ``max_new`` tokens in this call (None: until it finishes); the token at response position
    p draws noise stream (row.seed, p), so a row continued over calls under unchanged weights draws what one
    call draws. ``stops[r]`` checks row r's stop strings on its whole generated list. ``until()`` is asked
    before every forward; True returns at once. Returns the decode steps (sampling forwards) run and whether
    ``until`` ended the call.
    """
    from transformers import DynamicCache

    if until is not None and until():
        return 0, True
    device = next(model.parameters()).device
    batch = len(rows)
    sequences = [r.prompt_ids + r.token_ids for r in rows]
    longest = max(len(p) for p in sequences)
    vocab_size = int(model.config.vocab_size)
    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for r, p in enumerate(sequences):
        tokens[r, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, longest - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {_cache_keyword(model): DynamicCache(config=model.config)}
    budget = [r.params.max_new_tokens - len(r.token_ids) if max_new is None else max_new for r in rows]
    active = [not r.done for r in rows]
    specs = _spec_groups(rows)
    steps = 0
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, **cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    while True:
        generators = [seeded_generator(row.seed, len(row.token_ids), device) for row in rows]
        sampled = torch.empty(batch, dtype=torch.long, device=device)
        lps = torch.empty(batch, dtype=torch.float32, device=device)
        for spec, members in specs:
            if len(members) == batch:  # one request's rows (generate): the batch as one
                sampled, lps = sample_tokens(logits, 0, vocab_size, spec, generators, None)
            else:
                index = torch.tensor(members, device=device)
                sampled[index], lps[index] = sample_tokens(logits[index], 0, vocab_size, spec,
                                                           [generators[m] for m in members], None)
        steps += 1
        next_tokens = sampled.clone()
        sampled, lps = sampled.tolist(), lps.tolist()
        for r, row in enumerate(rows):
            if not active[r]:
                continue
            token = sampled[r]
            row.token_ids.append(token)
            row.logprobs.append(lps[r])
            row.versions.append(version)
            budget[r] -= 1
            if token in eos_ids:
                row.finish_reason = "eos"
            elif stops[r].hit(row.token_ids):
                row.finish_reason = "stop"
            elif len(row.token_ids) >= row.params.max_new_tokens:
                row.finish_reason = "length"
            active[r] = not row.done and budget[r] > 0
        if not any(active):
            return steps, False
        if until is not None and until():
            return steps, True
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=next_tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                       **cache, use_cache=True).logits[:, -1]


def _spec_groups(rows: list[Row]) -> list[tuple[SamplingSpec, list[int]]]:
    """The rows of a batch grouped by sampling settings (each group is sampled in one call)."""
    groups: dict[tuple, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault((row.params.temperature, row.params.top_k, row.params.top_p), []).append(r)
    return [(SamplingSpec(*key), members) for key, members in groups.items()]


def generate_rows_with_model(model, tokenizer, eos_ids: set[int], rows: Sequence[Row], version: int,
                             max_batch_size: int, max_new: Optional[int] = None,
                             until: Optional[Callable[[], bool]] = None) -> int:
    """:meth:`HFRolloutEngine.generate_rows` on ``model``: the unfinished rows in the order given, in batches of
    ``max_batch_size``; ``until`` also ends the call between batches. Returns the decode steps run."""
    pending = [row for row in rows if not finish_at_length(row)]
    checkers: dict[tuple, StopChecker] = {}
    steps = 0
    for start in range(0, len(pending), max_batch_size):
        batch = pending[start: start + max_batch_size]
        stops = [checkers.setdefault(tuple(r.params.stop), StopChecker(tokenizer, r.params.stop)) for r in batch]
        ran, interrupted = decode_batch(model, batch, version, eos_ids, stops, max_new, until)
        steps += ran
        if interrupted:
            break
    return steps


def _cache_keyword(model) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` in recent transformers 5 releases (which warn
    on the older ``past_key_values``), ``past_key_values`` in those vLLM 0.32 accepts (< 5.20)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_with_model(model, tokenizer, eos_ids: set[int], prompts: Sequence[list[int]], params: SamplingParams,
                        seed: int, max_batch_size: int, seeds: Optional[list[list[int]]] = None
                        ) -> list[list[Completion]]:
    """``params.n`` completions per prompt; ``seeds[i][j]`` overrides the row seed of sample j of prompt i.
    The rows path in one call: shortest prompts first, batches of ``max_batch_size``."""
    rows = request_rows(prompts, params, seed, seeds)
    generate_rows_with_model(model, tokenizer, eos_ids, shortest_first(rows), 0, max_batch_size)
    return request_completions(rows, params.n, tokenizer)


class HFRolloutEngine:
    """:class:`~megatron_pz.rollout.base.RolloutEngine` on its own ``transformers`` model (see module doc)."""

    owns_weights = True  # the phase protocol must push the actor's weights before each rollout
    keeps_weights_asleep = True  # sleep moves them to host memory, never drops them

    def __init__(self, tokenizer, hf_config, max_batch_size: int = 32, seed: int = 1234, bucket_mb: int = 512,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        check_engine_for_model(RolloutConfig(engine="hf"), hf_config)
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.max_batch_size = int(max_batch_size)
        self.seed = int(seed)
        self.bucket_bytes = int(bucket_mb) * 1024 * 1024
        self.device = torch.device(device)
        self.eos_ids = eos_ids_of(tokenizer, hf_config)
        self.group = model_parallel_generation_group()
        # only the leader decodes, so only the leader holds a model
        self.model = build_hf_model(hf_config, dtype, self.device) if self.group.is_leader() else None
        self._target = HFModelTarget(self.model) if self.model is not None else None
        self._calls = 0
        self.asleep = False
        self.syncs = 0
        self.last_sync = None

    # ------------------------------------------------------------------ protocol

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("HFRolloutEngine.generate called while asleep; enter a rollout phase first")
        validate_request(prompts, params, self.vocab_size)
        seed = self.seed + self._calls if params.seed is None else int(params.seed)
        self._calls += 1
        result = None
        if self.model is not None:
            result = generate_with_model(self.model, self.tokenizer, self.eos_ids, prompts, params, seed,
                                         self.max_batch_size)
        return self.group.broadcast_from_leader(result)

    def generate_rows(self, rows: list[Row], version: int, max_new: Optional[int] = None,
                      until: Optional[Callable[[], bool]] = None) -> int:
        """:meth:`~megatron_pz.rollout.base.RolloutEngine.generate_rows`: the leader decodes (``until`` is asked
        there only) and the rows' new state is broadcast to the rest of its model-parallel group."""
        if self.asleep:
            raise RuntimeError("HFRolloutEngine.generate_rows called while asleep; enter a rollout phase first")
        validate_rows(rows, self.vocab_size, max_new)
        steps = None
        if self.model is not None:
            steps = generate_rows_with_model(self.model, self.tokenizer, self.eos_ids, rows, int(version),
                                             self.max_batch_size, max_new, until)
        return broadcast_rows(self.group, rows, steps)

    def update_weights(self, model_chunks) -> None:
        """Pull the actor's current weights into this engine's model (collective over the model-parallel
        group: every rank exports its shards; the leader loads them)."""
        self.load_weight_buckets(iter_model_buckets(model_chunks, self.hf_config, self.bucket_bytes))

    def load_weight_buckets(self, buckets) -> None:
        """Load weight buckets (:class:`~megatron_pz.rollout.weight_sync.Bucket`) from any source: the
        actor's export (colocated) or the bridge from the training ranks (a rollout rank)."""
        target = self._target
        self.last_sync = load_buckets(buckets, target.load_weights if target else (lambda _: None))
        if target is not None and target.missing():
            raise RuntimeError(f"weight sync left HF parameters unwritten: {target.missing()[:5]}")
        self.syncs += 1

    def sleep(self) -> None:
        """Training phase: on an accelerator the weights go to host memory (the KV cache lives only
        inside one generate call)."""
        if self.model is not None and self.device.type != "cpu":
            self.model.to("cpu")
        self.asleep = True

    def wake(self) -> None:
        if self.model is not None and self.device.type != "cpu":
            self.model.to(self.device)
        self.asleep = False

    def finish_phase(self) -> None:
        """Nothing pending: generation is not collective beyond the model-parallel group."""

    def stale_weights(self, model_chunks) -> list[str]:
        """Names whose tensor differs (bit for bit) from the actor's export; collective like a sync."""
        return stale_weights(self.model, model_chunks, self.hf_config, self.bucket_bytes)


def check_refresh(model_chunks, tokenizer, hf_config, prompt_ids: list[int], max_new_tokens: int = 8) -> dict:
    """Smoke check of the refresh on any device (``tools/gpu_smoke.py``): an ``hf`` engine on the actor's
    device and dtype is synced from ``model_chunks``, must then hold the actor's export bit for bit, must
    generate from a greedy prompt, and must still hold the same weights after a sleep/wake round trip.
    Collective over the model-parallel group. Returns what it saw; raises on a failed check."""
    dtype, device = param_dtype_and_device(model_chunks)
    engine = HFRolloutEngine(tokenizer, hf_config, dtype=dtype, device=device)
    engine.update_weights(model_chunks)
    stale = engine.stale_weights(model_chunks)
    if stale:
        raise RuntimeError(f"hf engine weights differ from the actor's export after a sync: {stale[:5]}")
    completion = engine.generate([list(prompt_ids)], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                                    seed=0))[0][0]
    engine.sleep()
    engine.wake()
    stale = engine.stale_weights(model_chunks)
    if stale:
        raise RuntimeError(f"hf engine weights changed across sleep/wake: {stale[:5]}")
    return {"device": str(device), "dtype": str(dtype), "tensors": engine.last_sync.num_tensors,
            "sync_s": engine.last_sync.seconds, "tokens": completion.token_ids}
