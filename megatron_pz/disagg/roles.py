"""Two roles in one torchrun job, without Ray: training ranks first, rollout ranks last.

``rollout.placement: disaggregated`` with ``rollout.ranks: N`` makes the job's last N ranks *rollout
ranks* (an engine, no Megatron model) and the others *training ranks*. Each role starts its own default
``torch.distributed`` world on a prefix of torchrun's store (``pz/world/trainer/``, ``pz/world/rollout/``):

* on the training ranks megatron-core 0.16.1 sees a world of the trainers only:
  ``parallel_state.initialize_model_parallel`` takes the whole default world, and ``dist_checkpointing``'s
  collectives run on the default world with no group (``validation.py``: ``all_gather_object`` in
  ``determine_global_metadata``, ``broadcast_object_list`` in ``_validate_common_state_dict``;
  ``exchange_utils.py``; ``serialization.save``: rank 0 writes the common state), so saves and loads stay
  among the trainers and never wait for a rollout rank;
* on the rollout ranks the default world is the rollout ranks', which is what vLLM's ``external_launcher``
  joins (it reads RANK / WORLD_SIZE / LOCAL_RANK): RANK and WORLD_SIZE are rewritten to the role's values
  (the job's are kept in ``PZ_JOB_RANK`` / ``PZ_JOB_WORLD_SIZE``), LOCAL_RANK stays the GPU of this process.

The bridge between the roles (:mod:`megatron_pz.disagg.bridge`) lives on a third prefix. The store also
carries each rank's heartbeat (:class:`Liveness`), so a rank waiting for the other role notices a dead peer
and names it instead of hanging (peers do the same with their own store: NeMo-RL
``stateless_process_group.py``, verl ``one_step_off_policy/distributed_utils.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_pz.config import ConfigError
from megatron_pz.errors import PzError
from megatron_pz.runtime.distributed import resolve_device, world_backend

TRAINER, ROLLOUT = "trainer", "rollout"


class RankLost(PzError, RuntimeError):
    """A rank of the other role died, reported an error, or stopped answering; the message names it."""


@dataclass(frozen=True)
class Peer:
    """A rank as the store knows it (``key``) and as a person reads it (``name``)."""

    key: str
    name: str


# how often a waiting rank reads a message doorbell. Every message costs its sender about this much (a gloo send
# completes only once the receiver has posted its recv, i.e. has seen the doorbell): at 20 ms the trainer lost
# ~41 ms per one-step-off-policy step to two messages (bench/bench_async.py, traced). store.wait() would wake at
# once, but its timeouts (needed to keep watching the peers' heartbeats) log a c10d warning each time; at 5 ms
# a waiting rank asks the store 200 times a second.
DOORBELL_POLL_S = 0.005


class Liveness:
    """This rank's heartbeat in the job's store, and the watch on the peers a wait depends on.

    A background thread bumps ``pz/beat/<me>`` every ``period`` seconds. A peer is lost when its counter has
    not moved for ``timeout`` seconds of this rank's clock (counters, not timestamps: clocks of different
    nodes need not agree), or as soon as it published an error (``pz/error/<peer>``, see :meth:`report_error`).
    """

    def __init__(self, store, me: Peer, timeout: float, period: Optional[float] = None):
        self.store, self.me, self.timeout = store, me, float(timeout)
        self.period = period if period is not None else min(1.0, self.timeout / 5)
        self._seen: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pz-heartbeat", daemon=True)

    def start(self) -> "Liveness":
        self.store.add(f"pz/beat/{self.me.key}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.store.add(f"pz/beat/{self.me.key}", 1)
            except Exception:  # the store's host is gone: the job is ending anyway
                return

    def report_error(self, text: str) -> None:
        """Tell the other role why this rank is about to die (read by :meth:`check`)."""
        try:
            self.store.set(f"pz/error/{self.me.key}", text[-4000:])
        except Exception:
            pass

    def check(self, peers: list[Peer]) -> None:
        """Raise :class:`RankLost` naming the first peer that reported an error or whose heartbeat stalled."""
        now = time.monotonic()
        for peer in peers:
            if self.store.check([f"pz/error/{peer.key}"]):
                error = self.store.get(f"pz/error/{peer.key}").decode(errors="replace")
                raise RankLost(f"{peer.name} failed:\n{error}")
            beats = self.store.add(f"pz/beat/{peer.key}", 0)
            count, since = self._seen.get(peer.key, (-1, now))
            if beats != count:
                self._seen[peer.key] = (beats, now)
            elif now - since > self.timeout:
                raise RankLost(f"{peer.name} stopped answering: no heartbeat for {now - since:.1f} s "
                               f"(rollout.heartbeat_timeout_s={self.timeout:g}); it was killed or hangs, its own "
                               "output says which")

    def wait_for_count(self, key: str, count: int, peers: list[Peer], poll: float = 0.02) -> None:
        """Block until the store counter ``key`` reaches ``count``, checking ``peers`` all along."""
        next_check = 0.0
        while self.store.add(key, 0) < count:
            if time.monotonic() >= next_check:
                self.check(peers)
                next_check = time.monotonic() + self.period
            time.sleep(poll)

    def blame(self, peers: list[Peer], error: BaseException) -> RankLost:
        """After a bridge transfer failed: the peer that died (waiting up to the heartbeat timeout for the
        evidence), or ``error`` itself when every peer is still alive."""
        deadline = time.monotonic() + self.timeout + 2 * self.period
        while time.monotonic() < deadline:
            try:
                self.check(peers)
            except RankLost as lost:
                return lost
            time.sleep(self.period)
        return RankLost(f"a bridge transfer with {', '.join(p.name for p in peers)} failed while all of them "
                        f"still beat: {error}")


@dataclass
class Roles:
    """This process's role in a disaggregated job, the job's store and the liveness watch."""

    role: str
    job_rank: int
    job_world: int
    trainers: int  # job ranks [0, trainers) train; [trainers, job_world) are rollout ranks
    store: object = field(repr=False)
    liveness: Liveness = field(repr=False)

    @property
    def is_trainer(self) -> bool:
        return self.role == TRAINER

    @property
    def rank(self) -> int:
        """Rank within the role (the default world's rank)."""
        return self.job_rank if self.is_trainer else self.job_rank - self.trainers

    @property
    def world(self) -> int:
        return self.trainers if self.is_trainer else self.job_world - self.trainers

    @property
    def rollout_ranks(self) -> int:
        return self.job_world - self.trainers

    def rollout_peer(self, i: int) -> Peer:
        return Peer(f"rollout{i}", f"rollout rank {i} (job rank {self.trainers + i})")

    def trainer_peer(self, i: int = 0) -> Peer:
        return Peer(f"trainer{i}", f"training rank {i} (job rank {i})")

    def me(self) -> Peer:
        return self.trainer_peer(self.rank) if self.is_trainer else self.rollout_peer(self.rank)

    def close(self) -> None:
        self.liveness.stop()

    @contextlib.contextmanager
    def reporting_errors(self) -> Iterator[None]:
        """This rank's part of the job: an error is published in the store before it propagates (the other
        role fails naming this rank instead of waiting for it), and the heartbeat stops either way."""
        try:
            yield
        except BaseException:
            self.liveness.report_error(traceback.format_exc())
            raise
        finally:
            self.close()


def split_of(rollout_cfg, job_world: int) -> tuple[int, int]:
    """(training ranks, rollout ranks) of a job of ``job_world`` ranks; refuses a split that leaves no trainer."""
    n = rollout_cfg.ranks
    if n >= job_world:
        raise ConfigError(f"rollout.ranks={n} leaves no training rank in a job of {job_world} ranks "
                          "(the rollout ranks are the job's last rollout.ranks ranks)")
    return job_world - n, n


def start_roles(rollout_cfg, runtime_cfg) -> Roles:
    """Join torchrun's store, take this rank's role and start that role's default world (collective over the
    job: every rank calls it first thing). Needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"rollout.placement=disaggregated needs a torchrun launch (unset: {', '.join(missing)})")
    if dist.is_initialized():
        raise RuntimeError("start_roles must run before torch.distributed is initialized")
    timeout = datetime.timedelta(minutes=runtime_cfg.timeout_minutes)
    # the same client rendezvous as init_process_group("env://"): torchrun's agent store (torch 2.13
    # rendezvous._create_c10d_store), or rank 0's when launched without the agent
    store, job_rank, job_world = next(dist.rendezvous("env://", timeout=timeout))
    trainers, _ = split_of(rollout_cfg, job_world)
    role = TRAINER if job_rank < trainers else ROLLOUT
    rank, world = (job_rank, trainers) if role == TRAINER else (job_rank - trainers, job_world - trainers)
    os.environ.update(PZ_ROLE=role, PZ_JOB_RANK=str(job_rank), PZ_JOB_WORLD_SIZE=str(job_world),
                      RANK=str(rank), WORLD_SIZE=str(world))
    device = resolve_device(runtime_cfg.device)
    if device.type == "cuda":  # NCCL groups (the world's, the bridge's) take the current device
        torch.cuda.set_device(device)
    dist.init_process_group(world_backend(device, runtime_cfg.backend), store=dist.PrefixStore(f"pz/world/{role}/", store),
                            rank=rank, world_size=world, timeout=timeout)
    me = Peer(f"{role}{rank}", f"{role} rank {rank}")
    liveness = Liveness(store, me, rollout_cfg.heartbeat_timeout_s).start()
    return Roles(role, job_rank, job_world, trainers, store, liveness)


def job_world_size() -> int:
    """Ranks of the whole torchrun job (``WORLD_SIZE`` holds the role's world once roles are set)."""
    return int(os.environ.get("PZ_JOB_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
