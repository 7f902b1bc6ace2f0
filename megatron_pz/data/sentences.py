"""Sentence boundaries with nltk Punkt, trained on the input itself or loaded from disk.

The stock English Punkt model is a download (``nltk.download('punkt_tab')``), which our machines may
not do, so the unsupervised ``PunktTrainer`` learns abbreviations/collocations from a bounded sample
of the cleaned input; the learned parameters are saved as JSON next to the output so every worker and
every resumed run splits identically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer


def train_punkt(texts: Iterable[str], max_chars: int = 1_000_000) -> PunktParameters:
    """Learn Punkt parameters from the first ``max_chars`` characters of ``texts``.

    Training is pure Python (~2.5 s/MB), so the sample is bounded; abbreviation statistics saturate
    long before a full dump.
    """
    trainer = PunktTrainer()
    seen = 0
    for text in texts:
        if seen >= max_chars:
            break
        chunk = text[: max_chars - seen]
        trainer.train(chunk, finalize=False)
        seen += len(chunk)
    trainer.finalize_training()
    return trainer.get_params()


def save_punkt(params: PunktParameters, path: str | os.PathLike) -> None:
    payload = {
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted([list(pair) for pair in params.collocations]),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": sorted([key, value] for key, value in params.ortho_context.items()),
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload, indent=0, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def load_punkt(path: str | os.PathLike) -> PunktParameters:
    """Parameters written by :func:`save_punkt`."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        params = PunktParameters()
        params.abbrev_types = set(payload["abbrev_types"])
        params.collocations = {tuple(pair) for pair in payload["collocations"]}
        params.sent_starters = set(payload["sent_starters"])
        for key, value in payload["ortho_context"]:
            params.ortho_context[key] = value
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a Punkt parameter file written by save_punkt: {err}") from err
    return params


class SentenceSplitter:
    """Sentence spans of cleaned text; a line break always ends a sentence (paragraphs, list items)."""

    def __init__(self, params: PunktParameters):
        self._punkt = PunktSentenceTokenizer(params)
        self._end_chars = frozenset(self._punkt._lang_vars.sent_end_chars)

    def spans(self, text: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        start = 0
        for line in text.split("\n"):
            if line and not self._end_chars.intersection(line):
                # Punkt only breaks after a sentence-ending character; without one the line is one
                # sentence (skipping Punkt here is exact and saves its per-token Python cost)
                stripped = line.strip()
                if stripped:
                    left = len(line) - len(line.lstrip())
                    out.append((start + left, start + left + len(stripped)))
            elif line:
                out.extend((start + s, start + e) for s, e in self._punkt.span_tokenize(line))
            start += len(line) + 1
        return out
