"""Move weights between live Megatron model chunks and Hugging Face tensors, one layer at a time.

:func:`megatron_to_hf_tensors` is what export and the rollout weight sync use: full HF-named tensors
for the layers of this pipeline stage, gathered over the TP group (and experts over the EP group).
:func:`load_hf_tensors` is the inverse used by import: every rank reads the full HF tensors of the
parameters it owns and keeps its own shard. Both work with the local and the Transformer Engine spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_pz.config import ConfigError, num_experts_of
from megatron_pz.convert.mapping import (
    REPLICATED,
    ParamSpec,
    combine_hf,
    local_name_from_te,
    param_spec,
    split_megatron,
)
from megatron_pz.convert.sharding import all_gather, shard, unshard


class WeightMismatchError(ConfigError):
    """An HF tensor is missing, unused or has the wrong shape for the Megatron model; names it."""


@dataclass
class Layout:
    """This rank's place in the groups that shard weights (all 1/None when Megatron is not initialised)."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: object = None
    etp_rank: int = 0
    etp_size: int = 1
    etp_group: object = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: object = None

    @classmethod
    def current(cls) -> "Layout":
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_group=ps.get_tensor_model_parallel_group(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            etp_group=ps.get_expert_tensor_parallel_group(check_initialized=False),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            ep_group=ps.get_expert_model_parallel_group(check_initialized=False),
        )


@dataclass
class _Param:
    name: str  # the model's own name (local or TE spec), for error messages
    local_name: str  # local-spec name
    layer: Optional[int]  # global layer index, None outside the decoder layers
    param: torch.nn.Parameter
    spec: ParamSpec


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _layer_groups(chunk, hf_config, layout: Layout) -> Iterator[list[_Param]]:
    """This chunk's parameters grouped: embedding, then one group per decoder layer, then the head."""
    model = unwrap(chunk)
    num_experts = num_experts_of(hf_config)
    num_local = num_experts // layout.ep_size if num_experts else 0
    layer_offset = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    tied_head = bool(getattr(model, "share_embeddings_and_output_weights", False))
    groups: dict[object, list[_Param]] = {}
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and tied_head:
            continue  # the last stage's copy of the tied embedding: HF has one tensor, on stage 0
        local = local_name_from_te(name)
        layer = None
        if local.startswith("decoder.layers."):
            layer = layer_offset[int(local.split(".")[2])]
        spec = param_spec(hf_config, local, layer, num_local, layout.ep_rank)
        key = ("layer", layer) if layer is not None else name.split(".")[0]
        groups.setdefault(key, []).append(_Param(name, local, layer, param, spec))
    yield from groups.values()


def megatron_to_hf_tensors(model_chunks, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for every HF tensor held by this pipeline stage.

    Collective: all ranks of this stage's TP and EP groups must iterate it together (it all-gathers
    TP shards and routed experts). Layer indices in names are global. Tensors of one layer are
    gathered, yielded, and released before the next layer starts. Without TP/EP gathering a yielded
    tensor may share storage with the parameter: copy it if you keep it across an optimizer step.
    """
    layout = Layout.current()
    num_experts = num_experts_of(hf_config)
    num_local = num_experts // layout.ep_size if num_experts else 0
    for chunk in model_chunks:
        for group in _layer_groups(chunk, hf_config, layout):
            out: list[tuple[str, torch.Tensor]] = []
            for p in group:
                if p.spec.expert is None:
                    shards = [p.param] if p.spec.tp_split == REPLICATED else all_gather(p.param, layout.tp_group)
                    pieces = [(p.spec, unshard([s.detach() for s in shards], p.spec.tp_split))]
                else:
                    shards = ([p.param] if p.spec.tp_split == REPLICATED
                              else all_gather(p.param, layout.etp_group))
                    full_local = unshard([s.detach() for s in shards], p.spec.tp_split)
                    pieces = [
                        (param_spec(hf_config, p.local_name, p.layer, num_local, ep_rank), t)
                        for ep_rank, t in enumerate(all_gather(full_local, layout.ep_group))
                    ]
                for spec, full in pieces:
                    out.extend(zip(spec.hf_names, split_megatron(spec, full, hf_config)))
            yield from out
            del out


def load_hf_tensors(model_chunks, hf_config, get_tensor: Callable[[str], torch.Tensor]) -> set[str]:
    """Fill this rank's parameters from HF tensors; return the HF names it used.

    ``get_tensor(name)`` returns one full HF tensor (e.g. read lazily from safetensors), so at most one
    parameter's source tensors are alive at a time. Not collective. A tied model's last pipeline stage
    fills its output layer from the embedding.
    """
    layout = Layout.current()
    used: set[str] = set()
    with torch.no_grad():
        for chunk in model_chunks:
            model = unwrap(chunk)
            for group in _layer_groups(chunk, hf_config, layout):
                for p in group:
                    _load_one(p, hf_config, get_tensor, layout, used)
            if getattr(model, "share_embeddings_and_output_weights", False) and model.post_process \
                    and not model.pre_process:
                head = model.output_layer.weight
                spec = param_spec(hf_config, "embedding.word_embeddings.weight")
                p = _Param("output_layer.weight (tied)", "embedding.word_embeddings.weight", None, head, spec)
                _load_one(p, hf_config, get_tensor, layout, used)
    return used


def _load_one(p: _Param, hf_config, get_tensor, layout: Layout, used: set[str]) -> None:
    tensors = [get_tensor(n) for n in p.spec.hf_names]
    try:
        full = combine_hf(p.spec, tensors, hf_config)
        if p.spec.expert is None:
            local = shard(full, p.spec.tp_split, layout.tp_rank, layout.tp_size)
        else:
            local = shard(full, p.spec.tp_split, layout.etp_rank, layout.etp_size)
    except (RuntimeError, ValueError) as exc:
        raise WeightMismatchError(
            f"cannot build Megatron parameter {p.name} from {', '.join(p.spec.hf_names)} "
            f"(shapes {[tuple(t.shape) for t in tensors]}): {exc}") from exc
    if tuple(local.shape) != tuple(p.param.shape):
        raise WeightMismatchError(
            f"Megatron parameter {p.name} has shape {tuple(p.param.shape)} on this rank but "
            f"{', '.join(p.spec.hf_names)} (shapes {[tuple(t.shape) for t in tensors]}) give {tuple(local.shape)}")
    p.param.data.copy_(local)
    used.update(p.spec.hf_names)
