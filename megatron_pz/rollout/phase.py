"""The rollout/train phase protocol, in one place: wake -> sync the new weights -> generate -> sleep.

Every engine, every caller (the RL loop's rollouts and the held-out eval) goes through
:meth:`RolloutPhases.generating`::

    phases = RolloutPhases(engine, actor)
    with phases.generating() as engine:      # wake; push the actor's weights if they changed
        experiences = objective.collect(passages, engine, ...)
    actor.train_step(...)                    # the engine sleeps here (vLLM frees its GPU share)
    phases.weights_updated()                 # the next phase pushes the new weights, once

Weights go to an engine that holds its own copy (``hf``, vLLM: ``engine.owns_weights``) at the start
of the first phase after an update (of every phase when its sleep discards them: vLLM's level 2,
``engine.keeps_weights_asleep`` false), after the actor has finished gathering its parameters
(``overlap_param_gather`` leaves them stale until the next forward otherwise, see
:meth:`megatron_pz.train.actor.Actor.finish_param_sync`). The Megatron engine decodes on the actor's
own modules and needs no copy. ``refresh=False`` (``rollout.refresh_weights: false``) is a diagnostic:
the engine keeps the weights of its first sync, and the rollout-vs-train log-prob drift
(``rollout/logp_diff_mean``) shows what a missing refresh costs.

At the end of a phase the engine's ``finish_phase`` runs before it sleeps: an engine whose
generation is collective over ranks with different prompts (vLLM with its own TP groups) serves its
peers' remaining requests there, so a rank whose objective skipped ``generate`` (no prompts of its
own) does not leave its peers waiting. Callers must therefore not run collectives that span those
ranks between two ``generate`` calls of a phase only some ranks make.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional


class RolloutPhases:
    """Drives an engine through rollout phases; counts weight syncs (``syncs``) for tests/metrics."""

    def __init__(self, engine, actor, refresh: bool = True,
                 on_sync: Optional[Callable[[object], None]] = None):
        self.engine = engine
        self.actor = actor  # anything with .chunks and .finish_param_sync()
        self.refresh = bool(refresh)
        self.on_sync = on_sync  # called after each sync with the engine (weight checks in tests)
        self.stale = True  # the engine starts without the actor's weights
        self.syncs = 0
        self.sync_seconds = 0.0  # time spent pushing weights into the engine, over the run
        self.in_phase = False

    @property
    def owns_weights(self) -> bool:
        return bool(getattr(self.engine, "owns_weights", False))

    def needs_weights(self) -> bool:
        """After an update, or every phase when the engine's sleep discarded its weights (vLLM level 2)."""
        return self.stale or not getattr(self.engine, "keeps_weights_asleep", True)

    def weights_updated(self) -> None:
        """The actor took an optimizer step: the next phase brings the engine up to date."""
        self.stale = True

    def sync(self) -> None:
        """Push the actor's current (fully gathered) weights into the engine."""
        start = time.perf_counter()
        self.actor.finish_param_sync()
        self.engine.update_weights(self.actor.chunks)
        self.sync_seconds += time.perf_counter() - start
        self.syncs += 1
        self.stale = False
        if self.on_sync is not None:
            self.on_sync(self.engine)

    @contextlib.contextmanager
    def generating(self):
        """One rollout phase; yields the engine, awake and up to date."""
        if self.in_phase:
            raise RuntimeError("rollout phases do not nest")
        self.in_phase = True
        try:
            self.engine.wake()
            if self.owns_weights and (self.syncs == 0 or (self.refresh and self.needs_weights())):
                self.sync()
            yield self.engine
            self.engine.finish_phase()
        finally:
            self.engine.sleep()
            self.in_phase = False
