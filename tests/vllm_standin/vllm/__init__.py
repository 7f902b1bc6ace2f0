"""A test-only stand-in for the slice of vLLM 0.32.0's offline API that megatron_pz calls.

It checks OUR orchestration of vLLM, not vLLM: the calls, their order and their arguments, as vLLM
0.32.0 expects them (read from its source: ``vllm/entrypoints/llm.py`` ``LLM.__init__`` / ``generate``
/ ``sleep`` / ``wake_up`` / ``collective_rpc`` / ``reset_prefix_cache``, ``vllm/v1/worker/gpu_worker.py``
``Worker.reload_weights``, ``vllm/v1/executor/uniproc_executor.py`` ``ExecutorWithExternalLauncher``).
Decoding is the ``hf`` rollout engine's (:func:`megatron_pz.rollout.hf_engine.generate_with_model`) on a
``transformers`` model built from the folder's ``config.json``; nothing here says how fast or how
exactly vLLM samples. It is importable as ``vllm`` only when a test puts ``tests/vllm_standin`` on
``sys.path``.

What it enforces (each a way our engine could misuse the real one):

* ``LLM(...)``: ``external_launcher`` when the world has several ranks, ``data_parallel_size`` 1 (one
  independent engine per TP group, ranks ``[k*T, (k+1)*T)``), multiprocessing off, a seed, a config
  folder whose ``architectures`` names a ``transformers`` class, ``load_format="dummy"``.
* ``generate``: only fully awake; every rank of an engine submits the same requests with the same
  sampling parameters (all-gathered and compared), every request seeded; prompts fit ``max_model_len``.
* ``sleep(level)``: level 1 keeps a host copy of the weights, level 2 discards them (NaN here);
  ``wake_up(tags)`` with tags from ``("weights", "kv_cache", "scheduling")``; generating with
  discarded weights that were not reloaded is an error.
* ``collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format": True})``:
  only with the weights awake; every parameter of the model must arrive (vLLM would keep stale ones);
  it ends with the "process weights after loading" step, counted.

``INSTANCES`` holds every ``LLM`` of this process and ``EVENTS`` what happened to them, in order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

__version__ = "0.32.0+standin"

INSTANCES: list["LLM"] = []
EVENTS: list[tuple] = []
TAGS = ("weights", "kv_cache", "scheduling")


@dataclass
class SamplingParams:
    """The fields of vLLM 0.32's ``SamplingParams`` that megatron_pz sets (``top_k`` 0 = off)."""

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

    def __post_init__(self):
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def _rank_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Worker:
    """The worker ``collective_rpc`` reaches (one per engine per rank with external_launcher)."""

    def __init__(self, llm: "LLM"):
        self.llm = llm

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format: bool = True) -> None:
        from megatron_pz.rollout.weight_sync import HFModelTarget

        llm = self.llm
        if not llm.awake["weights"]:
            raise RuntimeError("reload_weights with the weights asleep: wake_up(tags=['weights']) first")
        if weights_iterator is None or weights_path is not None or not is_checkpoint_format:
            raise NotImplementedError("the stand-in reloads checkpoint-format weights from an iterator only")
        target = HFModelTarget(llm.model)
        count = 0
        for name, tensor in weights_iterator:
            target.load_weights([(name, tensor)])
            count += 1
        if target.missing():
            raise RuntimeError(f"reload_weights: parameters not loaded (vLLM would keep stale ones): "
                               f"{target.missing()[:5]}")
        llm.discarded = False
        llm.processed_after_loading += 1  # vLLM: finalize_layerwise_reload -> process_weights_after_loading
        EVENTS.append(("reload", llm.rank, count))


