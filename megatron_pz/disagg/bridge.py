"""The bridge between the training ranks and the rollout ranks: weights out, requests out, batches back.

One group per pipeline stage s, built on a prefix of the job's store outside both roles' default worlds
(:mod:`megatron_pz.disagg.roles`): member 0 is the stage's *head* (the rank of stage s with data-, tensor-
and context-parallel rank 0), members 1..R are the R rollout ranks. Each group is a raw torch 2.13 backend,
``ProcessGroupGloo`` (and on GPU also ``ProcessGroupNCCL`` for the weight buffers), built as
``distributed_c10d._new_process_group_helper`` builds them and driven by its own methods (``broadcast``,
``send``, ``recv``), since the groups belong to no default world. Every operation carries
``rollout.bridge_timeout_s``; a failure is turned into :class:`~megatron_pz.disagg.roles.RankLost` naming
the rank that died (:meth:`~megatron_pz.disagg.roles.Liveness.blame`).

* Weights (:func:`push_weights` / :func:`receive_weights`): every training rank exports its stage through the
  same stream the colocated sync uses (:func:`~megatron_pz.rollout.weight_sync.stage_tensors`: TP shards and
  EP experts gathered by all ranks of the stage), the head packs it into buckets
  (:func:`~megatron_pz.rollout.weight_sync.pack_buckets`) and broadcasts each bucket's header (gloo) and
  bytes (gloo on CPU, NCCL on GPU) over its stage's group. Rollout ranks receive stage after stage, i.e. the
  whole model as :class:`~megatron_pz.rollout.weight_sync.Bucket` s, straight from every pipeline stage (no
  hop through stage 0), and the engine loads them (``load_weight_buckets``).
* Messages: stage 0's head is training rank 0, which drives the protocol: requests to and batches from the
  rollout ranks go point to point over stage 0's gloo group, pickled (so the records may gain fields, e.g.
  MoE routes, without touching this module).
"""

from __future__ import annotations

import datetime
import pickle
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_pz.disagg.roles import Peer, Roles
from megatron_pz.rollout.weight_sync import Bucket, pack_buckets, stage_tensors


def _gloo(store, index: int, size: int, timeout: datetime.timedelta):
    return dist.ProcessGroupGloo(store, index, size, timeout)


def _nccl(store, index: int, size: int, timeout: datetime.timedelta):  # GPU only; read against torch 2.13, not run
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, index, size, options)


class StageGroup:
    """The bridge of one pipeline stage: its head (index 0) and the rollout ranks (1..R)."""

    def __init__(self, store, name: str, index: int, size: int, timeout_s: float, device: torch.device,
                 peers: list[Peer], liveness):
        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = dist.PrefixStore(f"pz/bridge/{name}/", store)
        self.index, self.size, self.device = index, size, device
        self.peers, self.liveness = peers, liveness  # who may be to blame when an operation fails
        self.last_bytes = 0  # size of the last object sent or received
        self.gloo = _gloo(dist.PrefixStore("gloo/", prefix), index, size, timeout)
        self.data = self.gloo if device.type == "cpu" else _nccl(dist.PrefixStore("nccl/", prefix), index, size,
                                                                 timeout)

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise self.liveness.blame(self.peers, error) from error

    # ------------------------------------------------------------------ collectives over the stage group

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        group = self.gloo if tensor.device.type == "cpu" else self.data
        self._wait(group.broadcast([tensor], opts))

    def broadcast_object(self, obj=None, src: int = 0):
        if self.index == src:
            payload = _to_bytes(obj)
            self.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), src)
            self.broadcast(payload, src)
            return obj
        size = torch.zeros(1, dtype=torch.int64)
        self.broadcast(size, src)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.broadcast(payload, src)
        return _from_bytes(payload)

    # ------------------------------------------------------------------ point to point (gloo)

    def send_object(self, obj, dst: int) -> int:
        """Pickle ``obj`` to member ``dst``; returns the bytes sent."""
        payload = _to_bytes(obj)
        self._wait(self.gloo.send([torch.tensor([payload.numel()], dtype=torch.int64)], dst, 0))
        self._wait(self.gloo.send([payload], dst, 1))
        self.last_bytes = payload.numel()
        return payload.numel()

    def recv_object(self, src: int):
        size = torch.zeros(1, dtype=torch.int64)
        self._wait(self.gloo.recv([size], src, 0))
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._wait(self.gloo.recv([payload], src, 1))
        self.last_bytes = payload.numel()
        return _from_bytes(payload)


