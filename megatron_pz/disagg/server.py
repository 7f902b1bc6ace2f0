"""What a rollout rank does for the whole run (``rollout.placement: disaggregated``).

It holds one engine with its own weights (``hf`` or vLLM; no Megatron model is ever built here), waits for
training rank 0's messages (:mod:`megatron_pz.disagg.protocol`) and answers them:

* ``PushWeights``: receive the whole model from every pipeline stage's head and load it into the engine;
* ``Generate``: start this rank's units of the step's passages on the stream (:mod:`megatron_pz.disagg.stream`):
  each runs the rollout half of the objective (:func:`megatron_pz.objectives.split.generate`; for PretrainZero
  that is everything, both stages and their text rewards; for RLP the thoughts);
* ``Resume``: generate in windows until the oldest requested step is deliverable (:class:`Driver`), send its
  drafts (``Generated``), and wait again; unfinished samples stay in flight and continue under the weights
  pushed next;
* ``Evaluate``: this rank's slice of the held-out evaluation, greedy, as colocated runs do it;
* ``Snapshot`` / ``Restore``: the partial samples in flight, for a checkpoint and a resumed run;
* ``Stop``: return.

Waiting for a message can last a whole update; it watches training rank 0's heartbeat meanwhile, and any
error here is published in the store before it propagates, so the trainers fail naming this rank.
SIGTERM / SIGUSR1 are left to the trainers (they receive the next batch, save it with the partial samples
in flight, and send ``Stop``).
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch

from megatron_pz.data.dataset import train_and_heldout
from megatron_pz.data.tokenizer import load_tokenizer
from megatron_pz.disagg.bridge import connect_rollout_side, receive_weights
from megatron_pz.disagg.protocol import (Evaluate, Evaluated, Generate, Generated, Hello, PushWeights, Restore,
                                         Resume, Snapshot, Snapshotted, Stop, WorkSplit)
from megatron_pz.disagg.stream import DONE, Stream
from megatron_pz.disagg.roles import DOORBELL_POLL_S, Roles
from megatron_pz.eval.heldout import build_eval_items, generate_eval
from megatron_pz.memory_plan import check_at_startup
from megatron_pz.model.provider import resolve_hf_config
from megatron_pz.objectives.composite import build_training_objective
from megatron_pz.rollout.budget import rollout_context_length
from megatron_pz.rollout.factory import build_own_weights_engine
from megatron_pz.runtime.distributed import resolve_device


class RolloutRank:
    """One rollout rank's end of the bridge: its stage groups, message doorbells and the engine."""

    def __init__(self, cfg, roles: Roles):
        self.cfg, self.roles = cfg, roles
        self.index = roles.rank
        self.device = resolve_device(cfg.runtime.device)
        self.trainer = roles.trainer_peer(0)
        self.received = 0  # messages taken from training rank 0
        self.groups = connect_rollout_side(roles, cfg.parallel.pp, cfg.rollout.bridge_timeout_s, self.device)
        self.version = None
        self.last_push = None

    def receive(self):
        self.received += 1
        self.roles.liveness.wait_for_count(f"pz/ctl/{self.index}", self.received, [self.trainer], poll=DOORBELL_POLL_S)
        return self.groups[0].recv_object(0)

    def send(self, message) -> None:
        self.roles.store.add(f"pz/out/{self.index}", 1)
        self.groups[0].send_object(message, 0)

    def load_weights(self, engine, message: PushWeights) -> None:
        start = time.perf_counter()
        engine.load_weight_buckets(receive_weights(self.groups))
        stats = engine.last_sync
        self.version = message.version
        self.last_push = {"seconds": time.perf_counter() - start, "bytes": float(sum(stats.bucket_bytes)),
                          "buckets": float(len(stats.bucket_bytes))}


