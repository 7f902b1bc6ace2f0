"""The real vLLM, one TP=2 engine over two ranks that ask for different prompts (actor DP=2), under torchrun.

Rank 1 asks once and rank 0 twice: the engine's ``finish_phase`` carries rank 1 through rank 0's second
round (vLLM's external_launcher ranks must run every step together). Greedy completions equal the actor's
argmax and sampled log-probs its log-probs at T=1, for both ranks' prompts, after a weight push.

Shared memory: the engine's segments carry this run's prefix, equal on both ranks; segments of a dead
run (a killed job's, found in /dev/shm by the test) are gone after the engine is built, a live job's
(``LIVE_SEGMENT``, named with the test process's pid) are kept, and vLLM's own unprefixed names from a
build without our fix (``PLANTED_DEFAULT``, planted by the test) no longer block anything.

``--hold``: build the engine, print VLLM_HOLDING and wait to be killed (the test's crashed run).
Prints ROLLOUT_VLLM_RANKS_OK.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402
from vllm_parity import LOGPROB_TOLERANCE  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.config import RolloutConfig  # noqa: E402
from megatron_pz.rollout.factory import build_rollout_engine  # noqa: E402
from megatron_pz.rollout.parity import actor_token_logprobs  # noqa: E402
from megatron_pz.rollout.phase import RolloutPhases  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402

SHM = Path("/dev/shm")


class Weights:
    def __init__(self, chunks):
        self.chunks = chunks

    def finish_param_sync(self):
        pass


def segments() -> list[str]:
    return sorted(p.name for p in SHM.iterdir() if "cpushm" in p.name)


def main(hold: bool):
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))  # DP=2: each rank a whole actor
    rank = dist.get_rank()
    tok = byte_tokenizer()
    cfg = tiny_hf_config()
    model = build_model(cfg)
    with torch.no_grad():  # the same "trained" weights on both ranks (DP replicas)
        generator = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    sharpen(model, 2.0)
    model.eval()
    before = set(segments())
    engine = build_rollout_engine(RolloutConfig(engine="vllm", tensor_parallel_size=2, seed=5), [model], tok, cfg,
                                  max_model_len=200)
    assert engine._engine_ranks == [0, 1]
    ours = sorted(set(segments()) - before)
    tags = [None, None]
    dist.all_gather_object(tags, sorted({name.split("-", 1)[0] for name in ours}))
    assert tags[0] == tags[1] and len(tags[0]) == 1 and tags[0][0].startswith(f"mpz"), tags
    if hold:
        print(f"rank {rank}: VLLM_HOLDING {ours}", flush=True)
        time.sleep(600)
        return
    dead = [n for n in before if n.startswith("mpz") and n != os.environ.get("LIVE_SEGMENT")]
    assert not set(dead) & set(segments()), f"a dead run's segments are still there: {dead}"
    if os.environ.get("LIVE_SEGMENT"):
        assert os.environ["LIVE_SEGMENT"] in segments(), "a live job's segment was removed"
    print(f"rank {rank}: shared memory {ours} (prefix {tags[0][0]}); dead run's {len(dead)} segment(s) removed",
          flush=True)

    phases = RolloutPhases(engine, Weights([model]))
    prompts = [tok.encode(t) for t in (["hello world", "ab"] if rank == 0 else ["the quick brown fox"])]
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=3)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)
    with phases.generating() as e:
        results = [(sampled, e.generate(prompts, sampled))]
        if rank == 0:  # rank 1 has nothing more to ask: finish_phase serves rank 0's second round
            results.append((greedy, e.generate(prompts[:1], greedy)))
    worst = 0.0
    for params, groups in results:
        for prompt, group in zip(prompts, groups):
            assert len(group) == params.n
            for c in group:
                logp, rows = actor_token_logprobs(model, prompt, c.token_ids, params.temperature)
                if params.temperature == 0.0:
                    assert c.token_ids == rows.argmax(-1).tolist(), (c.token_ids, rows.argmax(-1).tolist())
                worst = max(worst, (logp - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < LOGPROB_TOLERANCE, worst
    print(f"rank {rank}: {sum(len(g) for _, gs in results for g in gs)} completions equal the actor "
          f"(log-probs within {worst:.2g}); phase finished with {len(results)} generate call(s)", flush=True)
    engine.close()
    dist.barrier()
    print("ROLLOUT_VLLM_RANKS_OK", flush=True)


if __name__ == "__main__":
    main(hold="--hold" in sys.argv)
