"""Does a rollout engine serve the actor's current policy? Its completions scored by the actor itself.

An engine that holds its own weights (``hf``, vLLM) can go stale in ways no weight comparison shows (a
kernel's packed copy of a weight, see :func:`~megatron_pz.rollout.vllm_engine.refresh_processed_weights`),
so the check is on what reaches the trainer: each completion is teacher-forced through the actor and

* greedy tokens must be the actor's argmax (up to ``tolerance`` in log-prob, so a bf16 near-tie passes);
* reported log-probs must equal ``log_softmax(actor logits / T)`` of the sampled tokens (the rule of
  :func:`megatron_pz.rl.logprobs.logits_at_temperature`).

Used by tests/workers/vllm_parity.py (fp32, tight) and ``tools/gpu_smoke.py --rollout vllm`` (bf16, on a
GPU). The actor is one whole Megatron model (TP = PP = 1) on its own device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_pz.rollout.base import SamplingParams


@dataclass
class Parity:
    completions: int = 0
    max_logprob_diff: float = 0.0  # over every reported token
    max_greedy_gap: float = 0.0  # actor's best log-prob minus that of the engine's greedy token

    def __str__(self) -> str:
        return (f"{self.completions} completions: log-probs within {self.max_logprob_diff:.3g} of the actor's, "
                f"greedy tokens within {self.max_greedy_gap:.3g} of its argmax")


def actor_token_logprobs(model, prompt: list[int], tokens: list[int], temperature: float):
    """(log-probs of ``tokens`` after ``prompt`` at ``temperature``, full log-softmax rows) under ``model``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(tokens)], device=device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids, positions, None)[0, len(prompt) - 1: -1].float()
    rows = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return rows.gather(-1, torch.tensor(tokens, device=device).unsqueeze(-1)).squeeze(-1).cpu(), rows.cpu()


def check_engine_parity(engine, model, prompts: list[list[int]], tolerance: float,
                        temperatures=(0.0, 1.0, 0.7), max_new_tokens: int = 12, seed: int = 3) -> Parity:
    """Generate on ``engine`` (awake, weights pushed) and score every completion with ``model``; raise
    AssertionError naming the first completion off by more than ``tolerance``."""
    seen = Parity()
    for temperature in temperatures:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=1 if not temperature else 2,
                                seed=seed)
        for prompt, group in zip(prompts, engine.generate(prompts, params)):
            for c in group:
                if not c.token_ids or c.logprobs is None or len(c.logprobs) != len(c.token_ids):
                    raise AssertionError(f"T={temperature}: the engine returned {c}")
                ours, rows = actor_token_logprobs(model, prompt, c.token_ids, temperature)
                diff = (ours - torch.tensor(c.logprobs)).abs().max().item()
                gap = (rows.max(-1).values - ours).max().item() if not temperature else 0.0
                seen.completions += 1
                seen.max_logprob_diff = max(seen.max_logprob_diff, diff)
                seen.max_greedy_gap = max(seen.max_greedy_gap, gap)
                if diff > tolerance or gap > tolerance:
                    raise AssertionError(f"T={temperature}, prompt {prompt[:8]}...: tokens {c.token_ids} off the "
                                         f"actor by {diff:.3g} in log-prob, {gap:.3g} from its argmax "
                                         f"(tolerance {tolerance})")
    return seen
