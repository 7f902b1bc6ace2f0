"""Export: a Megatron checkpoint saved at any TP/PP/EP layout -> a Hugging Face folder.

The checkpoint is loaded in one process at TP=PP=EP=1 (dist_checkpointing reshards on load), mapped to
HF names layer by layer with :func:`megatron_pz.convert.weights.megatron_to_hf_tensors`, and written as
safetensors shards with an index, ``config.json`` and the tokenizer files stored in the checkpoint.
The folder appears atomically: it is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron_pz.checkpoint import (TOKENIZER_DIR, load_checkpoint, read_hf_config, read_metadata,
                                    resolve_checkpoint_dir)
from megatron_pz.config import ConfigError, ModelConfig, ParallelConfig, RuntimeConfig
from megatron_pz.convert.hf_io import CheckpointFormatError, HFShardWriter
from megatron_pz.convert.mapping import expected_hf_tensors
from megatron_pz.convert.targets import check_export_target, remove_previous_export
from megatron_pz.convert.weights import megatron_to_hf_tensors
from megatron_pz.data.tokenizer import copy_tokenizer_files
from megatron_pz.errors import during_work
from megatron_pz.model.provider import SUPPORTED_ARCHITECTURES, build_model
from megatron_pz.runtime import initialize


def export_hf_checkpoint(ckpt, out, max_shard_bytes: int = 2 * 1024**3, device: str = "auto",
                         overwrite: bool = False) -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("megatron-to-hf runs in a single process (it reshards to TP=PP=EP=1); "
                          "do not launch it under torchrun")
    out = Path(out)
    check_export_target(ckpt, out, overwrite)  # nothing that is not a previous export is ever replaced
    ckpt_dir = resolve_checkpoint_dir(ckpt)  # complete, or the error names the newest complete one
    meta = read_metadata(ckpt_dir)
    hf_config = read_hf_config(ckpt_dir)
    with during_work():
        return _export(ckpt_dir, meta, hf_config, out, max_shard_bytes, device)


def _export(ckpt_dir: Path, meta: dict, hf_config, out: Path, max_shard_bytes: int, device: str) -> Path:
    info = initialize(ParallelConfig(), RuntimeConfig(device=device))
    dtype = meta.get("params_dtype") or "float32"
    # every parameter is overwritten by the checkpoint, so skip the random init (it touches every page)
    model = build_model(hf_config, ModelConfig(params_dtype=dtype, init_weights=False), ParallelConfig(),
                        device=info.device)
    load_checkpoint(ckpt_dir, [model], restore_rng=False)

    tmp = out.parent / f".tmp_{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = HFShardWriter(tmp, max_shard_bytes)
    out_dtype = getattr(torch, dtype)
    for name, tensor in megatron_to_hf_tensors([model], hf_config):
        # Megatron may keep some tensors (norms) in fp32 inside a bf16 model; HF folders are uniform.
        writer.add(name, tensor.to(device="cpu", dtype=out_dtype))
    written = set(writer.finish())
    expected = set(expected_hf_tensors(hf_config))
    if written != expected:
        raise CheckpointFormatError(
            f"export of {ckpt_dir} produced the wrong tensor set: missing {sorted(expected - written)[:12]}, "
            f"unexpected {sorted(written - expected)[:12]}")
    hf_config.architectures = [SUPPORTED_ARCHITECTURES[hf_config.model_type]]
    hf_config.dtype = dtype
    hf_config.save_pretrained(tmp)
    copy_tokenizer_files(ckpt_dir / TOKENIZER_DIR, tmp)
    if out.exists():
        remove_previous_export(out)  # checked above: it holds nothing else
    os.replace(tmp, out)
    return out
