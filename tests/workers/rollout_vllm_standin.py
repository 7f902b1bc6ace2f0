"""VLLMRolloutEngine against the vLLM 0.32 stand-in (tests/vllm_standin), two ranks, one vLLM TP=2 engine.

The actor is DP=2 (each rank its own model-parallel group), so the two members of the vLLM engine
ask for *different* prompts, and rank 1 makes fewer ``generate`` calls than rank 0 (its objective had
nothing to ask): the phase's ``finish_phase`` must carry it through rank 0's extra round. Checks: the
engine's construction arguments (external_launcher, no data_parallel_size, max_model_len from the
run, custom all-reduce off, sleep mode, an ``architectures`` entry for an inline config), one reload
per phase through ``reload_weights`` with every tensor, the engine asleep (level 2) outside phases,
completions equal to the ``hf`` engine's on the same weights and seeds, and both ranks running the
same number of ``llm.generate`` calls. Prints ROLLOUT_VLLM_STANDIN_OK.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "vllm_standin"))  # `import vllm` -> the stand-in
import vllm  # noqa: E402
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.config import RolloutConfig  # noqa: E402
from megatron_pz.rollout.factory import build_rollout_engine  # noqa: E402
from megatron_pz.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from megatron_pz.rollout.phase import RolloutPhases  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402


class Weights:
    """The slice of the Actor the phase protocol uses."""

    def __init__(self, chunks):
        self.chunks = chunks

    def finish_param_sync(self):
        pass


def key(groups):
    return [[(c.token_ids, c.text, c.finish_reason, [round(x, 4) for x in c.logprobs]) for c in g] for g in groups]


def main():
    assert vllm.__version__.endswith("+standin")
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
    rank = dist.get_rank()
    tok = byte_tokenizer()
    cfg = tiny_hf_config()
    assert not getattr(cfg, "architectures", None)  # an inline config, as model.architecture gives
    model = build_model(cfg)
    sharpen(model)
    model.eval()
    rcfg = RolloutConfig(engine="vllm", tensor_parallel_size=2, dtype="float32", seed=5, bucket_mb=1)
    engine = build_rollout_engine(rcfg, [model], tok, cfg, max_model_len=200)
    llm = engine.llm
    kw = llm.init_kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["data_parallel_size"] == 1
    assert kw["max_model_len"] == 200 and kw["disable_custom_all_reduce"] and kw["enable_sleep_mode"]
    assert kw["load_format"] == "dummy" and kw["tensor_parallel_size"] == 2 and llm.group_ranks == [0, 1]
    assert json.loads((Path(engine.model_dir) / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert getattr(cfg, "architectures", None) in (None, [])  # the run's config is left as it was

    phases = RolloutPhases(engine, Weights([model]))
    reference = HFRolloutEngine(tok, cfg, max_batch_size=8, seed=5)
    reference.update_weights([model])
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=3, stop=["o"])
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, n=1, seed=0)
    mine = [tok.encode(t) for t in (["hello world", "ab"] if rank == 0 else ["the quick brown fox"])]

    for phase in range(2):
        with phases.generating() as e:
            got = [key(e.generate(mine, sampled))]
            if rank == 0:  # rank 1's objective has nothing more to ask: finish_phase carries it
                got.append(key(e.generate(mine[:1], greedy)))
        expected = [key(reference.generate(mine, sampled))]
        if rank == 0:
            expected.append(key(reference.generate(mine[:1], greedy)))
        assert got == expected, (phase, got, expected)
        assert llm.asleep and llm.discarded  # level 2 while the actor would train
        try:
            engine.generate(mine, sampled)
            raise AssertionError("generate outside a phase must fail")
        except RuntimeError as exc:
            assert "asleep" in str(exc)

    generates = [e for e in vllm.EVENTS if e[0] == "generate"]
    reloads = [e for e in vllm.EVENTS if e[0] == "reload"]
    sleeps = [e for e in vllm.EVENTS if e[0] == "sleep"]
    counts = [None, None]
    dist.all_gather_object(counts, len(generates))
    assert counts == [4, 4], counts  # two rounds per phase on both ranks
    n_tensors = len(reference.model.state_dict()) - int(cfg.tie_word_embeddings)
    assert phases.syncs == 2 and [r[2] for r in reloads] == [n_tensors, n_tensors]  # level 2: every phase
    assert llm.processed_after_loading == 2 and [s[2] for s in sleeps] == [2, 2]
    order = [e[0] if e[0] != "wake_up" else e[2] for e in vllm.EVENTS if e[0] != "init"]
    # a fresh engine is awake; after sleeping, the weights wake first, then the KV cache after the reload
    assert order == ["reload", "reset_prefix_cache", "generate", "generate", "sleep",
                     ("weights",), "reload", "reset_prefix_cache", ("kv_cache",), "generate", "generate", "sleep"], order
    print(f"rank {rank}: vLLM stand-in OK ({len(generates)} generate calls, {len(reloads)} reloads)", flush=True)
    dist.barrier()
    print("ROLLOUT_VLLM_STANDIN_OK", flush=True)


if __name__ == "__main__":
    main()
