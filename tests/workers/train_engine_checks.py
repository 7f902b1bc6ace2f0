"""`megatron-pz train ...` with observation points on the rollout engine (tests/test_trainer.py).

Wraps, without changing what they do: every rollout phase (after its weight sync, the ``hf`` engine's
weights are compared with the actor's export, bit for bit; the vLLM engine's post-reload refresh and the
CPU build's shared-memory segments are recorded), ``Actor.train_step`` (is every engine asleep?), and
the objective's ``collect`` (a digest of the experiences of each step). Each rank writes what it saw to
``<train.run_dir>/engine_checks_rank<R>.json`` at the end.
"""

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

SHM = Path("/dev/shm")


def install(records):
    import megatron_pz.objectives.composite as objectives
    from megatron_pz.rollout.hf_engine import HFRolloutEngine
    from megatron_pz.rollout.phase import RolloutPhases
    from megatron_pz.train.actor import Actor

    phases_made = []
    original_init = RolloutPhases.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        phases_made.append(self)

    original_generating = RolloutPhases.generating

    @contextlib.contextmanager
    def generating(self):
        with original_generating(self) as engine:
            if isinstance(engine, HFRolloutEngine):
                records["stale_tensors"].append(len(engine.stale_weights(self.actor.chunks)))
            elif hasattr(engine, "last_refresh"):  # the vLLM engine
                records["vllm_refresh"].append(dict(engine.last_refresh))
                records["shm_segments"].append(sorted(p.name for p in SHM.glob("*cpushm*")) if SHM.is_dir() else [])
            records["syncs_at_phase"].append(self.syncs)
            yield engine

    def asleep(engine):
        if hasattr(engine, "sleep_mode"):  # vLLM: asleep after every phase where its platform has sleep mode
            return not engine._weights_awake and not engine._kv_awake
        return bool(getattr(engine, "asleep", False))

    original_step = Actor.train_step

    def train_step(self, *args, **kwargs):
        records["asleep_in_update"].append(all(asleep(p.engine) for p in phases_made) and bool(phases_made))
        return original_step(self, *args, **kwargs)

    original_build = objectives.build_objective

    def build_objective(*args, **kwargs):
        objective = original_build(*args, **kwargs)
        collect = objective.collect

        def observed(passages, engine, scorer, step):
            experiences, metrics = collect(passages, engine, scorer, step)
            text = repr([(e.prompt_ids, e.response_ids, e.reward, [round(x, 5) for x in e.rollout_logprobs or []])
                         for e in experiences])
            records["experiences"].append(hashlib.sha256(text.encode()).hexdigest()[:16])
            return experiences, metrics

        objective.collect = observed
        return objective

    RolloutPhases.__init__ = init
    RolloutPhases.generating = generating
    Actor.train_step = train_step
    objectives.build_objective = build_objective
    return phases_made


def main(argv):
    from megatron_pz.cli import main as cli_main

    records = {"stale_tensors": [], "syncs_at_phase": [], "asleep_in_update": [], "experiences": [],
               "vllm_refresh": [], "shm_segments": []}
    phases_made = install(records)
    code = cli_main(argv)
    records["syncs"] = phases_made[0].syncs if phases_made else 0
    engine = phases_made[0].engine if phases_made else None
    if hasattr(engine, "sleep_mode"):
        records["vllm"] = {k: getattr(engine, k) for k in ("sleep_mode", "max_model_len", "kv_cache_memory_bytes",
                                                           "enforce_eager", "dtype", "syncs")}
        records["vllm"]["engine_ranks"] = engine._engine_ranks
    rank = int(os.environ.get("RANK", "0"))
    run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("train.run_dir="))
    (Path(run_dir) / f"engine_checks_rank{rank}.json").write_text(json.dumps(records))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