def serve(cfg, roles: Roles) -> dict:
    """The life of a rollout rank; returns when training rank 0 says stop. Errors are published first."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: print(f"rollout rank {roles.rank}: stop signal noted; the training ranks "
                                            "drain the batch in flight and stop this rank", flush=True))
    with roles.reporting_errors():
        return serve_messages(cfg, roles)


def serve_messages(cfg, roles: Roles) -> dict:
    """Answer training rank 0's messages until it says stop; generate while told to (:class:`Resume`)."""
    me = RolloutRank(cfg, roles)
    hello = me.receive()
    if not isinstance(hello, Hello):
        raise RuntimeError(f"rollout rank {me.index}: expected Hello first, got {type(hello).__name__}")
    hf_config = resolve_hf_config(cfg)
    check_at_startup(cfg, hf_config, roles.world, me.device.type, rank=roles.rank, rollout_rank=True)
    tokenizer = load_tokenizer(hello.tokenizer_dir)
    dataset, heldout = train_and_heldout(hello.data_path, cfg.data)
    work = WorkSplit(cfg.train.passages_per_step, roles.rollout_ranks, hello.dp_size,
                     per_passage=cfg.rollout.partial_rollout_tokens > 0)
    engine = build_own_weights_engine(cfg.rollout, tokenizer, hf_config, getattr(torch, hello.dtype), me.device,
                                      rollout_context_length(cfg))
    engine.wake()  # its own device: awake for the whole run
    stream = Stream(engine, build_training_objective(cfg.objective, tokenizer), tokenizer, dataset,
                    cfg.rollout.partial_rollout_tokens)
    driver = Driver(me, stream, work, cfg.rollout.max_staleness)
    eval_items = None
    try:
        while True:
            if driver.running:
                driver.advance()
                continue
            message = me.receive()
            if isinstance(message, PushWeights):
                me.load_weights(engine, message)
            elif isinstance(message, Generate):
                driver.request(message)
            elif isinstance(message, Resume):
                driver.resume()
            elif isinstance(message, Snapshot):
                me.send(Snapshotted(me.index, driver.snapshot()))
            elif isinstance(message, Restore):
                driver.restore(message.snapshots.get(me.index))
            elif isinstance(message, Evaluate):
                if message.version != me.version:
                    raise RuntimeError(f"asked to evaluate with weights v{message.version}, this rollout rank holds "
                                       f"v{me.version}")
                start = time.perf_counter()
                eval_items = eval_items or build_eval_items(heldout, cfg)
                totals, samples = generate_eval(engine, tokenizer, heldout, eval_items, cfg, me.index,
                                                roles.rollout_ranks)
                engine.finish_phase()
                me.send(Evaluated(totals, samples, time.perf_counter() - start))
            elif isinstance(message, Stop):  # "stopped": the signal's name when a stop signal ended the run (exit 75)
                return {"role": "rollout", "stopped": message.signal, "reason": message.reason}
            else:
                raise RuntimeError(f"rollout rank {me.index}: unexpected message {type(message).__name__}")
    finally:
        stream.close()


