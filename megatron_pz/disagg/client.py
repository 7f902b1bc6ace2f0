"""The training ranks' end of a disaggregated run: the rollout client and the one-step schedule.

:class:`RolloutClient` speaks the protocol (:mod:`megatron_pz.disagg.protocol`) over the bridge
(:mod:`megatron_pz.disagg.bridge`) to the rollout ranks (:mod:`megatron_pz.disagg.server`); :class:`RolloutSchedule`
decides which batch is requested when, with which weights, and what is in flight.

The schedule is the algorithm of staleness. With v_k the weights after k RL steps, one step at
``rollout.max_staleness: 1`` runs (the order of verl's one-step off-policy trainer and slime's
``train_async.py``)::

    wait for batch k (sampled from v_{k-1}) -> push v_k -> request batch k+1 -> score + update on batch k
                                                                (the rollout ranks generate k+1 meanwhile)

so generating batch k+1 overlaps the update on batch k, and every batch after the first is trained one
version after the one that sampled it; the loss's rollout correction against the rollout log-probs
(``grpo.rollout_correction``: truncated importance weights by default) corrects the lag, and its metrics are
logged per lag (``rollout_corr/lag1/k3``). At 0 the push, the request and the wait are back to back:
the papers' on-policy setting, on separate ranks.

A checkpoint holds the batch in flight: a save first waits for it (the next step would wait for it anyway)
and stores its drafts beside the trainer state, so a resumed run trains exactly what the uninterrupted one
would have.
"""

from __future__ import annotations

import io
import pickle
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_pz.disagg.bridge import connect_training_side, push_weights
from megatron_pz.disagg.protocol import Evaluate, Generate, Hello, PushWeights, Stop, WorkSplit
from megatron_pz.eval.heldout import eval_metrics


@dataclass
class RolloutBatch:
    """One step's rollouts as a training rank holds them: the drafts of its data-parallel replica's units."""

    step: int  # the RL step (0-based) that trains on it
    version: int  # the weights that sampled it
    passages: list[int]  # the global batch (dataset indices)
    drafts: list  # this replica's units, in order
    stats: dict[str, float] = field(default_factory=dict)


class RolloutClient:
    """The training ranks' end of the bridge. Training rank 0 talks to the rollout ranks, each pipeline
    stage's head pushes its stage's weights, and every training rank takes part in the export and receives
    its replica's share of each batch. Every method is collective over the training ranks."""

    def __init__(self, roles, run, actor):
        from megatron.core import parallel_state as ps

        self.roles, self.run, self.actor, self.cfg = roles, run, actor, run.cfg
        self.n = roles.rollout_ranks
        self.work = WorkSplit(run.cfg.train.passages_per_step, self.n, run.dp_size)
        self.peers = [roles.rollout_peer(i) for i in range(self.n)]
        head = run.dp_rank == 0 and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        self.group = connect_training_side(roles, ps.get_pipeline_model_parallel_rank() if head else None,
                                           run.cfg.rollout.bridge_timeout_s, run.info.device)
        self.dp_of: list = [None] * dist.get_world_size()  # training rank -> its data-parallel replica
        dist.all_gather_object(self.dp_of, run.dp_rank)
        self.answers = 0  # answers taken from each rollout rank
        dtype = next(p.dtype for c in actor.chunks for p in c.parameters())
        self._tell(Hello(str(run.dataset.tokenizer_dir), str(run.data_path), str(dtype).replace("torch.", ""),
                         run.dp_size))

    @property
    def talks(self) -> bool:
        return dist.get_rank() == 0

    def _tell(self, message) -> None:
        """Training rank 0: ring each rollout rank's doorbell, then send it ``message``."""
        if not self.talks:
            return
        for i in range(self.n):
            self.roles.store.add(f"pz/ctl/{i}", 1)
            self.group.send_object(message, 1 + i)

    def _answers(self) -> tuple[list, float, int]:
        """Training rank 0: every rollout rank's next answer (waiting while watching all of them), the
        seconds spent receiving and the bytes received."""
        self.answers += 1
        out, seconds, nbytes = [], 0.0, 0
        for i in range(self.n):
            self.roles.liveness.wait_for_count(f"pz/out/{i}", self.answers, self.peers)
            start = time.perf_counter()
            out.append(self.group.recv_object(1 + i))
            seconds += time.perf_counter() - start
            nbytes += self.group.last_bytes
        return out, seconds, nbytes

    def push(self, version: int) -> float:
        """Send weights v_``version`` to every rollout rank; returns the seconds it took."""
        start = time.perf_counter()
        self.actor.finish_param_sync()  # overlap_param_gather: export fully gathered values
        self._tell(PushWeights(version))
        push_weights(self.group, self.actor.chunks, self.run.hf_config, self.cfg.rollout.bucket_mb * 2**20)
        return time.perf_counter() - start

    def request(self, step: int, version: int, passages: list[int]) -> None:
        self._tell(Generate(step, version, passages))

    def collect(self, step: int, version: int, passages: list[int]) -> RolloutBatch:
        """The answers to ``request(step, ...)``: each training rank gets its replica's units."""
        shares = None
        if self.talks:
            answers, seconds, nbytes = self._answers()
            drafts: dict = {}
            for answer in answers:
                if (answer.step, answer.version) != (step, version):
                    raise RuntimeError(f"rollout rank {answer.worker} answered step {answer.step} (v{answer.version}) "
                                       f"to a request for step {step} (v{version})")
                drafts.update(answer.drafts)
            stats = {"time/rollout_s": max(a.seconds for a in answers), "bridge/batch_s": seconds,
                     "bridge/batch_mb": nbytes / 1e6}
            push = answers[0].push
            if push:  # the receive side of the weight push that preceded this batch
                stats.update({"bridge/push_s": push["seconds"], "bridge/push_gb": push["bytes"] / 1e9,
                              "bridge/push_gbps": push["bytes"] / 1e9 / max(push["seconds"], 1e-9)})
            shares = [RolloutBatch(step, version, passages, [drafts[u] for u in self.work.units_of_replica(dp)],
                                   stats) for dp in self.dp_of]
        box: list = [None]
        dist.scatter_object_list(box, shares, src=0)
        return box[0]

    def evaluate(self, step: int, version: int) -> tuple[dict, list]:
        """Held-out eval on the rollout ranks; the metrics on every training rank, the samples on rank 0."""
        self._tell(Evaluate(step, version))
        box: list = [None]
        samples: list = []
        if self.talks:
            answers, _, _ = self._answers()
            totals = [sum(values) for values in zip(*(a.totals for a in answers))]
            samples = [s for a in answers for s in a.samples]
            box = [eval_metrics(totals)]
        dist.broadcast_object_list(box, src=0)
        return box[0], samples

    def stop(self, reason: str, signal: Optional[str] = None) -> None:
        self._tell(Stop(reason, signal))


