"""Log-probs of recorded rollouts under *saved* actors (tests/test_disaggregated.py).

    saved_actor_logprobs.py EXPERIENCES.jsonl OUT.json UPDATE=CHECKPOINT_DIR [UPDATE=CHECKPOINT_DIR ...]

One process builds the run's actor (Megatron, the checkpoint's HF config), loads each checkpoint in turn
and writes, for each ``UPDATE`` (a line of the file train_recorded.py wrote), the per-token log-probs of
every recorded response at its sampling temperature, the way the trainer computes old log-probs
(``experiences_to_sequences`` -> ``Actor.forward_values(token_logprobs_at_temperature)``).
"""

import json
import sys
from pathlib import Path


def main(experiences_path: str, out_path: str, *pairs: str):
    from megatron_pz.checkpoint import load_checkpoint, read_hf_config
    from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.rl.types import Experience
    from megatron_pz.runtime import initialize
    from megatron_pz.train.actor import Actor
    from megatron_pz.train.losses import token_logprobs_at_temperature
    from megatron_pz.train.update import experiences_to_sequences

    updates = [json.loads(line) for line in Path(experiences_path).read_text().splitlines()]
    jobs = [(int(u), Path(c)) for u, c in (p.split("=", 1) for p in pairs)]
    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu"))
    hf = read_hf_config(jobs[0][1])
    actor = Actor(hf, ModelConfig(), ParallelConfig(), OptimizerConfig(), info.device, total_steps=1,
                  max_sequence_length=1024)
    out = {}
    for update, ckpt in jobs:
        load_checkpoint(ckpt, actor.chunks, restore_rng=False)
        exps = [Experience(r["prompt"], r["response"], 0.0, "g", r["role"], temperature=r["temperature"])
                for r in updates[update]]
        rows = experiences_to_sequences(exps)
        batches = actor.micro_batches(rows, 4096, 0)
        values = actor.forward_values(batches, token_logprobs_at_temperature)
        logprobs = [None] * len(exps)
        for mb, vals in zip(batches, values):
            for r, (idx, length) in enumerate(zip(mb.indices, mb.lengths)):
                if idx >= 0:
                    p = len(exps[idx].prompt_ids)
                    logprobs[idx] = vals[r, p:length].tolist()
        out[f"{update}@{ckpt.name}"] = logprobs
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
