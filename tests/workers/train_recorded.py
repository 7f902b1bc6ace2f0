"""`megatron-pz train ...` that records what each update trained on (tests/test_disaggregated.py).

Wraps, without changing what it does, ``grpo_update`` (the RL loop of both placements calls the trainer
module's): every training rank appends each update's experiences (prompt, response, reward, advantage, rollout log-probs,
temperature, per-token weight versions and lags, token mask) to ``<train.run_dir>/experiences_rank<R>.jsonl``, flushed per update so a killed run keeps
what it did. A rollout rank writes ``<train.run_dir>/rollout_rank<R>.json`` when it is done: whether it ever
had Megatron's parallel groups or a Megatron model. ``--kill-rollout-at-step K``: the rollout rank SIGKILLs itself when asked to generate RL step K
(0-based), after writing the time to ``<train.run_dir>/killed_at``.
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def run_dir_of(argv) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("train.run_dir=")))


def record_updates(run_dir: Path) -> None:
    import megatron_pz.train.trainer as trainer

    original = trainer.grpo_update
    rank = os.environ.get("RANK", "0")

    def grpo_update(actor, experiences, *args, **kwargs):
        rows = [{"prompt": e.prompt_ids, "response": e.response_ids, "reward": e.reward, "advantage": e.advantage,
                 "rollout_logprobs": e.rollout_logprobs, "temperature": e.temperature, "role": e.role,
                 "trainable": e.trainable, "group": e.group, "versions": e.versions, "lag": e.lag,
                 "token_mask": e.token_mask} for e in experiences]
        with open(run_dir / f"experiences_rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(rows) + "\n")
        return original(actor, experiences, *args, **kwargs)

    trainer.grpo_update = grpo_update


def observe_rollout_rank(run_dir: Path) -> None:
    import megatron_pz.train.trainer as trainer  # where a rollout rank is sent to serve

    original = trainer.serve

    def serve(cfg, roles):
        import gc

        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel

        result = original(cfg, roles)
        seen = {"megatron_groups": ps.model_parallel_is_initialized(),  # type(): vLLM leaves weak proxies in gc
                "megatron_models": sum(issubclass(type(o), GPTModel) for o in gc.get_objects()), "result": result}
        (run_dir / f"rollout_rank{roles.rank}.json").write_text(json.dumps(seen))
        return result

    trainer.serve = serve


def kill_rollout_at(step: int, run_dir: Path) -> None:
    import megatron_pz.objectives.split as split

    original = split.generate

    # Every unit thread of the rank reaches the step: the first writes the time and kills, the others wait on the
    # lock (never released) for the SIGKILL. Written once and renamed: a second thread's truncating open once raced
    # the kill and left the file empty.
    first = threading.Lock()

    def generate(objective, passages, engine, at_step):
        if at_step == step and os.environ.get("PZ_ROLE") == "rollout":
            first.acquire()
            stamp = run_dir / "killed_at.tmp"
            stamp.write_text(str(time.time()))
            os.replace(stamp, run_dir / "killed_at")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(objective, passages, engine, at_step)

    split.generate = generate


def main(argv):
    kill = None
    if argv[:1] == ["--kill-rollout-at-step"]:
        kill, argv = int(argv[1]), argv[2:]
    run_dir = run_dir_of(argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_updates(run_dir)
    observe_rollout_rank(run_dir)
    if kill is not None:
        kill_rollout_at(kill, run_dir)
    from megatron_pz.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
