"""The streaming safetensors shard writer: files safetensors itself reads back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megatron_pz.convert.hf_io import INDEX_NAME, CheckpointFormatError, HFShardWriter


def test_shards_read_back_bit_exact_with_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(6, 5, generator=g)
    tensors = {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "c.q": fused[:2],  # views into a fused tensor, as the QKV / gate-up split yields
        "c.kv": fused[2:].t(),  # non-contiguous
        "d.ids": torch.arange(5, dtype=torch.int64),
        "e.scalar": torch.tensor(1.5, dtype=torch.float16),
    }
    writer = HFShardWriter(tmp_path, max_shard_bytes=64)  # forces several shards
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.finish()
    assert names == sorted(tensors)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files + [INDEX_NAME])  # no staging left
    for name, expected in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), framework="pt") as f:
            got = f.get_tensor(name)
            assert f.metadata() == {"format": "pt"}
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), name


def test_duplicate_and_unsupported_tensors_are_named(tmp_path):
    writer = HFShardWriter(tmp_path)
    writer.add("x", torch.zeros(2))
    with pytest.raises(CheckpointFormatError, match="x was produced twice"):
        writer.add("x", torch.zeros(2))
    with pytest.raises(CheckpointFormatError, match="y: dtype torch.complex64"):
        writer.add("y", torch.zeros(2, dtype=torch.complex64))
