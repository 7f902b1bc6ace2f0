"""Model state of one rank: the parameters of its model chunks, Megatron DDP's param/grad buffers and the
(distributed) optimizer's fp32 main params and Adam moments, element for element as megatron-core 0.16.1
lays them out (``distributed/param_and_grad_buffer.py``, ``optimizer/distrib_optimizer.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_pz.config import num_experts_of
from megatron_pz.model.provider import moe_layer_pattern

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ====================================================================== parameter layout


@dataclass
class ParamSpec:
    """One parameter of a model chunk on this rank, in ``named_parameters`` order."""

    name: str
    numel: int
    expert: bool = False  # an expert parameter with EP > 1: reduced over the expert-DP group
    shared_embedding: bool = False  # tied embedding/head with PP > 1: its own bucket (dist. optimizer)
    gemm: bool = False  # a GEMM weight (FP8 keeps quantised copies of these)


@dataclass
class Layout:
    """Sizes of the world: data-parallel sizes of the dense and the expert parameters."""

    world: int
    tp: int
    pp: int
    ep: int
    cp: int
    etp: int
    vp: Optional[int]
    sequence_parallel: bool

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)


def layout_of(parallel, world: int) -> Layout:
    return Layout(world=world, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, cp=parallel.cp,
                  etp=parallel.etp or parallel.tp, vp=parallel.virtual_pp,
                  sequence_parallel=parallel.sequence_parallel)


@dataclass
class Shapes:
    """The architecture numbers every term needs (read from the HF config like the model provider)."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    linear_bias: bool
    qk_norm: bool
    experts: int = 0
    topk: int = 0
    moe_ffn: int = 0
    moe_layers: tuple = ()  # 1 where a layer is MoE

    @classmethod
    def from_hf(cls, hf) -> "Shapes":
        heads = hf.num_attention_heads
        experts = num_experts_of(hf)
        pattern = moe_layer_pattern(hf) or [0] * hf.num_hidden_layers
        return cls(
            vocab=hf.vocab_size, hidden=hf.hidden_size, ffn=hf.intermediate_size, layers=hf.num_hidden_layers,
            heads=heads, groups=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            tied=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(hf, "attention_bias", False)) or hf.model_type == "qwen2",
            linear_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=hf.model_type in ("qwen3", "qwen3_moe"),
            experts=experts, topk=int(getattr(hf, "num_experts_per_tok", 0) or 0) if experts else 0,
            moe_ffn=int(getattr(hf, "moe_intermediate_size", hf.intermediate_size)) if experts else 0,
            moe_layers=tuple(pattern),
        )


