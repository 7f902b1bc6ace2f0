"""MoE routes: which experts the rollout sent each token to, in one compact host format.

Rollout routing replay (R3, arXiv 2510.11370): the rollout engine and the Megatron actor route tokens
independently, and a tiny numerical difference flips a top-k choice; R3 records the rollout's choices and
makes every training forward on that sample use them. This module is the format they travel in, from
either engine to the experience to the micro-batch; :mod:`megatron_pz.train.routing_replay` feeds them to
Megatron's routers.

Format, per sequence: a numpy array ``[tokens, moe_layers, topk]`` of expert ids, ``uint8`` when the model
has at most 256 experts and ``uint16`` above (vLLM 0.32.0's own rule, ``RoutedExpertsCapturer``). Row ``t``
holds the choices for token ``t`` of prompt + response as an *input* of the forward. A rollout knows
``len(prompt) + len(response) - 1`` rows: the last sampled token is never fed back (vLLM returns the same
count). Column ``j`` is the ``j``-th MoE layer in model order (:attr:`RouteShape.moe_layers`; dense layers
of ``mlp_only_layers`` / ``decoder_sparse_step`` have no column).

Rows a sample has no route for (its last token, the tokens RLP's scorer appends, padding) route natively
in training: in a micro-batch they are :data:`NATIVE` (-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_pz.config import num_experts_of
from megatron_pz.model.provider import moe_layer_pattern

NATIVE = -1  # a micro-batch entry without a rollout route: the router chooses natively


def route_dtype(num_experts: int):
    """uint8 up to 256 experts, uint16 above (vLLM 0.32.0 ``RoutedExpertsCapturer.output_dtype_name``)."""
    if num_experts > 65536:
        raise ValueError(f"{num_experts} experts do not fit uint16 route ids")
    return np.uint8 if num_experts <= 256 else np.uint16


@dataclass(frozen=True)
class RouteShape:
    """What a route array of this model looks like."""

    num_layers: int  # all decoder layers (vLLM's array has one column per layer, MoE or not)
    moe_layers: tuple[int, ...]  # 0-based indices of the MoE layers, in order: the route columns
    topk: int
    num_experts: int

    @classmethod
    def from_hf(cls, hf_config) -> Optional["RouteShape"]:
        """The shape for an HF config; None for a dense model."""
        experts = num_experts_of(hf_config)
        if not experts:
            return None
        pattern = moe_layer_pattern(hf_config)
        return cls(num_layers=int(hf_config.num_hidden_layers),
                   moe_layers=tuple(i for i, moe in enumerate(pattern) if moe),
                   topk=int(hf_config.num_experts_per_tok), num_experts=experts)

    @property
    def dtype(self):
        return route_dtype(self.num_experts)

    def column_of_layer_number(self, layer_number: int) -> int:
        """Route column of Megatron's ``layer_number`` (1-based, global: includes the pipeline offset)."""
        try:
            return self.moe_layers.index(layer_number - 1)
        except ValueError:
            raise ValueError(f"layer {layer_number} is not an MoE layer of this model "
                             f"(MoE layers, 1-based: {[i + 1 for i in self.moe_layers]})") from None

    def bytes_per_token(self) -> int:
        return len(self.moe_layers) * self.topk * np.dtype(self.dtype).itemsize


def check_routes(routes, shape: RouteShape, num_tokens: int, where: str) -> np.ndarray:
    """``routes`` as a validated ``[num_tokens, moe_layers, topk]`` array of ``shape.dtype``.

    Bad routes would make the MoE all-to-all fail far from their source (duplicate ids in a row break its
    split sizes) or silently train on wrong experts, so each is refused here with ``where`` (the
    experience or completion) named: wrong shape or length, an id outside ``[0, experts)``, a layer that is
    all zeros with top-k > 1 (an unwritten layer, e.g. a dense layer's column of vLLM's array), a repeated id
    in a row.
    """
    array = np.asarray(routes)
    expected = (num_tokens, len(shape.moe_layers), shape.topk)
    if array.shape != expected:
        raise ValueError(f"{where}: routes have shape {array.shape}, expected {expected} "
                         "(prompt + response - 1 tokens, MoE layers, top-k)")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: routes must be integer expert ids, got {array.dtype}")
    if array.size == 0:
        return array.astype(shape.dtype)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= shape.num_experts:
        raise ValueError(f"{where}: routes hold expert ids in [{low}, {high}], expected [0, {shape.num_experts})")
    if shape.topk > 1:  # (with top-1, a router may legitimately send every token to expert 0)
        zero_layers = np.flatnonzero(~array.any(axis=(0, 2)))
        if len(zero_layers):
            layer = shape.moe_layers[int(zero_layers[0])]
            raise ValueError(f"{where}: routes of MoE layer {layer} (0-based) are all zeros: an unwritten layer")
        ordered = np.sort(array, axis=-1)
        repeated = np.argwhere((ordered[..., 1:] == ordered[..., :-1]).any(axis=-1))
        if len(repeated):
            token, column = (int(v) for v in repeated[0])
            raise ValueError(f"{where}: token {token}, MoE layer {shape.moe_layers[column]} (0-based) repeats an "
                             f"expert id: {array[token, column].tolist()}")
    return array.astype(shape.dtype, copy=False)


def routes_from_vllm(routed_experts, prompt_len: int, num_generated: int, shape: RouteShape,
                     where: str) -> np.ndarray:
    """Our format from vLLM 0.32.0's ``CompletionOutput.routed_experts``.

    vLLM 0.32.0 (``outputs.py``, ``v1/engine/output_processor.py``,
    ``distributed/aux_output_connector/{connector,routed_experts}.py``,
    ``model_executor/layers/fused_moe/routed_experts_capturer.py``): a numpy array
    ``[prompt_len + generated - 1, num_hidden_layers, topk]`` (uint8 up to 256 experts, else uint16),
    prompt tokens included (``routed_experts_prompt_start`` = 0), set on the finished output only; rows of
    tokens dropped after a stop string are trimmed with the tokens. Column ``i`` is layer ``i`` (the
    ``layers.N`` index of the MoE runner); a dense layer's column is never written, so only the MoE
    layers' columns are kept.
    """
    if routed_experts is None:
        raise ValueError(f"{where}: vLLM returned no routed_experts (was the engine built with "
                         "enable_return_routed_experts=True, and is the output finished?)")
    array = np.asarray(routed_experts)
    if array.ndim != 3 or array.shape[1] != shape.num_layers or array.shape[2] != shape.topk:
        raise ValueError(f"{where}: vLLM routed_experts have shape {array.shape}, expected "
                         f"[tokens, {shape.num_layers} layers, {shape.topk}]")
    return check_routes(array[:, list(shape.moe_layers), :], shape, prompt_len + num_generated - 1, where)
