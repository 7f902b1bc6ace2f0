"""Per-GPU memory budget of a run, per phase (rollout, scoring, training), before anything is built.

Every term is a function of the run config, the HF config and the world layout; each has a docstring
saying which tensors it counts and where that was read or measured. Three groups:

* **Model state** (resident for the whole run): the parameters, the fp32 gradient buffer and the
  optimizer state, replicated exactly as megatron-core 0.16.1 lays them out
  (``distributed/param_and_grad_buffer.py``: one buffer per (param dtype, grad dtype) and per
  dense/expert group, parameters walked in reverse order, starts aligned to 64 elements and buckets
  padded to ``lcm(DP, 128)`` with the distributed optimizer; ``optimizer/distrib_optimizer.py``: each
  DP rank owns ``1/DP`` of every bucket and keeps fp32 main copies (16-bit params only) and Adam's
  ``exp_avg``/``exp_avg_sq`` for the elements it owns). tests/test_memory_plan.py checks these bytes
  against a built :class:`~megatron_pz.train.actor.Actor` for equality.
* **Activations** of one micro-batch of ``train.max_tokens_per_micro_batch`` padded tokens: the
  tensors autograd saves, counted per module from the local (plain PyTorch) spec's saved-tensor
  inventory (``torch.autograd.graph.saved_tensors_hooks`` over a training step, see
  :func:`layer_activation_elements`), plus the logits path of the GRPO loss. Measured on CPU against
  the allocator's peak (torch.profiler memory events): tests/test_memory_plan.py. The Transformer
  Engine spec differs where TE fuses (layer norm into the next GEMM) or quantises (FP8 GEMM inputs);
  those differences are read from the source, not measured (no GPU was at hand).
* **Rollout engine**: vLLM takes ``gpu_memory_utilization`` of the device while awake (weights at its
  own TP, the KV cache and its workspace inside that share); asleep, level 1 keeps its weights in
  pinned host memory and level 2 drops them; the Megatron engine's static KV cache.

Not counted (left to the margin): the CUDA context and NCCL's communication buffers (a few hundred
MiB per process, driver- and topology-dependent), allocator fragmentation, vLLM's CUDA-graph pool
kept across sleep. That is why shipped configs are sized with at least 10 % margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

GIB = 2**30
DEFAULT_MIN_MARGIN = 0.10  # shipped configs keep >= 10 % of the device free (see "Not counted" above)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ====================================================================== parameter layout


@dataclass
class ParamSpec:
    """One parameter of a model chunk on this rank, in ``named_parameters`` order."""

    name: str
    numel: int
    expert: bool = False  # an expert parameter with EP > 1: reduced over the expert-DP group
    shared_embedding: bool = False  # tied embedding/head with PP > 1: its own bucket (dist. optimizer)
    gemm: bool = False  # a GEMM weight (FP8 keeps quantised copies of these)
    norm: bool = False  # a norm weight: the local spec's torch RMSNorm keeps it fp32 whatever params_dtype


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
        from megatron_pz.config import num_experts_of
        from megatron_pz.model.provider import moe_layer_pattern

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
        out.append(ParamSpec(p + "input_layernorm.weight", h, norm=True))
    out.append(ParamSpec(p + "self_attention.linear_proj.weight", h * s.heads * d // tp, gemm=True))
    if s.linear_bias:
        out.append(ParamSpec(p + "self_attention.linear_proj.bias", h))
    if te:
        out.append(ParamSpec(p + "self_attention.linear_qkv.layer_norm_weight", h, norm=True))
    out.append(ParamSpec(p + "self_attention.linear_qkv.weight", qkv_rows * h, gemm=True))
    if s.qkv_bias:
        out.append(ParamSpec(p + "self_attention.linear_qkv.bias", qkv_rows))
    if s.qk_norm:
        out += [ParamSpec(p + "self_attention.q_layernorm.weight", d, norm=True),
                ParamSpec(p + "self_attention.k_layernorm.weight", d, norm=True)]
    if moe:
        expert = lay.ep > 1
        local = s.experts // lay.ep
        f = s.moe_ffn // lay.etp
        out.append(ParamSpec(p + "pre_mlp_layernorm.weight", h, norm=True))
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
            out.append(ParamSpec(p + "pre_mlp_layernorm.weight", h, norm=True))
        else:
            out.append(ParamSpec(p + "mlp.linear_fc1.layer_norm_weight", h, norm=True))
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
        out.append(ParamSpec("decoder.final_layernorm.weight", s.hidden, norm=True))
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
                      bucketing: bool = True, fp32_norms: bool = False) -> StateBytes:
    """Weights, gradient buffer and optimizer state of one model chunk on one rank.

    ``bucketing``: False for pipeline ranks > 0 and virtual chunks > 0 (Megatron's DDP uses one bucket
    there). Dense parameters are sharded over DP x CP, expert parameters (EP > 1) over the expert-DP
    group. Without the distributed optimizer every rank holds the full state: parameters as built,
    fp32 main copies of 16-bit parameters (``Float16OptimizerWithFloat16Params``) and full moments.
    ``fp32_norms``: the local spec's norms are ``torch.nn.RMSNorm`` modules built without a dtype, so
    their weights stay fp32 in a 16-bit model and get a buffer of their own (measured).
    """
    out = StateBytes()
    if fp32_norms and param_bytes < 4:  # one buffer per parameter dtype (and dense/expert group)
        norms = [p for p in params if p.norm]
        rest = [p for p in params if not p.norm]
        return (model_state_bytes(rest, lay, param_bytes, distributed_optimizer, overlap_grad_reduce, dp_rank,
                                  expert_dp_rank, bucketing)
                + model_state_bytes(norms, lay, 4, distributed_optimizer, overlap_grad_reduce, dp_rank,
                                    expert_dp_rank, bucketing))
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
                                          dp_rank, expert_dp_rank, bucketing=(pp_rank == 0 and v == 0),
                                          fp32_norms=spec != "te")
    return total


def worst_model_state(s: Shapes, lay: Layout, pp_rank: int, spec: str, grouped_gemm: bool, param_bytes: int,
                      distributed_optimizer: bool, overlap_grad_reduce: bool) -> StateBytes:
    """The DP rank whose shard holds the most real elements (padding sits in the last shards)."""
    if not distributed_optimizer:
        return rank_model_state(s, lay, pp_rank, spec, grouped_gemm, param_bytes, False, overlap_grad_reduce)
    candidates = [rank_model_state(s, lay, pp_rank, spec, grouped_gemm, param_bytes, True, overlap_grad_reduce,
                                   r, r) for r in sorted({0, lay.dp * lay.cp - 1, lay.expert_dp - 1})]
    return max(candidates, key=lambda st: st.optimizer)


# ====================================================================== activations


def layer_activation_elements(s: Shapes, moe: bool, tp: int, sp: bool, spec: str, etp: int) -> dict[str, float]:
    """Per-token saved tensors of one decoder layer, as element counts by storage width.

    Inventory of the local spec (``saved_tensors_hooks`` over a GRPO training step of a Qwen3 layer,
    storages deduplicated), per token:

    * each RMSNorm + the GEMM after it: its input, ``1/rms`` (1), the normalised input and the GEMM's
      input (the weighted output): ``3h + 1``;
    * q/k norms: a copy of q (``ad``), ``1/rms`` per head, the normalised q; the fused qkv output
      (``(a+2g)d``, which k and v view), ``1/rms``, the normalised k;
    * SDPA (flash kernel on CPU): q and k after RoPE (``ad + gd``; v is a view of the qkv output),
      the output (``ad``, also ``linear_proj``'s input) and the log-sum-exp (``a``);
    * dense SwiGLU MLP: fc1 output (``2f``), two ``f``-wide products of the GLU, fc2's input (``f``);
    * MoE MLP: the router's input is the norm output; per routed token (``k`` per token) the permuted
      input (``h``), fc1 output (``2f_e``), activation, GLU product, probability-weighted product and
      fc2 input (``4 f_e``) and the probability (1); routing metadata (indices int64, probabilities
      fp32: ``20 k`` bytes; routing map and its probabilities: ``5 E`` bytes) in ``"bytes"``.

    Transformer Engine spec (read from megatron-core's TE modules, not measured): a fused
    ``LayerNormLinear`` saves its input, ``1/rms`` and the normalised output (``2h + 1``, not
    ``3h + 1``); with FP8 the GEMM inputs are kept as FP8 (``"fp8"`` class). With sequence parallelism
    the ``h``-wide tensors are split over TP; heads, groups and FFN columns are split over TP always
    (experts' over ETP). Balanced routing is assumed (each EP rank receives ``k`` routed tokens per
    token on average).
    """
    h, d = s.hidden, s.head_dim
    a = s.heads / tp
    g = max(1.0, s.groups / tp)
    te = spec == "te"
    out = {"act": 0.0, "gemm_in": 0.0, "fp32": 0.0, "bytes": 0.0}
    # attention block
    norm = _norm_elements(h, tp if sp else 1, te)
    for key in out:
        out[key] += norm[key]
    if s.qk_norm:
        out["act"] += 2 * a * d + (a + 2 * g) * d + g * d
        out["fp32"] += a + g
    else:
        out["act"] += (a + 2 * g) * d
    out["act"] += a * d + g * d  # q, k after RoPE
    out["gemm_in"] += a * d  # attention output = linear_proj input
    out["fp32"] += a  # log-sum-exp
    # MLP block
    for key in out:
        out[key] += norm[key]
    if moe:
        f = s.moe_ffn / etp
        k = s.topk
        out["act"] += k * (2 * f + 3 * f) + k  # fc1 out, GLU products, probs
        out["gemm_in"] += k * (h + f)  # permuted tokens (fc1 input), fc2 input
        out["bytes"] += 20 * k + 5 * s.experts
    else:
        f = s.ffn / tp
        out["act"] += 4 * f
        out["gemm_in"] += f
    return out


def _norm_elements(h: float, split: int, te: bool) -> dict[str, float]:
    """An RMSNorm followed by a GEMM, per token. Local: input, normalised input and the GEMM input (the
    weighted output) plus ``1/rms`` (fp32). TE's fused ``LayerNormLinear``: input, ``ln_out`` (the GEMM
    input, FP8 under FP8) and ``1/rms``. ``split``: TP with sequence parallelism (tokens are split), else 1."""
    hs = h / split
    return {"act": hs if te else 2 * hs, "gemm_in": hs, "fp32": 1 / split, "bytes": 0.0}


@dataclass
class Term:
    name: str
    bytes: float
    knob: str = ""  # the config knob that shrinks it
    note: str = ""


def _bytes_of(elements: dict[str, float], tokens: float, act_bytes: int, gemm_bytes: int) -> float:
    return tokens * (elements["act"] * act_bytes + elements["gemm_in"] * gemm_bytes + elements["fp32"] * 4
                     + elements["bytes"])


def training_activation_terms(s: Shapes, lay: Layout, pp_rank: int, tokens: int, seq_len: int, spec: str,
                              act_bytes: int, fp8: bool, recompute: Optional[str]) -> list[Term]:
    """Saved activations of the micro-batches in flight on pipeline rank ``pp_rank``, and the logits path.

    1F1B keeps ``PP - rank`` micro-batches in flight on rank ``rank`` (the first stage holds PP of
    them); each holds its layers' saved tensors (:func:`layer_activation_elements`), the RoPE tables
    (``cos``/``sin`` for q and k: ``4 s d`` per layer) and, on the first stage, the token ids (int64).
    Context parallelism divides the tokens. ``recompute``: ``full`` keeps each layer's input only (and
    recomputes one layer at a time in backward: one layer's tensors on top); ``selective`` recomputes
    core attention (its log-sum-exp is not kept). With a virtual pipeline the interleaved schedule's
    warm-up keeps more micro-batches in flight than ``PP - rank``; this count is then a lower bound.
    """
    tokens_rank = tokens / lay.cp
    vp = lay.vp or 1
    indices = []
    for v in range(vp):
        start = (v * lay.pp + pp_rank) * (s.layers // (lay.pp * vp))
        indices += list(range(start, start + s.layers // (lay.pp * vp)))
    in_flight = lay.pp - pp_rank
    gemm_bytes = 1 if fp8 else act_bytes
    hs = s.hidden / lay.tp if lay.sequence_parallel else s.hidden
    per_layer = []
    for i in indices:
        moe = bool(s.moe_layers and s.moe_layers[i])
        el = layer_activation_elements(s, moe, lay.tp, lay.sequence_parallel, spec, lay.etp)
        if recompute == "selective":
            el["fp32"] -= s.heads / lay.tp
        # RoPE: cos and sin for q and for k, [s, 1, 1, d] in the activations' dtype (rope_utils.py)
        per_layer.append(_bytes_of(el, tokens_rank, act_bytes, gemm_bytes) + 4 * seq_len / lay.cp * s.head_dim * act_bytes)
    if recompute == "full":
        saved = tokens_rank * hs * act_bytes * len(indices) + max(per_layer, default=0)
    else:
        saved = sum(per_layer)
    terms = [Term(f"activations: {len(indices)} layers x {in_flight} micro-batch(es) in flight",
                  saved * in_flight, "train.max_tokens_per_micro_batch, model.recompute, parallel.tp/pp (+SP)",
                  f"{tokens} tokens per micro-batch")]
    if pp_rank == 0:
        terms.append(Term("token ids (first stage)", in_flight * tokens_rank * 8))
    if pp_rank == lay.pp - 1:
        final = _norm_elements(s.hidden, lay.tp if lay.sequence_parallel else 1, False)  # final norm + output layer (Megatron's own linear, not TE's)
        if spec == "te":
            final["act"] -= hs  # TENorm keeps input and 1/rms; the output layer keeps its input
        terms.append(Term("final norm + output-layer input", _bytes_of(final, tokens_rank, act_bytes, act_bytes)))
        terms += logits_terms(s, lay, tokens_rank, act_bytes, training=True)
    return terms


def logits_terms(s: Shapes, lay: Layout, tokens: float, logits_bytes: int, training: bool) -> list[Term]:
    """The vocab-parallel logits on the last stage and the fp32 copies the loss makes of them.

    ``L = tokens x vocab / TP``. The model returns its logits (``logits_bytes``, the params dtype).
    Training (``make_grpo_loss_fn``): ``token_logprobs`` makes one fp32 copy that Megatron's
    ``vocab_parallel_cross_entropy`` turns into the softmax kept for backward (in place); while it is
    held, the no-grad entropy makes ``float()`` (a copy unless already fp32), the shifted logits, their
    ``exp`` and the product ``exp * shifted``: 3 fp32 copies (4 from 16-bit logits). Measured on CPU
    (fp32): the step's allocator peak is reached inside that entropy. Scoring (``forward_values``):
    the same entropy chain over the model's logits, with no softmax kept.
    """
    L = tokens * s.vocab / lay.tp
    extra = 0 if logits_bytes == 4 else 1
    terms = [Term("logits (model output)", L * logits_bytes, "train.max_tokens_per_micro_batch, parallel.tp")]
    if training:
        terms.append(Term("loss: fp32 softmax kept for backward", L * 4, "train.max_tokens_per_micro_batch, parallel.tp"))
        terms.append(Term("loss per-token tensors", tokens * 29))  # mask, targets, GRPO's 5 fp32 rows
    terms.append(Term(f"entropy: {3 + extra} fp32 copies of the logits (transient)", L * 4 * (3 + extra),
                      "train.max_tokens_per_micro_batch, parallel.tp"))
    return terms


# ====================================================================== the plan


@dataclass
class Phase:
    name: str
    terms: list[Term] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class MemoryPlan:
    """Per-GPU budget of the worst pipeline stage, per phase, against the device's memory."""

    device_bytes: float
    min_margin: float
    world: int
    layout: Layout
    stage: int
    phases: list[Phase]
    host_terms: list[Term]
    notes: list[str] = field(default_factory=list)
    gpus_per_node: int = 8  # for the host-memory line
    problems: list[str] = field(default_factory=list)  # infeasible settings (e.g. vLLM weights > its share)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> float:
        return self.peak_phase.total

    @property
    def margin(self) -> float:
        return self.device_bytes - self.peak

    @property
    def fits(self) -> bool:
        return not self.problems and self.margin >= self.min_margin * self.device_bytes

    def largest_terms(self, n: int = 4) -> list[Term]:
        return sorted((t for t in self.peak_phase.terms if t.knob), key=lambda t: -t.bytes)[:n]

    def verdict(self) -> str:
        g = self.device_bytes / GIB
        head = (f"peak {self.peak / GIB:.1f} GiB ({self.peak_phase.name}, pipeline stage {self.stage}) of "
                f"{g:.1f} GiB: margin {self.margin / GIB:.1f} GiB ({100 * self.margin / self.device_bytes:.0f} %, "
                f"required >= {100 * self.min_margin:.0f} %)")
        if self.fits:
            return "FITS: " + head
        lines = ["DOES NOT FIT: " + head] + [f"  problem: {p}" for p in self.problems]
        lines.append("  largest terms and the knob that shrinks each:")
        lines += [f"    {t.name}: {t.bytes / GIB:.1f} GiB -> {t.knob}" for t in self.largest_terms()]
        return "\n".join(lines)


def _dtype_bytes(model_cfg, device: str) -> int:
    if model_cfg.params_dtype == "auto":
        return 2 if device == "cuda" else 4
    return _DTYPE_BYTES[model_cfg.params_dtype]


def max_sequence_length(cfg) -> int:
    """The longest row the run can make: prompt budget + the longest response of the roles its objective
    samples + 8 (the margin ``Run.max_sequence_length`` keeps; that bound covers every objective)."""
    o = cfg.objective
    response = {"pretrainzero": max(o.generator_max_tokens, o.predictor_max_tokens),
                "random_rlpt": max(o.generator_max_tokens, o.predictor_max_tokens),
                "rlp": o.rlp_thought_max_tokens + 2}.get(o.name, o.ntr_max_tokens)
    return cfg.train.max_prompt_tokens + response + 8


def plan_run(cfg, hf, world: int, device_bytes: float, device: str = "cuda",
             min_margin: float = DEFAULT_MIN_MARGIN) -> MemoryPlan:
    """Budget every pipeline stage of ``cfg`` on ``world`` ranks; keep the stage with the highest peak."""
    s = Shapes.from_hf(hf)
    lay = layout_of(cfg.parallel, world)
    # auto: Transformer Engine on GPU (installed with the gpu extras), the local spec on CPU
    spec = cfg.model.spec if cfg.model.spec != "auto" else ("te" if device == "cuda" else "local")
    p = _dtype_bytes(cfg.model, device)
    opt = cfg.optimizer
    seq = max_sequence_length(cfg)
    tokens = cfg.train.max_tokens_per_micro_batch
    r = cfg.rollout
    best = None
    stage_totals = []
    for stage in range(lay.pp):
        st = worst_model_state(s, lay, stage, spec, cfg.model.moe_grouped_gemm, p, opt.use_distributed_optimizer,
                               opt.overlap_grad_reduce)
        resident = [
            Term("weights" + (" (DDP param buffer)" if opt.use_distributed_optimizer else ""), st.weights,
                 "parallel.tp/pp/ep"),
            Term("gradient buffer (fp32, grad_reduce_in_fp32)", st.grads, "parallel.tp/pp/ep"),
            Term("optimizer: fp32 main params" + (" (1/DP shard)" if opt.use_distributed_optimizer else ""),
                 st.main_params, "optimizer.use_distributed_optimizer, more DP ranks"),
            Term("optimizer: Adam moments" + (" (1/DP shard)" if opt.use_distributed_optimizer else ""), st.moments,
                 "optimizer.use_distributed_optimizer, more DP ranks"),
        ]
        if cfg.objective.name == "rlp":
            teacher = sum(sum(q.numel for q in chunk_params(s, lay, stage, spec, cfg.model.moe_grouped_gemm, v))
                          for v in range(lay.vp or 1)) * p
            resident.append(Term("RLP EMA teacher weights", teacher, "parallel.tp/pp/ep"))
        rollout_terms, asleep_terms, host, problems = rollout_engine_terms(cfg, s, lay, stage, device_bytes, p, seq)
        train_terms = list(resident) + asleep_terms
        if cfg.model.fp8:
            train_terms.append(Term("FP8 weight copies (row + column-wise, 1 byte each)", 2 * st.fp8_gemm_weights,
                                    "model.fp8"))
        train_terms += training_activation_terms(s, lay, stage, tokens, min(seq, tokens), spec, p,
                                                 bool(cfg.model.fp8), cfg.model.recompute)
        largest_grad = max((q.numel for v in range(lay.vp or 1)
                            for q in chunk_params(s, lay, stage, spec, cfg.model.moe_grouped_gemm, v)), default=0)
        train_terms.append(Term("largest weight gradient before it joins the buffer (transient)", largest_grad * p))
        score_terms = list(resident) + asleep_terms + scoring_terms(s, lay, stage, tokens, spec, p)
        phases = [Phase("rollout", list(resident) + rollout_terms), Phase("scoring", score_terms),
                  Phase("training", train_terms)]
        candidate = MemoryPlan(device_bytes=device_bytes, min_margin=min_margin, world=world, layout=lay,
                               stage=stage, phases=phases, host_terms=host, problems=problems)
        stage_totals.append(f"stage {stage}: " + ", ".join(f"{ph.name} {ph.total / GIB:.1f}" for ph in phases))
        if best is None or candidate.peak > best.peak:
            best = candidate
    if lay.pp > 1:
        best.notes.append("GiB per pipeline stage (the table shows the stage with the highest peak): "
                          + "; ".join(stage_totals))
    if r.engine == "vllm":
        best.notes.append(f"scoring and training assume the vLLM engine sleeps (level {r.sleep_level}) after each "
                          "generation (VLLMRolloutEngine.sleep/wake); awake, it keeps its whole share")
    best.notes.append(f"world {world}: TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp}; EP {lay.ep}, "
                      f"ETP {lay.etp}, expert-DP {lay.expert_dp}; spec {spec}, params {p} bytes, "
                      f"micro-batch {tokens} tokens, sequences <= {seq}")
    return best


def scoring_terms(s: Shapes, lay: Layout, stage: int, tokens: int, spec: str, p: int) -> list[Term]:
    """Forward-only passes (log-probs, entropies): nothing is saved between layers, one layer's
    tensors are alive at a time (bounded by its training inventory), plus the logits path."""
    moe = any(s.moe_layers) if s.moe_layers else False
    el = layer_activation_elements(s, moe, lay.tp, lay.sequence_parallel, spec, lay.etp)
    terms = [Term("one layer's working tensors (forward only)", _bytes_of(el, tokens / lay.cp, p, p),
                  "train.max_tokens_per_micro_batch")]
    if stage == lay.pp - 1:
        terms += logits_terms(s, lay, tokens / lay.cp, p, training=False)
    return terms


def rollout_engine_terms(cfg, s: Shapes, lay: Layout, stage: int, device_bytes: float, p: int, seq: int):
    """(awake terms, asleep terms, host terms, problems) of the rollout engine on one GPU.

    vLLM (``gpu_memory_utilization`` = u): awake it holds ``u x device`` (its weights at
    ``rollout.tensor_parallel_size``, then the KV cache and its workspace fill the rest of that
    share); weight sync pushes buckets of ``rollout.bucket_mb`` while only its weights are awake.
    Asleep (scoring and training, ``llm.sleep``): level 1 moves its weights to pinned host memory and
    drops the KV cache, level 2 drops both; neither leaves tensors on the GPU. Megatron engine: the
    static KV cache of ``max_batch_size`` sequences of the run's longest sequence, on this stage's
    layers, freed after each batch (counted in the rollout phase only).
    """
    r = cfg.rollout
    problems: list[str] = []
    host: list[Term] = []
    if r.engine == "vllm":
        total_params = _total_params(s)
        weights = total_params * _DTYPE_BYTES.get(r.dtype, 2) / r.tensor_parallel_size
        share = r.gpu_memory_utilization * device_bytes
        bucket = r.bucket_mb * 2**20
        kv_per_token = 2 * s.layers * max(1, s.groups // r.tensor_parallel_size) * s.head_dim * 2
        awake = [Term(f"vLLM weights (TP {r.tensor_parallel_size})", weights, "rollout.tensor_parallel_size"),
                 Term(f"vLLM KV cache + workspace (rest of gpu_memory_utilization={r.gpu_memory_utilization})",
                      max(0.0, share - weights), "rollout.gpu_memory_utilization",
                      f"~{max(0.0, share - weights) / kv_per_token / 1e3:.0f}k tokens of KV at most")]
        if weights + bucket > share:
            awake.append(Term("weight-sync bucket over vLLM's share", weights + bucket - share, "rollout.bucket_mb"))
        if weights >= share:
            problems.append(f"vLLM's weights ({weights / GIB:.1f} GiB at rollout.tensor_parallel_size="
                            f"{r.tensor_parallel_size}) do not fit its share rollout.gpu_memory_utilization="
                            f"{r.gpu_memory_utilization} ({share / GIB:.1f} GiB): raise either")
        if r.sleep_level == 1:
            host.append(Term("vLLM weights offloaded while asleep (pinned host memory)", weights,
                             "rollout.sleep_level=2"))
        return awake, [], host, problems
    # Megatron engine: decodes with the actor's own weights
    layers_here = s.layers // lay.pp
    kv = 2 * layers_here * max(1, s.groups // lay.tp) * s.head_dim * p * r.max_batch_size * seq
    return [Term(f"Megatron engine KV cache ({r.max_batch_size} sequences x {seq})", kv, "rollout.max_batch_size")], \
        [], host, problems


def _total_params(s: Shapes) -> int:
    """All parameters of the model (no parallelism), for the rollout engine's copy."""
    lay = Layout(world=1, tp=1, pp=1, ep=1, cp=1, etp=1, vp=None, sequence_parallel=False)
    return sum(p.numel for p in chunk_params(s, lay, 0, "local", False))


# ====================================================================== rendering and the start-up check


def render(plan: MemoryPlan, title: str = "") -> str:
    """The plan as a table (GiB per phase, one row per term) plus host memory and the verdict."""
    import io

    from rich.console import Console
    from rich.table import Table

    names: list[str] = []
    knobs: dict[str, str] = {}
    for phase in plan.phases:
        for t in phase.terms:
            if t.name not in names:
                names.append(t.name)
                knobs[t.name] = t.knob
    table = Table(title=title or f"per-GPU memory plan (pipeline stage {plan.stage}), GiB", title_justify="left")
    table.add_column("term")
    for phase in plan.phases:
        table.add_column(phase.name, justify="right")
    table.add_column("knob")

    def cell(phase: Phase, name: str) -> str:
        value = sum(t.bytes for t in phase.terms if t.name == name)
        return f"{value / GIB:.2f}" if any(t.name == name for t in phase.terms) else "-"

    for name in names:
        table.add_row(name, *(cell(p, name) for p in plan.phases), knobs[name])
    table.add_section()
    table.add_row("total", *(f"{p.total / GIB:.2f}" for p in plan.phases), "")
    table.add_row(f"device ({plan.device_bytes / GIB:.0f} GiB) - total",
                  *(f"{(plan.device_bytes - p.total) / GIB:.2f}" for p in plan.phases), "")
    out = io.StringIO()
    console = Console(file=out, width=132, force_terminal=False, color_system=None)
    console.print(table)
    for t in plan.host_terms:
        console.print(f"host: {t.name}: {t.bytes / GIB:.2f} GiB per GPU, {plan.gpus_per_node * t.bytes / GIB:.0f} GiB "
                      f"per node of {plan.gpus_per_node} GPUs ({t.knob} releases it)")
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(plan.verdict())
    return out.getvalue()


def device_memory(device: str) -> float:
    """Bytes of the device ranks train on: the GPU's total memory, or on CPU host RAM divided by the
    ranks of this host (where tensors, the dataset and every other process share it: the check then
    only catches gross overcommitment)."""
    if device == "cuda":
        import os

        import torch

        return float(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory)
    import os

    import psutil

    return float(psutil.virtual_memory().total) / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_at_startup(cfg, hf, world: int, device: str, device_bytes: Optional[float] = None,
                     rank: int = 0) -> Optional[MemoryPlan]:
    """``train``'s start-up check, before any model is built: print the plan (rank 0) and refuse an
    unfit one with its largest terms and their knobs (``runtime.memory_plan``: enforce | warn | off)."""
    from megatron_pz.config import ConfigError

    mode = cfg.runtime.memory_plan
    if mode == "off":
        return None
    device_bytes = device_memory(device) if device_bytes is None else device_bytes
    plan = plan_run(cfg, hf, world, device_bytes, device, cfg.runtime.memory_plan_margin)
    if rank == 0:
        print(render(plan, f"memory plan on {device} ({device_bytes / GIB:.0f} GiB per rank), GiB"), flush=True)
    if not plan.fits and mode == "enforce":
        raise ConfigError("the memory plan does not fit the device (set runtime.memory_plan=warn to start anyway):\n"
                          + plan.verdict())
    return plan
