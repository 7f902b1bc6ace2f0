"""Turn variable-length token sequences into padded micro-batches with little padding.

Length bucketing: sequences are sorted by length and cut into runs of neighbours (micro-batches) whose
padded size (rows x longest row) stays under a token budget; the cuts minimise padded tokens plus a
fixed cost per micro-batch (:data:`MICRO_BATCH_COST_TOKENS`), so a long row does not drag short ones to
its width just because the budget had room for them. The local (CPU) attention cannot take packed
``thd`` sequences, so rows are right-padded; causal attention keeps padding from touching real
tokens, and the loss mask drops it. Padding waste is measured and reported with every step.

Per-token fields are aligned with ``input_ids``: value ``[r, j]`` belongs to the prediction of token
``j`` from the prefix ``< j`` (column 0 is never predicted and is always masked).

MoE routes (R3, :mod:`megatron_pz.model.routes`) ride along as ``MicroBatch.routes`` ``[b, s, moe_layers,
topk]`` int16, -1 where a token has no rollout route (routed natively); they stay on the host and the
actor's :class:`~megatron_pz.train.routing_replay.RoutingReplay` copies each router's share to the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from megatron_pz.config import FP8_TOKEN_ALIGN
from megatron_pz.model.routes import NATIVE


@dataclass
class TokenSequence:
    """One training row: tokens, which of them are trained on, and per-token values (same length)."""

    tokens: list[int]
    loss_mask: list[float]
    per_token: dict[str, list[float]] = field(default_factory=dict)
    index: int = 0  # position in the caller's list, to map results back
    routes: Optional[Any] = None  # MoE routes of the first tokens, [n <= len(tokens), moe_layers, topk]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, s] long
    position_ids: torch.Tensor  # [b, s] long
    loss_mask: torch.Tensor  # [b, s] float
    per_token: dict[str, torch.Tensor]  # name -> [b, s] float
    lengths: list[int]  # real length of each row
    indices: list[int]  # TokenSequence.index of each row
    routes: Optional[torch.Tensor] = None  # [b, s, moe_layers, topk] int16, -1 = route natively; host

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> "MicroBatch":
        """This micro-batch with every tensor on ``device`` (batches are built on the host; the model
        and its loss run on the actor's device). Routes stay on the host: routing replay moves only each
        router's share."""
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), self.loss_mask.to(device),
                          {k: v.to(device) for k, v in self.per_token.items()}, self.lengths, self.indices,
                          self.routes)

    def first_needed_column(self) -> int:
        """The first column any row trains on or the rollout correction counts (a token it rejected has left the
        loss mask but stays in its metrics: ``per_token["rejected"]``); the width when there is none."""
        needed = self.loss_mask.sum(0) > 0
        if "rejected" in self.per_token:
            needed |= self.per_token["rejected"].sum(0) > 0
        cols = torch.nonzero(needed)
        return int(cols[0]) if len(cols) else self.input_ids.shape[1]

    def columns_from(self, start: int) -> "MicroBatch":
        """The columns ``start:`` of every per-token tensor (rows and routes unchanged): what a loss sees
        when the model's logits were computed for those positions only (``Actor`` logits window)."""
        if start == 0:
            return self
        return MicroBatch(self.input_ids[:, start:], self.position_ids[:, start:], self.loss_mask[:, start:],
                          {k: v[:, start:] for k, v in self.per_token.items()},
                          [max(0, n - start) for n in self.lengths], self.indices, self.routes)


# One forward/backward pass costs about as much as this many extra padded tokens, whatever its size
# (measured for the tiny CPU model: Python/launch work of one pass through Megatron's schedule). It only
# decides whether splitting a micro-batch to cut padding pays; the token budget is a hard limit.
MICRO_BATCH_COST_TOKENS = 256

def sequence_multiple(tp: int = 1, sequence_parallel: bool = False, cp: int = 1,
                      fp8_recipe: Optional[str] = None) -> int:
    """What every micro-batch width must be a multiple of for this model configuration.

    * sequence parallelism scatters the sequence dimension over the TP ranks: width % TP == 0;
    * context parallelism cuts the sequence into 2 x CP load-balanced chunks: width % (2 CP) == 0;
    * FP8 needs each rank's token count aligned (:data:`megatron_pz.config.FP8_TOKEN_ALIGN`); with SP a rank holds
      width / TP tokens per row, so the alignment is multiplied by TP.
    The factors multiply (each rank's shard must itself be aligned), which over-pads by at most one
    multiple per row.
    """
    multiple = 1
    if fp8_recipe is not None:
        if fp8_recipe not in FP8_TOKEN_ALIGN:
            raise ValueError(f"unknown fp8 recipe {fp8_recipe!r}; known: {sorted(FP8_TOKEN_ALIGN)}")
        multiple *= FP8_TOKEN_ALIGN[fp8_recipe]
    if sequence_parallel and tp > 1:
        multiple *= tp
    if cp > 1:
        multiple *= 2 * cp
    return multiple


