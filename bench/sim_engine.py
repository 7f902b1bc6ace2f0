"""A simulated rollout engine with long-tailed response lengths, and the analytical model of its schedules.

Used by ``bench/bench_async.py`` (part c) in place of the real engine: it speaks the rollout-engine interface
(:class:`megatron_pz.rollout.base.RolloutEngine` plus the rows API of issue 30's windows, ``generate_rows``),
holds no model and spends its time in ``time.sleep`` (a stand-in for a GPU engine: its latency does not compete
with the trainer for the CPU), so the training step it is paired with is the real one.

Response lengths (:class:`LengthModel`): a row's length is fixed by its seed alone (never by the weights or the
batch), drawn from a lognormal of median ``median`` tokens and log-space spread ``sigma``, rounded up and clipped
to the request's ``max_new_tokens``. With median 48, sigma 1.3 and a maximum of 512 (the shape bench_async's part c uses at any maximum, the
shape of PretrainZero's responses, up to 4096 tokens there, scaled to the tiny model) 59 % of the rows are
under 64 tokens, the mean is 93, the 90th percentile 244, and 3.0 % reach the maximum: a batch of 32 rows
has one at the maximum in 63 % of batches.
A row that ends before the maximum ends on its request's first stop string (when it fits) or an EOS token.

Latency (:class:`LatencyModel`): a window's time is the sum over its engine passes, in chunks of
``max_batch_size`` rows as the real engines batch them: a prefill of every row's prompt + prefix
(``prefill_s_per_token`` each, the re-prefill of a row continued from a previous window included), then per
decode step ``step_s + token_s * (context length summed over the rows still decoding)``: a memory-bound
decoder reads the weights once per step and each active row's KV cache. Finished rows leave the batch, so a
long tail decodes few rows at full per-step cost. The sleep runs against an absolute deadline (sleeping ahead
of small steps would drift by the OS's sleep granularity).

Tokens are copied from the prompt (valid ids of the run's tokenizer whatever its vocabulary), log-probs are
``-log(vocab)`` (a random-initialised policy's, near uniform: the rollout correction sees ratios near 1).
Weights are consumed (a bucket stream from the bridge must be read to its end) and counted, never used.

The analytical model (:func:`predict`) runs the same engine on a virtual clock through the lockstep schedule of
issue 30's stream (windows of at most W new tokens per row, new weights between windows, N steps requested
ahead), against a constant training time T, and predicts each setting's RL step period.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence

from megatron_pz.rollout.base import Completion, SamplingParams
from megatron_pz.rollout.common import row_seed, validate_request
from megatron_pz.rollout.weight_sync import iter_model_buckets, load_buckets

try:  # the rows API of issue 30 (megatron_pz.rollout.base.Row); the same fields here until it lands
    from megatron_pz.rollout.base import Row
except ImportError:
    @dataclass
    class Row:  # type: ignore[no-redef]
        prompt_ids: list[int]
        params: SamplingParams
        seed: int
        token_ids: list[int] = field(default_factory=list)
        logprobs: list[float] = field(default_factory=list)
        versions: list[int] = field(default_factory=list)
        finish_reason: Optional[str] = None
        routes: Optional[object] = None

        @property
        def done(self) -> bool:
            return self.finish_reason is not None

COMPLETION_HAS_VERSIONS = "versions" in {f.name for f in fields(Completion)}


@dataclass(frozen=True)
class LengthModel:
    """Response lengths: lognormal (median, sigma), rounded up, clipped to [1, the request's maximum]."""

    median: float = 48.0
    sigma: float = 1.3

    def length(self, seed: int, max_new_tokens: int) -> int:
        draw = random.Random(seed).lognormvariate(math.log(self.median), self.sigma)
        return max(1, min(int(max_new_tokens), math.ceil(draw)))

    def quantiles(self, max_new_tokens: int, n: int = 20000) -> dict[str, float]:
        """Shape of the distribution at this maximum, for the bench's header (from n seeds)."""
        lengths = sorted(self.length(s, max_new_tokens) for s in range(n))
        return {"mean": sum(lengths) / n, "p50": lengths[n // 2], "p90": lengths[int(0.9 * n)],
                "p99": lengths[int(0.99 * n)], "at_max": sum(x == max_new_tokens for x in lengths) / n}


@dataclass(frozen=True)
class LatencyModel:
    """Seconds per engine pass (see the module docstring)."""

    step_s: float = 2e-3  # per decode step, whatever the batch
    token_s: float = 2e-7  # per decode step and token of context of each active row
    prefill_s_per_token: float = 2e-7  # per prompt (+ prefix) token of a prefill

    def decode_step(self, context_tokens: int) -> float:
        return self.step_s + self.token_s * context_tokens

    def prefill(self, tokens: int) -> float:
        return self.prefill_s_per_token * tokens


class SleepClock:
    """Wall time: ``spend`` sleeps until the running deadline."""

    def __init__(self):
        self.deadline: Optional[float] = None

    def now(self) -> float:
        return time.perf_counter()

    def spend(self, seconds: float) -> None:
        now = time.perf_counter()
        self.deadline = max(self.deadline or now, now) + seconds
        if self.deadline > now:
            time.sleep(self.deadline - now)


class VirtualClock:
    """The analytical model's clock: ``spend`` only adds."""

    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def spend(self, seconds: float) -> None:
        self.t += seconds


class SimEngine:
    """The simulated engine (see the module docstring): ``generate`` / ``generate_rows`` / weight loading."""

    owns_weights = True
    keeps_weights_asleep = True

    def __init__(self, tokenizer=None, hf_config=None, max_batch_size: int = 32, seed: int = 1234,
                 bucket_mb: int = 512, lengths: LengthModel = LengthModel(), latency: LatencyModel = LatencyModel(),
                 clock=None, vocab_size: Optional[int] = None, log_path: Optional[str] = None):
        self.tokenizer, self.hf_config = tokenizer, hf_config
        self.vocab_size = int(vocab_size or getattr(hf_config, "vocab_size", 0) or 2**31 - 1)
        self.max_batch_size, self.seed, self.bucket_bytes = int(max_batch_size), int(seed), int(bucket_mb) * 2**20
        self.lengths, self.latency = lengths, latency
        self.clock = clock or SleepClock()
        self.eos_id = self._eos_id()
        self.version = 0  # weight loads so far
        self.syncs = 0
        self.last_sync = None
        self.asleep = False
        self._calls = 0
        self._shapes: dict = {}
        self.busy_s = 0.0  # engine time spent (prefill + decode), over the run
        self.decode_steps = 0
        self.log_path = log_path  # one JSON line per generate_rows call: wall start / end, decode steps, tokens

    def _eos_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None and self.hf_config is not None:
            eos = getattr(self.hf_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return int(eos) if eos is not None else 0

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        if not params.stop or self.tokenizer is None:
            return []
        return list(self.tokenizer.encode(params.stop[0], add_special_tokens=False))

    # ------------------------------------------------------------------ rows

    def generate_rows(self, rows: list, version: int, max_new: Optional[int] = None,
                      until: Optional[Callable[[], bool]] = None) -> int:
        """Continue every unfinished row by at most ``max_new`` tokens (None: to its end); see DESIGN30's rows
        API. Chunks of ``max_batch_size`` rows in the order given; ``until()`` is checked between decode steps.
        Returns the decode steps run."""
        start, before = time.time(), sum(len(r.token_ids) for r in rows)
        steps = self._generate_rows(rows, version, max_new, until)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"t0": start, "t1": time.time(), "steps": steps, "rows": len(rows),
                                    "tokens": sum(len(r.token_ids) for r in rows) - before}) + "\n")
        return steps

    def _generate_rows(self, rows: list, version: int, max_new: Optional[int], until) -> int:
        pending = [r for r in rows if not r.done]
        steps = 0
        for start in range(0, len(pending), self.max_batch_size):
            chunk = pending[start: start + self.max_batch_size]
            spent = self.latency.prefill(sum(len(r.prompt_ids) + len(r.token_ids) for r in chunk))
            self.clock.spend(spent)
            self.busy_s += spent
            budget = {id(r): len(r.token_ids) + (max_new if max_new is not None else r.params.max_new_tokens)
                      for r in chunk}
            active = list(chunk)
            while active:
                if until is not None and until():
                    return steps
                spent = self.latency.decode_step(sum(len(r.prompt_ids) + len(r.token_ids) for r in active))
                self.clock.spend(spent)
                self.busy_s += spent
                steps += 1
                self.decode_steps += 1
                for r in active:
                    self._append(r, version)
                active = [r for r in active if not r.done and len(r.token_ids) < budget[id(r)]]
        return steps

    def _append(self, row, version: int) -> None:
        """The row's next token: position p of its fixed-length response (copied prompt tokens, then its end)."""
        params = row.params
        key = (row.seed, params.max_new_tokens, tuple(params.stop))
        if key not in self._shapes:  # the row's length and ending, fixed by its seed
            self._shapes[key] = (self.lengths.length(row.seed, params.max_new_tokens), self._stop_ids(params))
        total, stop = self._shapes[key]
        p = len(row.token_ids)
        if total < params.max_new_tokens and stop and len(stop) <= total and p >= total - len(stop):
            token = stop[p - (total - len(stop))]
        elif total < params.max_new_tokens and not stop and p == total - 1:
            token = self.eos_id
        else:
            token = row.prompt_ids[(row.seed * 1_000_003 + p * 7919) % len(row.prompt_ids)]
        row.token_ids.append(int(token))
        row.logprobs.append(-math.log(self.vocab_size))
        row.versions.append(int(version))
        if len(row.token_ids) >= total:
            row.finish_reason = "length" if total >= params.max_new_tokens else ("stop" if stop else "eos")

    def completion(self, row) -> Completion:
        text = self.tokenizer.decode(row.token_ids) if self.tokenizer is not None else ""
        extra = {"versions": list(row.versions)} if COMPLETION_HAS_VERSIONS else {}
        return Completion(prompt_ids=list(row.prompt_ids), token_ids=list(row.token_ids), text=text,
                          logprobs=list(row.logprobs), finish_reason=row.finish_reason or "length", **extra)

    # ------------------------------------------------------------------ the engine protocol

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("SimEngine.generate called while asleep")
        validate_request(prompts, params, self.vocab_size)
        seed = self.seed + self._calls if params.seed is None else int(params.seed)
        self._calls += 1
        rows = [[Row(list(map(int, p)), params, row_seed(seed, list(map(int, p)), j)) for j in range(params.n)]
                for p in prompts]
        flat = sorted((r for group in rows for r in group), key=lambda r: len(r.prompt_ids))  # as request_batches
        self.generate_rows(flat, self.version)
        return [[self.completion(r) for r in group] for group in rows]

    def update_weights(self, model_chunks) -> None:
        """Colocated: the actor's real export, consumed."""
        self.load_weight_buckets(iter_model_buckets(model_chunks, self.hf_config, self.bucket_bytes))

    def load_weight_buckets(self, buckets) -> None:
        self.last_sync = load_buckets(buckets, lambda tensors: None)
        self.syncs += 1
        self.version = self.syncs

    def sleep(self) -> None:
        self.asleep = True

    def wake(self) -> None:
        self.asleep = False

    def finish_phase(self) -> None:
        """Nothing pending."""


