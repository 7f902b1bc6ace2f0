"""Sentence boundaries with nltk Punkt, trained on the input itself or loaded from disk.

The stock English Punkt model is a download (``nltk.download('punkt_tab')``), which our machines may
not do, so the unsupervised ``PunktTrainer`` learns abbreviations/collocations from a bounded sample
of the cleaned input; the learned parameters are saved as JSON next to the output so every worker and
every resumed run splits identically.

nltk (3.10) routes every regex through ``nltk.redos``, a wrapper that runs each match under a
wall-clock timeout; Punkt calls it several times per word, and with ``PunktToken``'s generic
constructor that wrapping was about 40% of Punkt's cost. :class:`_LangVars` and :class:`_Token` run
the very same compiled patterns (same ``regex`` engine, so the same matches) without the wrapper. The
safety bound stays where it can matter: lines longer than ``UNTIMED_MAX_CHARS`` go through nltk's
timed patterns. (The per-token patterns have no nested quantifiers, so they are linear anyway.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from nltk.tokenize.punkt import (
    PunktLanguageVars,
    PunktParameters,
    PunktSentenceTokenizer,
    PunktToken,
    PunktTrainer,
)

UNTIMED_MAX_CHARS = 20_000  # longer lines (no Wikipedia paragraph is) keep nltk's regex timeout


def _untimed(pattern):
    """The compiled ``regex`` pattern inside an ``nltk.redos.TimedPattern`` (older nltk: itself)."""
    return getattr(pattern, "_rx", pattern)


class _LangVars(PunktLanguageVars):
    """English Punkt variables whose patterns run without nltk's per-call timeout."""

    re_boundary_realignment = _untimed(PunktLanguageVars.re_boundary_realignment)

    def word_tokenize(self, s):
        if len(s) > UNTIMED_MAX_CHARS:
            return super().word_tokenize(s)
        return _untimed(self._word_tokenizer_re()).findall(s)

    def period_context_re(self):
        return _untimed(super().period_context_re())


class _Token(PunktToken):
    """``PunktToken`` with untimed patterns and a constructor without the generic attribute loops."""

    __slots__ = ()
    _RE_ELLIPSIS = _untimed(PunktToken._RE_ELLIPSIS)
    _RE_NUMERIC = _untimed(PunktToken._RE_NUMERIC)
    _RE_INITIAL = _untimed(PunktToken._RE_INITIAL)
    _RE_ALPHA = _untimed(PunktToken._RE_ALPHA)

    def __init__(self, tok, **params):
        self.tok = tok
        self.type = self._get_type(tok)
        self.period_final = tok.endswith(".")
        self.parastart = self.linestart = self.sentbreak = self.abbr = self.ellipsis = None
        for key, value in params.items():
            setattr(self, key, value)


def train_punkt(texts: Iterable[str], max_chars: int = 1_000_000) -> PunktParameters:
    """Learn Punkt parameters from the first ``max_chars`` characters of ``texts``.

    Training is pure Python (~1 s/MB), so the sample is bounded; abbreviation statistics saturate
    long before a full dump.
    """
    trainer = PunktTrainer(lang_vars=_LangVars(), token_cls=_Token)
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
        self._punkt = PunktSentenceTokenizer(params, lang_vars=_LangVars(), token_cls=_Token)
        self._timed_punkt = PunktSentenceTokenizer(params)  # for lines over UNTIMED_MAX_CHARS
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
                punkt = self._punkt if len(line) <= UNTIMED_MAX_CHARS else self._timed_punkt
                out.extend((start + s, start + e) for s, e in punkt.span_tokenize(line))
            start += len(line) + 1
        return out
