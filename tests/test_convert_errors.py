"""Corrupt or mismatched Hugging Face folders fail before any weight is copied, naming the file/tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_pz.config import ConfigError
from megatron_pz.convert.hf_io import CheckpointFormatError, HFCheckpointReader, check_against_config
from megatron_pz.model.provider import load_hf_config
from workers.convert_models import write_hf_folder


@pytest.fixture()
def hf_dir(tmp_path):
    folder = tmp_path / "hf"
    write_hf_folder("qwen3_moe", folder, tokenizer=False)
    return folder


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _check(folder):
    check_against_config(HFCheckpointReader(folder), load_hf_config(folder))


def test_clean_folder_passes(hf_dir):
    reader = HFCheckpointReader(hf_dir)
    assert check_against_config(reader, load_hf_config(hf_dir)) == []
    assert len(reader.names()) == 45


def test_missing_shard_names_the_file(hf_dir):
    victim = sorted(set(_index(hf_dir).values()))[1]
    (hf_dir / victim).unlink()
    with pytest.raises(CheckpointFormatError, match=victim):
        HFCheckpointReader(hf_dir)


def test_truncated_file_names_the_file(hf_dir):
    victim = sorted(set(_index(hf_dir).values()))[0]
    data = (hf_dir / victim).read_bytes()
    (hf_dir / victim).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFormatError, match=f"cannot read safetensors file .*{victim}"):
        HFCheckpointReader(hf_dir)


def _rewrite(folder, name, fn):
    file = _index(folder)[name]
    tensors = load_file(str(folder / file))
    fn(tensors)
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    return file


def test_wrong_shape_names_the_tensor(hf_dir):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    _rewrite(hf_dir, name, lambda t: t.__setitem__(name, torch.zeros(31, 64)))
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight has shape \(31, 64\)"):
        _check(hf_dir)


def test_missing_expert_is_an_error_not_a_silent_drop(hf_dir):
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    _rewrite(hf_dir, name, lambda t: t.pop(name))
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"missing tensors: model\.layers\.0\.mlp\.experts\.3\.down_proj"):
        _check(hf_dir)


def test_unexpected_tensor_is_reported(hf_dir):
    name = "model.layers.0.mlp.gate.weight"
    _rewrite(hf_dir, name, lambda t: t.__setitem__("model.layers.0.mlp.shared_expert.weight", torch.zeros(2)))
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.shared_expert.weight"] = index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensors.*shared_expert"):
        _check(hf_dir)


def test_index_pointing_at_wrong_file(hf_dir):
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=f"{name}.*{files[1]}"):
        HFCheckpointReader(hf_dir)


def test_unknown_architecture_names_the_config(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json has model_type='gpt2'"):
        load_hf_config(hf_dir)


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointFormatError, match="neither model.safetensors.index.json nor model.safetensors"):
        HFCheckpointReader(tmp_path)
