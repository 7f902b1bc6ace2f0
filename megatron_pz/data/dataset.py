"""Read what ``preprocess`` wrote: passages (tokens + text + title) and their span candidates.

Token ids and word tables are Megatron ``IndexedDataset``s aligned by document index with the
``text/*.jsonl`` shards; everything is checked against the manifest on load, and a shard whose size
or line count disagrees raises naming the file (a half-written or truncated shard never loads).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_pz.errors import BadInput

from .preprocess import FORMAT_VERSION
from .spans import NUM_WORD_FIELDS, candidate_arrays

SPLITS = ("all", "train", "heldout", "validation")
REBUILD = "preprocess the data again (this folder was damaged or only partly copied)"


class DatasetFormatError(BadInput, ValueError):
    """A preprocessed folder is missing a file or disagrees with its manifest; names the file."""


@dataclass
class SpanCandidate:
    text: str
    char_start: int  # offsets into Passage.text
    char_end: int
    token_start: int  # offsets into Passage.token_ids; [token_start, token_end) decodes to text
    token_end: int  #   (modulo a leading space carried by the first BPE token)
    num_words: int
    idf: float  # mean IDF of the span's non-stopword words


@dataclass
class Passage:
    index: int  # document index in the IndexedDataset
    title: str
    text: str
    token_ids: np.ndarray
    candidates: list[SpanCandidate] = field(default_factory=list)
    page: int = -1  # page number in the input stream
    part: int = 0  # passage number within its article


class PassageDataset:
    """Passages of one preprocessed folder; ``split`` holds out whole articles by a hash of the title in
    [0, 1): ``heldout`` below ``heldout_fraction``, ``validation`` the next ``validation_fraction`` (for
    choosing settings without looking at the held-out articles), ``train`` the rest."""

    def __init__(
        self,
        path: str | Path,
        split: str = "all",
        heldout_fraction: float = 0.02,
        max_span_words: Optional[int] = None,
        max_span_tokens: Optional[int] = None,
        validation_fraction: float = 0.0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}, expected one of {SPLITS}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={heldout_fraction}, expected 0 <= f < 1")
        if not 0.0 <= validation_fraction < 1.0 - heldout_fraction:
            raise ValueError(f"validation_fraction={validation_fraction}, expected 0 <= f < 1 - heldout_fraction")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        files = self.manifest["files"]
        built_k = self.manifest["options"]["max_span_words"]
        self.max_span_words = built_k if max_span_words is None else min(max_span_words, built_k)
        self.max_span_tokens = max_span_tokens  # None: any length
        total = self.manifest["counts"]["passages"]
        self.tokens = open_indexed(self.path, self.manifest, "passages")
        self.words = open_indexed(self.path, self.manifest, "words")
        self._shards = self.manifest["shards"]
        self._shard_first = np.array([s["first_passage"] for s in self._shards], dtype=np.int64)
        self._line_offsets = [self._index_shard(s) for s in self._shards]
        keys = np.load(self.path / files["split_keys"])
        if len(keys) != total:
            raise DatasetFormatError(f"{self.path / files['split_keys']}: {len(keys)} keys, expected {total}")
        if split == "all":
            self._indices = np.arange(total)
        elif split == "heldout":
            self._indices = np.flatnonzero(keys < heldout_fraction)
        elif split == "validation":
            self._indices = np.flatnonzero((keys >= heldout_fraction) & (keys < heldout_fraction + validation_fraction))
        else:
            self._indices = np.flatnonzero(keys >= heldout_fraction + validation_fraction)
        self._maps: dict[int, mmap.mmap] = {}

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.manifest["files"]["tokenizer"]

    def _index_shard(self, shard: dict) -> np.ndarray:
        path = self.path / shard["file"]
        if not path.is_file():
            raise DatasetFormatError(f"{path}: text shard missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DatasetFormatError(f"{path}: {size} bytes, manifest says {shard['bytes']}")
        data = np.fromfile(path, dtype=np.uint8)
        ends = np.flatnonzero(data == ord("\n")) + 1
        if len(ends) != shard["passages"] or (size and ends[-1] != size):
            raise DatasetFormatError(
                f"{path}: {len(ends)} complete lines, but the .idx holds {shard['passages']} passages for it"
            )
        return np.concatenate([[0], ends]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getstate__(self):  # picklable for DataLoader workers: reopen the mmaps lazily
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def document_index(self, i: int) -> int:
        return int(self._indices[i])

    def record(self, doc: int) -> dict:
        """The JSON record (title, text, page, part) of document ``doc``."""
        shard = int(np.searchsorted(self._shard_first, doc, side="right") - 1)
        if shard not in self._maps:
            with open(self.path / self._shards[shard]["file"], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        line = doc - self._shards[shard]["first_passage"]
        offsets = self._line_offsets[shard]
        return json.loads(self._maps[shard][offsets[line] : offsets[line + 1]])

    def word_table(self, doc: int) -> np.ndarray:
        return np.asarray(self.words[doc]).reshape(-1, NUM_WORD_FIELDS)

    def candidate_arrays(self, doc: int) -> dict[str, np.ndarray]:
        """Candidates of document ``doc`` as arrays (char/token spans, num_words, idf), no objects."""
        words = self.word_table(doc)
        spans = candidate_arrays(words, self.max_span_words)
        if self.max_span_tokens is not None:
            keep = words[spans["last"], 3] - words[spans["first"], 2] <= self.max_span_tokens
            spans = {k: v[keep] for k, v in spans.items()}
        first, last = spans["first"], spans["last"]
        return {
            "char_start": words[first, 0].astype(np.int64),
            "char_end": words[last, 1].astype(np.int64),
            "token_start": words[first, 2].astype(np.int64),
            "token_end": words[last, 3].astype(np.int64),
            "num_words": spans["num_words"],
            "idf": spans["idf"],
        }

    def __getitem__(self, i: int) -> Passage:
        if not -len(self) <= i < len(self):
            raise IndexError(f"passage {i} out of range for {len(self)} passages")
        doc = int(self._indices[i])
        rec = self.record(doc)
        text = rec["text"]
        arr = self.candidate_arrays(doc)
        candidates = [
            SpanCandidate(text[cs:ce], cs, ce, ts, te, nw, float(idf))
            for cs, ce, ts, te, nw, idf in zip(
                arr["char_start"].tolist(), arr["char_end"].tolist(), arr["token_start"].tolist(),
                arr["token_end"].tolist(), arr["num_words"].tolist(), arr["idf"].tolist(),
            )
        ]
        return Passage(
            index=doc,
            title=rec["title"],
            text=text,
            token_ids=np.asarray(self.tokens[doc], dtype=np.int64),
            candidates=candidates,
            page=rec["page"],
            part=rec["part"],
        )


def read_manifest(path: Path) -> dict:
    """The manifest of a preprocessed folder (a folder without one is not a finished preprocess output)."""
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise DatasetFormatError("no such folder", path, "build it with `megatron-pz preprocess ... --out` that folder")
    if not manifest_path.is_file():
        raise DatasetFormatError("missing; not a finished preprocess output", manifest_path,
                                 "rerun the same `megatron-pz preprocess` command to finish (it resumes)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"unreadable ({exc})", manifest_path, "rerun `megatron-pz preprocess` into a new folder")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetFormatError(f"format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}",
                                 manifest_path, "preprocess the data again with this version")
    return manifest


def open_indexed(path: Path, manifest: dict, key: str):
    """The ``IndexedDataset`` of ``manifest["files"][key]``, once :func:`check_indexed` has found it whole."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(check_indexed(path, manifest, key)))


