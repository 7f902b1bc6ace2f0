"""Per-GPU memory budget of a run, per phase (rollout, scoring, training), before anything is built.

Every term is a function of the run config, the HF config and the world layout; each has a docstring
saying which tensors it counts and where that was read or measured. Three groups:

* **Model state** (resident for the whole run): the parameters, the fp32 gradient buffer and the
  optimizer state, replicated exactly as megatron-core 0.16.1 lays them out
  (``distributed/param_and_grad_buffer.py``: one buffer per (param dtype, grad dtype) and per
  dense/expert group, parameters walked in reverse order, starts aligned to 64 elements and buckets
  padded to ``lcm(DP, 128)`` with the distributed optimizer; ``optimizer/distrib_optimizer.py``: each
  DP rank owns ``1/DP`` of every bucket and keeps fp32 main copies (16-bit params only) and Adam's
  ``exp_avg``/``exp_avg_sq`` for the elements it owns). tests/test_memory_plan.py checks these bytes
  against a built :class:`~megatron_pz.train.actor.Actor` for equality.
* **Activations** of one micro-batch of ``train.max_tokens_per_micro_batch`` padded tokens: the
  tensors autograd saves, counted per module from the local (plain PyTorch) spec's saved-tensor
  inventory (``torch.autograd.graph.saved_tensors_hooks`` over a training step, see
  :func:`layer_activation_elements`), plus the logits path of the GRPO loss. Measured on CPU against
  the allocator's peak (torch.profiler memory events): tests/test_memory_plan.py. The Transformer
  Engine spec differs where TE fuses (layer norm into the next GEMM) or quantises (FP8 GEMM inputs);
  those differences are read from the source, not measured (no GPU was at hand).
* **MoE routing replay** (:mod:`.routes`): the step's rollout routes on the host, the replay targets of
  the micro-batches in flight on the device.
* **Rollout engine**: vLLM takes ``gpu_memory_utilization`` of the device while awake (weights at its
  own TP, the KV cache and its workspace inside that share); asleep, level 1 keeps its weights in
  pinned host memory and level 2 drops them; the Megatron engine's static KV cache.

A disaggregated run (``rollout.placement: disaggregated``) gets one plan per role (:func:`plan_split`): the
training ranks without engine terms (a "weight push" phase holds one packed bucket instead), the rollout
ranks with their engine awake for the whole run plus one received bucket. A rollout rank holds the rows of
``rollout.max_staleness`` + 1 requested steps at once (:func:`~.plan.rows_in_flight`): the plan shows the part of
the engine's KV cache they take at full length (and notes how many run at once when the cache is smaller: the
others wait for its blocks), and their token ids, log-probs and weight versions as a host term (with
``rollout.partial_rollout_tokens`` the rows cut at a window's budget wait there for the next window).

Modules: :mod:`.model_state` (parameters, buffers, optimizer), :mod:`.activations` (saved tensors and the
logits path), :mod:`.routes` (routing replay), :mod:`.plan` (the phases, the verdict, the table, ``train``'s start-up check).

Not counted (left to the margin): the CUDA context and NCCL's communication buffers (a few hundred
MiB per process, driver- and topology-dependent), allocator fragmentation, vLLM's CUDA-graph pool
kept across sleep. That is why shipped configs are sized with at least 10 % margin.
"""

from megatron_pz.memory_plan.activations import (Term, layer_activation_elements, logits_terms, scoring_terms,
                                                 training_activation_terms)
from megatron_pz.memory_plan.model_state import (Buffer, Layout, ParamSpec, Shapes, StateBytes, chunk_params,
                                                 ddp_buffer, layout_of, model_state_bytes, owned_elements,
                                                 rank_model_state, worst_model_state)
from megatron_pz.memory_plan.plan import (DEFAULT_MIN_MARGIN, GIB, MemoryPlan, Phase, SplitPlan, check_at_startup,
                                          device_memory, max_sequence_length, plan_rollout_ranks, plan_run,
                                          plan_split, render)

__all__ = [
    "Buffer", "DEFAULT_MIN_MARGIN", "GIB", "Layout", "MemoryPlan", "ParamSpec", "Phase", "Shapes", "SplitPlan",
    "StateBytes", "plan_rollout_ranks", "plan_split",
    "Term", "check_at_startup", "chunk_params", "ddp_buffer", "device_memory", "layer_activation_elements",
    "layout_of", "logits_terms", "max_sequence_length", "model_state_bytes", "owned_elements", "plan_run",
    "rank_model_state", "render", "scoring_terms", "training_activation_terms", "worst_model_state",
]
