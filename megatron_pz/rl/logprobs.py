"""Per-token log-probs and entropies from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for its slice of the vocabulary ([..., V/tp]). The log-sum-exp
is assembled from an all-reduce MAX of the per-rank maxima (a constant shift, no gradient needed)
and an all-reduce SUM of the per-rank sums of exponentials; the target's logit comes from the rank
that owns it (all-reduce SUM of a masked pick). Communication is O(tokens), never O(tokens x V).

The SUM all-reduces use Megatron's ``reduce_from_tensor_model_parallel_region`` (forward: all-reduce,
backward: identity), Megatron's convention for a loss that every TP rank computes identically; each
rank's shard then receives exactly its slice of the full-vocabulary gradient. This is the same
algorithm as ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``, written out because that
function has no group argument and no entropy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _resolve_group(tp_group):
    """The TP group to reduce over, or None for a single shard holding the whole vocabulary."""
    if tp_group is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group if dist.get_world_size(tp_group) > 1 else None


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def _shifted(logits_shard: torch.Tensor, group) -> torch.Tensor:
    logits = logits_shard.float()
    global_max = logits.detach().max(dim=-1).values
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    return logits - global_max.unsqueeze(-1)


def vocab_parallel_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor,
                            tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """log p(targets) under softmax over the full vocabulary; float32, shape of ``targets``.

    ``tp_group`` None: Megatron's tensor-parallel group if initialised, else a single shard.
    """
    group = _resolve_group(tp_group)
    shifted = _shifted(logits_shard, group)
    vocab_local = shifted.shape[-1]
    rank = dist.get_rank(group) if group is not None else 0
    local = targets.long() - rank * vocab_local
    owned = (local >= 0) & (local < vocab_local)
    picked = shifted.gather(-1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    picked = _sum(picked * owned.to(picked.dtype), group)
    sum_exp = _sum(shifted.exp().sum(dim=-1), group)
    return picked - torch.log(sum_exp)


def vocab_parallel_entropy(logits_shard: torch.Tensor,
                           tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Entropy H = log Z - sum_v p_v z_v of the full-vocabulary softmax; float32, shape logits[:-1]."""
    group = _resolve_group(tp_group)
    shifted = _shifted(logits_shard, group)
    exp = shifted.exp()
    sum_exp = _sum(exp.sum(dim=-1), group)
    weighted = _sum((exp * shifted).sum(dim=-1), group)
    return torch.log(sum_exp) - weighted / sum_exp


def logits_at_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """The ONE rule for the log-probs of a sampled token: log softmax(logits / T)[token].

    Rollout engines report, and the trainer trains on, log-probs of the distribution the token was
    sampled from (temperature T, before any top-k / top-p truncation), as verl and TRL do; otherwise
    the gradient is of a different policy than the one that sampled and the IS ratio compares the
    wrong pair. ``temperature``: a float, or a tensor broadcastable to ``logits[..., :1]`` (one value
    per row / token). T <= 0 (greedy decoding) leaves the logits as they are (T = 1).
    """
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(logits.dtype)
        return logits / torch.where(t > 0, t, torch.ones_like(t))
    if temperature <= 0 or temperature == 1.0:
        return logits
    return logits / temperature
