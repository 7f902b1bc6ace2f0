"""Where an RL step's time goes: generation, scoring, weight sync, update, and the tokens/s of each.

The rollout phase of a colocated step (``objective.collect`` inside :meth:`RolloutPhases.generating`) is more
than generation: it pushes the new weights into an engine that owns a copy (``RolloutPhases.sync_seconds``)
and runs the objective's Megatron forward passes (RLP's policy and EMA log-probs, entropy positions:
``MegatronScorer.seconds``). The rest of the phase is generation (:class:`RolloutClock`, used by
:class:`~megatron_pz.train.colocated.ColocatedSource`). The update is every forward/backward of ``grpo_update``
(:func:`update_metrics`, the RL loop's, for both placements). Tokens per second: generated tokens (every
replica's), tokens the scorer ran through the model (prompt and response), tokens of the update's
micro-batches (padding excluded).
"""

from __future__ import annotations

import time


class RolloutClock:
    """``start()`` before a rollout phase, ``finish(experiences)`` after it: its time/* and tokens_per_s/* parts."""

    def __init__(self, phases, scorer):
        self.phases = phases
        self.scorer = scorer

    def _counters(self) -> tuple[float, float, float, int]:
        return (time.perf_counter(), getattr(self.phases, "sync_seconds", 0.0), getattr(self.scorer, "seconds", 0.0),
                getattr(self.scorer, "tokens", 0))

    def start(self) -> None:
        self.before = self._counters()

    def finish(self, experiences, dp_size: int = 1) -> dict[str, float]:
        after = self._counters()
        phase, sync, score, scored = (a - b for a, b in zip(after, self.before))
        generate = max(0.0, phase - sync - score)
        generated = sum(len(e.response_ids) for e in experiences) * dp_size
        return {"time/generate_s": generate, "time/score_s": score, "time/sync_s": sync,
                "tokens_per_s/generate": generated / max(generate, 1e-9),
                "tokens_per_s/score": scored * dp_size / max(score, 1e-9) if scored else 0.0}


def update_metrics(seconds: float, batches, dp_size: int = 1) -> dict[str, float]:
    """The update's time and tokens/s (``batches``: this rank's micro-batches of the step's updates)."""
    updated = sum(sum(mb.lengths) for mb in batches) * dp_size
    return {"time/update_s": seconds, "tokens_per_s/update": updated / max(seconds, 1e-9)}
