"""The trainable policy: Megatron model chunks, DDP, (distributed) optimizer, LR schedule.

All parallel plumbing for one optimizer step lives here so the trainer loop reads as the algorithm:
``actor.train_step(micro_batches, loss_fn)`` runs Megatron's pipeline schedule
(``get_forward_backward_func``), which calls ``loss_fn(micro_batch, vocab_parallel_logits)`` on the
last pipeline stage. ``loss_fn`` returns ``(loss_sum, num_tokens, metrics)``: with
``calculate_per_token_loss`` Megatron sums ``num_tokens`` over micro-batches and data-parallel ranks and
divides the gradients once by that global count.

MoE routing replay (R3): every forward the schedule runs goes through :attr:`Actor.routing`
(:class:`~megatron_pz.train.routing_replay.RoutingReplay`), which hands the micro-batch's rollout routes to
the routers of the chunk that runs it (``routing_replay="r3"``) or only measures agreement (``"off"``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_pz.checkpoint import load_checkpoint
from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_pz.model.provider import build_model
from megatron_pz.model.routes import NATIVE, RouteShape
from megatron_pz.train.batching import MicroBatch, TokenSequence, make_micro_batches, round_up, sequence_multiple
from megatron_pz.train.routing_replay import RoutingReplay

LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def build_model_chunks(hf_config, model_cfg: ModelConfig, parallel: ParallelConfig, device,
                       max_sequence_length: Optional[int] = None) -> list[torch.nn.Module]:
    """One chunk per virtual pipeline stage (a single chunk without interleaving)."""
    stages = parallel.virtual_pp or 1
    return [
        build_model(hf_config, model_cfg, parallel, device, max_sequence_length,
                    vp_stage=(v if parallel.virtual_pp else None))
        for v in range(stages)
    ]


@contextlib.contextmanager
def output_layer_from(model, start: int):
    """Inside, ``model``'s output layer (on the last pipeline stage) sees hidden states ``[start:]`` of the
    sequence only, so the model returns logits ``[b, s - start, V]`` (megatron-core 0.16.1 ``GPTModel.
    _postprocess`` calls ``self.output_layer(hidden_states, ...)`` with hidden states ``[s, b, h]``)."""
    layer = getattr(unwrap(model), "output_layer", None) if start else None
    if layer is None:
        yield
        return

    def window(module, args, kwargs):
        return (args[0][start:], *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(window, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def sequence_multiple_of(config) -> int:
    """What this model's micro-batch widths must be a multiple of (Megatron ``TransformerConfig``):
    SP scatters the sequence over TP, CP cuts it in 2 x CP chunks, FP8 GEMMs need aligned rows."""
    return sequence_multiple(config.tensor_model_parallel_size, config.sequence_parallel,
                             config.context_parallel_size, config.fp8_recipe if config.fp8 else None)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def wrap_ddp(chunks: list, transformer_config, opt_cfg: OptimizerConfig) -> list:
    """Megatron DDP around each chunk: fp32 gradient buffers, reduced (and gathered, with the distributed
    optimizer) over the data-parallel group; only the first chunk is bucketed."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=opt_cfg.overlap_grad_reduce,
        overlap_param_gather=opt_cfg.overlap_param_gather,
        use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
        average_in_collective=False,
    )
    return [DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def build_optimizer(chunks: list, opt_cfg: OptimizerConfig, dtype: torch.dtype):
    """Megatron's optimizer over the DDP chunks (distributed when ``optimizer.use_distributed_optimizer``)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer=opt_cfg.name,
            lr=opt_cfg.lr,
            min_lr=opt_cfg.min_lr,
            weight_decay=opt_cfg.weight_decay,
            adam_beta1=opt_cfg.adam_beta1,
            adam_beta2=opt_cfg.adam_beta2,
            adam_eps=opt_cfg.adam_eps,
            clip_grad=opt_cfg.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
        ),
        chunks,
    )


def build_scheduler(optimizer, opt_cfg: OptimizerConfig, total_steps: int):
    """The learning-rate schedule: linear warmup over ``optimizer.warmup_steps`` then ``optimizer.lr_schedule``
    down to ``min_lr`` at ``total_steps`` (a constant schedule stays at ``lr``); constant weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = max(1, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt_cfg.warmup_steps else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr if opt_cfg.lr_schedule != "constant" else opt_cfg.lr,
        lr_warmup_steps=opt_cfg.warmup_steps,
        lr_decay_steps=max(decay_steps, opt_cfg.warmup_steps + 1),
        lr_decay_style=opt_cfg.lr_schedule,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


@dataclass
class StepResult:
    metrics: dict[str, float]
    grad_norm: float
    lr: float
    num_tokens: int


class Actor:
    """Owns the policy's parameters and their optimizer; one call per optimizer step."""

    def __init__(self, hf_config, model_cfg: ModelConfig, parallel: ParallelConfig,
                 opt_cfg: OptimizerConfig, device: torch.device, total_steps: int,
                 max_sequence_length: Optional[int] = None, routing_replay: str = "off"):
        self.hf_config = hf_config
        self.parallel = parallel
        self.device = device
        chunks = build_model_chunks(hf_config, model_cfg, parallel, device, max_sequence_length)
        self.transformer_config = unwrap(chunks[0]).config
        self.sequence_multiple = sequence_multiple_of(self.transformer_config)
        self.use_logits_window = True  # see logits_window
        self.chunks = wrap_ddp(chunks, self.transformer_config, opt_cfg)
        self.optimizer = build_optimizer(self.chunks, opt_cfg, self.transformer_config.params_dtype)
        self.scheduler = build_scheduler(self.optimizer, opt_cfg, total_steps)
        # MoE: rollout routes replayed ("r3") or only compared ("off") in every forward; None when dense
        self.route_shape = RouteShape.from_hf(hf_config)
        if routing_replay not in ("off", "r3"):
            raise ValueError(f"routing_replay must be 'off' or 'r3', got {routing_replay!r}")
        if routing_replay == "r3" and self.route_shape is None:
            raise ValueError("routing_replay='r3' needs an MoE model; this one is dense")
        self.routing = None
        if self.route_shape is not None:
            self.routing = RoutingReplay(self.chunks, self.route_shape, replay=routing_replay == "r3")
        self._wire_schedule_hooks(opt_cfg)

    def _wire_schedule_hooks(self, opt_cfg: OptimizerConfig) -> None:
        """What Megatron's pipeline schedule calls around the passes: gradient finalisation, loss scaling,
        DDP's no-sync and, with overlapped parameter gathers, the parameter sync of each chunk."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        cfg = self.transformer_config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss
        cfg.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        if opt_cfg.overlap_param_gather and opt_cfg.use_distributed_optimizer:
            cfg.param_sync_func = [c.start_param_sync for c in self.chunks]
            if len(self.chunks) == 1:
                cfg.param_sync_func = cfg.param_sync_func[0]

    def load_weights(self, path) -> None:
        """Model weights only (an imported or warm-started checkpoint, no optimizer state), then the
        optimizer's fp32 main params refreshed from them (megatron-core's ``reload_model_params``). The main
        params of a bf16/fp16 model are copies taken when the optimizer was built, from the random init:
        without the refresh its first step wrote them back, and a bf16 run from an imported checkpoint
        trained the random init (SmolLM2 format warm start: loss 4.3 -> 11.1, ln(vocab) 10.8, in one step)."""
        load_checkpoint(path, self.chunks, restore_rng=False)
        self.optimizer.reload_model_params()

    def logits_window(self, mb: MicroBatch) -> int:
        """First position whose logits a training step needs: the one predicting the first trained token, or the
        first token the rollout correction rejected (its metrics count them), rounded down to
        :attr:`sequence_multiple`. An RL row trains on its response only (Random RLPT on
        SmolLM2: ~10 of ~170 tokens), so the output layer, the loss's softmax over 49,152 tokens and the
        entropy skip the prompt (update ~25 % faster there). 0 where the sequence is split across ranks
        before the output layer (sequence or context parallel) and off with ``logits_window = False``."""
        config = self.transformer_config
        if not self.use_logits_window or config.sequence_parallel or config.context_parallel_size > 1:
            return 0
        start = max(0, mb.first_needed_column() - 1)
        return start - start % self.sequence_multiple

    # ------------------------------------------------------------------ schedule

    def micro_batches(self, rows: Sequence[TokenSequence], max_tokens_per_micro_batch: int,
                      pad_id: int) -> list[MicroBatch]:
        """Length-bucketed micro-batches for this actor: widths padded to :attr:`sequence_multiple`,
        the same count (and, interleaved, shape) on every rank. Built on the host; the schedule moves
        each one to the actor's device as it runs."""
        batches = make_micro_batches(rows, max_tokens_per_micro_batch, pad_id,
                                     pad_to_multiple=self.sequence_multiple)
        return equalize_micro_batches(batches, pad_id, pad_to_multiple=self.sequence_multiple)

    def _run_schedule(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, forward_only: bool,
                      chunks: Optional[list] = None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = chunks or self.chunks
        routing = self.routing

        def forward_step(data_iterator, model):
            mb = next(data_iterator).to(self.device)  # the one place batches meet the device
            if routing is not None:
                routing.begin_forward(model, mb)  # this chunk's routers: the micro-batch's rollout routes
            start = 0 if forward_only else self.logits_window(mb)
            with output_layer_from(model, start):
                output = model(mb.input_ids, mb.position_ids, None)
            if routing is not None:
                routing.end_forward(model, backward_follows=not forward_only)  # later calls: recomputes
            return output, functools.partial(loss_fn, mb.columns_from(start))

        num = len(micro_batches)
        iterators = [iter(list(micro_batches)) for _ in chunks]
        longest = max(mb.input_ids.shape[1] for mb in micro_batches)
        rows = max(mb.input_ids.shape[0] for mb in micro_batches)
        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks,
                num_microbatches=num,
                seq_length=longest,
                micro_batch_size=rows,
                forward_only=forward_only,
            )
        finally:
            if routing is not None:
                routing.finish()

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepResult:
        """Forward/backward over all micro-batches, one optimizer step, LR schedule step."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        with warnings.catch_warnings():
            # megatron-core 0.16.1's distributed optimizer probes ``.grad`` of its fp32 shard views (not
            # leaves), which torch flags; nothing is lost: the grads live in DDP's buffers.
            warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf",
                                    category=UserWarning)
            self.optimizer.zero_grad()
        outputs = self._run_schedule(micro_batches, loss_fn, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        metrics, num_tokens = reduce_metrics(outputs)
        return StepResult(metrics=metrics, grad_norm=float(grad_norm or 0.0),
                          lr=self.optimizer.param_groups[0]["lr"], num_tokens=num_tokens)

    @torch.no_grad()
    def forward_values(self, micro_batches: Sequence[MicroBatch],
                       value_fn: Callable[[MicroBatch, torch.Tensor], torch.Tensor],
                       chunks: Optional[list] = None) -> list[torch.Tensor]:
        """Per-token values (e.g. log-probs, entropies) for every micro-batch, on every rank.

        ``value_fn(mb, logits)`` runs on the last pipeline stage and returns a [b, s] tensor; it is
        broadcast over the pipeline group so every rank (which runs the objectives) sees it.
        """
        from megatron.core import parallel_state as ps

        chunks = chunks or self.chunks
        for chunk in chunks:
            chunk.eval()
        collected: list[torch.Tensor] = []

        def loss_fn(mb, logits):
            collected.append(value_fn(mb, logits).float())
            return (torch.zeros((), device=logits.device), torch.zeros((), dtype=torch.int, device=logits.device),
                    {})

        self._run_schedule(micro_batches, loss_fn, forward_only=True, chunks=chunks)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            group = ps.get_pipeline_model_parallel_group()
            if not ps.is_pipeline_last_stage():  # receive on the sender's device (one backend per collective)
                collected = [torch.empty(mb.input_ids.shape, dtype=torch.float32, device=self.device)
                             for mb in micro_batches]
            for tensor in collected:
                dist.broadcast(tensor, src=last, group=group)
        for chunk in chunks:
            chunk.train()
        return collected

    def finish_param_sync(self) -> None:
        """Make every parameter hold the values of the last optimizer step, on every rank.

        With the distributed optimizer and ``overlap_param_gather``, ``optimizer.step`` updates only
        this rank's shard; the all-gather of the rest is dispatched lazily by the next forward pass
        (megatron-core 0.16.1: ``DistributedDataParallel`` forward pre-hooks call the bucket groups'
        ``finish_param_sync``, ``param_gather_dispatched`` is reset by ``finish_grad_sync``). Anything
        that reads parameters between a step and the next forward (the EMA teacher, a weight sync to
        a rollout engine) calls this first: bucket groups whose all-gather was not dispatched are
        gathered now, pending ones are waited for; the next forward then finds them done.
        """
        for chunk in self.chunks:
            if not getattr(chunk, "use_forward_hook", False):
                continue  # gathered synchronously inside optimizer.step (or no distributed optimizer)
            for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
                if not group.param_gather_dispatched or group.param_gather_handle is not None:
                    group.start_param_sync(force_sync=True)


def equalize_micro_batches(batches: list[MicroBatch], pad_id: int = 0,
                           pad_to_multiple: int = 1) -> list[MicroBatch]:
    """Pad every rank's list to the world's longest with fully-masked micro-batches.

    Expert parallelism runs all-to-alls inside every MoE layer's forward, so all ranks must run the
    same number of forward passes even though their data (and so their bucketing) differ.

    With a virtual pipeline, Megatron's interleaved schedule needs the count to be a multiple of PP
    (its default micro-batch group per virtual stage), and it exchanges activations with one fixed
    shape (it hangs on per-micro-batch shapes), so every micro-batch is also padded to the world's
    largest [rows, length]; padding rows carry index -1 and no loss. Filler widths are multiples of
    ``pad_to_multiple`` like every other width (:func:`~megatron_pz.train.batching.sequence_multiple`).
    """
    from megatron.core import parallel_state as ps

    interleaved = (ps.get_virtual_pipeline_model_parallel_world_size() or 1) > 1
    rows = max((mb.input_ids.shape[0] for mb in batches), default=1)
    width = max((mb.input_ids.shape[1] for mb in batches), default=round_up(2, pad_to_multiple))
    sizes = torch.tensor([len(batches), rows, width], dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    target, rows, width = (int(v) for v in sizes.tolist())
    if interleaved:
        pp = ps.get_pipeline_model_parallel_world_size()
        target = max(pp, -(-target // pp) * pp)
    missing = target - len(batches)
    if missing > 0:
        names = sorted(batches[0].per_token) if batches else []
        fillers = make_micro_batches([], 8, pad_id, pad_to_multiple=pad_to_multiple, min_micro_batches=missing)
        for f in fillers:
            f.per_token = {n: torch.zeros_like(f.loss_mask) for n in names}
        batches = list(batches) + fillers
    if interleaved:
        batches = [pad_micro_batch(mb, rows, width, pad_id) for mb in batches]
    return batches


def pad_micro_batch(mb: MicroBatch, rows: int, width: int, pad_id: int) -> MicroBatch:
    """``mb`` grown to [rows, width] with pad tokens that carry no loss (rows added: index -1)."""
    b, s = mb.input_ids.shape
    if (b, s) == (rows, width):
        return mb

    def grow(t: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((rows, width), fill, dtype=t.dtype)
        out[:b, :s] = t
        return out

    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(rows, -1).contiguous()
    routes = None
    if mb.routes is not None:  # padding routes natively
        routes = torch.full((rows, width, *mb.routes.shape[2:]), NATIVE, dtype=mb.routes.dtype)
        routes[:b, :s] = mb.routes
    return MicroBatch(grow(mb.input_ids, pad_id), positions, grow(mb.loss_mask, 0.0),
                      {k: grow(v, 0.0) for k, v in mb.per_token.items()},
                      list(mb.lengths) + [0] * (rows - b), list(mb.indices) + [-1] * (rows - b), routes)


def reduce_metrics(outputs: list[dict]) -> tuple[dict[str, float], int]:
    """Sum metric tensors over micro-batches and the whole world, counting each model replica once.

    Loss functions report sums (``*_sum``) plus ``num_tokens``; means are formed here from the global
    sums, so the logged numbers do not depend on how the batch was split.
    """
    from megatron.core import parallel_state as ps

    local_keys = sorted({k for out in outputs for k in out})
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_keys)  # non-last pipeline stages have no outputs
    keys = sorted({k for ks in gathered for k in ks})
    totals = torch.zeros(len(keys) + 1, dtype=torch.float64)
    contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if contributes:
        for out in outputs:
            for i, k in enumerate(keys):
                if k in out:
                    totals[i] += float(out[k])
    dist.all_reduce(totals)
    summed = {k: totals[i].item() for i, k in enumerate(keys)}
    return summed, int(summed.get("num_tokens", 0))