# ====================================================================== the analytical model


@dataclass
class Prediction:
    name: str
    period: float  # seconds per RL step, steady state
    rollout: float  # engine seconds per delivered batch
    tokens: float  # response tokens per batch

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.period


def _batch_rows(step: int, rows_per_step: int, prompt_tokens: int, max_new: int, seed: int) -> list:
    params = SamplingParams(max_new_tokens=max_new)
    prompt = [1] * prompt_tokens
    return [Row(prompt, params, row_seed(seed + step, prompt, j)) for j in range(rows_per_step)]


def predict(name: str, staleness: int, window: int, train_s: float, rows_per_step: int, prompt_tokens: int,
            max_new: int, lengths: LengthModel, latency: LatencyModel, max_batch_size: int, steps: int = 200,
            seed: int = 0) -> Prediction:
    """The steady-state period of one setting, on a virtual clock.

    ``staleness`` 0: generate, then train (L + T). ``staleness`` >= 1 with ``window`` 0: one batch generated
    to its end per weight version, overlapping the update (max(L, T)): today's s=1. With ``window`` W > 0
    (the stream's lockstep): under each version, windows of at most W new tokens per row over every pending
    row of the ``staleness`` steps requested ahead, repeated until the oldest is deliverable; the period is
    max(windows' time, T) per step."""
    clock = VirtualClock()
    engine = SimEngine(max_batch_size=max_batch_size, lengths=lengths, latency=latency, clock=clock,
                       vocab_size=4096)
    periods, rollouts, tokens = [], [], []
    if window == 0 or staleness == 0:
        for step in range(steps):
            rows = _batch_rows(step, rows_per_step, prompt_tokens, max_new, seed)
            start = clock.now()
            engine.generate_rows(sorted(rows, key=lambda r: len(r.prompt_ids)), step)
            L = clock.now() - start
            periods.append(L + train_s if staleness == 0 else max(L, train_s))
            rollouts.append(L)
            tokens.append(sum(len(r.token_ids) for r in rows))
    else:
        pending: list[list] = [_batch_rows(s, rows_per_step, prompt_tokens, max_new, seed) for s in range(staleness)]
        requested = staleness
        for step in range(steps):
            start = clock.now()
            while not all(r.done for r in pending[0]):
                engine.generate_rows([r for batch in pending for r in batch], step, max_new=window)
            L = clock.now() - start
            batch = pending.pop(0)
            pending.append(_batch_rows(requested, rows_per_step, prompt_tokens, max_new, seed))
            requested += 1
            periods.append(max(L, train_s))
            rollouts.append(L)
            tokens.append(sum(len(r.token_ids) for r in batch))
    warm = steps // 10  # the pipeline fills first
    mean = lambda xs: sum(xs[warm:]) / len(xs[warm:])  # noqa: E731
    return Prediction(name, mean(periods), mean(rollouts), mean(tokens))
