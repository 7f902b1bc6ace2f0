"""What a rollout engine is sized for: its context length and, for vLLM, its KV cache in bytes.

One place for both the engine and the memory plan (:mod:`megatron_pz.memory_plan.plan`), so the plan
counts exactly what the engine asks for.
"""

from __future__ import annotations

import math
from typing import Optional

# vLLM 0.32.0 platforms/cpu.py check_and_update_config: the CPU backend's block size when the user sets
# none (GPU backends default to 16). The KV cache is handed out in whole blocks.
VLLM_CPU_BLOCK_SIZE = 128
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def eval_response_budget(cfg) -> int:
    """Longest response the held-out evaluation generates (``cfg``: the RunConfig): the greedy tasks'
    ``train.eval_max_new_tokens``, the generator reward's predictions (``objective.predictor_max_tokens``)
    and the information gain's thoughts (+2: ``</think>`` and the target its scoring appends), each only
    when it runs."""
    e, o = cfg.eval, cfg.objective
    longest = cfg.train.eval_max_new_tokens
    if e.generator_reward_samples:
        longest = max(longest, o.predictor_max_tokens)
    if e.info_gain_positions:
        longest = max(longest, (e.info_gain_thought_tokens or o.rlp_settings().rlp_thought_max_tokens) + 2)
    return longest


def rollout_context_length(cfg) -> int:
    """Prompt + longest response this run generates (vLLM's ``max_model_len`` unless
    ``rollout.max_model_len`` is set; without it vLLM sizes its KV cache for the model's full context).

    The responses are every phase / component's (``ObjectiveConfig.longest_response``) and the held-out
    evaluation's (:func:`eval_response_budget`). Not the PretrainZero budgets of
    an objective that never runs them: an RLP run's evaluation used to size vLLM's KV cache for
    ``generator_max_tokens`` (4096 by default) although its greedy tasks stop at ``train.eval_max_new_tokens``
    (a SmolLM2 RLP run with 32-token thoughts asked for 64 x 4,616 tokens, 13 GiB, and was OOM-killed).
    """
    longest = max(cfg.objective.longest_response(), eval_response_budget(cfg))
    return cfg.train.max_prompt_tokens + longest + 8


def vllm_max_model_len(cfg) -> int:
    return cfg.rollout.max_model_len or rollout_context_length(cfg)


def kv_bytes_per_token(hf_config, tensor_parallel_size: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token on one rank of a vLLM TP group (KV heads split over TP,
    replicated when there are fewer heads than ranks)."""
    heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * max(1, heads // tensor_parallel_size) * head_dim * dtype_bytes


def vllm_kv_cache_bytes(rollout_cfg, hf_config, max_model_len: int, on_cpu: bool,
                        dtype_bytes: int) -> Optional[int]:
    """The ``kv_cache_memory_bytes`` vLLM gets, or None for "the rest of ``gpu_memory_utilization``".

    ``rollout.kv_cache_memory_bytes`` when set. Otherwise on vLLM's CPU platform, where
    ``gpu_memory_utilization`` would be a fraction of the whole NUMA node's RAM per rank (vLLM 0.32.0
    ``v1/worker/cpu_worker.py``), the KV cache of ``rollout.max_batch_size`` sequences of
    ``max_model_len`` tokens in whole blocks: what the ``hf`` and Megatron engines hold for the same run.
    """
    if rollout_cfg.kv_cache_memory_bytes is not None:
        return int(rollout_cfg.kv_cache_memory_bytes)
    if not on_cpu:
        return None
    tokens = math.ceil(max_model_len / VLLM_CPU_BLOCK_SIZE) * VLLM_CPU_BLOCK_SIZE
    return rollout_cfg.max_batch_size * tokens * kv_bytes_per_token(hf_config, rollout_cfg.tensor_parallel_size,
                                                                     dtype_bytes)
