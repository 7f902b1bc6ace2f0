"""vLLM rollouts on GPU, colocated with the Megatron actor (same processes, same GPUs).

Uses vLLM's documented offline API only:

* ``vllm.LLM(..., distributed_executor_backend="external_launcher")`` makes one vLLM engine per torchrun
  rank that reuses the job's ``torch.distributed`` world (vLLM's torchrun examples); ranks
  ``[k*T, (k+1)*T)`` form vLLM tensor-parallel group ``k`` (``T = rollout.tensor_parallel_size``,
  independent of the actor's TP/PP/EP) and the groups are vLLM data-parallel replicas. All ranks of one
  vLLM TP group must submit the same requests, so the engine all-gathers its group's prompts,
  generates them all, and returns this rank's share.
* ``enable_sleep_mode=True`` with ``llm.sleep(level)`` / ``llm.wake_up(tags)`` frees the GPU for the
  training phase (level 1: weights to CPU, KV cache dropped; level 2: both dropped).
* The engine starts from a config-only model folder with ``load_format="dummy"``; the actor's weights
  are pushed with :func:`megatron_pz.rollout.weight_sync.sync_weights` into each worker's model via
  ``llm.collective_rpc`` and the model's ``load_weights`` (which reshards full HF tensors for vLLM's
  own TP), then the prefix cache is reset so no KV computed with old weights is reused.
* ``SamplingParams(n, temperature, top_p, top_k, max_tokens, stop, logprobs=0, seed)`` and
  ``generate(prompts=[TokensPrompt(prompt_token_ids=...)])``. Log-probs are at the sampling
  temperature (``logprobs_mode="processed_logprobs"``), the rule of
  :func:`megatron_pz.rl.logprobs.logits_at_temperature` that the Megatron engine and the trainer use.

``vllm`` is imported only inside this class; without it construction fails with a clear message.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_pz.config import ConfigError
from megatron_pz.rollout.base import Completion, SamplingParams
from megatron_pz.rollout.config import RolloutConfig
from megatron_pz.rollout.megatron_engine import eos_ids_of, validate_request
from megatron_pz.rollout.weight_sync import sync_weights

NOT_INSTALLED = "vLLM is not installed; install megatron-pz[gpu] or set rollout.engine=megatron"


class VLLMNotInstalledError(ImportError):
    pass


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise VLLMNotInstalledError(NOT_INSTALLED) from exc
    return vllm, TokensPrompt


def _load_weights_on_worker(worker, weights):
    """Runs inside each vLLM worker (``collective_rpc`` passes the worker first)."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights=weights)
    return len(weights)


def _finish_reason(output) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"


class VLLMRolloutEngine:
    """:class:`~megatron_pz.rollout.base.RolloutEngine` backed by a colocated ``vllm.LLM``."""

    def __init__(self, cfg: RolloutConfig, tokenizer, hf_config, model_chunks=None,
                 model_dir: Optional[str] = None):
        vllm, self._TokensPrompt = _import_vllm()
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.eos_ids = sorted(eos_ids_of(tokenizer, hf_config))
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        tp = cfg.tensor_parallel_size
        if world % tp:
            raise ConfigError(f"rollout.tensor_parallel_size={tp} does not divide the world size {world}")
        self._group, self._group_size = None, tp
        if tp > 1:  # vLLM TP group k = ranks [k*tp, (k+1)*tp); every rank must create every group
            for start in range(0, world, tp):
                group = dist.new_group(list(range(start, start + tp)))
                if start <= rank < start + tp:
                    self._group = group
        self.model_dir = model_dir or self._write_model_dir()
        # In-process engine core: collective_rpc then calls our function on the worker in this
        # process, with the bucket's tensors passed by reference (no serialisation).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(
            model=self.model_dir,
            tokenizer=self.model_dir,
            load_format="dummy",
            dtype=cfg.dtype,
            tensor_parallel_size=tp,
            data_parallel_size=world // tp,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            enable_sleep_mode=True,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_model_len=cfg.max_model_len,
            seed=cfg.seed,
            # vLLM 0.32.0 (v1/sample/sampler.py, ops/topk_topp_sampler.py): "processed_logprobs" is
            # log_softmax(logits / T) taken after top-k/top-p masking (greedy: raw, T = 1); with
            # top_k = 0 and top_p = 1 that is exactly logits_at_temperature's rule. With truncation
            # vLLM renormalises over the kept tokens, which our rule does not.
            logprobs_mode="processed_logprobs",
        )
        self._asleep = False
        self._weights_awake_only = False
        if model_chunks is not None:
            self.update_weights(model_chunks)

    def _write_model_dir(self) -> str:
        """Config (+ tokenizer) folder vLLM starts from; weights come from the actor."""
        folder = tempfile.mkdtemp(prefix="megatron_pz_vllm_")
        self.hf_config.save_pretrained(folder)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder)
        else:
            raise ConfigError("the vLLM engine needs a Hugging Face tokenizer (with save_pretrained) to "
                              "detokenize stop strings")
        return folder

    # ------------------------------------------------------------------ protocol

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self._asleep or self._weights_awake_only:
            raise RuntimeError("VLLMRolloutEngine.generate called while asleep; call wake() first")
        validate_request(prompts, params, self.vocab_size)
        vllm, _ = _import_vllm()
        shares = [list(map(list, prompts))]
        if self._group is not None:
            shares = [None] * self._group_size
            dist.all_gather_object(shares, [list(map(int, p)) for p in prompts], group=self._group)
        mine = 0 if self._group is None else dist.get_rank(self._group)
        requests, sampling = [], []
        base_seed = None if params.seed is None else int(params.seed)
        for owner, share in enumerate(shares):
            for i, prompt in enumerate(share):
                for j in range(params.n):
                    # one request per sample: a shared per-request seed would make n samples identical
                    seed = None if base_seed is None else (base_seed * 1_000_003 + owner * 10_007 + i * 101 + j) % (2**31)
                    requests.append(self._TokensPrompt(prompt_token_ids=prompt))
                    sampling.append(vllm.SamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k if params.top_k > 0 else -1,
                        max_tokens=params.max_new_tokens,
                        stop=list(params.stop) or None,
                        stop_token_ids=self.eos_ids or None,
                        include_stop_str_in_output=True,
                        logprobs=0,
                        seed=seed,
                    ))
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        offset = sum(len(s) for s in shares[:mine]) * params.n
        result: list[list[Completion]] = []
        for i, prompt in enumerate(shares[mine]):
            group = []
            for j in range(params.n):
                out = outputs[offset + i * params.n + j].outputs[0]
                token_ids = list(out.token_ids)
                logprobs = [step[t].logprob for t, step in zip(token_ids, out.logprobs or [])] or None
                group.append(Completion(prompt_ids=list(prompt), token_ids=token_ids, text=out.text,
                                        logprobs=logprobs, finish_reason=_finish_reason(out)))
            result.append(group)
        return result

    def update_weights(self, model_chunks) -> None:
        """Push the actor's weights (all ranks of the actor's model-parallel group take part)."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep, self._weights_awake_only = False, True
        self.last_sync = sync_weights(
            model_chunks, self.hf_config,
            lambda weights: self.llm.collective_rpc(_load_weights_on_worker, args=(weights,)),
            self.cfg.bucket_mb * 1024 * 1024,
        )
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if not self._asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep, self._weights_awake_only = True, False

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
        elif self._weights_awake_only:
            self.llm.wake_up(tags=["kv_cache"])
        self._asleep = self._weights_awake_only = False
