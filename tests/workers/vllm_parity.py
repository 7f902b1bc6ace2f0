"""The real vLLM (its CPU build) against the Megatron actor it serves, in one process (world of one).

For each tiny model (Qwen3 tied and untied, Qwen3-MoE, a SmolLM-shaped Llama with a tied head), twice:
perturb the actor's weights (a training step would), push them through ``VLLMRolloutEngine.update_weights``,
then

* greedy: vLLM's tokens equal the actor's argmax at every position (teacher-forced on vLLM's tokens);
* sampled at T=1 and T=0.7: vLLM's processed log-probs equal ``log_softmax(actor logits / T)`` of the
  sampled tokens.

The second push is what a stale engine fails: vLLM's dummy weights were processed at construction, so a
tied LM head that is not re-processed after the reload keeps serving old logits (issue 20, defect 2), and
so do the CPU MoE experts' prepacked weights. One sampled call sends more prompt tokens than vLLM's
default step budget: with chunked prefill, a seeded request's discarded token crashed the CPU build.

Around it, the process the trainer lives in must not change because vLLM was built, ran and shut down:
torch's thread count and the torch attributes vLLM replaces, the global RNG streams, the environment
outside ``VLLM_*`` (LOCAL_WORLD_SIZE: the memory plan's per-rank host budget), the default process
group, the garbage collector's freeze. Prints one line per model and VLLM_PARITY_OK.
"""

import gc
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.memory_plan import device_memory  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.config import RolloutConfig  # noqa: E402
from megatron_pz.rollout.factory import build_rollout_engine  # noqa: E402
from megatron_pz.rollout.parity import actor_token_logprobs, check_engine_parity  # noqa: E402
from megatron_pz.rollout.vllm_isolation import PATCHABLE  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402

LOGPROB_TOLERANCE = 2e-4  # fp32 on both sides; a stale head or a stale MoE prepack is off by ~1 or more


def process_state() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "torch attributes": {f"{o.__name__}.{n}": id(getattr(o, n, None)) for o, names in PATCHABLE for n in names},
        "rng": (torch.get_rng_state().tolist(), np.random.get_state()[1].tolist(), random.getstate()),
        "environment": {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")},
        "memory plan host budget": device_memory("cpu"),
        "default process group": dist.is_initialized() and dist.get_world_size(),
        "gc frozen": gc.get_freeze_count(),
    }


def perturb(model, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    sharpen(model, 2.0)  # spread the logits (a tied head through the embedding)


def check_model(name: str, hf_config, tok) -> str:
    model = build_model(hf_config)
    model.eval()
    cfg = RolloutConfig(engine="vllm", seed=5, bucket_mb=1)
    engine = build_rollout_engine(cfg, [model], tok, hf_config, max_model_len=160)
    assert engine.dtype == "float32" and not engine.sleep_mode and engine.enforce_eager
    prompts = [tok.encode(t) for t in ("The city of", "ab", "hello world, this is")]
    generator = torch.Generator().manual_seed(11)
    seen = []
    for push in range(2):
        perturb(model, generator)
        engine.update_weights([model])
        try:
            seen.append(check_engine_parity(engine, model, prompts, LOGPROB_TOLERANCE))
        except AssertionError as exc:
            raise AssertionError(f"{name}, weight push {push + 1}: {exc}") from None
    if name == "qwen3 untied":  # one call of more prompt tokens than vLLM's default step budget (4096):
        long = [[(7 * i + j) % 250 + 1 for j in range(120)] for i in range(40)]  # chunked prefill would split it
        seen.append(check_engine_parity(engine, model, long, LOGPROB_TOLERANCE, temperatures=(1.0,),
                                        max_new_tokens=4))
    engine.close()
    worst = max(p.max_logprob_diff for p in seen)
    return f"{name}: greedy = actor argmax, log-probs at T=1/0.7 within {worst:.2g} over 2 weight pushes"


def main():
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
    tok = byte_tokenizer()
    models = {
        "qwen3 tied": tiny_hf_config(tied=True),
        "qwen3 untied": tiny_hf_config(),
        "qwen3_moe": tiny_hf_config(moe=True),
        "llama (SmolLM-shaped) tied": tiny_hf_config(model_type="llama", tied=True),
    }
    only = os.environ.get("VLLM_PARITY_MODELS")
    for hf_config in models.values():  # what the trainer's own code does to the process (Megatron sets
        actor_token_logprobs(build_model(hf_config), [1, 2], [3], 1.0)  # NVTE_*) happens before the snapshot
    before = process_state()
    for name, hf_config in models.items():
        if only and name not in only.split(","):
            continue
        line = check_model(name, hf_config, tok)
        after = process_state()
        # the RNG is compared below, where nothing but vLLM runs (build_model draws from it here)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k] and k != "rng"}
        assert not changed, f"vLLM changed the trainer's process: {changed}"
        print(line, flush=True)
    # the RNG: what the trainer draws after vLLM ran is what it would have drawn without it
    model = build_model(models["qwen3 untied"])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    state = process_state()["rng"]
    engine = build_rollout_engine(RolloutConfig(engine="vllm", seed=5), [model], tok, models["qwen3 untied"],
                                  max_model_len=64)
    assert process_state()["rng"] == state, "building vLLM moved the trainer's RNG streams"
    engine.generate([tok.encode("ab")], SamplingParams(max_new_tokens=4, temperature=1.0, seed=1))
    assert process_state()["rng"] == state, "generating on vLLM moved the trainer's RNG streams"
    engine.close()
    assert dist.is_initialized(), "vLLM's shutdown destroyed the trainer's default process group"
    print("process state unchanged by vLLM: threads, torch attributes, RNG, environment, plan, world, gc", flush=True)
    print("VLLM_PARITY_OK", flush=True)


if __name__ == "__main__":
    main()
