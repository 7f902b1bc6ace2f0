"""Where an RL step's time goes: generation, scoring, weight sync, update, and the tokens/s of each.

The rollout phase of a step (``objective.collect`` inside :meth:`RolloutPhases.generating`) is more than
generation: it pushes the new weights into an engine that owns a copy (``RolloutPhases.sync_seconds``)
and runs the objective's Megatron forward passes (RLP's policy and EMA log-probs, entropy positions:
``MegatronScorer.seconds``). The rest of the phase is generation. The update is every forward/backward
of ``grpo_update``. Tokens per second: generated tokens (every replica's), tokens the scorer ran through
the model (prompt and response), tokens of the update's micro-batches (padding excluded).
"""

from __future__ import annotations

import time


class StepClock:
    """``start()`` before the rollout phase, ``rollout_done()`` after it, ``finish(...)`` after the update."""

    def __init__(self, phases, scorer):
        self.phases = phases
        self.scorer = scorer

    def _counters(self) -> tuple[float, float, int]:
        return (getattr(self.phases, "sync_seconds", 0.0), getattr(self.scorer, "seconds", 0.0),
                getattr(self.scorer, "tokens", 0))

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = self._counters()

    def rollout_done(self) -> None:
        self.t1 = time.perf_counter()
        self.c1 = self._counters()

    def finish(self, experiences, batches, dp_size: int = 1) -> dict[str, float]:
        t2 = time.perf_counter()
        sync, score = self.c1[0] - self.c0[0], self.c1[1] - self.c0[1]
        scored = self.c1[2] - self.c0[2]
        generate = max(0.0, self.t1 - self.t0 - sync - score)
        generated = sum(len(e.response_ids) for e in experiences) * dp_size
        updated = sum(sum(mb.lengths) for mb in batches) * dp_size
        update = t2 - self.t1
        return {"time/generate_s": generate, "time/score_s": score, "time/sync_s": sync, "time/update_s": update,
                "tokens_per_s/generate": generated / max(generate, 1e-9),
                "tokens_per_s/score": scored * dp_size / max(score, 1e-9) if scored else 0.0,
                "tokens_per_s/update": updated / max(update, 1e-9)}