def _layer_params(s: Shapes, lay: Layout, index: int, spec: str, grouped_gemm: bool) -> list[ParamSpec]:
    """Parameters of decoder layer ``index`` in Megatron's registration order.

    Local spec: the order printed by ``named_parameters`` of a built GPTModel (Attention registers
    ``linear_proj`` before ``SelfAttention`` adds ``linear_qkv`` and the q/k norms). TE spec: the input
    and pre-MLP norms of dense layers live inside ``TELayerNormColumnParallelLinear`` as
    ``layer_norm_weight`` (sizes identical; only their place in the walk differs, which can move a
    bucket boundary by a few elements when buckets are used).
    """
    h, d, tp = s.hidden, s.head_dim, lay.tp
    p = f"decoder.layers.{index}."
    qkv_rows = (s.heads + 2 * s.groups) * d // tp
    out: list[ParamSpec] = []
    te = spec == "te"
    moe = bool(s.moe_layers and s.moe_layers[index])
    if not te:
        out.append(ParamSpec(p + "input_layernorm.weight", h))
    out.append(ParamSpec(p + "self_attention.linear_proj.weight", h * s.heads * d // tp, gemm=True))
    if s.linear_bias:
        out.append(ParamSpec(p + "self_attention.linear_proj.bias", h))
    if te:
        out.append(ParamSpec(p + "self_attention.linear_qkv.layer_norm_weight", h))
    out.append(ParamSpec(p + "self_attention.linear_qkv.weight", qkv_rows * h, gemm=True))
    if s.qkv_bias:
        out.append(ParamSpec(p + "self_attention.linear_qkv.bias", qkv_rows))
    if s.qk_norm:
        out += [ParamSpec(p + "self_attention.q_layernorm.weight", d),
                ParamSpec(p + "self_attention.k_layernorm.weight", d)]
    if moe:
        expert = lay.ep > 1
        local = s.experts // lay.ep
        f = s.moe_ffn // lay.etp
        out.append(ParamSpec(p + "pre_mlp_layernorm.weight", h))
        out.append(ParamSpec(p + "mlp.router.weight", s.experts * h))
        if grouped_gemm and not te:  # GroupedMLP: one weight per projection for all local experts
            out += [ParamSpec(p + "mlp.experts.weight1", local * 2 * f * h, expert, gemm=True),
                    ParamSpec(p + "mlp.experts.weight2", local * f * h, expert, gemm=True)]
        elif grouped_gemm:  # TEGroupedMLP: weight{i} per local expert, fc1 then fc2
            out += [ParamSpec(p + f"mlp.experts.linear_fc1.weight{i}", 2 * f * h, expert, gemm=True)
                    for i in range(local)]
            out += [ParamSpec(p + f"mlp.experts.linear_fc2.weight{i}", f * h, expert, gemm=True)
                    for i in range(local)]
        else:  # SequentialMLP
            for i in range(local):
                q = p + f"mlp.experts.local_experts.{i}."
                out += [ParamSpec(q + "linear_fc1.weight", 2 * f * h, expert, gemm=True),
                        ParamSpec(q + "linear_fc2.weight", f * h, expert, gemm=True)]
    else:
        f = s.ffn // tp
        if not te:
            out.append(ParamSpec(p + "pre_mlp_layernorm.weight", h))
        else:
            out.append(ParamSpec(p + "mlp.linear_fc1.layer_norm_weight", h))
        out.append(ParamSpec(p + "mlp.linear_fc1.weight", 2 * f * h, gemm=True))
        if s.linear_bias:
            out.append(ParamSpec(p + "mlp.linear_fc1.bias", 2 * f))
        out.append(ParamSpec(p + "mlp.linear_fc2.weight", f * h, gemm=True))
        if s.linear_bias:
            out.append(ParamSpec(p + "mlp.linear_fc2.bias", h))
    return out


def chunk_params(s: Shapes, lay: Layout, pp_rank: int, spec: str = "local", grouped_gemm: bool = False,
                 vp_stage: int = 0) -> list[ParamSpec]:
    """Parameters of one model chunk of pipeline rank ``pp_rank`` (virtual stage ``vp_stage``).

    Layers are split evenly (Megatron's default without an explicit layout); the first chunk of the
    first stage holds the embedding, the last chunk of the last stage the final norm and the output
    layer (also with tied embeddings when PP > 1: a second copy, ``shared_embedding``).
    """
    vp = lay.vp or 1
    per_chunk = s.layers // (lay.pp * vp)
    first = vp_stage == 0 and pp_rank == 0
    last = vp_stage == vp - 1 and pp_rank == lay.pp - 1
    start = (vp_stage * lay.pp + pp_rank) * per_chunk
    out: list[ParamSpec] = []
    vocab_rows = s.vocab // lay.tp
    shared = s.tied and lay.pp > 1
    if first:
        out.append(ParamSpec("embedding.word_embeddings.weight", vocab_rows * s.hidden,
                             shared_embedding=shared and not last))
    for i in range(start, start + per_chunk):
        out += _layer_params(s, lay, i, spec, grouped_gemm)
    if last:
        out.append(ParamSpec("decoder.final_layernorm.weight", s.hidden))
        if not s.tied or not first:
            out.append(ParamSpec("output_layer.weight", vocab_rows * s.hidden, gemm=True,
                                 shared_embedding=shared))
    return out


# ====================================================================== DDP buffers and optimizer


@dataclass
class Buffer:
    """One ``_ParamAndGradBuffer``: its padded size and every parameter's [start, end) in it."""

    numel: int
    ranges: list  # (start, end) per parameter, in walk order
    buckets: list  # (start, end) per bucket
    dp: int


def ddp_buffer(params: list[ParamSpec], dp: int, distributed_optimizer: bool,
               bucket_size: Optional[int]) -> Buffer:
    """``_ParamAndGradBuffer.__init__`` sizing (megatron-core 0.16.1), element for element.

    Parameters are walked in reverse registration order (the backward order). With the distributed
    optimizer each parameter starts at a multiple of 64 elements and each bucket ends at a multiple of
    ``lcm(DP, 128)`` (so every DP rank owns an equal shard); a shared embedding gets a bucket of its
    own. A bucket closes once it holds ``bucket_size`` elements (only with ``overlap_grad_reduce``).
    """
    def pad(n: int, k: int) -> int:
        return -(-n // k) * k

    divisor = math.lcm(dp, 128)
    end_pad = (lambda n: pad(n, divisor)) if distributed_optimizer else (lambda n: n)
    start_pad = (lambda n: pad(n, 64)) if distributed_optimizer else (lambda n: n)
    ranges, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    for p in params[::-1]:
        start = start_pad(start)
        own_bucket = p.shared_embedding and distributed_optimizer
        if own_bucket and in_bucket:
            closed = end_pad(start)
            buckets.append((bucket_start, closed))
            bucket_start = start = closed
            in_bucket = 0
        end = start + p.numel
        ranges.append((start, end))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            closed = end_pad(end)
            buckets.append((bucket_start, closed))
            bucket_start = start = closed
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        buckets.append((bucket_start, end_pad(end)))
    numel = buckets[-1][1] if buckets else 0
    return Buffer(numel=numel, ranges=ranges, buckets=buckets, dp=dp)


def owned_elements(buf: Buffer, dp_rank: int) -> int:
    """Elements of real parameters in DP rank ``dp_rank``'s shard of every bucket (the distributed
    optimizer's main params and Adam moments cover exactly these; padding is skipped)."""
    total = 0
    for b_start, b_end in buf.buckets:
        size = (b_end - b_start) // buf.dp
        lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
        for start, end in buf.ranges:
            if end > lo and start < hi:
                total += min(end, hi) - max(start, lo)
    return total


@dataclass
class StateBytes:
    """Resident bytes of the model state on one rank."""

    weights: int = 0  # parameters (the DDP param buffer with the distributed optimizer)
    grads: int = 0  # fp32 gradient buffer (grad_reduce_in_fp32=True)
    main_params: int = 0  # fp32 master copies of 16-bit parameters
    moments: int = 0  # Adam exp_avg + exp_avg_sq (fp32)
    fp8_gemm_weights: int = 0  # GEMM weight elements (for FP8's quantised copies)

    @property
    def optimizer(self) -> int:
        return self.main_params + self.moments

    def __add__(self, other: "StateBytes") -> "StateBytes":
        return StateBytes(*(getattr(self, f) + getattr(other, f) for f in
                            ("weights", "grads", "main_params", "moments", "fp8_gemm_weights")))


def model_state_bytes(params: list[ParamSpec], lay: Layout, param_bytes: int, distributed_optimizer: bool,
                      overlap_grad_reduce: bool, dp_rank: int = 0, expert_dp_rank: int = 0,
                      bucketing: bool = True) -> StateBytes:
    """Weights, gradient buffer and optimizer state of one model chunk on one rank.

    ``bucketing``: False for pipeline ranks > 0 and virtual chunks > 0 (Megatron's DDP uses one bucket
    there). Dense parameters are sharded over DP x CP, expert parameters (EP > 1) over the expert-DP
    group. Without the distributed optimizer every rank holds the full state: parameters as built,
    fp32 main copies of 16-bit parameters (``Float16OptimizerWithFloat16Params``) and full moments.
    Every parameter has ``param_bytes``: the model provider casts the local spec's norms (built in fp32
    by torch) to the model's dtype, as Megatron-LM's Float16Module does.
    """
    out = StateBytes()
    groups = [([p for p in params if not p.expert], lay.dp * lay.cp, dp_rank),
              ([p for p in params if p.expert], lay.expert_dp, expert_dp_rank)]
    bucket_dp = lay.dp  # DistributedDataParallel: max(40M, 1M x dp group size)
    bucket_size = max(40_000_000, 1_000_000 * bucket_dp) if (overlap_grad_reduce and bucketing) else None
    master = 4 if param_bytes < 4 else 0
    for group, dp, rank in groups:
        if not group:
            continue
        n = sum(p.numel for p in group)
        if distributed_optimizer:
            buf = ddp_buffer(group, dp, True, bucket_size)
            owned = owned_elements(buf, rank % dp)
            out.weights += buf.numel * param_bytes
            out.grads += buf.numel * 4
            out.main_params += owned * master
            out.moments += owned * 8
        else:
            out.weights += n * param_bytes
            out.grads += n * 4
            out.main_params += n * master
            out.moments += n * 8
        out.fp8_gemm_weights += sum(p.numel for p in group if p.gemm)
    return out


def rank_model_state(s: Shapes, lay: Layout, pp_rank: int, spec: str, grouped_gemm: bool, param_bytes: int,
                     distributed_optimizer: bool, overlap_grad_reduce: bool, dp_rank: int = 0,
                     expert_dp_rank: int = 0) -> StateBytes:
    """:func:`model_state_bytes` summed over the virtual chunks of pipeline rank ``pp_rank``."""
    total = StateBytes()
    for v in range(lay.vp or 1):
        params = chunk_params(s, lay, pp_rank, spec, grouped_gemm, v)
        total = total + model_state_bytes(params, lay, param_bytes, distributed_optimizer, overlap_grad_reduce,
                                          dp_rank, expert_dp_rank, bucketing=(pp_rank == 0 and v == 0))
    return total


def worst_model_state(s: Shapes, lay: Layout, pp_rank: int, spec: str, grouped_gemm: bool, param_bytes: int,
                      distributed_optimizer: bool, overlap_grad_reduce: bool) -> StateBytes:
    """The DP rank whose shard holds the most real elements (padding sits in the last shards)."""
    if not distributed_optimizer:
        return rank_model_state(s, lay, pp_rank, spec, grouped_gemm, param_bytes, False, overlap_grad_reduce)
    candidates = [rank_model_state(s, lay, pp_rank, spec, grouped_gemm, param_bytes, True, overlap_grad_reduce,
                                   r, r) for r in sorted({0, lay.dp * lay.cp - 1, lay.expert_dp - 1})]
    return max(candidates, key=lambda st: st.optimizer)




def total_params(s: Shapes) -> int:
    """All parameters of the model (no parallelism), for the rollout engine's copy."""
    lay = Layout(world=1, tp=1, pp=1, ep=1, cp=1, etp=1, vp=None, sequence_parallel=False)
    return sum(p.numel for p in chunk_params(s, lay, 0, "local", False))
