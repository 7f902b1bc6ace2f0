"""Push the Megatron actor's weights into a rollout model, in size-bounded buckets.

The source is :func:`megatron_pz.convert.weights.megatron_to_hf_tensors`: full HF-named tensors of this
pipeline stage (TP shards and EP experts already gathered). They are packed into flat byte buffers of
at most ``bucket_bytes`` (a tensor larger than the bound travels alone), and each bucket is handed to
the target's ``load_weights(iterable of (name, tensor))`` — the method vLLM models expose, and which
reshards for the target's own tensor parallelism. Buckets bound the extra memory of a sync (one
bucket, not the model) and turn thousands of small transfers into a few large ones.

With pipeline parallelism each stage only holds its own layers, but the rollout model (vLLM, PP=1)
needs all of them: every stage's buckets are broadcast over the pipeline group, stage after stage, so
each rank delivers the full model to its target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_pz.convert.weights import megatron_to_hf_tensors

_ALIGN = 16  # byte alignment of each tensor inside a bucket (so dtype views are aligned)


@dataclass
class Bucket:
    """Tensors packed into one flat ``uint8`` buffer, with what is needed to view them back."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    offsets: list[int]
    buffer: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def header(self) -> tuple:
        return (self.names, self.shapes, [str(d) for d in self.dtypes], self.offsets, self.nbytes)

    @classmethod
    def from_header(cls, header: tuple, buffer: torch.Tensor) -> "Bucket":
        """The bucket another rank described with :meth:`header`, around the ``buffer`` it sent."""
        names, shapes, dtypes, offsets, nbytes = header
        if buffer.numel() != nbytes:
            raise ValueError(f"bucket buffer has {buffer.numel()} bytes, its header says {nbytes}")
        return cls(list(names), [tuple(s) for s in shapes], [getattr(torch, d.split(".")[-1]) for d in dtypes],
                   list(offsets), buffer)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, shape, dtype, offset in zip(self.names, self.shapes, self.dtypes, self.offsets):
            count = _numel(shape) * _itemsize(dtype)
            out.append((name, self.buffer[offset: offset + count].view(dtype).view(shape)))
        return out


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_bytes: int = 0
    bucket_bytes: list[int] = field(default_factory=list)
    bucket_sizes: list[int] = field(default_factory=list)  # tensors per bucket
    seconds: float = 0.0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _pack(items: list[tuple[str, torch.Tensor]]) -> Bucket:
    offsets, total = [], 0
    for _, t in items:
        offsets.append(total)
        total += _aligned(t.numel() * t.element_size())
    buffer = torch.empty(total, dtype=torch.uint8, device=items[0][1].device)
    for (_, t), offset in zip(items, offsets):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset: offset + flat.numel()].copy_(flat)
    return Bucket([n for n, _ in items], [tuple(t.shape) for _, t in items], [t.dtype for _, t in items],
                  offsets, buffer)


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` (one tensor
    larger than the bound makes a bucket of its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if pending and size + nbytes > bucket_bytes:
            yield _pack(pending)
            pending, size = [], 0
        pending.append((name, tensor))
        size += nbytes
    if pending:
        yield _pack(pending)


def stage_tensors(model_chunks, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors of this pipeline stage (collective over its TP and EP groups)."""
    return megatron_to_hf_tensors(model_chunks, hf_config)


def _pipeline_info():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None, 0, 1, None
    group = ps.get_pipeline_model_parallel_group()
    return group, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(), \
        dist.get_process_group_ranks(group)


def iter_model_buckets(model_chunks, hf_config, bucket_bytes: int,
                       device: Optional[torch.device] = None) -> Iterator[Bucket]:
    """Buckets of the *whole* model on every rank (all pipeline stages). Collective over the TP, EP
    and PP groups: every rank of the model-parallel group must consume the iterator fully."""
    pp_group, pp_rank, pp_size, pp_ranks = _pipeline_info()
    if pp_group is None:
        yield from pack_buckets(stage_tensors(model_chunks, hf_config), bucket_bytes)
        return
    if device is None:
        device = next(p.device for c in model_chunks for p in c.parameters())
    for stage in range(pp_size):
        src = pp_ranks[stage]
        if stage == pp_rank:
            for bucket in pack_buckets(stage_tensors(model_chunks, hf_config), bucket_bytes):
                dist.broadcast_object_list([bucket.header()], src=src, group=pp_group)
                dist.broadcast(bucket.buffer, src=src, group=pp_group)
                yield bucket
            dist.broadcast_object_list([None], src=src, group=pp_group)
        else:
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=src, group=pp_group)
                if box[0] is None:
                    break
                buffer = torch.empty(box[0][-1], dtype=torch.uint8, device=device)
                dist.broadcast(buffer, src=src, group=pp_group)
                yield Bucket.from_header(box[0], buffer)


def load_buckets(buckets: Iterable[Bucket], load_weights: Callable[[list[tuple[str, torch.Tensor]]], object]
                 ) -> SyncStats:
    """Hand each bucket's tensors to ``load_weights`` (one call per bucket), counting what passed."""
    stats = SyncStats()
    start = time.perf_counter()
    for bucket in buckets:
        tensors = bucket.tensors()
        load_weights(tensors)
        stats.num_tensors += len(tensors)
        stats.num_bytes += sum(t.numel() * t.element_size() for _, t in tensors)
        stats.bucket_bytes.append(bucket.nbytes)
        stats.bucket_sizes.append(len(tensors))
    stats.seconds = time.perf_counter() - start
    return stats


def sync_weights(model_chunks, hf_config, load_weights: Callable[[list[tuple[str, torch.Tensor]]], object],
                 bucket_bytes: int) -> SyncStats:
    """Deliver every HF tensor of the actor to ``load_weights``, one bucket per call."""
    return load_buckets(iter_model_buckets(model_chunks, hf_config, bucket_bytes), load_weights)


class HFModelTarget:
    """A ``transformers`` model as a weight-sync target (CPU tests, the HF side of the benchmark).

    ``load_weights`` copies each named tensor into the model's state dict, refusing unknown names and
    shape mismatches; ``missing()`` lists what no sync has written yet. Tied heads (``lm_head`` sharing
    the embedding) are reached through either name.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.loaded: set[str] = set()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        names = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in self.state:
                    raise KeyError(f"weight sync: {name!r} is not a parameter of {type(self.model).__name__}")
                target = self.state[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, "
                                     f"the target expects {tuple(target.shape)}")
                target.data.copy_(tensor)
                names.add(name)
        self.loaded |= names
        return names

    def missing(self) -> list[str]:
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        skip = {"lm_head.weight"} if tied else set()
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        return sorted(params - self.loaded - skip)


def stale_weights(model: Optional[torch.nn.Module], model_chunks, hf_config, bucket_bytes: int = 64 * 1024 * 1024
                  ) -> list[str]:
    """HF names whose tensor in ``model`` is not bit-for-bit the actor's current export (empty: fresh).

    The refresh check of a rollout engine with its own weights (tests, ``tools/gpu_smoke.py``):
    collective like :func:`sync_weights` (every rank of the model-parallel group calls it); a rank
    whose ``model`` is None only takes part in the export and returns []. A tied head is compared
    through the embedding, as the sync writes it.
    """
    state = model.state_dict() if model is not None else None
    differ: list[str] = []
    for bucket in iter_model_buckets(model_chunks, hf_config, bucket_bytes):
        if state is None:
            continue
        for name, tensor in bucket.tensors():
            mine = state.get(name)
            if mine is None or mine.dtype != tensor.dtype or not torch.equal(mine, tensor.to(mine.device)):
                differ.append(name)
    return differ
