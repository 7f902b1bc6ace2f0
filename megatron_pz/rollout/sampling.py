"""Next-token sampling on vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for its slice ``[vocab_start, vocab_start + V/TP)`` of the
vocabulary. Sampling is done with the Gumbel-max trick: ``argmax(logits / T + G)`` with i.i.d. Gumbel
noise ``G`` is an exact sample of ``softmax(logits / T)``, and an argmax decomposes over vocabulary
shards (each rank takes its local argmax, then one all-gather of ``[TP, b]`` values picks the winner).
The noise for the *whole* vocabulary is drawn from one generator seeded identically on every rank of
the model-parallel group and then sliced, so

* every TP rank computes the same token (no broadcast needed), and
* the sampled tokens do not depend on the TP size (TP=2 draws what TP=1 draws for the same seed).

top-k: each rank proposes its local top-k, one all-gather of ``[TP, b, k]`` candidates gives the exact
global top-k. top-p (nucleus) needs the globally sorted distribution; with top-k set it runs on the
gathered top-k candidates (exact, small); with top-p alone it gathers the full vocabulary row, because
the nucleus can hold any number of tokens and no per-shard bound on it exists.

Log-probs reported for sampled tokens are those of the sampling distribution at temperature T, before
top-k / top-p truncation: ``log softmax(logits / T)[token]`` (:func:`megatron_pz.rl.logprobs.
logits_at_temperature`, the one rule the trainer uses too, so the train/rollout drift and the IS ratio
compare like with like). The normaliser is combined from per-shard ``(max, sum exp)`` pairs.

Megatron has its own sampling (``megatron.core.inference`` text generation controllers), but it works
on gathered logits and draws from torch's global RNG; we need vocab-parallel sampling with an explicit,
TP-invariant random stream, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_pz.rl.logprobs import logits_at_temperature


@dataclass
class SamplingSpec:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_gather_stack(tensor: torch.Tensor, group) -> torch.Tensor:
    """``[*shape]`` on each rank -> ``[group_size, *shape]`` (identical on all ranks)."""
    size = _group_size(group)
    if size == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def gumbel_noise(batch: int, vocab_size: int, generator, device) -> torch.Tensor:
    """``[batch, vocab_size]`` standard Gumbel noise (same on every rank).

    ``generator`` is one ``torch.Generator`` for the batch, or a list with one per row: per-row
    streams make a sample depend only on its own seed, not on which rows share its batch (so the
    data-parallel size or the batching cannot change what is sampled).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        u = torch.stack([torch.rand(vocab_size, generator=g, device=device, dtype=torch.float32)
                         for g in generator])
    else:
        u = torch.rand(batch, vocab_size, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def _pick_max(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Per column of ``[R, b]`` candidates: the index of the largest value, ties -> smallest index."""
    best = values.max(dim=0).values
    big = torch.iinfo(torch.long).max
    masked = torch.where(values == best.unsqueeze(0), indices, torch.full_like(indices, big))
    return masked.min(dim=0).values


def sharded_logsumexp(logits: torch.Tensor, group) -> torch.Tensor:
    """logsumexp over the full vocabulary of ``[b, V/TP]`` shards -> ``[b]``."""
    local_max = logits.max(dim=-1).values
    local_sum = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    stats = all_gather_stack(torch.stack([local_max, local_sum]), group)  # [tp, 2, b]
    maxes, sums = stats[:, 0], stats[:, 1]
    top = maxes.max(dim=0).values
    return top + torch.log((sums * torch.exp(maxes - top.unsqueeze(0))).sum(dim=0))


def _token_logits(logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Raw logit of ``tokens`` (global ids), looked up on the shard that owns each."""
    local = tokens - vocab_start
    owned = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(owned, picked, torch.full_like(picked, float("-inf")))
    return all_gather_stack(picked, group).max(dim=0).values


def _candidates(scores: torch.Tensor, vocab_start: int, spec: SamplingSpec, group):
    """Global candidate set ``(values [b, C], token ids [b, C])``, sorted by value (desc), ties by id."""
    if spec.top_k > 0:
        k = min(spec.top_k, scores.shape[-1])
        vals, idx = torch.topk(scores, k, dim=-1)
        idx = idx + vocab_start
        vals = all_gather_stack(vals, group).permute(1, 0, 2).reshape(scores.shape[0], -1)
        idx = all_gather_stack(idx, group).permute(1, 0, 2).reshape(scores.shape[0], -1)
    else:  # top-p alone: the nucleus may be any size, so gather the row (see module docstring)
        vals = all_gather_stack(scores, group).permute(1, 0, 2).reshape(scores.shape[0], -1)
        idx = torch.arange(vals.shape[-1], device=scores.device).expand_as(vals)
    by_id = torch.argsort(idx, dim=-1)
    vals, idx = vals.gather(-1, by_id), idx.gather(-1, by_id)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    if spec.top_k > 0:
        vals, idx = vals[:, : spec.top_k], idx[:, : spec.top_k]
    return vals, idx


def sample_tokens(
    logits: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    spec: SamplingSpec,
    generator,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of vocab-parallel ``logits [b, V/TP]``.

    Returns ``(tokens [b] int64 global ids, logprobs [b] float32 log-probs at the sampling temperature,
    see :func:`~megatron_pz.rl.logprobs.logits_at_temperature`)``, identical on
    every rank of ``group`` (the TP group). Collective over ``group``.
    """
    logits = logits.float()
    batch, shard = logits.shape
    if spec.temperature <= 0:
        vals, idx = logits.max(dim=-1)
        tokens = _pick_max(all_gather_stack(vals, group), all_gather_stack(idx + vocab_start, group))
    else:
        noise = gumbel_noise(batch, vocab_size, generator, logits.device)
        scores = logits / spec.temperature
        if spec.top_k > 0 or spec.top_p < 1.0:
            vals, idx = _candidates(scores, vocab_start, spec, group)
            if spec.top_p < 1.0:
                probs = torch.softmax(vals, dim=-1)
                mass_before = torch.cumsum(probs, dim=-1) - probs
                keep = mass_before < spec.top_p
                keep[:, 0] = True
                vals = torch.where(keep, vals, torch.full_like(vals, float("-inf")))
            choice = (vals + noise.gather(-1, idx)).argmax(dim=-1)
            tokens = idx.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        else:
            perturbed = scores + noise[:, vocab_start: vocab_start + shard]
            vals, idx = perturbed.max(dim=-1)
            tokens = _pick_max(all_gather_stack(vals, group), all_gather_stack(idx + vocab_start, group))
    return tokens, reported_logprobs(logits, tokens, vocab_start, group, spec.temperature)


def reported_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int, group=None,
                      temperature: float = 1.0) -> torch.Tensor:
    """The per-token log-prob every rollout engine reports for its sampled ``tokens`` (``[b]``).

    ``log softmax(logits / T)[token]`` at the sampling temperature (before top-k/top-p; greedy counts as
    T = 1): the policy that sampled, which the trainer recomputes at each row's temperature
    (:func:`megatron_pz.rl.logprobs.logits_at_temperature`, one rule for every engine and the trainer).
    The Megatron and the ``hf`` engine both call this function. Collective over ``group``.
    """
    scaled = logits_at_temperature(logits.float(), temperature)
    return _token_logits(scaled, tokens, vocab_start, group) - sharded_logsumexp(scaled, group)