# megatron-core 0.16.1, indexed_dataset.DType: the dtype code an .idx header holds -> bytes per element
_DTYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def check_indexed(path: Path, manifest: dict, key: str) -> Path:
    """The ``.idx``/``.bin`` pair of ``manifest["files"][key]`` is whole: both there, the index as long as its
    header says, the ``.bin`` exactly as long as the index describes (a short one would fail only when its
    last passage is drawn), as many documents as the manifest counts. Returns the pair's path prefix.

    The index is read as megatron-core 0.16.1 writes it (``indexed_dataset._IndexWriter``: 9-byte magic,
    version 1, dtype code, sequence and document counts, then int32 lengths, int64 pointers, int64 document
    indices), without importing megatron (seconds of a refused start-up) and before ``IndexedDataset`` opens
    it: that fails on a short index naming no file, and complains again when the half-built object is freed."""
    prefix = path / manifest["files"][key]
    idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    for file in (idx, bin_):
        if not file.is_file():
            raise DatasetFormatError("missing", file, REBUILD)
    with open(idx, "rb") as f:
        header = f.read(34)
    if (len(header) < 34 or header[:9] != b"MMIDIDX\x00\x00" or struct.unpack("<Q", header[9:17])[0] != 1
            or header[17] not in _DTYPE_BYTES):
        raise DatasetFormatError("not an index of megatron-core's IndexedDataset (bad header)", idx, REBUILD)
    sequences, documents = struct.unpack("<QQ", header[18:34])
    expected = 34 + sequences * (4 + 8) + documents * 8
    if idx.stat().st_size != expected:
        raise DatasetFormatError(f"{idx.stat().st_size} bytes, its header describes {expected}", idx, REBUILD)
    total = manifest["counts"]["passages"]
    if sequences != total:
        raise DatasetFormatError(f"{sequences} documents, manifest says {total}", idx, REBUILD)
    expected = 0
    if sequences:
        length = np.fromfile(idx, dtype=np.int32, count=1, offset=34 + 4 * (sequences - 1))[0]
        pointer = np.fromfile(idx, dtype=np.int64, count=1, offset=34 + 4 * sequences + 8 * (sequences - 1))[0]
        expected = int(pointer) + int(length) * _DTYPE_BYTES[header[17]]
    if bin_.stat().st_size != expected:
        raise DatasetFormatError(f"{bin_.stat().st_size} bytes, but {idx.name} describes {expected}", bin_, REBUILD)
    return prefix


def check_dataset(path: str | Path) -> dict:
    """The start-up check of a preprocessed folder, without reading its passages: manifest, indexed files
    (sizes against their index), text shards (sizes against the manifest), split keys, tokenizer. Returns
    the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for key in ("passages", "words"):
        check_indexed(path, manifest, key)
    for shard in manifest["shards"]:
        file = path / shard["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != shard["bytes"]:
            raise DatasetFormatError("missing" if size is None else f"{size} bytes, manifest says {shard['bytes']}",
                                     file, REBUILD)
    for file in (path / manifest["files"]["split_keys"], path / manifest["files"]["tokenizer"] / "tokenizer.json"):
        if not file.is_file():
            raise DatasetFormatError("missing", file, "preprocess the data again")
    return manifest


def train_and_heldout(path: str | Path, data_cfg) -> tuple["PassageDataset", "PassageDataset"]:
    """The training passages of a run (``data_cfg``: its DataConfig) and the ones it evaluates on
    (``data.eval_split``: the held-out articles, or the validation articles when choosing settings), as
    every rank opens them."""
    opts = dict(heldout_fraction=data_cfg.heldout_fraction, max_span_words=data_cfg.max_span_words,
                max_span_tokens=data_cfg.max_span_tokens, validation_fraction=data_cfg.validation_fraction)
    return PassageDataset(path, split="train", **opts), PassageDataset(path, split=data_cfg.eval_split, **opts)