def make_micro_batches(
    sequences: Sequence[TokenSequence],
    max_tokens_per_micro_batch: int,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    min_micro_batches: int = 1,
    micro_batch_cost_tokens: int = MICRO_BATCH_COST_TOKENS,
) -> list[MicroBatch]:
    """Length-bucketed micro-batches; deterministic for a given input order.

    ``min_micro_batches`` pads the list with fully-masked rows so every rank runs the same schedule
    when needed (e.g. a data-parallel rank whose samples were all filtered out).
    """
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i].tokens), i))
    lengths = [round_up(len(sequences[i].tokens), pad_to_multiple) for i in order]
    groups = [order[a:b] for a, b in _cheapest_cuts(lengths, max_tokens_per_micro_batch, micro_batch_cost_tokens)]
    batches = [_collate([sequences[i] for i in g], pad_id, pad_to_multiple) for g in groups]
    while len(batches) < min_micro_batches:
        batches.append(_collate([TokenSequence([pad_id, pad_id], [0.0, 0.0], index=-1)], pad_id, pad_to_multiple,
                                per_token_names=_names(sequences)))
    return batches


def _cheapest_cuts(lengths: list[int], budget: int, cost_per_batch: int) -> list[tuple[int, int]]:
    """Split ``lengths`` (sorted longest first) into runs ``[a, b)`` with ``(b - a) * lengths[a] <= budget``
    (a row longer than the budget goes alone) minimising the sum of ``(b - a) * lengths[a] + cost``.

    Dynamic programme over prefixes: O(n x rows per micro-batch), trivial next to a forward pass.
    """
    n = len(lengths)
    best = [0] + [float("inf")] * n
    start = [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b - 1, -1, -1):
            rows = b - a
            if rows > 1 and rows * lengths[a] > budget:
                break
            cost = best[a] + rows * lengths[a] + cost_per_batch
            if cost <= best[b]:  # ties: the larger micro-batch
                best[b], start[b] = cost, a
    cuts, b = [], n
    while b > 0:
        cuts.append((start[b], b))
        b = start[b]
    return cuts[::-1]


def _names(sequences: Sequence[TokenSequence]) -> list[str]:
    return sorted(sequences[0].per_token) if sequences else []


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _collate(rows: list[TokenSequence], pad_id: int, pad_to_multiple: int,
             per_token_names: Optional[list[str]] = None) -> MicroBatch:
    width = round_up(max(len(r.tokens) for r in rows), pad_to_multiple)
    names = per_token_names if per_token_names is not None else sorted(rows[0].per_token)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    values = {n: torch.zeros((len(rows), width), dtype=torch.float32) for n in names}
    for r, row in enumerate(rows):
        n = len(row.tokens)
        if len(row.loss_mask) != n:
            raise ValueError(f"row {row.index}: loss_mask has {len(row.loss_mask)} entries for {n} tokens")
        ids[r, :n] = torch.tensor(row.tokens, dtype=torch.long)
        mask[r, :n] = torch.tensor(row.loss_mask, dtype=torch.float32)
        for name in names:
            vals = row.per_token.get(name)
            if vals is None:
                continue
            if len(vals) != n:
                raise ValueError(f"row {row.index}: '{name}' has {len(vals)} values for {n} tokens")
            values[name][r, :n] = torch.tensor(vals, dtype=torch.float32)
    mask[:, 0] = 0.0
    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(len(rows), -1).contiguous()
    return MicroBatch(ids, positions, mask, values, [len(r.tokens) for r in rows], [r.index for r in rows],
                      _collate_routes(rows, width))


def _collate_routes(rows: list[TokenSequence], width: int) -> Optional[torch.Tensor]:
    """The rows' routes as ``[b, width, moe_layers, topk]`` int16, -1 (native) where a row has none."""
    given = [r.routes for r in rows if r.routes is not None]
    if not given:
        return None
    out = torch.full((len(rows), width, *given[0].shape[1:]), NATIVE, dtype=torch.int16)
    for r, row in enumerate(rows):
        if row.routes is None:
            continue
        n = len(row.routes)
        if n > len(row.tokens) or tuple(row.routes.shape[1:]) != tuple(out.shape[2:]):
            raise ValueError(f"row {row.index}: routes of shape {tuple(row.routes.shape)} for {len(row.tokens)} "
                             f"tokens (expected at most that many rows of {tuple(out.shape[2:])})")
        out[r, :n] = torch.from_numpy(row.routes.astype("int16"))
    return out


def padding_fraction(batches: Sequence[MicroBatch]) -> float:
    total = sum(b.num_tokens for b in batches)
    real = sum(sum(b.lengths) for b in batches if b.indices[0] != -1)
    return 0.0 if total == 0 else 1.0 - real / total