class Driver:
    """What a rollout rank generates when (the lockstep of :mod:`megatron_pz.disagg.stream`).

    Told to :meth:`resume`, it runs windows (at least one while samples are pending) until the oldest requested
    step is deliverable, sends that batch and waits for training rank 0 again. A step is deliverable when all
    its units are done; with partial rollouts (``rollout.partial_rollout_tokens``: the per-step token budget of
    each sample, one window) also with the units that are done then, its unfinished units deferred: they join a
    later batch when done. A unit is deferred only while that keeps it within ``rollout.max_staleness``: the
    step that will train it minus its oldest token's version (the current weights' for a unit with no token yet)
    must stay <= N, else the step waits for it (so a long sample is generated in the background for as many
    steps as the bound allows, never dropped for staleness). Each delivery also takes any deferred unit that
    finished meanwhile."""

    def __init__(self, me: RolloutRank, stream: Stream, work: WorkSplit, max_staleness: int):
        self.me, self.stream, self.work, self.max_staleness = me, stream, work, max_staleness
        self.partial = stream.window_tokens > 0
        self.outstanding: list[int] = []  # steps requested and not delivered, oldest first
        self.deferred: list[tuple[int, int]] = []  # units of delivered steps still generating
        self.running = False
        self.windows = 0  # windows since the last delivery
        self.started = self.waited_from = time.perf_counter()

    def request(self, message: Generate) -> None:
        if message.version != self.me.version:
            raise RuntimeError(f"asked to generate step {message.step} with weights v{message.version}, "
                               f"this rollout rank holds v{self.me.version}")
        for unit in self.work.units_of_worker(self.me.index):
            self.stream.add(message.step, unit, message.passages[self.work.unit_slice(unit)])
        self.outstanding.append(message.step)
        self.stream.settle()

    def resume(self) -> None:
        if not self.outstanding:
            raise RuntimeError(f"rollout rank {self.me.index}: told to resume with no step requested")
        self.running, self.windows = True, 0
        self.started = time.perf_counter()
        self.idle = self.started - self.waited_from

    def advance(self) -> None:
        """Deliver the oldest step if it is deliverable, else run one more window. Each resume runs at least one
        window while rows are pending, so the rank generates while the trainers update (even when the oldest
        step was already complete); a window ends at the token budget or when the oldest unfinished step's rows
        are all done, so later steps' samples are cut there and continue under the next weights (in flight)."""
        step = self.outstanding[0]
        units = self.stream.units_of(step)
        complete = all(t.state == DONE for t in units)
        pending = self.stream.pending_rows()
        if (self.windows or not pending) and (complete or (self.partial and self._finished_any(step)
                                                           and self._may_defer(step, units))):
            self._deliver(step, units, complete)
            return
        if not pending:
            raise RuntimeError(f"rollout rank {self.me.index}: step {step} is not complete and nothing is left to "
                               "generate")
        target = min(t.step for t in self.stream.tasks.values() if t.state != DONE)
        self.stream.window(self.me.version, lambda: self.stream.rows_done(target))
        self.windows += 1

    def _may_defer(self, step: int, units) -> bool:
        """Every unfinished unit of ``step`` and every deferred one can wait for a later batch (trained at
        ``step + 1`` or later) within the staleness bound."""
        waiting = [t for t in units if t.state != DONE] + [self.stream.tasks[key] for key in self.deferred
                                                           if self.stream.tasks[key].state != DONE]
        for task in waiting:
            versions = [v for call in task.calls for row in call for v in row.versions]
            if step + 1 - min(versions, default=self.me.version) > self.max_staleness:
                return False
        return True

    def _finished_any(self, step: int) -> bool:
        return any(t.state == DONE for t in self.stream.units_of(step)) or \
            any(self.stream.tasks[key].state == DONE for key in self.deferred)

    def _deliver(self, step: int, units, complete: bool) -> None:
        keys = [t.key for t in units if t.state == DONE]
        late = [key for key in self.deferred if self.stream.tasks[key].state == DONE]
        self.deferred = [key for key in self.deferred if key not in late] + [t.key for t in units if t.state != DONE]
        drafts = self.stream.pop(late + keys)
        seconds = time.perf_counter() - self.started
        stats = {**self.stream.take_stats(), "rollout/idle_s": self.idle, "rollout/deferred_units": float(len(self.deferred)),
                 "rollout/late_units": float(len(late)), "rollout/inflight_units": float(len(self.stream.tasks))}
        self.outstanding.pop(0)
        self.me.send(Generated(step, self.me.version, self.me.index, drafts, seconds, self.me.last_push, stats))
        self.me.last_push = None
        self.running = False
        self.waited_from = time.perf_counter()

    def snapshot(self) -> dict:
        return {"outstanding": list(self.outstanding), "deferred": list(self.deferred),
                "units": self.stream.snapshot()}

    def restore(self, saved: Optional[dict]) -> None:
        if not saved:
            return
        self.outstanding, self.deferred = list(saved["outstanding"]), [tuple(k) for k in saved["deferred"]]
        self.stream.restore(saved["units"])
