"""Which Hugging Face tensors make up each Megatron parameter, and how their layouts differ.

Everything here works on *full* (unsharded) tensors and on the local layer spec's parameter names;
Transformer Engine's fused names are translated to and from those names by :func:`local_name_from_te`
and :func:`te_name_from_local`, so one table serves both specs. Sharding over TP/EP lives in
:mod:`megatron_pz.convert.sharding`. Hand-written because no maintained library maps HF <-> Megatron
without Transformer Engine (mbridge and megatron-bridge both require it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_pz.config import ConfigError, num_experts_of
from megatron_pz.model.provider import moe_layer_pattern

# How a full Megatron tensor is split over tensor-parallel ranks.
COLUMN = "column"  # dim 0 (qkv per query group, embedding/output vocab rows, expert fc1 rows)
ROW = "row"  # dim 1 (linear_proj, linear_fc2)
GATE_UP = "gate_up"  # dim 0, but gate and up halves are split separately: rank r holds [gate_r; up_r]
REPLICATED = "replicated"  # norms, router, row-parallel biases


@dataclass(frozen=True)
class ParamSpec:
    """One Megatron parameter: the HF tensors it is built from, how they combine, how TP splits it."""

    hf_names: tuple[str, ...]
    combine: str  # "copy" | "qkv" | "gate_up"
    tp_split: str  # COLUMN | ROW | GATE_UP | REPLICATED
    expert: Optional[int] = None  # global expert index for routed-expert parameters


class UnknownParameterError(ConfigError):
    pass


# --------------------------------------------------------------------------- TE <-> local names

_TE_TO_LOCAL = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_bias$"), "input_layernorm.bias"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_bias$"), "pre_mlp_layernorm.bias"),
    (re.compile(r"mlp\.experts\.linear_fc([12])\.(weight|bias)(\d+)$"),
     r"mlp.experts.local_experts.\3.linear_fc\1.\2"),
]


def local_name_from_te(name: str) -> str:
    """Map a Transformer Engine spec parameter name to the local spec's name (identity if already local)."""
    prefix, _, rest = _split_layer_prefix(name)
    for pattern, repl in _TE_TO_LOCAL:
        if pattern.search(rest):
            return prefix + pattern.sub(repl, rest)
    return name


def te_name_from_local(name: str, moe_layer: bool, grouped_gemm: bool = True) -> str:
    """Map a local-spec name to the TE spec's name. In TE's dense layers the pre-attention and pre-MLP
    norms are fused into linear_qkv / linear_fc1; an MoE layer keeps a separate ``pre_mlp_layernorm``;
    TE's grouped experts store expert ``i`` as ``mlp.experts.linear_fc1.weight{i}``."""
    prefix, _, rest = _split_layer_prefix(name)
    if not prefix:
        return name
    if rest.startswith("input_layernorm."):
        return prefix + "self_attention.linear_qkv.layer_norm_" + rest.split(".", 1)[1]
    if rest.startswith("pre_mlp_layernorm.") and not moe_layer:
        return prefix + "mlp.linear_fc1.layer_norm_" + rest.split(".", 1)[1]
    m = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.(weight|bias)", rest)
    if m and grouped_gemm:
        return prefix + f"mlp.experts.linear_fc{m.group(2)}.{m.group(3)}{m.group(1)}"
    return name


def _split_layer_prefix(name: str) -> tuple[str, Optional[int], str]:
    m = re.match(r"^(.*?decoder\.layers\.(\d+)\.)(.*)$", name)
    if not m:
        return "", None, name
    return m.group(1), int(m.group(2)), m.group(3)


# --------------------------------------------------------------------------- the mapping table


def is_moe_layer(hf_config, layer: int) -> bool:
    pattern = moe_layer_pattern(hf_config)
    return bool(pattern and pattern[layer])


