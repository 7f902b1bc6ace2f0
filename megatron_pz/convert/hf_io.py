"""Read and write Hugging Face safetensors folders tensor by tensor.

Reading goes through ``safetensors.safe_open`` one tensor at a time, so importing never holds more than
the tensors of the parameter being filled. Every file is checked up front (missing shard, unreadable
or truncated file, names and shapes against the config) so errors name the file or tensor before any
weight is copied or any collective starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_pz.config import ConfigError
from megatron_pz.convert.mapping import IGNORABLE_HF_TENSORS, expected_hf_tensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointFormatError(ConfigError):
    """A Hugging Face folder is incomplete or corrupt; the message names the file or tensor."""


class HFCheckpointReader:
    """Lazy view of a HF safetensors checkpoint (single file, or shards listed in the index)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointFormatError(f"{index} is not a safetensors index (needs 'weight_map'): {exc}")
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_NAME).is_file():
            files, weight_map = [SINGLE_NAME], None
        else:
            raise CheckpointFormatError(
                f"{self.folder} has neither {INDEX_NAME} nor {SINGLE_NAME} (expected a Hugging Face model folder)")
        self._handles = {}
        self.location: dict[str, str] = {}
        for file in files:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointFormatError(f"shard {path} listed in {INDEX_NAME} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except Exception as exc:  # SafetensorError (also for a truncated file) / OSError
                raise CheckpointFormatError(f"cannot read safetensors file {path}: {exc}") from exc
            self._handles[file] = handle
            for name in names:
                if name in self.location:
                    raise CheckpointFormatError(f"tensor {name} is stored twice ({self.location[name]} and {file})")
                self.location[name] = file
        if weight_map is not None:
            for name, file in weight_map.items():
                if self.location.get(name) != file:
                    raise CheckpointFormatError(
                        f"{INDEX_NAME} places tensor {name} in {file}, but that file does not contain it")

    def names(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.location[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        file = self.location.get(name)
        if file is None:
            raise CheckpointFormatError(f"tensor {name} is not in the checkpoint {self.folder}")
        try:
            return self._handles[file].get_tensor(name)
        except Exception as exc:
            raise CheckpointFormatError(f"cannot read tensor {name} from {self.folder / file}: {exc}") from exc


def check_against_config(reader: HFCheckpointReader, hf_config) -> list[str]:
    """Names and shapes in the checkpoint must be exactly what the config implies.

    Returns the derived-state tensors skipped (e.g. ``rotary_emb.inv_freq``); raises naming every
    missing, unexpected or wrongly shaped tensor otherwise.
    """
    expected = expected_hf_tensors(hf_config)
    present = set(reader.names())
    skipped = sorted(n for n in present if IGNORABLE_HF_TENSORS.search(n))
    present -= set(skipped)
    tied_extra = []
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" in present:
        present.discard("lm_head.weight")  # a tied copy; checked equal below
        tied_extra = ["lm_head.weight"]
    problems = []
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not used by a {hf_config.model_type} model of this config): "
                        f"{_short(unexpected)}")
    for name in sorted(present & set(expected)):
        if reader.shape(name) != tuple(expected[name]):
            problems.append(f"tensor {name} has shape {reader.shape(name)}, config implies {tuple(expected[name])}")
    if tied_extra and not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        problems.append("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    if problems:
        raise CheckpointFormatError(f"checkpoint {reader.folder} does not match its config: " + "; ".join(problems))
    return skipped + tied_extra


def _short(names: list[str], limit: int = 12) -> str:
    head = ", ".join(names[:limit])
    return head + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# safetensors' names of the dtypes a model holds (https://github.com/huggingface/safetensors, format spec)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class HFShardWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards plus the index, as they arrive.

    Each tensor's bytes go to disk as soon as it is added, so export holds one tensor beyond the model,
    not a shard (``safetensors.torch.save_file`` serialises a whole dict in memory, which at the usual
    2-5 GB shard size would double an export's footprint). A shard's data is staged in a ``.data`` file;
    when the shard reaches ``max_shard_bytes`` the safetensors header (8-byte length + JSON of dtype,
    shape and offsets, as the format specifies) is written followed by the staged bytes. Names are fixed
    up at :meth:`finish` when the number of shards is known.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._entries: dict[str, dict] = {}
        self._data = None
        self._data_bytes = 0
        self._files: list[list[str]] = []
        self.total_bytes = 0

    def _staging(self) -> Path:
        return self.folder / f"shard-{len(self._files):05d}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries or any(name in f for f in self._files):
            raise CheckpointFormatError(f"tensor {name} was produced twice during export")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._data_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self._staging(), "wb")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._data.write(memoryview(flat.numpy()))
        self._entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
        self._data_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._entries:
            return
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format pads the header so data starts 8-byte aligned
        staging = self._staging()
        with open(self.folder / f"shard-{len(self._files):05d}.tmp", "wb") as out, open(staging, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 1024**2)  # a small buffer: the page cache does the rest
        staging.unlink()
        self._files.append(list(self._entries))
        self._entries, self._data, self._data_bytes = {}, None, 0

    def finish(self) -> list[str]:
        self._flush()
        n = len(self._files)
        weight_map = {}
        for i, names in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return sorted(weight_map)
