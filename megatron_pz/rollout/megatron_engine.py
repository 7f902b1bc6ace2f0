"""In-process rollouts on the actor's own Megatron modules, with a KV cache.

The engine decodes with the trainer's ``GPTModel`` chunks (shared weights: ``update_weights`` has
nothing to copy) through Megatron's ``StaticInferenceContext`` KV cache. It runs under every layout the
trainer uses: TP (vocab-parallel sampling, :mod:`megatron_pz.rollout.sampling`), PP (hidden states go
stage to stage with Megatron's inference p2p helpers; the last stage samples and broadcasts the
tokens), virtual PP (chunks visited in pipeline order), EP (ranks of an expert-parallel group step in
lockstep, see below) and DP (each rank decodes the prompts it is given).

Batching prompts of different lengths: sequences (prompts x n samples) are sorted by prompt length and
cut into batches of ``max_batch_size``; a batch is prefilled up to its *shortest* prompt in one
forward pass, then decoded one position at a time, where rows whose prompt is longer are fed their
own prompt tokens (teacher forcing) until their prompt ends. Every cached position then holds a real
token at its true position, so no attention mask or position shift is needed and results are exactly
those of decoding each prompt alone (Megatron's static text generation controller uses the same
scheme). Sorting keeps the teacher-forced stretch short; GRPO groups (n samples of one prompt) share
a length and always land together. Left-padding was the alternative: Megatron's static KV path ignores
position ids (RoPE positions come from the cache offset) and would need a padding mask in decode
steps, which the static context does not carry.

Expert parallelism: MoE layers exchange tokens with all-to-all over the EP group, so every rank of that
group must run the same number of forward passes even when its prompts finish earlier (or it has
fewer batches): the number of batches, the cache length and the "all done" flag are all-reduced over
the EP group, and a rank with nothing left decodes a dummy row whose output is discarded. Each call
opens with one all-reduce over the EP group, so a rank whose objective skipped a call (no prompts of its
own) joins its peers' remaining calls in :meth:`MegatronRolloutEngine.finish_phase` at the end of the
rollout phase.

Sequence parallelism (TE spec) cannot split one-token decode steps: it is switched off for the
rollout and restored after, as Megatron's own static controller does (kept in MoE layers when TP and
EP are both > 1). Context parallelism is refused with a clear error.

Cost note (CPU, local spec): Megatron's static KV path caches keys *before* RoPE and re-rotates (and,
for GQA, re-expands) the whole cache at every step, an O(length) elementwise cost per layer that
Hugging Face's cache avoids; it dominates the gap measured by ``bench/bench_rollout.py``.

MoE routes (R3): built with a :class:`~megatron_pz.model.routes.RouteShape`, the engine records every
router's choices while it decodes (:mod:`megatron_pz.rollout.route_recorder`) and each completion carries
the routes of its prompt and response tokens (all but the last sampled one, which is never fed back).

Log-probs are those of the sampling distribution at the request's temperature (log softmax(logits / T),
before top-k / top-p) for each sampled token; see :mod:`megatron_pz.rollout.sampling` and
:func:`megatron_pz.rl.logprobs.logits_at_temperature`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_pz.model.routes import RouteShape, check_routes
from megatron_pz.rollout.base import Completion, SamplingParams
from megatron_pz.rollout.common import StopChecker, eos_ids_of, request_batches, row_seed, seeded_generator, validate_request
from megatron_pz.rollout.route_recorder import RouteRecorder
from megatron_pz.rollout.sampling import SamplingSpec, sample_tokens


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


class MegatronRolloutEngine:
    """:class:`~megatron_pz.rollout.base.RolloutEngine` on the actor's Megatron modules."""

    owns_weights = False  # decodes on the actor's modules: nothing to refresh

    def __init__(
        self,
        model_chunks,
        tokenizer,
        hf_config,
        max_batch_size: int = 32,
        seed: int = 1234,
        eos_token_ids: Optional[Iterable[int]] = None,
        route_shape: Optional[RouteShape] = None,
    ):
        from megatron.core import parallel_state as ps

        self.model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.max_batch_size = int(max_batch_size)
        self.seed = int(seed)
        self.eos_ids = set(eos_token_ids) if eos_token_ids is not None else eos_ids_of(tokenizer, hf_config)
        if ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError(
                "the Megatron rollout engine does not decode with context parallelism (parallel.cp > 1); "
                "use rollout.engine=vllm or cp=1"
            )
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.ep_group = ps.get_expert_model_parallel_group() if ps.get_expert_model_parallel_world_size() > 1 else None
        config = _unwrap(self.model_chunks[0]).config
        self.hidden_size = config.hidden_size
        self.pipeline_dtype = torch.float32 if config.fp32_residual_connection else config.params_dtype
        self.device = next(_unwrap(self.model_chunks[0]).parameters()).device
        self._calls = 0
        self.route_shape = route_shape  # set: record MoE routes into every completion
        self._recorder = RouteRecorder(self.model_chunks, route_shape) if route_shape is not None else None
        self._route_buffer: Optional[torch.Tensor] = None  # the decode batch being recorded

    # ------------------------------------------------------------------ protocol

    def update_weights(self, model_chunks) -> None:
        """Shares the actor's modules: only follow a rebuilt module list, no copy."""
        self.model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if self._recorder is not None:
            self._recorder = RouteRecorder(self.model_chunks, self.route_shape)

    def sleep(self) -> None:
        """Nothing to release: the KV cache lives only inside one :meth:`generate` call."""

    def wake(self) -> None:
        pass

    def finish_phase(self) -> None:
        """End of a rollout phase. Expert parallelism: MoE layers exchange tokens over the EP group, so
        a rank whose objective made fewer ``generate`` calls (no prompts of its own) keeps decoding
        dummy rows in its peers' remaining calls until every peer has finished its phase too."""
        if self.ep_group is None:
            return
        dummy = SamplingParams(max_new_tokens=1, temperature=0.0)
        while self._group_max(0, self.ep_group):  # a peer started another generate call
            num_batches = self._group_max(0, self.ep_group)
            with self._rollout_mode():
                for b in range(num_batches):
                    self._decode_batch([[0]], dummy, [row_seed(0, [0], b)], dummy=True)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        validate_request(prompts, params, self.vocab_size)
        if self.ep_group is not None:  # one round per call: peers in finish_phase answer 0 here
            self._group_max(1, self.ep_group)
        seed = self.seed + self._calls if params.seed is None else int(params.seed)
        self._calls += 1
        items, batches = request_batches(prompts, params.n, self.max_batch_size)
        num_batches = self._group_max(len(batches), self.ep_group)
        out: list[list[Optional[Completion]]] = [[None] * params.n for _ in prompts]
        with self._rollout_mode():
            for b in range(num_batches):
                if b < len(batches):
                    # one stream per (seed, prompt, sample index): what is sampled for a prompt does
                    # not depend on its batch-mates, the batch size or the data-parallel layout
                    row_seeds = [row_seed(seed, items[k][2], items[k][1]) for k in batches[b]]
                    done = self._decode_batch([items[k][2] for k in batches[b]], params, row_seeds)
                    for k, completion in zip(batches[b], done):
                        out[items[k][0]][items[k][1]] = completion
                else:  # nothing left here, but EP peers still decode: keep stepping with them
                    self._decode_batch([[0]], params, [row_seed(seed, [0], b)], dummy=True)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ decoding

    @contextlib.contextmanager
    def _rollout_mode(self):
        """eval() + no_grad, and logits kept vocab-parallel.

        Megatron asserts ``runtime_gather_output=True`` whenever an inference context is passed; a
        pre-hook on the output layer turns the gather back off so each TP rank keeps its V/TP columns
        and :func:`sample_tokens` samples without materialising the vocabulary.
        """
        was_training = [m.training for m in self.model_chunks]
        sequence_parallel = self._disable_sequence_parallel()
        hooks = []
        for chunk in self.model_chunks:
            model = _unwrap(chunk)
            if getattr(model, "post_process", False):
                hooks.append(model.output_layer.register_forward_pre_hook(
                    lambda mod, args, kwargs: (args, {**kwargs, "runtime_gather_output": False}),
                    with_kwargs=True,
                ))
        recording = self._recorder.recording() if self._recorder is not None else contextlib.nullcontext()
        try:
            for m in self.model_chunks:
                m.eval()
            with torch.no_grad(), recording:
                yield
        finally:
            for hook in hooks:
                hook.remove()
            for m, flag in zip(self.model_chunks, was_training):
                m.train(flag)
            if sequence_parallel:
                self._disable_sequence_parallel(restore=True)

    def _disable_sequence_parallel(self, restore: bool = False) -> bool:
        """Sequence parallelism (TE spec, GPU) cannot split a one-token decode step. As Megatron's own
        static-batching controller does, turn it off for the rollout, except in MoE layers when
        TP and EP are both > 1 (their dispatcher relies on it). Returns whether anything changed."""
        from megatron.core.transformer.moe.moe_layer import BaseMoELayer
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        changed = False
        for chunk in self.model_chunks:
            model = _unwrap(chunk)
            config = model.config
            if not restore and not config.sequence_parallel:
                continue
            tp_ep = config.tensor_model_parallel_size > 1 and config.expert_model_parallel_size > 1
            set_model_to_sequence_parallel(model, restore, exclude_modules=[BaseMoELayer] if tp_ep else None)
            changed = True
        return changed

    def _group_max(self, value: int, group) -> int:
        if group is None:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())

    def _broadcast_from_last_stage(self, packed: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """Sampled tokens + log-probs ``[2, b]`` from the last pipeline stage to the others.

        (Megatron's ``broadcast_from_last_pipeline_stage`` asserts CUDA tensors; this is the same
        broadcast over the PP group, device-agnostic.)"""
        from megatron.core import parallel_state as ps

        if packed is None:
            packed = torch.empty(2, batch, dtype=torch.float64, device=self.device)
        dist.broadcast(packed, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return packed

    def _forward(self, tokens: torch.Tensor, context) -> Optional[torch.Tensor]:
        """One forward pass through all pipeline stages/chunks; last-token logits ``[b, V/TP]`` on the
        last stage (None elsewhere). Advances the cache offset."""
        from megatron.core.inference.communication_utils import (
            recv_from_prev_pipeline_rank_,
            send_to_next_pipeline_rank,
        )

        batch, length = tokens.shape
        positions = torch.arange(context.sequence_len_offset, context.sequence_len_offset + length,
                                 device=tokens.device).unsqueeze(0).expand(batch, -1)
        logits = None
        last_chunk = len(self.model_chunks) - 1
        for c, chunk in enumerate(self.model_chunks):
            first_piece = self.pp_rank == 0 and c == 0
            last_piece = self.pp_rank == self.pp_size - 1 and c == last_chunk
            model = _unwrap(chunk)
            if not first_piece:
                hidden = torch.empty(length, batch, self.hidden_size, dtype=self.pipeline_dtype,
                                     device=tokens.device)
                recv_from_prev_pipeline_rank_(hidden)
                model.set_input_tensor(hidden)
            output = chunk(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            if last_piece:
                logits = output[:, -1, :]
            else:
                send_to_next_pipeline_rank(output.contiguous())
        if self._route_buffer is not None:
            self._recorder.store(self._route_buffer, context.sequence_len_offset, length)
        context.sequence_len_offset += length
        return logits

    def _decode_batch(self, prompts: list[list[int]], params: SamplingParams, row_seeds: list[int],
                      dummy: bool = False) -> list[Completion]:
        from megatron.core.inference.contexts import StaticInferenceContext

        batch = len(prompts)
        lengths = [len(p) for p in prompts]
        shortest, longest = min(lengths), max(lengths)
        # Decode steps after the prefill; EP peers all run the largest count of the group.
        steps = self._group_max(longest - shortest + params.max_new_tokens, self.ep_group)
        capacity = shortest + steps
        tokens = torch.zeros(batch, capacity, dtype=torch.long, device=self.device)
        for r, p in enumerate(prompts):
            tokens[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        context = StaticInferenceContext(batch, capacity)
        spec = SamplingSpec(params.temperature, params.top_k, params.top_p)
        stops = StopChecker(self.tokenizer, params.stop)
        generated: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        done = [dummy] * batch
        vocab_start = self.tp_rank * (self.vocab_size // self.tp_size)
        is_last_stage = self.pp_rank == self.pp_size - 1
        if self._recorder is not None and not dummy:
            self._route_buffer = self._recorder.new_buffer(batch, capacity)

        logits = self._forward(tokens[:, :shortest], context)
        position = shortest
        while True:
            if is_last_stage:
                # noise for row r's k-th sampled token comes from (row seed, k) only, so rows still
                # reading their prompt, batch-mates and batch size leave a row's samples unchanged
                step_generators = [seeded_generator(stream, len(generated[r]), self.device)
                                   for r, stream in enumerate(row_seeds)]
                sampled, lps = sample_tokens(logits, vocab_start, self.vocab_size, spec, step_generators,
                                             self.tp_group)
                packed = torch.stack([sampled.double(), lps.double()])
            else:
                packed = None
            if self.pp_size > 1:
                packed = self._broadcast_from_last_stage(packed, batch)
            sampled, sampled_logprobs = packed[0].long().tolist(), packed[1].tolist()
            for r in range(batch):
                if done[r] or position < lengths[r]:
                    continue  # finished, or still inside its prompt (teacher forced below)
                token = sampled[r]
                generated[r].append(token)
                logprobs[r].append(sampled_logprobs[r])
                tokens[r, position] = token
                if token in self.eos_ids:
                    done[r], reasons[r] = True, "eos"
                elif stops.hit(generated[r]):
                    done[r], reasons[r] = True, "stop"
                elif len(generated[r]) >= params.max_new_tokens:
                    done[r] = True
            position += 1
            finished = int(all(done))
            if self.ep_group is not None:
                finished = -self._group_max(-finished, self.ep_group)  # done only when all peers are
            if finished or position >= capacity:
                break
            logits = self._forward(tokens[:, position - 1: position], context)
        if dummy:
            return []
        routes = self._take_routes(prompts, generated)
        completions = []
        for r in range(batch):
            text = stops.decode(generated[r])
            if reasons[r] == "stop":
                text = stops.cut(text)
            completions.append(Completion(prompt_ids=prompts[r], token_ids=generated[r], text=text,
                                          logprobs=logprobs[r], finish_reason=reasons[r], routes=routes[r]))
        return completions

    def _take_routes(self, prompts: list[list[int]], generated: list[list[int]]) -> list:
        """Each row's recorded routes (prompt + response - 1 tokens), every pipeline stage's layers."""
        buffer, self._route_buffer = self._route_buffer, None
        if buffer is None:
            return [None] * len(prompts)
        buffer = self._recorder.gather(buffer, self.pp_group, self.pp_size)
        out = []
        for r, (prompt, gen) in enumerate(zip(prompts, generated)):
            n = len(prompt) + len(gen) - 1
            out.append(check_routes(buffer[r, :n].numpy(), self.route_shape, n, f"Megatron engine decode row {r}"))
        return out
