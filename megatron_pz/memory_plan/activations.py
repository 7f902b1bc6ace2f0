"""Activations of training micro-batches and forward-only passes, from a measured saved-tensor inventory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_pz.memory_plan.model_state import Layout, Shapes


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


def stage_layer_indices(s: Shapes, lay: Layout, pp_rank: int) -> list[int]:
    """0-based decoder layers pipeline rank ``pp_rank`` holds (every virtual stage's, in order)."""
    vp = lay.vp or 1
    per_chunk = s.layers // (lay.pp * vp)
    return [i for v in range(vp) for i in range((v * lay.pp + pp_rank) * per_chunk,
                                                 (v * lay.pp + pp_rank + 1) * per_chunk)]


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
    indices = stage_layer_indices(s, lay, pp_rank)
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