def qk_layernorm(hf_config) -> bool:
    return hf_config.model_type in ("qwen3", "qwen3_moe")


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_query_groups(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def param_spec(hf_config, local_name: str, layer: Optional[int] = None,
               num_local_experts: int = 0, ep_rank: int = 0) -> ParamSpec:
    """HF tensors for the Megatron parameter ``local_name`` (local-spec name, any layer index).

    ``layer`` is the *global* layer index (the name's own index is this pipeline stage's local one);
    routed expert ``i`` on expert-parallel rank ``ep_rank`` is global expert ``ep_rank*num_local+i``.
    """
    if local_name == "embedding.word_embeddings.weight":
        return ParamSpec(("model.embed_tokens.weight",), "copy", COLUMN)
    if local_name == "decoder.final_layernorm.weight":
        return ParamSpec(("model.norm.weight",), "copy", REPLICATED)
    if local_name == "output_layer.weight":
        return ParamSpec(("lm_head.weight",), "copy", COLUMN)
    prefix, local_layer, rest = _split_layer_prefix(local_name)
    if not prefix:
        raise UnknownParameterError(f"Megatron parameter {local_name!r} has no Hugging Face counterpart")
    layer = local_layer if layer is None else layer
    hf = f"model.layers.{layer}."
    table = {
        "input_layernorm.weight": ((hf + "input_layernorm.weight",), "copy", REPLICATED),
        "pre_mlp_layernorm.weight": ((hf + "post_attention_layernorm.weight",), "copy", REPLICATED),
        "self_attention.q_layernorm.weight": ((hf + "self_attn.q_norm.weight",), "copy", REPLICATED),
        "self_attention.k_layernorm.weight": ((hf + "self_attn.k_norm.weight",), "copy", REPLICATED),
        "self_attention.linear_proj.weight": ((hf + "self_attn.o_proj.weight",), "copy", ROW),
        "self_attention.linear_proj.bias": ((hf + "self_attn.o_proj.bias",), "copy", REPLICATED),
        "mlp.linear_fc2.weight": ((hf + "mlp.down_proj.weight",), "copy", ROW),
        "mlp.linear_fc2.bias": ((hf + "mlp.down_proj.bias",), "copy", REPLICATED),
        "mlp.router.weight": ((hf + "mlp.gate.weight",), "copy", REPLICATED),
    }
    for kind in ("weight", "bias"):
        table[f"self_attention.linear_qkv.{kind}"] = (
            tuple(hf + f"self_attn.{p}_proj.{kind}" for p in "qkv"), "qkv", COLUMN)
        table[f"mlp.linear_fc1.{kind}"] = (
            (hf + f"mlp.gate_proj.{kind}", hf + f"mlp.up_proj.{kind}"), "gate_up", GATE_UP)
    if rest in table:
        names, combine, split = table[rest]
        return ParamSpec(names, combine, split)
    m = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.(weight|bias)", rest)
    if m:
        expert = ep_rank * num_local_experts + int(m.group(1))
        ex = hf + f"mlp.experts.{expert}."
        if m.group(2) == "1":
            return ParamSpec((ex + f"gate_proj.{m.group(3)}", ex + f"up_proj.{m.group(3)}"),
                             "gate_up", GATE_UP, expert)
        return ParamSpec((ex + f"down_proj.{m.group(3)}",), "copy",
                         ROW if m.group(3) == "weight" else REPLICATED, expert)
    raise UnknownParameterError(f"Megatron parameter {local_name!r} has no Hugging Face counterpart")


def expected_hf_tensors(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds (hub layout), with its shape.

    Built from the config alone, so a checkpoint can be checked (names and shapes from the safetensors
    headers) before any weight is read or any collective starts. SmolLM3 holds Llama's tensors (its NoPE
    layers differ only in ``no_rope_layers``, which maps to Megatron's ``no_rope_freq``, not to a tensor).
    """
    h, v = hf_config.hidden_size, hf_config.vocab_size
    nq, ng, hd = hf_config.num_attention_heads, num_query_groups(hf_config), head_dim(hf_config)
    attn_bias = bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2"
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not getattr(hf_config, "tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    experts = num_experts_of(hf_config)
    for layer in range(hf_config.num_hidden_layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (nq * hd, h)
        out[p + "self_attn.k_proj.weight"] = (ng * hd, h)
        out[p + "self_attn.v_proj.weight"] = (ng * hd, h)
        out[p + "self_attn.o_proj.weight"] = (h, nq * hd)
        if attn_bias:
            out[p + "self_attn.q_proj.bias"] = (nq * hd,)
            out[p + "self_attn.k_proj.bias"] = (ng * hd,)
            out[p + "self_attn.v_proj.bias"] = (ng * hd,)
            if hf_config.model_type != "qwen2":
                out[p + "self_attn.o_proj.bias"] = (h,)
        if qk_layernorm(hf_config):
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
        if is_moe_layer(hf_config, layer):
            f = getattr(hf_config, "moe_intermediate_size", hf_config.intermediate_size)
            out[p + "mlp.gate.weight"] = (experts, h)
            for e in range(experts):
                ex = p + f"mlp.experts.{e}."
                out[ex + "gate_proj.weight"] = (f, h)
                out[ex + "up_proj.weight"] = (f, h)
                out[ex + "down_proj.weight"] = (h, f)
        else:
            f = hf_config.intermediate_size
            out[p + "mlp.gate_proj.weight"] = (f, h)
            out[p + "mlp.up_proj.weight"] = (f, h)
            out[p + "mlp.down_proj.weight"] = (h, f)
            if mlp_bias:
                out[p + "mlp.gate_proj.bias"] = (f,)
                out[p + "mlp.up_proj.bias"] = (f,)
                out[p + "mlp.down_proj.bias"] = (h,)
    return out


# Tensors some HF checkpoints carry that are derived state, not weights: skipped and counted.
IGNORABLE_HF_TENSORS = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\..*)$")


# --------------------------------------------------------------------------- layout transforms


def combine_hf(spec: ParamSpec, tensors: list[torch.Tensor], hf_config) -> torch.Tensor:
    """HF tensors -> one full Megatron tensor."""
    if spec.combine == "copy":
        return tensors[0]
    if spec.combine == "gate_up":
        return torch.cat(tensors, dim=0)
    if spec.combine == "qkv":
        q, k, v = tensors
        ng = num_query_groups(hf_config)
        rest = q.shape[1:]
        # Megatron's fused qkv is laid out per query group: [q heads of group g; k_g; v_g].
        return torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)],
                         dim=1).reshape(-1, *rest)
    raise ValueError(spec.combine)


def split_megatron(spec: ParamSpec, full: torch.Tensor, hf_config) -> list[torch.Tensor]:
    """One full Megatron tensor -> its HF tensors (inverse of :func:`combine_hf`)."""
    if spec.combine == "copy":
        return [full]
    if spec.combine == "gate_up":
        return list(torch.chunk(full, 2, dim=0))
    if spec.combine == "qkv":
        ng, hd = num_query_groups(hf_config), head_dim(hf_config)
        q_per_group = hf_config.num_attention_heads // ng
        rest = full.shape[1:]
        grouped = full.reshape(ng, (q_per_group + 2) * hd, *rest)
        q, k, v = torch.split(grouped, [q_per_group * hd, hd, hd], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    raise ValueError(spec.combine)
