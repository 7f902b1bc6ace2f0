"""Read what ``preprocess`` wrote: passages (tokens + text + title) and their span candidates.

Token ids and word tables are Megatron ``IndexedDataset``s aligned by document index with the
``text/*.jsonl`` shards; everything is checked against the manifest on load, and a shard whose size
or line count disagrees raises naming the file (a half-written or truncated shard never loads).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .preprocess import FORMAT_VERSION
from .spans import NUM_WORD_FIELDS, candidate_arrays

SPLITS = ("all", "train", "heldout", "validation")


class DatasetFormatError(ValueError):
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
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if split not in SPLITS:
            raise ValueError(f"split={split!r}, expected one of {SPLITS}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={heldout_fraction}, expected 0 <= f < 1")
        if not 0.0 <= validation_fraction < 1.0 - heldout_fraction:
            raise ValueError(f"validation_fraction={validation_fraction}, expected 0 <= f < 1 - heldout_fraction")
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DatasetFormatError(
                f"{manifest_path}: missing; not a finished preprocess output (rerun preprocess to resume)"
            )
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetFormatError(
                f"{manifest_path}: format_version {self.manifest.get('format_version')}, expected {FORMAT_VERSION}"
            )
        files = self.manifest["files"]
        built_k = self.manifest["options"]["max_span_words"]
        self.max_span_words = built_k if max_span_words is None else min(max_span_words, built_k)
        self.max_span_tokens = max_span_tokens  # None: any length
        total = self.manifest["counts"]["passages"]
        for key in ("passages", "words"):
            for suffix in (".bin", ".idx"):
                if not (self.path / (files[key] + suffix)).is_file():
                    raise DatasetFormatError(f"{self.path / (files[key] + suffix)}: missing")
        self.tokens = IndexedDataset(str(self.path / files["passages"]))
        self.words = IndexedDataset(str(self.path / files["words"]))
        for key, ds in (("passages", self.tokens), ("words", self.words)):
            if len(ds) != total:
                raise DatasetFormatError(
                    f"{self.path / (files[key] + '.idx')}: {len(ds)} documents, manifest says {total}"
                )
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


def train_and_heldout(path: str | Path, data_cfg) -> tuple["PassageDataset", "PassageDataset"]:
    """The training passages of a run (``data_cfg``: its DataConfig) and the ones it evaluates on
    (``data.eval_split``: the held-out articles, or the validation articles when choosing settings), as
    every rank opens them."""
    opts = dict(heldout_fraction=data_cfg.heldout_fraction, max_span_words=data_cfg.max_span_words,
                max_span_tokens=data_cfg.max_span_tokens, validation_fraction=data_cfg.validation_fraction)
    return PassageDataset(path, split="train", **opts), PassageDataset(path, split=data_cfg.eval_split, **opts)