class RolloutSchedule:
    """Which batch is requested when, with which weights, and what is in flight (see the module docstring)."""

    def __init__(self, client: RolloutClient, sampler, staleness: int, steps: int):
        self.client, self.sampler, self.staleness, self.steps = client, sampler, staleness, steps
        self.pushed: Optional[int] = None  # the weight version the rollout ranks hold
        self.inflight: Optional[tuple[int, int, list[int]]] = None  # (step, version, passages) requested
        self.ready: Optional[RolloutBatch] = None  # received, not trained yet
        self.redo: Optional[list[int]] = None  # passages of a saved batch that has to be generated again
        self.timing: dict[str, float] = {}

    def _weights(self, version: int) -> None:
        if self.pushed != version:
            self.timing["time/push_s"] = self.timing.get("time/push_s", 0.0) + self.client.push(version)
            self.pushed = version

    def _request(self, step: int, version: int, passages: list[int]) -> None:
        self._weights(version)
        self.client.request(step, version, passages)
        self.inflight = (step, version, passages)

    def drain(self) -> None:
        """Wait for the batch in flight, if any."""
        if self.inflight is not None:
            start = time.perf_counter()
            self.ready = self.client.collect(*self.inflight)
            self.inflight = None
            self.timing["time/wait_rollout_s"] = self.timing.get("time/wait_rollout_s", 0.0) \
                + time.perf_counter() - start

    def batch_for(self, step: int) -> RolloutBatch:
        """The batch RL step ``step`` trains on (the weights hold version ``step``); at staleness 1 the
        next step's batch is requested before returning, from these weights."""
        self.timing = {}
        if self.ready is None and self.inflight is None:  # the first step, or nothing was saved in flight
            passages = self.redo or self.sampler.next_global_indices()
            self.redo = None
            self._request(step, step, passages)
        self.drain()
        batch, self.ready = self.ready, None
        if batch.step != step:
            raise RuntimeError(f"the batch at hand was made for step {batch.step}, not {step}")
        if self.staleness and step + 1 < self.steps:
            self._request(step + 1, step, self.sampler.next_global_indices())
        return batch

    def evaluate(self, step: int) -> tuple[dict, list]:
        """The held-out eval with weights v_``step`` (the batch in flight is received first)."""
        self.drain()
        self._weights(step)
        return self.client.evaluate(step, step)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict:
        """What a save must hold to resume with a batch in flight: its identity (common to all ranks) and this
        rank's drafts (pickled into a tensor: the checkpoint loader only unpickles tensors and plain data)."""
        self.drain()
        batch = self.ready
        if batch is None:
            return {"rollout_batch": None}
        run, work = self.client.run, self.client.work
        meta = {"step": batch.step, "version": batch.version, "passages": batch.passages, "dp": run.dp_size,
                "units": work.units}
        mine = torch.frombuffer(bytearray(pickle.dumps((run.dp_rank, batch))), dtype=torch.uint8)
        return {"rollout_batch": meta, "per_rank": {"rollout_batch": mine}}

    def restore(self, state: Optional[dict]) -> None:
        """Take back the batch in flight of a checkpoint; when this layout cannot use its drafts (another
        data-parallel size or world), its passages are generated again from the current weights."""
        meta = (state or {}).get("rollout_batch")
        if not meta:
            return
        run, work = self.client.run, self.client.work
        mine = None
        saved = (state.get("per_rank") or {}).get("rollout_batch") if state.get("per_rank_restored") else None
        if saved is not None and (meta["dp"], meta["units"]) == (run.dp_size, work.units):
            dp_rank, batch = SavedBatchUnpickler(io.BytesIO(saved.numpy().tobytes())).load()
            mine = batch if dp_rank == run.dp_rank else None
        usable = torch.tensor([int(mine is not None)])
        dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item():
            self.ready = mine
            return
        self.redo = list(meta["passages"])
        if dist.get_rank() == 0:
            print(f"resume: the batch in flight of RL step {meta['step'] + 1} was saved for {meta['dp']} data-parallel "
                  f"replicas and {meta['units']} units; this layout generates its passages again from the current "
                  "weights (one on-policy step)", flush=True)


class SavedBatchUnpickler(pickle.Unpickler):
    """Reads a checkpoint's batch in flight, also one saved before :class:`RolloutBatch` moved here from
    ``megatron_pz.train.async_loop`` (a run stopped under the old layout resumes under this one)."""

    def find_class(self, module, name):
        return super().find_class(__name__ if module == "megatron_pz.train.async_loop" else module, name)