def _to_bytes(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def _from_bytes(payload: torch.Tensor):
    return pickle.loads(payload.numpy().tobytes())


# ====================================================================== weights


@dataclass
class PushStats:
    """One stage head's share of a weight push (a rank that is no head reports zeros)."""

    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0


def push_weights(group: Optional[StageGroup], model_chunks, hf_config, bucket_bytes: int,
                 on_bucket: Optional[Callable[[Bucket], None]] = None) -> PushStats:
    """Send this pipeline stage's weights to every rollout rank. Collective over the training ranks (all take
    part in the stage's export); ``group`` is the stage's bridge on its head, None elsewhere.
    ``on_bucket`` sees each bucket the head sends (tests: checksums)."""
    stats = PushStats()
    start = time.perf_counter()
    if group is None:
        for _ in stage_tensors(model_chunks, hf_config):  # TP / EP gathers need every rank of the stage
            pass
        return stats
    for bucket in pack_buckets(stage_tensors(model_chunks, hf_config), bucket_bytes):
        group.broadcast_object(bucket.header())
        group.broadcast(bucket.buffer)
        if on_bucket is not None:
            on_bucket(bucket)
        stats.num_bytes += bucket.nbytes
        stats.num_buckets += 1
    group.broadcast_object(None)  # end of this stage
    stats.seconds = time.perf_counter() - start
    return stats


def receive_weights(groups: list[StageGroup]) -> Iterator[Bucket]:
    """On a rollout rank: every bucket of every pipeline stage, in stage order (the whole model)."""
    for group in groups:
        while True:
            header = group.broadcast_object()
            if header is None:
                break
            buffer = torch.empty(header[-1], dtype=torch.uint8, device=group.device)
            group.broadcast(buffer)
            yield Bucket.from_header(header, buffer)


# ====================================================================== connecting


def connect_training_side(roles: Roles, stage: Optional[int], timeout_s: float, device, tag: str = ""
                          ) -> Optional[StageGroup]:
    """Collective over the training ranks. ``stage``: the pipeline stage this rank heads (None: no head).
    Heads publish their rank, training rank 0 opens the bridge, each head joins its stage's group."""
    if stage is not None:
        roles.store.set(f"pz/bridge/{tag}head{stage}", str(roles.rank))
    dist.barrier()  # every head is published before the rollout ranks read them
    if roles.rank == 0:
        roles.store.add(f"pz/bridge/{tag}open", 1)
    if stage is None:
        return None
    peers = [roles.rollout_peer(i) for i in range(roles.rollout_ranks)]
    return StageGroup(roles.store, f"{tag}stage{stage}", 0, 1 + roles.rollout_ranks, timeout_s, device, peers,
                      roles.liveness)


def connect_rollout_side(roles: Roles, pp: int, timeout_s: float, device, tag: str = "") -> list[StageGroup]:
    """This rollout rank's member of every stage's group, once training rank 0 opened the bridge (waiting for
    it can last the trainers' whole start-up: data building, warm start)."""
    roles.liveness.wait_for_count(f"pz/bridge/{tag}open", 1, [roles.trainer_peer(0)])
    groups = []
    for stage in range(pp):
        head = int(roles.store.get(f"pz/bridge/{tag}head{stage}"))
        peer = Peer(f"trainer{head}", f"training rank {head} (head of pipeline stage {stage})")
        groups.append(StageGroup(roles.store, f"{tag}stage{stage}", 1 + roles.rank, 1 + roles.rollout_ranks,
                                 timeout_s, device, [peer], roles.liveness))
    return groups
