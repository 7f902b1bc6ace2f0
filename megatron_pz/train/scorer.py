"""The :class:`~megatron_pz.objectives.base.Scorer` the objectives see, on Megatron forward passes.

Teacher-forced log-probs (policy or RLP's EMA teacher) and next-token entropies, computed
vocab-parallel on the last pipeline stage and broadcast to every rank of the pipeline, so objectives
run identically on all model-parallel ranks. The policy's passes replay the rollout's MoE routes when
given (R3, the actor's ``routing_replay``); the EMA teacher routes natively.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence


from megatron_pz.model.routes import check_routes
from megatron_pz.rl.logprobs import vocab_parallel_entropy
from megatron_pz.train.batching import TokenSequence
from megatron_pz.train.losses import token_logprobs


class MegatronScorer:
    def __init__(self, actor, teacher_chunks: Optional[list] = None, pad_id: int = 0,
                 max_tokens_per_micro_batch: int = 16384):
        self.actor = actor
        self.teacher_chunks = teacher_chunks
        self.pad_id = pad_id
        self.max_tokens = max_tokens_per_micro_batch
        self.seconds = 0.0  # forward time and tokens scored over the run (the step-time breakdown)
        self.tokens = 0

    def _values(self, sequences, value_fn, chunks, routes: Optional[Sequence] = None) -> list[list[float]]:
        start = time.perf_counter()
        try:
            return self._forward_values(sequences, value_fn, chunks, routes)
        finally:
            self.seconds += time.perf_counter() - start
            self.tokens += sum(len(s) for s in sequences)

    def _forward_values(self, sequences, value_fn, chunks, routes) -> list[list[float]]:
        routes = self._checked_routes(sequences, routes)
        rows = [TokenSequence(list(s), [1.0] * len(s), index=i, routes=routes[i]) for i, s in enumerate(sequences)]
        batches = self.actor.micro_batches(rows, self.max_tokens, self.pad_id)
        values = self.actor.forward_values(batches, value_fn, chunks=chunks)
        out: list[list[float]] = [[] for _ in sequences]
        for mb, vals in zip(batches, values):
            for r, (idx, length) in enumerate(zip(mb.indices, mb.lengths)):
                if idx >= 0:
                    out[idx] = vals[r, :length].tolist()
        return out

    def _checked_routes(self, sequences, routes) -> list:
        """Per sequence: its routes (validated; at most as many rows as tokens), or None."""
        if routes is None or self.actor.route_shape is None:
            if routes is not None and any(r is not None for r in routes):
                raise ValueError("MoE routes were given for a dense model")
            return [None] * len(sequences)
        if len(routes) != len(sequences):
            raise ValueError(f"{len(routes)} route arrays for {len(sequences)} sequences")

        out = []
        for i, (seq, r) in enumerate(zip(sequences, routes)):
            if r is not None:
                if len(r) > len(seq):
                    raise ValueError(f"scored sequence {i}: {len(r)} route rows for {len(seq)} tokens")
                r = check_routes(r, self.actor.route_shape, len(r), f"scored sequence {i}")
            out.append(r)
        return out

    def token_logprobs(self, sequences: list[list[int]], model: str = "policy",
                       routes: Optional[Sequence] = None) -> list[list[float]]:
        if model not in ("policy", "ema"):
            raise ValueError(f"model must be 'policy' or 'ema', got {model!r}")
        if model == "ema" and self.teacher_chunks is None:
            raise RuntimeError("the EMA teacher was asked for, but this run has none (no RLP phase or component)")
        if model == "ema" and routes is not None:
            raise ValueError("the EMA teacher routes natively (a reference, not the policy): pass no routes")
        chunks = self.teacher_chunks if model == "ema" else None
        values = self._values(sequences, token_logprobs, chunks, routes)
        return [v[1:] for v in values]

    def token_entropies(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._values(sequences, lambda mb, logits: vocab_parallel_entropy(logits.float()), None)