class LLM:
    def __init__(self, model: str, *, tokenizer: Optional[str] = None, load_format: str = "auto",
                 dtype: str = "auto", tensor_parallel_size: int = 1,
                 distributed_executor_backend: Optional[str] = None, gpu_memory_utilization: float = 0.92,
                 enforce_eager: bool = False, enable_sleep_mode: bool = False,
                 enable_prefix_caching: Optional[bool] = None, max_model_len: Optional[int] = None,
                 disable_custom_all_reduce: bool = False, seed: Optional[int] = 0,
                 data_parallel_size: int = 1, logprobs_mode: str = "raw_logprobs", **kwargs):
        import transformers

        self.init_kwargs = dict(model=model, tokenizer=tokenizer, load_format=load_format, dtype=dtype,
                                tensor_parallel_size=tensor_parallel_size,
                                distributed_executor_backend=distributed_executor_backend,
                                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                enable_sleep_mode=enable_sleep_mode, enable_prefix_caching=enable_prefix_caching,
                                max_model_len=max_model_len, disable_custom_all_reduce=disable_custom_all_reduce,
                                seed=seed, data_parallel_size=data_parallel_size, logprobs_mode=logprobs_mode,
                                **kwargs)
        if kwargs:
            raise TypeError(f"vLLM stand-in: arguments it does not model: {sorted(kwargs)}")
        self.rank, world = _rank_world()
        tp = int(tensor_parallel_size)
        if world > 1 and distributed_executor_backend != "external_launcher":
            raise ValueError("several torchrun ranks need distributed_executor_backend='external_launcher'")
        if data_parallel_size != 1:
            raise ValueError("stand-in: data_parallel_size > 1 makes one lock-stepped model-DP engine; "
                             "megatron_pz runs independent engines per TP group")
        if distributed_executor_backend == "external_launcher" and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise AssertionError("To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0")
        if seed is None:
            raise ValueError("external_launcher engines need a seed (all TP ranks must sample alike)")
        if world % tp:
            raise ValueError(f"world size {world} is not a multiple of tensor_parallel_size {tp}")
        if load_format != "dummy":
            raise NotImplementedError("the stand-in starts from dummy weights only")
        if logprobs_mode != "processed_logprobs":  # vLLM 0.32's default is raw_logprobs (temperature 1)
            raise NotImplementedError("the stand-in reports log-probs at the sampling temperature only "
                                      "(logprobs_mode='processed_logprobs', what megatron_pz asks for)")
        self.group, self.group_ranks = None, [self.rank]
        if tp > 1:  # ExternalDP x TP: engine k = ranks [k*tp, (k+1)*tp)
            for start in range(0, world, tp):
                ranks = list(range(start, start + tp))
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.group, self.group_ranks = group, ranks
        config = transformers.AutoConfig.from_pretrained(model)
        architectures = getattr(config, "architectures", None)
        if not architectures or getattr(transformers, architectures[0], None) is None:
            raise ValueError(f"cannot resolve the model class from architectures={architectures!r} in {model}")
        torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
        self.model = getattr(transformers, architectures[0])(config).to(torch_dtype).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or model)
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.sleep_enabled = bool(enable_sleep_mode)
        self.awake = {"weights": True, "kv_cache": True}
        self.discarded = False
        self.host_copy: Optional[dict] = None
        self.processed_after_loading = 0
        self.worker = _Worker(self)
        INSTANCES.append(self)
        EVENTS.append(("init", self.rank, tp))

    @property
    def asleep(self) -> bool:
        return not any(self.awake.values())

    # ------------------------------------------------------------------ generation

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, **kwargs) -> list[RequestOutput]:
        from megatron_pz.rollout import base
        from megatron_pz.rollout.hf_engine import generate_with_model

        if not all(self.awake.values()):
            raise RuntimeError(f"generate on a sleeping engine (awake: {self.awake})")
        if self.discarded:
            raise RuntimeError("generate with weights discarded by sleep(level=2) and never reloaded")
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [list(map(int, p["prompt_token_ids"])) for p in prompts]
        for i, (prompt, sp) in enumerate(zip(ids, params)):
            if sp.seed is None:
                raise ValueError(f"request {i} has no seed: external_launcher ranks would sample differently")
            if sp.n != 1:
                raise ValueError("the stand-in models one sample per request (megatron_pz sends n=1)")
            if len(prompt) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens, max_model_len is {self.max_model_len}")
        digest = hashlib.sha256(repr([(p, asdict(sp)) for p, sp in zip(ids, params)]).encode()).hexdigest()
        if self.group is not None:
            digests = [None] * len(self.group_ranks)
            dist.all_gather_object(digests, digest, group=self.group)
            if len(set(digests)) != 1:
                raise RuntimeError(f"ranks {self.group_ranks} of one vLLM engine submitted different requests")
        EVENTS.append(("generate", self.rank, len(ids)))
        outputs: list[Optional[RequestOutput]] = [None] * len(ids)
        by_settings: dict[tuple, list[int]] = {}
        for i, sp in enumerate(params):
            key = (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, tuple(sp.stop or ()), tuple(sp.stop_token_ids or ()))
            by_settings.setdefault(key, []).append(i)
        for (temperature, top_p, top_k, max_tokens, stop, stop_ids), members in by_settings.items():
            ours = base.SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       top_k=max(0, top_k), stop=list(stop), n=1)
            done = generate_with_model(self.model, self.tokenizer, set(stop_ids), [ids[i] for i in members], ours,
                                       seed=0, max_batch_size=len(members),
                                       seeds=[[params[i].seed] for i in members])
            for i, (completion,) in zip(members, done):
                stop_reason = None
                if completion.finish_reason == "eos":
                    stop_reason = completion.token_ids[-1]
                elif completion.finish_reason == "stop":
                    stop_reason = next(s for s in stop if s in completion.text)
                logprobs = None
                if params[i].logprobs is not None:
                    logprobs = [{t: Logprob(lp, 1)} for t, lp in zip(completion.token_ids, completion.logprobs)]
                finish = "length" if completion.finish_reason == "length" else "stop"
                outputs[i] = RequestOutput(str(i), ids[i], [CompletionOutput(
                    0, completion.text, completion.token_ids, sum(completion.logprobs), logprobs, finish, stop_reason)])
        return outputs  # type: ignore[return-value]

    # ------------------------------------------------------------------ sleep mode

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.sleep_enabled:
            raise RuntimeError("sleep needs enable_sleep_mode=True")
        if level not in (1, 2):
            raise ValueError(f"sleep level {level} is not modelled")
        with torch.no_grad():
            if level == 1:  # weights to host, KV cache dropped
                self.host_copy = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                self.host_copy = None
            for p in self.model.parameters():
                if p.is_floating_point():
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

    # ------------------------------------------------------------------ control plane

    def collective_rpc(self, method, timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        kwargs = kwargs or {}
        if isinstance(method, str):
            return [getattr(self.worker, method)(*args, **kwargs)]
        return [method(self.worker, *args, **kwargs)]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        EVENTS.append(("reset_prefix_cache", self.rank))
        return True
