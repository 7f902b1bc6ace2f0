"""A rollout rank's generation: units of several steps in flight, decoded in windows, weights loaded between them.

Each requested *unit* (:class:`~megatron_pz.disagg.protocol.WorkSplit`: a slice of one step's passages) runs
its objective's rollout half (:func:`megatron_pz.objectives.split.generate`: PretrainZero's two stages, RLP's
thoughts, ...) in a thread of its own, against a :class:`UnitEngine`: its ``generate(prompts, params)`` turns
the call into :class:`~megatron_pz.rollout.base.Row` s (one per sample, seeded as the engine seeds them) and
blocks. The rank's driver (:func:`megatron_pz.disagg.server.serve_messages`) waits until every unit is blocked
or done (:meth:`Stream.settle`), then runs one **window** (:meth:`Stream.window`): one
``engine.generate_rows`` call over the unfinished rows of *all* units, oldest step first, so the short samples
of later steps fill the batch while a long one finishes (continuous batching across units and steps). Units
whose rows are all finished continue (PretrainZero's predictor stage follows its generator stage), and so on.

Between two windows the rank may load new weights: the unfinished rows continue from their prefix under them
(in-flight weight updates, as AReaL's interruptible rollouts and PipelineRL do; the prefix is re-encoded under
the new weights). Every token records the version of the window that sampled it (``Row.versions``).

Determinism: objective code runs only while the driver waits for it, rows are ordered by (step, unit, call,
sample), each row's noise depends only on its own seed and position, and the driver reads training rank 0's
messages only while it waits for them (protocol module docstring). So what a rank generates depends on the
messages, never on thread or network timing, and :meth:`Stream.snapshot` / :meth:`Stream.restore` carry the
partial samples through a checkpoint: a restored unit replays its objective against the saved rows (finished
calls return them, unfinished rows continue), which rebuilds every thread's state exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_pz.config import ConfigError
from megatron_pz.objectives import split as objective_split
from megatron_pz.rollout.common import StopChecker, request_rows, row_completion

RUNNING, BLOCKED, DONE, FAILED = "running", "blocked", "done", "failed"


@dataclass
class UnitTask:
    """One unit's objective half in its thread; ``calls`` is the replay record (every engine call's rows)."""

    step: int
    unit: int
    passages: list[int]  # dataset indices
    calls: list = field(default_factory=list)  # list[list[Row]], in call order
    replay: list = field(default_factory=list)  # a restored unit's saved calls
    state: str = RUNNING
    waiting: list = field(default_factory=list)  # the unfinished rows of the call it is blocked on
    result: Any = None  # the draft
    error: Optional[BaseException] = None
    thread: Optional[threading.Thread] = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.unit)


class UnitEngine:
    """The engine as one unit's objective sees it: ``generate`` queues rows on the stream and blocks until the
    driver has finished them; anything else is the real engine's (read-only attributes)."""

    def __init__(self, stream: "Stream", task: UnitTask):
        self._stream, self._task = stream, task

    def generate(self, prompts, params):
        return self._stream.submit(self._task, prompts, params)

    def __getattr__(self, name):
        return getattr(self._stream.engine, name)


