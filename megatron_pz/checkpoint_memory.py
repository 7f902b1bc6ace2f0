"""Keep dist_checkpointing from copying model weights on CPU: the difference between "model + one layer"
and "model + every SwiGLU ``linear_fc1``" of peak memory when saving, loading and converting.

Two copies happen inside megatron-core 0.16 that we avoid without patching it, and one read order:

* **save**: its filesystem writer clones every CPU tensor whose storage is larger than the tensor
  (``_clone_if_needed``: a *view*), so that ``torch.save`` does not write the whole storage. Views are
  what the fused ``linear_fc1`` factory hands it (the gate and up halves, ``torch.chunk``) and what every
  parameter is under Megatron DDP with the distributed optimizer (slices of one contiguous param
  buffer). All clones live until the write ends. We apply the factories ourselves (save's first step)
  and pass instead a tensor over the same bytes with a storage of exactly its own size (made via
  numpy, which shares memory), so nothing is cloned and the bytes written are the same.
* **load**: the fc1 factory's merge concatenates the two loaded halves into a new tensor (for every
  layer at once, before ``load_state_dict`` copies it into the model). The halves were loaded in place
  into views of the parameter itself, so the merge can hand back the parameter. When the loaded
  tensors are not those views (a strategy that returns fresh tensors), Megatron's own merge runs.
* **load order**: each tensor is read into a temporary buffer of its size and copied into the model.
  A model built without initialisation (``init_weights=False``: conversion) is not resident until
  loaded, so loading the largest tensors (embedding, output layer) first keeps their buffers from
  stacking on top of an already resident model (:func:`largest_first`).
"""

from __future__ import annotations

import dataclasses

import torch

# numpy has no bfloat16 (nor fp8): such tensors travel through numpy as same-width integers.
_NUMPY_CARRIER = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def exact_storage_alias(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or (for a contiguous CPU view) a tensor over the same memory whose storage
    holds exactly its bytes, so writers that clone views to trim their storage leave it alone."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return tensor
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    carrier = _NUMPY_CARRIER.get(tensor.dtype)
    source = tensor.view(carrier) if carrier is not None else tensor
    alias = torch.from_numpy(source.numpy())
    return alias.view(tensor.dtype) if carrier is not None else alias


def without_copies(sharded_state: dict, is_loading: bool) -> dict:
    """Rewrite a sharded state dict (in place, also returned) so its save or load copies no weights."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories

    if not is_loading:
        apply_factories(sharded_state)  # what save does first; afterwards every tensor it writes is here

        def alias(item):
            if isinstance(item, ShardedTensor) and item.data is not None:
                item.data = exact_storage_alias(item.data)
            return item

        dict_list_map_inplace(alias, sharded_state)
        return sharded_state

    def merge_in_place(item):
        return _merging_in_place(item) if isinstance(item, ShardedTensorFactory) else item

    dict_list_map_inplace(merge_in_place, sharded_state)
    for key, value in sharded_state.items():
        if isinstance(value, dict) and (key.startswith("model") or key.startswith("extra_models.")):
            sharded_state[key] = largest_first(value)
    return sharded_state


def largest_first(model_state: dict) -> dict:
    """The same entries, ordered by tensor size, largest first (dist_checkpointing reads in this order)."""
    def size(item) -> int:
        data = getattr(item, "data", None)
        return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0

    return dict(sorted(model_state.items(), key=lambda kv: -size(kv[1])))


def _merging_in_place(factory):
    """The factory with a merge that hands back the original tensor when the load filled it in place."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    build, merge = factory.build_fn, factory.merge_fn
    built: dict[str, list] = {}  # the original tensor and the pieces the factory made of it

    def build_fn(key, data, replica_id, flattened_range):
        sub_state = build(key, data, replica_id, flattened_range)
        built["source"] = data
        built["pieces"] = [sh.data for sh in nested_values(sub_state) if isinstance(sh, ShardedTensor)]
        return sub_state

    def merge_fn(sub_state):
        loaded = [t for t in nested_values(sub_state) if isinstance(t, torch.Tensor)]
        pieces = built.get("pieces")
        if pieces is not None and _same_tensors(loaded, pieces) and _tile(pieces, built["source"]):
            return built["source"]
        return merge(sub_state)

    return dataclasses.replace(factory, build_fn=build_fn, merge_fn=merge_fn)


def _same_tensors(loaded: list, pieces: list) -> bool:
    return len(loaded) == len(pieces) and all(
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(loaded, pieces))


def _tile(pieces: list, source: torch.Tensor) -> bool:
    """The pieces, in order, are exactly ``source``'s memory (so the merged tensor *is* ``source``)."""
    if source is None or not source.is_contiguous() or not all(p.is_contiguous() for p in pieces):
        return False
    position = source.data_ptr()
    for piece in pieces:
        if piece.data_ptr() != position:
            return False
        position += piece.numel() * piece.element_size()
    return position == source.data_ptr() + source.numel() * source.element_size() and \
        all(p.dtype == source.dtype for p in pieces)
