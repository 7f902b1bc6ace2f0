"""Checkpoint save/load copy no weights: fc1 halves are written from the model's own memory, and a load
merges them back into the parameter itself (the memory figures are in bench/bench_convert_memory.py)."""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor, ShardedTensorFactory, apply_factories, apply_factory_merges,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

from megatron_pz.checkpoint_memory import exact_storage_alias, largest_first, without_copies


def _is_view(t: torch.Tensor) -> bool:
    """What megatron-core's CPU writer tests before cloning a tensor."""
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _fc1_state(param: torch.Tensor) -> dict:
    return {"model": {"mlp.linear_fc1.weight": apply_swiglu_sharded_factory(
        ShardedTensor.from_rank_offsets("mlp.linear_fc1.weight", param), ())}}


def test_alias_shares_memory_with_exact_storage():
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.arange(24, dtype=torch.float32).to(dtype).reshape(6, 4)
        view = base[2:5]
        assert _is_view(view)
        alias = exact_storage_alias(view)
        assert not _is_view(alias) and alias.dtype == dtype and alias.shape == view.shape
        assert alias.data_ptr() == view.data_ptr() and torch.equal(alias, view)
        base[3, 0] = 100  # same memory, not a copy
        assert alias[1, 0].item() == 100
    whole = torch.ones(3)
    assert not _is_view(exact_storage_alias(whole)) and exact_storage_alias(whole).data_ptr() == whole.data_ptr()
    strided = torch.ones(4, 4)[:, 1]
    assert exact_storage_alias(strided).data_ptr() == strided.data_ptr()  # left to the writer as before


def test_save_pieces_are_not_views_but_the_model_memory():
    param = torch.randn(8, 3)
    plain = _fc1_state(param)
    apply_factories(plain)
    assert all(_is_view(sh.data) for sh in plain["model"]["mlp.linear_fc1.weight"])  # what Megatron would clone

    state = without_copies(_fc1_state(param), is_loading=False)
    apply_factories(state)
    gate, up = state["model"]["mlp.linear_fc1.weight"]
    assert not _is_view(gate.data) and not _is_view(up.data)
    assert gate.data.data_ptr() == param.data_ptr() and torch.equal(gate.data, param[:4])
    assert up.data.data_ptr() == param[4:].data_ptr() and torch.equal(up.data, param[4:])
    assert gate.global_offset == (0, 0) and up.global_offset == (4, 0)  # layout unchanged


def test_load_merge_returns_the_parameter_when_loaded_in_place():
    param = torch.zeros(8, 3)
    state = without_copies(_fc1_state(param), is_loading=True)
    factories = {"model": dict(state["model"])}
    apply_factories(state)
    pieces = [sh.data for sh in state["model"]["mlp.linear_fc1.weight"]]
    pieces[0].copy_(torch.full((4, 3), 1.0))  # what an in-place load does
    pieces[1].copy_(torch.full((4, 3), 2.0))
    merged = apply_factory_merges({"model": {"mlp.linear_fc1.weight": pieces}}, factories)
    assert merged["model"]["mlp.linear_fc1.weight"] is param
    assert torch.equal(param, torch.cat([torch.full((4, 3), 1.0), torch.full((4, 3), 2.0)]))


def test_load_merge_falls_back_to_megatron_when_tensors_are_fresh():
    param = torch.zeros(8, 3)
    state = without_copies(_fc1_state(param), is_loading=True)
    factories = {"model": dict(state["model"])}
    apply_factories(state)
    fresh = [torch.full((4, 3), 3.0), torch.full((4, 3), 4.0)]
    merged = apply_factory_merges({"model": {"mlp.linear_fc1.weight": fresh}}, factories)["model"]
    result = merged["mlp.linear_fc1.weight"]
    assert result is not param and torch.equal(result, torch.cat(fresh))
    assert torch.equal(param, torch.zeros(8, 3))


def test_load_reads_largest_tensors_first():
    small, big = torch.zeros(2), torch.zeros(50)
    state = {"model": {"a": ShardedTensor.from_rank_offsets("a", small),
                       "b": _fc1_state(torch.zeros(8, 3))["model"]["mlp.linear_fc1.weight"],
                       "c": ShardedTensor.from_rank_offsets("c", big)},
             "pz_common": {"step": 1}}
    assert list(without_copies(state, is_loading=True)["model"]) == ["c", "b", "a"]
    assert isinstance(state["model"]["b"], ShardedTensorFactory)
    assert list(largest_first({"x": 1, "y": ShardedTensor.from_rank_offsets("y", big)})) == ["y", "x"]