class Stream:
    """The units in flight on one rollout rank (see the module docstring). Engine calls happen on the driver's
    thread only; units block in :meth:`submit`."""

    def __init__(self, engine, objective, tokenizer, dataset, window_tokens: int = 0):
        self.engine, self.objective, self.tokenizer, self.dataset = engine, objective, tokenizer, dataset
        self.window_tokens = int(window_tokens)  # rollout.partial_rollout_tokens (0: a window runs rows to the end)
        # an engine that cannot cut rows (vLLM spanning several ranks, or capturing MoE routes: rollout/vllm_engine.py)
        # runs each unit's engine call whole, as one generate() of its group: no token budget, no in-flight cut
        self.whole_calls = not getattr(engine, "rows_in_windows", True)
        if self.whole_calls and self.window_tokens:
            raise ConfigError("rollout.partial_rollout_tokens needs a rollout engine that continues samples over "
                              "windows: a vLLM engine of one rank without MoE route capture (set "
                              "rollout.tensor_parallel_size=1 and rollout.routing_replay=off) or rollout.engine=hf")
        self.tasks: dict[tuple[int, int], UnitTask] = {}
        self.cond = threading.Condition()
        self.tokens = 0  # tokens generated since the last delivery (:meth:`take_stats`)
        self.windows = 0
        self.decode_steps = 0

    # ------------------------------------------------------------------ units

    def add(self, step: int, unit: int, passages: list[int], replay: Optional[list] = None) -> None:
        """Start unit ``unit`` of step ``step`` (its thread runs until its first engine call)."""
        task = UnitTask(step, unit, list(passages), replay=list(replay or []))
        self.tasks[task.key] = task
        task.thread = threading.Thread(target=self._run, args=(task,), name=f"pz-unit-{step}-{unit}", daemon=True)
        task.thread.start()

    def _run(self, task: UnitTask) -> None:
        try:
            passages = [self.dataset[i] for i in task.passages]
            result = objective_split.generate(self.objective, passages, UnitEngine(self, task), task.step)
            with self.cond:
                task.result, task.state = result, DONE
                self.cond.notify_all()
        except BaseException as error:  # re-raised on the driver's thread (settle)
            with self.cond:
                task.error, task.state = error, FAILED
                self.cond.notify_all()

    def submit(self, task: UnitTask, prompts, params) -> list:
        """A unit's engine call (its thread): rows for the request (or the saved ones of a restored unit), wait
        until the driver has finished them, then the completions grouped per prompt."""
        call = len(task.calls)
        if call < len(task.replay):
            rows = task.replay[call]
            if [list(r.prompt_ids) for r in rows] != [list(p) for p in prompts for _ in range(params.n)]:
                raise RuntimeError(f"restored unit {task.unit} of step {task.step}: engine call {call} asks for other "
                                   "prompts than the checkpoint's partial samples (the objective or its config "
                                   "changed since the save)")
        else:
            if params.seed is None:  # the engine would seed it from its call count, which depends on thread order
                raise RuntimeError("an objective called the engine without a seed; the stream needs explicit seeds")
            rows = request_rows(prompts, params, params.seed)
        task.calls.append(rows)
        with self.cond:
            task.waiting = [r for r in rows if not r.done]
            if task.waiting:
                task.state = BLOCKED
                self.cond.notify_all()
                self.cond.wait_for(lambda: task.state == RUNNING)
        stops = StopChecker(self.tokenizer, params.stop)
        done = [row_completion(r, stops) for r in rows]
        return [done[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def settle(self) -> None:
        """Wait until every unit is blocked on the engine or done; a unit's error is raised here."""
        with self.cond:
            self.cond.wait_for(lambda: all(t.state != RUNNING for t in self.tasks.values()))
            for task in self.tasks.values():
                if task.state == FAILED:
                    raise RuntimeError(f"unit {task.unit} of step {task.step} failed on the rollout rank: "
                                       f"{type(task.error).__name__}: {task.error}") from task.error

    # ------------------------------------------------------------------ windows

    def pending_rows(self) -> list:
        return [r for key in sorted(self.tasks) for r in self.tasks[key].waiting if not r.done]

    def window(self, version: int, until_done: Optional[Callable[[], bool]] = None) -> None:
        """One engine call over every unfinished row (oldest step first) with weights ``version``: at most
        ``window_tokens`` new tokens per row (0: no budget), ended early when ``until_done()`` holds;
        then the units whose rows are all finished continue, and the stream settles again."""
        rows = self.pending_rows()
        before = sum(len(r.token_ids) for r in rows)
        if self.whole_calls:
            self._whole_calls(version)
        else:
            self.decode_steps += int(self.engine.generate_rows(rows, version, max_new=self.window_tokens or None,
                                                               until=until_done) or 0)
        self.tokens += sum(len(r.token_ids) for r in rows) - before
        self.windows += 1
        with self.cond:
            for task in self.tasks.values():
                if task.state == BLOCKED and all(r.done for r in task.waiting):
                    task.waiting, task.state = [], RUNNING
            self.cond.notify_all()
        self.settle()

    def _whole_calls(self, version: int) -> None:
        """Every blocked unit's engine call through ``engine.generate`` (collective over a vLLM engine group, whose
        members serve each other's calls in ``finish_phase``), its rows filled from the completions."""
        for key in sorted(self.tasks):
            task = self.tasks[key]
            if task.state != BLOCKED:
                continue
            rows = task.calls[-1]
            if any(r.token_ids for r in rows):
                raise RuntimeError(f"unit {task.unit} of step {task.step}: partial samples cannot continue on this "
                                   "engine (a checkpoint of another rollout engine layout); resume with that layout")
            params = rows[0].params
            prompts = [rows[i * params.n].prompt_ids for i in range(len(rows) // params.n)]
            for row, done in zip(rows, [c for group in self.engine.generate(prompts, params) for c in group]):
                row.token_ids, row.logprobs = list(done.token_ids), list(done.logprobs or [])
                row.versions, row.finish_reason, row.routes = [version] * len(done.token_ids), done.finish_reason, done.routes
        self.engine.finish_phase()

    def take_stats(self) -> dict[str, float]:
        stats = {"rollout/windows": float(self.windows), "rollout/decode_steps": float(self.decode_steps),
                 "rollout/tokens": float(self.tokens)}
        self.tokens = self.windows = self.decode_steps = 0
        return stats

    # ------------------------------------------------------------------ what a step delivers

    def units_of(self, step: int) -> list[UnitTask]:
        return [t for key, t in sorted(self.tasks.items()) if key[0] == step]

    def rows_done(self, step: int) -> bool:
        """Every row that step ``step``'s units are blocked on is finished (a window may end there)."""
        return all(r.done for t in self.units_of(step) for r in t.waiting)

    def pop(self, keys) -> dict[tuple[int, int], Any]:
        """Hand over the drafts of finished units (they leave the stream)."""
        out = {}
        for key in keys:
            task = self.tasks.pop(key)
            task.thread.join()
            out[key] = task.result
        return out

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> dict:
        """Every unit in flight: its passages and the rows of each engine call so far (finished or partial).
        Called only while settled (no unit thread runs)."""
        return {key: {"passages": t.passages, "calls": t.calls} for key, t in sorted(self.tasks.items())}

    def restore(self, snapshot: dict) -> None:
        """Start the saved units again; each replays its objective against its saved rows (module docstring)."""
        for (step, unit), saved in sorted(snapshot.items()):
            self.add(step, unit, saved["passages"], replay=saved["calls"])
        self.settle()

    def close(self) -> None:
        """Release blocked unit threads (they are daemons; a stopped rank leaves them behind)."""
        self.tasks.clear()
