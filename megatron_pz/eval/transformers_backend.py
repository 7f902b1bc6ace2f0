"""A Hugging Face folder behind the two interfaces the held-out evaluation drives, on plain ``transformers``.

The held-out evaluation (:mod:`megatron_pz.eval.heldout`, :mod:`megatron_pz.eval.records`) talks to a
:class:`~megatron_pz.rollout.base.RolloutEngine` (``generate``) and a
:class:`~megatron_pz.objectives.base.Scorer` (``token_logprobs``). During a run those are the run's
rollout engine and the Megatron actor; for an exported folder they are this class: the folder loaded
with ``AutoModelForCausalLM.from_pretrained`` and decoded with ``model.generate`` (greedy, or sampling
seeded per call), scored with one plain forward pass. Nothing of ours sits between the folder and the
figures, so a conversion that dropped or mangled a tensor shows up in them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_pz.rollout.base import Completion, SamplingParams


class TransformersBackend:
    owns_weights = False

    def __init__(self, model_dir, dtype: str = "auto", device: str = "cpu", batch_size: int = 16):
        """``dtype``: auto (the folder's own: what an exported run was trained in) | float32 | bfloat16."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype="auto" if dtype == "auto" else getattr(torch, dtype)).to(device)
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    # ------------------------------------------------------------------ RolloutEngine

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, batches of ``batch_size`` rows (left-padded); sampling draws
        from torch's generator seeded with ``params.seed`` + the batch number, so a call repeats exactly."""
        rows = [(i, list(map(int, p))) for i, p in enumerate(prompts) for _ in range(params.n)]
        out: list[list[Completion]] = [[] for _ in prompts]
        for b, start in enumerate(range(0, len(rows), self.batch_size)):
            chunk = rows[start:start + self.batch_size]
            for (i, prompt), completion in zip(chunk, self._batch([p for _, p in chunk], params, b)):
                out[i].append(completion)
        return out

    def _batch(self, prompts: list[list[int]], params: SamplingParams, batch_number: int) -> list[Completion]:
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        sampling = params.temperature > 0
        kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k or None) if sampling else dict(do_sample=False)
        if sampling:
            torch.manual_seed((params.seed or 0) * 1_000_003 + batch_number)
        with torch.no_grad():
            gen = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
                                      pad_token_id=self.pad_id, **kwargs)
        completions = []
        for r, p in enumerate(prompts):
            new = gen[r, longest:].tolist()
            reason = "length"
            ended = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
            if ended is not None:
                new, reason = new[:ended + 1], "eos"
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = cut_at_stop(text, params.stop)
            if cut is not None:
                # the completion ends with the token that completed the stop string (as vLLM keeps it)
                text, reason = cut, "stop"
                new = new[:_tokens_covering(self.tokenizer, new, len(cut))]
            completions.append(Completion(prompt_ids=p, token_ids=new, text=text, finish_reason=reason))
        return completions

    # ------------------------------------------------------------------ Scorer

    def token_logprobs(self, sequences: list[list[int]], model: str = "policy",
                       routes: Optional[Sequence] = None) -> list[list[float]]:
        """log p(seq[i] | seq[:i]) for i = 1..len-1, at temperature 1 (right-padded batches)."""
        if model != "policy":
            raise ValueError(f"a Hugging Face folder has only its own weights (model='policy'), not {model!r}")
        out: list[list[float]] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = [list(map(int, s)) for s in sequences[start:start + self.batch_size]]
            longest = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            with torch.no_grad():
                logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device)).logits[:, :-1].float()
                # log softmax at the targets only: one vocabulary-sized temporary (logsumexp's), not two
                picked = logits.gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
                logp = picked - torch.logsumexp(logits, dim=-1)
            out += [logp[r, :len(s) - 1].tolist() for r, s in enumerate(chunk)]
        return out


def cut_at_stop(text: str, stop: Sequence[str]) -> Optional[str]:
    """``text`` up to and including the earliest stop string, or None when none occurs."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else None


def _tokens_covering(tokenizer, ids: list[int], chars: int) -> int:
    """The fewest leading tokens of ``ids`` whose text holds the first ``chars`` characters."""
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= chars:
            return k
    return len(ids)
