"""The training ranks' end of a disaggregated run: the rollout client and the schedule of staleness.

:class:`RolloutClient` speaks the protocol (:mod:`megatron_pz.disagg.protocol`) over the bridge
(:mod:`megatron_pz.disagg.bridge`) to the rollout ranks (:mod:`megatron_pz.disagg.server`); :class:`RolloutSchedule`
decides which batch is requested when, with which weights, and what is in flight.

The schedule is the algorithm of staleness. With v_k the weights after k RL steps and N =
``rollout.max_staleness``, step k runs::

    [rollout ranks waiting: push v_k, request steps up to k + max(N-1, 0), resume]
    wait for batch k -> push v_k, request step k+N, resume -> score + update on batch k
                                      (the rollout ranks generate k+1 .. k+N meanwhile)

At N = 1 this is the order of verl's one-step off-policy trainer and slime's ``train_async.py``: batch k+1 is
generated from v_k while the update on batch k runs. At N >= 2 the rollout ranks hold N steps in flight, load
each new version between decode windows (in-flight updates, :mod:`megatron_pz.disagg.stream`) and every token
records the version that sampled it; a sample's staleness (this trainer's version minus its oldest token's) is
at most N by construction, unless partial rollouts (``rollout.partial_rollout_tokens``) deferred it to a later
batch: :func:`megatron_pz.rl.staleness.apply_staleness` then drops it or masks its stale tokens. The loss's
rollout correction (``grpo.rollout_correction``) corrects the lag, its metrics are logged per lag
(``rollout_corr/lag1/k3``). At N = 0 the push, the request and the wait are back to back: the papers'
on-policy setting, on separate ranks.

Training rank 0 speaks only while the rollout ranks wait (after they delivered a batch), so what they
generate never depends on timing. A checkpoint first receives the next batch (the next step would wait for it
anyway; the rollout ranks then wait), stores it beside the trainer state with every rollout rank's partial
samples in flight (:class:`~megatron_pz.disagg.protocol.Snapshot`), and a resumed run hands them back
(:class:`~megatron_pz.disagg.protocol.Restore`): it trains exactly what the uninterrupted run would have.
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
from megatron_pz.disagg.roles import DOORBELL_POLL_S
from megatron_pz.disagg.protocol import (Evaluate, Generate, Hello, PushWeights, Restore, Resume, Snapshot, Stop,
                                         WorkSplit)
from megatron_pz.eval.heldout import eval_metrics


@dataclass
class RolloutBatch:
    """One step's rollouts as a training rank holds them: the drafts of its data-parallel replica's units."""

    step: int  # the RL step (0-based) that trains on it
    version: int  # the weights that were requested to sample it (tokens carry their own versions)
    passages: list[int]  # the global batch requested for this step (dataset indices)
    drafts: list  # this replica's units, in (step, unit) order: deferred units of earlier steps first
    stats: dict[str, float] = field(default_factory=dict)
    units: list = field(default_factory=list)  # (step, unit) of each draft


class RolloutClient:
    """The training ranks' end of the bridge. Training rank 0 talks to the rollout ranks, each pipeline
    stage's head pushes its stage's weights, and every training rank takes part in the export and receives
    its replica's share of each batch. Every method is collective over the training ranks."""

    def __init__(self, roles, run, actor):
        from megatron.core import parallel_state as ps

        self.roles, self.run, self.actor, self.cfg = roles, run, actor, run.cfg
        self.n = roles.rollout_ranks
        self.work = WorkSplit(run.cfg.train.passages_per_step, self.n, run.dp_size,
                              per_passage=run.cfg.rollout.partial_rollout_tokens > 0)
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
            self.roles.liveness.wait_for_count(f"pz/out/{i}", self.answers, self.peers, poll=DOORBELL_POLL_S)
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

    def resume(self) -> None:
        self._tell(Resume())

    def collect(self, step: int, version: int, passages: list[int]) -> RolloutBatch:
        """The rollout ranks' delivery of step ``step``: each training rank gets its replica's units (by unit
        index; a deferred unit of an earlier step goes where its index goes)."""
        shares = None
        if self.talks:
            answers, seconds, nbytes = self._answers()
            drafts: dict = {}
            for answer in answers:
                if answer.step != step:
                    raise RuntimeError(f"rollout rank {answer.worker} delivered step {answer.step} (v{answer.version}) "
                                       f"when step {step} was due")
                drafts.update(answer.drafts)
            stats = {"time/rollout_s": max(a.seconds for a in answers), "bridge/batch_s": seconds,
                     "bridge/batch_mb": nbytes / 1e6}
            for answer in answers:  # counts add up over rollout ranks, times are the slowest rank's
                for key, value in answer.stats.items():
                    stats[key] = max(stats.get(key, 0.0), value) if key.endswith("_s") else stats.get(key, 0.0) + value
            push = answers[0].push
            if push:  # the receive side of the weight push that preceded this batch
                stats.update({"bridge/push_s": push["seconds"], "bridge/push_gb": push["bytes"] / 1e9,
                              "bridge/push_gbps": push["bytes"] / 1e9 / max(push["seconds"], 1e-9)})
            shares = []
            for dp in self.dp_of:
                mine = set(self.work.units_of_replica(dp))
                keys = sorted(key for key in drafts if key[1] in mine)
                shares.append(RolloutBatch(step, version, passages, [drafts[k] for k in keys], stats, keys))
        box: list = [None]
        dist.scatter_object_list(box, shares, src=0)
        return box[0]

    def snapshot(self) -> dict:
        """Every rollout rank's partial samples in flight (training rank 0 holds them; {} on the others)."""
        self._tell(Snapshot())
        if not self.talks:
            return {}
        answers, _, _ = self._answers()
        return {a.worker: a.state for a in answers}

    def restore(self, snapshots: dict) -> None:
        self._tell(Restore(snapshots))

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
        self.requested: dict[int, tuple[int, list[int]]] = {}  # step -> (version, passages), not yet delivered
        self.waiting = True  # the rollout ranks wait for training rank 0 (they generate only after Resume)
        self.ready: Optional[RolloutBatch] = None  # received, not trained yet
        self.redo: dict[int, list[int]] = {}  # passages of saved steps to generate again (another layout)
        self.next_request: Optional[int] = None  # the next step to request (None: the step first asked for)
        self.timing: dict[str, float] = {}

    def _weights(self, version: int) -> None:
        if self.pushed != version:
            self.timing["time/push_s"] = self.timing.get("time/push_s", 0.0) + self.client.push(version)
            self.pushed = version

    def _request_through(self, last: int, version: int) -> None:
        """Request every step up to ``last`` (< train.steps) not requested yet, from weights ``version``."""
        if self.next_request is None:
            self.next_request = version
        for step in range(self.next_request, min(last, self.steps - 1) + 1):
            passages = self.redo.pop(step, None) or self.sampler.next_global_indices()
            self._weights(version)
            self.client.request(step, version, passages)
            self.requested[step] = (version, passages)
            self.next_request = step + 1

    def _resume(self) -> None:
        if self.waiting and self.requested:
            self.client.resume()
            self.waiting = False

    def drain(self) -> None:
        """Receive the next batch if the rollout ranks are generating (they wait afterwards)."""
        if not self.waiting:
            start = time.perf_counter()
            step = min(self.requested)
            version, passages = self.requested.pop(step)
            self.ready = self.client.collect(step, version, passages)
            self.waiting = True
            self.timing["time/wait_rollout_s"] = self.timing.get("time/wait_rollout_s", 0.0) \
                + time.perf_counter() - start

    def batch_for(self, step: int) -> RolloutBatch:
        """The batch RL step ``step`` trains on (the weights hold version ``step``); at staleness N >= 1 the
        rollout ranks are set going again on steps up to ``step + N`` before returning."""
        self.timing = {}
        if self.ready is None:
            if self.waiting:  # nothing in flight: the first step, a run at staleness 0, or a resume
                self._request_through(step + max(self.staleness - 1, 0), step)
                self._resume()
            self.drain()
        batch, self.ready = self.ready, None
        if batch is None or batch.step != step:
            raise RuntimeError(f"the batch at hand was made for step {batch and batch.step}, not {step}")
        if self.staleness:
            self._request_through(step + self.staleness, step)
            self._weights(step)  # the in-flight samples continue under the newest weights
            self._resume()
        return batch

    def evaluate(self, step: int) -> tuple[dict, list]:
        """The held-out eval with weights v_``step`` (the next batch is received first)."""
        self.drain()
        self._weights(step)
        return self.client.evaluate(step, step)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict:
        """What a save must hold to resume with batches in flight: the steps requested (common to all ranks),
        this rank's drafts of the batch received (pickled into a tensor: the checkpoint loader only unpickles
        tensors and plain data) and, on training rank 0, every rollout rank's partial samples."""
        self.drain()
        run, work = self.client.run, self.client.work
        batch = self.ready
        meta = {"dp": run.dp_size, "units": work.units, "rollout_ranks": self.client.n,
                "requested": {int(s): [int(v), [int(p) for p in ps]] for s, (v, ps) in self.requested.items()},
                "step": batch.step if batch else None, "version": batch.version if batch else None,
                "passages": batch.passages if batch else None}
        snapshots = self.client.snapshot() if self.requested else {}
        mine = torch.frombuffer(bytearray(pickle.dumps((run.dp_rank, batch, snapshots))), dtype=torch.uint8)
        return {"rollout_batch": meta, "per_rank": {"rollout_batch": mine}}

    def restore(self, state: Optional[dict]) -> None:
        """Take back a checkpoint's batches in flight; when this layout cannot use them (another data-parallel
        size, unit count or number of rollout ranks), their passages are generated again from the current
        weights."""
        meta = (state or {}).get("rollout_batch")
        if not meta:
            return
        run, work = self.client.run, self.client.work
        mine = None
        saved = (state.get("per_rank") or {}).get("rollout_batch") if state.get("per_rank_restored") else None
        same = (meta["dp"], meta["units"], meta.get("rollout_ranks", self.client.n)) == \
            (run.dp_size, work.units, self.client.n)
        if saved is not None and same:
            loaded = SavedBatchUnpickler(io.BytesIO(saved.numpy().tobytes())).load()
            dp_rank, batch, snapshots = loaded if len(loaded) == 3 else (*loaded, {})
            mine = (batch, snapshots) if dp_rank == run.dp_rank else None
        usable = torch.tensor([int(mine is not None)])
        dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        requested = {int(s): (int(v), list(ps)) for s, (v, ps) in (meta.get("requested") or {}).items()}
        if usable.item():
            self.ready, snapshots = mine
            self.requested = requested
            steps = list(requested) + ([self.ready.step] if self.ready is not None else [])
            self.next_request = max(steps) + 1 if steps else None
            if requested:
                self.client.restore(snapshots)
                if dist.get_rank() == 0:
                    rows = [r for snap in snapshots.values() for unit in snap["units"].values()
                            for call in unit["calls"] for r in call]
                    partial = [r for r in rows if not r.done and r.token_ids]
                    print(f"resume: steps {', '.join(str(s + 1) for s in sorted(requested))} in flight handed back to "
                          f"the rollout ranks: {len(rows)} samples, {len(partial)} of them partial "
                          f"({sum(len(r.token_ids) for r in partial)} tokens kept)", flush=True)
            return
        self.redo = {s: ps for s, (_, ps) in requested.items()}
        if meta.get("step") is not None:
            self.redo[int(meta["step"])] = list(meta["passages"])
        self.next_request = min(self.redo) if self.redo else None
        if dist.get_rank() == 0:
            print(f"resume: the batches in flight of RL steps {sorted(s + 1 for s in self.redo)} were saved for "
                  f"{meta['dp']} data-parallel replicas, {meta['units']} units and "
                  f"{meta.get('rollout_ranks', '?')} rollout ranks; this layout generates their passages again from "
                  "the current weights", flush=True)


class SavedBatchUnpickler(pickle.Unpickler):
    """Reads a checkpoint's batch in flight, also one saved before :class:`RolloutBatch` moved here from
    ``megatron_pz.train.async_loop`` (a run stopped under the old layout resumes under this one)."""

    def find_class(self, module, name):
        return super().find_class(__name__ if module == "megatron_pz.train.async_loop" else module, name)
