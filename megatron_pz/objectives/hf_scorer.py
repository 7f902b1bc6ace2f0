"""A :class:`Scorer` over Hugging Face ``transformers`` causal LMs: the single-process reference.

The trainer's scorer runs Megatron forward passes (vocab-parallel, pipelined); this one runs a
``transformers`` model directly, so objectives can be exercised and debugged without Megatron and
the trainer's scorer can be checked against it.
"""

from __future__ import annotations

import torch


class HFScorer:
    def __init__(self, policy, ema=None, batch_size: int = 8):
        self.models = {"policy": policy, "ema": ema}
        self.batch_size = batch_size

    def _logits(self, model, sequences: list[list[int]]):
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attn = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):  # right padding: real tokens keep positions 0..len-1
                ids[i, :len(s)] = torch.tensor(s)
                attn[i, :len(s)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attn).logits.float()
            for i, s in enumerate(chunk):
                yield s, logits[i, :len(s)]

    def token_logprobs(self, sequences: list[list[int]], model: str = "policy", routes=None) -> list[list[float]]:
        if routes is not None and any(r is not None for r in routes):
            raise ValueError("HFScorer routes natively; it cannot replay MoE routes (use the trainer's scorer)")
        net = self.models.get(model)
        if net is None:
            raise ValueError(f"HFScorer has no {model!r} model")
        out = []
        for s, logits in self._logits(net, sequences):
            logp = torch.log_softmax(logits[:-1], dim=-1)
            out.append(logp.gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1).tolist())
        return out

    def token_entropies(self, sequences: list[list[int]]) -> list[list[float]]:
        out = []
        for _, logits in self._logits(self.models["policy"], sequences):
            logp = torch.log_softmax(logits, dim=-1)
            out.append((-(logp.exp() * logp).sum(-1)).tolist())
        return out
