"""vLLM rollouts on GPU, colocated with the Megatron actor (same processes, same GPUs).

Written against vLLM 0.32.0's offline API (``vllm/entrypoints/llm.py``, ``vllm/v1/worker/gpu_worker.py``,
``vllm/model_executor/model_loader/reload/inplace.py``, ``vllm/distributed/parallel_state.py``):

* Independent engines, one per vLLM tensor-parallel group. ``LLM(...,
  distributed_executor_backend="external_launcher")`` makes one engine per torchrun rank that reuses
  the job's ``torch.distributed`` world; vLLM lays the world out as ``ExternalDP x DP x PP x TP``, so
  with ``data_parallel_size`` left at 1 ranks ``[k*T, (k+1)*T)`` form engine ``k``
  (``T = rollout.tensor_parallel_size``, independent of the actor's layout) and the engines never talk
  to each other (as verl runs it). ``data_parallel_size=world/T`` would instead make one lock-stepped
  model-DP engine: MoE experts flattened across all ranks and a collective at every step, which
  deadlocks when one rank has nothing to generate.
* All ranks of an engine must submit the same requests, in the same order, with the same seeds
  (external_launcher: every rank runs the scheduler). Each call is a *round* over the engine's group:
  the group all-gathers what each member asks for, every member generates the union, and keeps its
  share. Only the leader of each actor model-parallel group (TP x CP x PP) asks; its completions are
  broadcast to the rest of that group, so all ranks that train on the same data see the same samples.
  A rank whose objective skipped ``generate`` (no prompts of its own) joins its peers' remaining rounds
  in :meth:`VLLMRolloutEngine.finish_phase`, which the phase protocol runs before sleeping.
* Sleep: ``enable_sleep_mode=True``; ``llm.sleep(level=2)`` (default) drops weights and KV cache while
  the actor trains, since the weights are resent every step (level 1 would copy them to pinned host
  memory each time). The phase protocol wakes ``["weights"]`` first, reloads, then ``["kv_cache"]``
  right before the first generation, so a sync never needs KV-cache memory too.
* Weights: the engine starts from a config-only folder with ``load_format="dummy"``; the actor's
  weights go through vLLM 0.32's supported in-place reload, ``collective_rpc("reload_weights",
  kwargs={"weights_iterator": ..., "is_checkpoint_format": True})`` (worker -> model runner ->
  ``reload_weights``: layerwise ``load_weights`` + ``process_weights_after_loading``). One call takes an
  iterator over *all* buckets of :func:`~megatron_pz.rollout.weight_sync.iter_model_buckets` (a call per
  bucket would process layers half-loaded). With ``external_launcher`` multiprocessing is off and
  ``collective_rpc`` runs in this process, so the bucket tensors are passed by reference. The prefix
  cache is reset after every reload.
* ``max_model_len`` defaults to the run's prompt + response budget (vLLM would use the model's
  40,960 positions and size the KV cache for it); custom all-reduce is off (colocated with Megatron's
  NCCL groups on the same GPUs, as verl does).
* ``SamplingParams(n=1, temperature, top_p, top_k, max_tokens, stop, stop_token_ids, logprobs=0, seed)``
  per sample, seeded from (seed, prompt, sample index) like the other engines, and
  ``generate([TokensPrompt(prompt_token_ids=...)])``. Log-probs are at the sampling temperature
  (``logprobs_mode="processed_logprobs"``), the rule of
  :func:`megatron_pz.rl.logprobs.logits_at_temperature` that the other engines and the trainer use.

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
from megatron_pz.rollout.groups import model_parallel_generation_group
from megatron_pz.rollout.hf_engine import causal_lm_architecture, row_seed
from megatron_pz.rollout.megatron_engine import eos_ids_of, validate_request
from megatron_pz.rollout.weight_sync import SyncStats, iter_model_buckets

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


def _finish_reason(output) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"


def write_model_dir(hf_config, tokenizer, folder: Optional[str] = None) -> str:
    """Config (+ tokenizer) folder vLLM starts from; weights come from the actor. ``architectures``
    is filled in for configs given inline (vLLM resolves the model class from it)."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise ConfigError("the vLLM engine needs a Hugging Face tokenizer (with save_pretrained) to "
                          "detokenize stop strings")
    folder = folder or tempfile.mkdtemp(prefix="megatron_pz_vllm_")
    architectures = getattr(hf_config, "architectures", None)
    hf_config.architectures = [causal_lm_architecture(hf_config)]
    try:
        hf_config.save_pretrained(folder)
    finally:
        hf_config.architectures = architectures
    tokenizer.save_pretrained(folder)
    return folder


