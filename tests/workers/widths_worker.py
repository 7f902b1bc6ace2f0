"""2 ranks (DP=2): rank 0 has rows, rank 1 none; equalized micro-batches keep the width multiple."""

import torch
import torch.distributed as dist

from megatron_pz.config import ParallelConfig, RuntimeConfig
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import equalize_micro_batches
from megatron_pz.train.batching import TokenSequence, make_micro_batches

initialize(ParallelConfig(), RuntimeConfig(device="cpu"))
rank = dist.get_rank()
multiple = 32  # e.g. TP=2 + SP with 16-aligned FP8 rows
rows = [TokenSequence(list(range(n)), [1.0] * n, {"adv": [1.0] * n}, index=i)
        for i, n in enumerate([5, 40, 70])] if rank == 0 else []
batches = equalize_micro_batches(make_micro_batches(rows, 64, pad_to_multiple=multiple), pad_to_multiple=multiple)
counts = [None, None]
dist.all_gather_object(counts, len(batches))
assert counts[0] == counts[1] >= 2, counts
assert all(b.input_ids.shape[1] % multiple == 0 for b in batches), [tuple(b.input_ids.shape) for b in batches]
if rank == 1:
    assert all(b.loss_mask.sum() == 0 and list(b.per_token) == [] for b in batches)
print(f"rank {rank}: widths ok {[tuple(b.input_ids.shape) for b in batches]}", flush=True)
