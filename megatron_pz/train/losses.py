"""Loss functions handed to :meth:`Actor.train_step` (run on the last pipeline stage).

Each returns ``(loss_sum, num_tokens, metrics)`` where metrics are sums (the actor reduces them over
micro-batches and ranks). The RL objective's loss is in :mod:`megatron_pz.rl.grpo`; this module adapts
it and the next-token loss of the warm start to the micro-batch layout.
"""

from __future__ import annotations

import torch

from megatron_pz.rl.logprobs import logits_at_temperature
from megatron_pz.train.batching import MicroBatch


def token_logprobs(mb: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
    """log p(token j | tokens < j) as [b, s] (column 0 = 0), vocab-parallel: no full-vocab gather."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    nll = vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), mb.input_ids[:, 1:].contiguous())
    return torch.nn.functional.pad(-nll, (1, 0))


def token_logprobs_at_temperature(mb: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
    """:func:`token_logprobs` of the distribution each row was sampled from: the logits predicting
    token j are divided by ``per_token["temperature"][:, j]`` (the rule of
    :func:`megatron_pz.rl.logprobs.logits_at_temperature`; rows without it, or padding (0), use T = 1)."""
    temperature = mb.per_token.get("temperature")
    if temperature is None:
        return token_logprobs(mb, logits)

    scaled = logits_at_temperature(logits[:, :-1].float(), temperature[:, 1:].unsqueeze(-1))
    return token_logprobs(mb, torch.nn.functional.pad(scaled, (0, 0, 0, 1)))


def next_token_loss(mb: MicroBatch, logits: torch.Tensor):
    """Plain language-model loss on the masked tokens (warm start / format teaching)."""
    logp = token_logprobs(mb, logits)
    mask = mb.loss_mask
    loss_sum = -(logp * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach()}
