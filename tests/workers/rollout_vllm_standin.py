"""VLLMRolloutEngine's use of vLLM's sleep mode, on the stand-in (tests/vllm_standin): the one slice the
CPU build of vLLM cannot run (its platform has no sleep mode). One process.

Level 2 (the default): every phase wakes the weights, reloads them (level 2 discarded them), resets the
prefix cache, wakes the KV cache right before the first generation and sleeps again; a phase with no
update in between still reloads. Level 1: the host copy comes back on wake, so only an update triggers a
reload. Generating outside a phase fails. Prints ROLLOUT_VLLM_STANDIN_OK.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "vllm_standin"))  # `import vllm` -> the stand-in
import vllm  # noqa: E402
from rollout_common import byte_tokenizer, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.config import RolloutConfig  # noqa: E402
from megatron_pz.rollout.factory import build_rollout_engine  # noqa: E402
from megatron_pz.rollout.phase import RolloutPhases  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402


class Weights:
    """The slice of the Actor the phase protocol uses."""

    def __init__(self, chunks):
        self.chunks = chunks

    def finish_param_sync(self):
        pass


def run_phases(level: int, updates: list[bool]) -> list:
    tok = byte_tokenizer()
    cfg = tiny_hf_config()
    model = build_model(cfg)
    vllm.EVENTS.clear()
    engine = build_rollout_engine(RolloutConfig(engine="vllm", sleep_level=level, seed=5), [model], tok, cfg,
                                  max_model_len=200)
    assert engine.sleep_mode and engine.llm.init_kwargs["enable_sleep_mode"]  # asked of the platform
    phases = RolloutPhases(engine, Weights([model]))
    for updated in updates:
        if updated:
            phases.weights_updated()
        with phases.generating() as e:
            e.generate([tok.encode("hello")], SamplingParams(max_new_tokens=4, temperature=0.0))
        assert engine.llm.asleep
        try:
            engine.generate([tok.encode("ab")], SamplingParams(max_new_tokens=2))
            raise AssertionError("generate outside a phase must fail")
        except RuntimeError as exc:
            assert "asleep" in str(exc)
    assert [e[2] for e in vllm.EVENTS if e[0] == "sleep"] == [level] * len(updates)
    return [e[0] if e[0] != "wake_up" else e[2] for e in vllm.EVENTS if e[0] != "init"]


def main():
    assert vllm.__version__.endswith("+standin")
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
    phase = ["reload", "reset_prefix_cache", ("kv_cache",), "generate", "sleep"]
    order = run_phases(2, [False, False, True])
    # a fresh engine is awake; after sleeping, the weights wake first, the KV cache after the reload
    assert order == phase[:2] + ["generate", "sleep"] + [("weights",), *phase] + [("weights",), *phase], order
    order = run_phases(1, [False, False, True])
    assert order == ["reload", "reset_prefix_cache", "generate", "sleep",
                     ("weights",), ("kv_cache",), "generate", "sleep",  # host copy back, no reload
                     ("weights",), *phase], order
    print("ROLLOUT_VLLM_STANDIN_OK", flush=True)


if __name__ == "__main__":
    main()