class VLLMRolloutEngine:
    """:class:`~megatron_pz.rollout.base.RolloutEngine` backed by one colocated ``vllm.LLM`` per vLLM TP group."""

    owns_weights = True

    def __init__(self, cfg: RolloutConfig, tokenizer, hf_config, max_model_len: Optional[int] = None,
                 model_dir: Optional[str] = None):
        self._vllm, self._TokensPrompt = _import_vllm()
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
        self.rank = rank
        self._engine_group, self._engine_ranks = None, [rank]
        if tp > 1:  # engine k = ranks [k*tp, (k+1)*tp), vLLM's ExternalDP x TP order; every rank makes every group
            for start in range(0, world, tp):
                ranks = list(range(start, start + tp))
                group = dist.new_group(ranks)
                if start <= rank < start + tp:
                    self._engine_group, self._engine_ranks = group, ranks
        self.mp = model_parallel_generation_group()
        self.model_dir = model_dir or write_model_dir(hf_config, tokenizer)  # per rank: nodes share no temp dir
        # external_launcher needs the engine core in this process (vLLM sets it too; set before import use)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = self._vllm.LLM(
            model=self.model_dir,
            tokenizer=self.model_dir,
            load_format="dummy",
            dtype=cfg.dtype,
            tensor_parallel_size=tp,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            enable_sleep_mode=True,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_model_len=max_model_len,
            disable_custom_all_reduce=True,
            seed=cfg.seed,  # equal on all ranks of an engine: their samplers must agree
            # vLLM 0.32.0 (v1/sample/sampler.py, ops/topk_topp_sampler.py): "processed_logprobs" is
            # log_softmax(logits / T) taken after top-k/top-p masking (greedy: raw, T = 1); with
            # top_k = 0 and top_p = 1 that is exactly logits_at_temperature's rule. With truncation
            # vLLM renormalises over the kept tokens, which our rule does not.
            logprobs_mode="processed_logprobs",
        )
        self.keeps_weights_asleep = cfg.sleep_level == 1  # level 2 discards them: every phase reloads
        self._calls = 0
        self._weights_awake = True  # a fresh engine is fully awake
        self._kv_awake = True
        self.syncs = 0
        self.last_sync: Optional[SyncStats] = None

    # ------------------------------------------------------------------ protocol

    def wake(self) -> None:
        """Weights first (a sync follows); the KV cache wakes at the phase's first generation."""
        if not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def _wake_kv(self) -> None:
        if not self._weights_awake:
            raise RuntimeError("VLLMRolloutEngine.generate called while asleep; enter a rollout phase first")
        if not self._kv_awake:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_awake = True

    def sleep(self) -> None:
        if self._weights_awake or self._kv_awake:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._weights_awake = self._kv_awake = False

    def update_weights(self, model_chunks) -> None:
        """Reload the actor's weights in place (all ranks of the actor's model-parallel group take part)."""
        self.load_weight_buckets(iter_model_buckets(model_chunks, self.hf_config, self.cfg.bucket_mb * 1024 * 1024))

    def load_weight_buckets(self, buckets) -> None:
        """Reload from weight buckets of any source: the actor's export (colocated) or the bridge from the
        training ranks (a rollout rank, :mod:`megatron_pz.rollout.bridge`)."""
        import time

        stats = SyncStats()
        start = time.perf_counter()

        def weights():
            for bucket in buckets:
                tensors = bucket.tensors()
                stats.num_tensors += len(tensors)
                stats.num_bytes += bucket.nbytes
                stats.bucket_bytes.append(bucket.nbytes)
                stats.bucket_sizes.append(len(tensors))
                yield from tensors

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        stats.seconds = time.perf_counter() - start
        self.last_sync = stats
        self.syncs += 1

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        validate_request(prompts, params, self.vocab_size)
        seed = self.cfg.seed + self._calls if params.seed is None else int(params.seed)
        self._calls += 1
        mine = [list(map(int, p)) for p in prompts] if self.mp.is_leader() else []
        result = self._round((mine, params, seed))
        return self.mp.broadcast_from_leader(result)

    def finish_phase(self) -> None:
        """Serve the engine group's remaining rounds until every member has finished its phase."""
        while self._round(None) is not None:
            pass

    # ------------------------------------------------------------------ one round of an engine group

    def _round(self, request):
        """All-gather each member's ``(prompts, params, seed)`` (None: this member is done), generate
        the union on every member, return this member's completions (None when all are done)."""
        asks = [request]
        if self._engine_group is not None:
            asks = [None] * len(self._engine_ranks)
            dist.all_gather_object(asks, request, group=self._engine_group)
        if all(a is None for a in asks):
            return None
        requests, sampling, owners = [], [], []
        for member, ask in enumerate(asks):
            if ask is None:
                continue
            prompts, params, seed = ask
            for i, prompt in enumerate(prompts):
                for j in range(params.n):
                    requests.append(self._TokensPrompt(prompt_token_ids=prompt))
                    sampling.append(self._sampling_params(params, row_seed(seed, prompt, j)))
                    owners.append((member, i, j))
        outputs = []
        if requests:
            self._wake_kv()
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        if request is None:
            return []
        me = self._engine_ranks.index(self.rank)
        prompts, params, _ = request
        result: list[list[Optional[Completion]]] = [[None] * params.n for _ in prompts]
        for (member, i, j), output in zip(owners, outputs):
            if member != me:
                continue
            out = output.outputs[0]
            token_ids = list(out.token_ids)
            logprobs = [step[t].logprob for t, step in zip(token_ids, out.logprobs or [])] or None
            result[i][j] = Completion(prompt_ids=list(prompts[i]), token_ids=token_ids, text=out.text,
                                      logprobs=logprobs, finish_reason=_finish_reason(out))
        return result

    def _sampling_params(self, params: SamplingParams, seed: int):
        return self._vllm.SamplingParams(
            n=1,  # one request per sample: a shared per-request seed would make n samples identical
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 = off in vLLM 0.32 as here
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=self.eos_ids or None,
            include_stop_str_in_output=True,
            logprobs=0,
            seed=seed,
        )
