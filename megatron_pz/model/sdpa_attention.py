"""Core attention of the local (plain PyTorch) layer spec through ``torch``'s fused SDPA.

Megatron's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores, builds a causal
mask, masks, soft-maxes and copies them (the work Transformer Engine's fused kernels avoid on GPU).
On CPU that is about a quarter of a training step of the tiny default. ``scaled_dot_product_attention``
computes the same ``softmax(Q K^T * scale) V`` with a fused (flash) kernel and no score tensor.

It is used only where it is Megatron's function exactly: no mask tensor, self-attention that is causal
(``sq == sk``) or a one-query decode step over a KV cache (Megatron attends to every cached key then),
float32, no attention dropout while training, vanilla softmax, no sliding window. Every other call goes
to Megatron's own implementation, so the module is a drop-in for ``DotProductAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SdpaDotProductAttention(DotProductAttention):
    """``DotProductAttention`` whose common case runs ``torch.nn.functional.scaled_dot_product_attention``."""

    def sdpa_applies(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        sq, sk = query.size(0), key.size(0)
        softmax = self.scale_mask_softmax
        return (
            attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and self.attn_mask_type == AttnMaskType.causal
            and (sq == sk or sq == 1)
            and query.dtype == torch.float32
            and self.softmax_offset is None
            and getattr(softmax, "window_size", None) is None
            and (self.attention_dropout.p == 0.0 or not self.training)
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self.sdpa_applies(query, key, attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, b = query.size(0), query.size(1)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # Megatron divides the scale by a layer coefficient and multiplies it back inside its softmax
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=sq > 1, scale=scale, enable_gqa=groups > 1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
