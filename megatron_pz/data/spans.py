"""Words of a passage and the maskable span candidates built from them.

A passage's words are stored once as a compact integer table (see ``WORD_FIELDS``); candidates, all
spans of 1..K consecutive words inside one sentence that are not made only of stopwords, are
enumerated from it with numpy. Storing words instead of the ~K-times-larger candidate list keeps the
output a small multiple of the token data even on a full dump.

Words are ``\\w+`` runs joined by inner hyphens/apostrophes/dots ("Pierre-Joseph", "don't", "U.S"),
so punctuation is never a word and a pure-punctuation span cannot arise. The stopword list is a module
constant because nltk's list is a separate download (``nltk.download('stopwords')``), which our
machines may not do; it is the usual short English function-word list.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from typing import Iterable

import numpy as np

WORD_RE = re.compile(r"\w+(?:['’\-.]\w+)*")
_MATCH_SPAN = re.Match.span

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves also may might must shall its it's i'm
    he's she's they're we're you're isn't aren't wasn't weren't don't doesn't didn't won't can't
    s t d ll m re ve y""".split()
)

# One row per word, relative to the passage: char span, token span (-1 where the word edge is not a
# token boundary), sentence number within the passage, stopword flag, IDF * 1000 (rounded).
WORD_FIELDS = ("char_start", "char_end", "token_start", "token_end", "sentence", "stop", "idf_milli")
NUM_WORD_FIELDS = len(WORD_FIELDS)


def word_keys(text: str) -> list[str]:
    """The lower-cased words of ``text``, in order.

    One ``lower()`` of the words joined by NUL gives each word's own ``lower()`` (NUL is neither cased
    nor case-ignorable, so even the Greek final-sigma rule stops at it) without a Python step per word.
    """
    words = WORD_RE.findall(text)
    return "\0".join(words).lower().split("\0") if words else []


def document_frequencies(texts: Iterable[str]) -> tuple[int, Counter]:
    """(number of documents, document frequency of each lower-cased word)."""
    df: Counter = Counter()
    n = 0
    for text in texts:
        n += 1
        df.update(set(word_keys(text)))
    return n, df


class IdfTable:
    """Smoothed IDF, ``log((1 + N) / (1 + df)) + 1`` (unseen words get the maximum)."""

    def __init__(self, num_docs: int, df: dict[str, int]):
        self.num_docs = num_docs
        self.df = df
        self.unseen_milli = self._milli(0)
        # every known word's value up front (one log per distinct df), so a lookup is one dict.get
        by_df = {n: self._milli(n) for n in set(df.values())}
        self._milli_of = {key: by_df[n] for key, n in df.items()}

    def _milli(self, df: int) -> int:
        return int(round(1000 * (math.log((1 + self.num_docs) / (1 + df)) + 1.0)))

    def milli(self, key: str) -> int:
        return self._milli_of.get(key, self.unseen_milli)

    def milli_many(self, keys: list[str]) -> list[int]:
        return list(map(self._milli_of.get, keys, itertools.repeat(self.unseen_milli, len(keys))))

    def to_json(self) -> dict:
        return {"num_docs": self.num_docs, "df": dict(sorted(self.df.items()))}

    @classmethod
    def from_json(cls, payload: dict) -> "IdfTable":
        return cls(int(payload["num_docs"]), {str(k): int(v) for k, v in payload["df"].items()})


def word_table(
    text: str,
    sentences: list[tuple[int, int]],
    token_anchors: np.ndarray,
    token_ends: np.ndarray,
    idf: IdfTable,
) -> np.ndarray:
    """The ``[num_words, NUM_WORD_FIELDS]`` int32 table of ``text`` (a passage).

    ``token_anchors`` is the first non-space character of each token (-1: whitespace-only token),
    ``token_ends`` each token's end, both relative to ``text``. A word's ``token_start`` is the token
    anchored at its first character and its ``token_end`` one past the token ending at its last
    character; -1 where no token edge falls there.
    """
    spans = np.fromiter(
        itertools.chain.from_iterable(map(_MATCH_SPAN, WORD_RE.finditer(text))), dtype=np.int64
    ).reshape(-1, 2)
    n = len(spans)
    table = np.empty((n, NUM_WORD_FIELDS), dtype=np.int32)
    if n == 0:
        return table
    keys = word_keys(text)
    starts, ends = spans[:, 0], spans[:, 1]
    table[:, 0], table[:, 1] = starts, ends
    table[:, 2] = _edge_index(token_anchors, starts, 0)
    table[:, 3] = _edge_index(token_ends, ends, 1)
    sentence_starts = np.array([s for s, _ in sentences], dtype=np.int64)
    table[:, 4] = np.searchsorted(sentence_starts, starts, side="right") - 1
    table[:, 5] = list(map(STOPWORDS.__contains__, keys))
    table[:, 6] = idf.milli_many(keys)
    return table


def _edge_index(edges: np.ndarray, positions: np.ndarray, shift: int) -> np.ndarray:
    """Index (+ ``shift``) of the token whose edge equals each position, or -1 (edges ascend, -1s aside)."""
    valid = np.flatnonzero(edges >= 0)
    ordered = edges[valid]
    where = np.searchsorted(ordered, positions, side="right" if shift else "left")
    if shift:  # last token ending at the position
        where = where - 1
        hit = (where >= 0) & (ordered[np.clip(where, 0, len(ordered) - 1)] == positions)
    else:  # first token anchored at the position
        hit = (where < len(ordered)) & (ordered[np.clip(where, 0, len(ordered) - 1)] == positions)
    if len(ordered) == 0:
        return np.full(len(positions), -1, dtype=np.int64)
    return np.where(hit, valid[np.clip(where, 0, len(ordered) - 1)] + shift, -1)


def count_candidates(words: np.ndarray, max_span_words: int, segments: np.ndarray | None = None) -> int:
    """How many spans :func:`candidate_arrays` gives for ``words``, without building them.

    ``segments`` numbers the passage of each row when the tables of a whole article are stacked, so
    the count takes one call per article instead of one per passage (spans never cross passages).
    """
    n = len(words)
    sentence = words[:, 4]
    start_ok, end_ok = words[:, 2] >= 0, words[:, 3] >= 0
    content_cum = np.concatenate([[0], np.cumsum(1 - words[:, 5].astype(np.int64))])
    total = 0
    for length in range(1, min(max_span_words, n) + 1):
        m = n - length + 1  # spans of this length: words [i, i + length - 1] for i < m
        keep = (
            (sentence[:m] == sentence[length - 1:])
            & start_ok[:m]
            & end_ok[length - 1:]
            & (content_cum[length:] > content_cum[:m])
        )
        if segments is not None:
            keep &= segments[:m] == segments[length - 1:]
        total += int(np.count_nonzero(keep))
    return total


def candidate_arrays(words: np.ndarray, max_span_words: int) -> dict[str, np.ndarray]:
    """All maskable spans of 1..``max_span_words`` words, as parallel arrays sorted by (start, length).

    A span is kept when it stays inside one sentence, its first word starts and its last word ends
    on a token boundary, and at least one of its words is not a stopword. Its ``idf`` is the mean
    IDF of its non-stopword words.
    """
    firsts, lasts, lengths, idfs = _candidate_parts(words, max_span_words)
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return {"first": empty, "last": empty, "num_words": empty, "idf": np.zeros(0)}
    first = np.concatenate(firsts)
    order = np.lexsort((np.concatenate(lengths), first))
    return {
        "first": first[order],
        "last": np.concatenate(lasts)[order],
        "num_words": np.concatenate(lengths)[order],
        "idf": np.concatenate(idfs)[order],
    }


def _candidate_parts(words: np.ndarray, max_span_words: int):
    n = len(words)
    firsts, lasts, lengths, idfs = [], [], [], []
    if n == 0:
        return firsts, lasts, lengths, idfs
    sentence = words[:, 4]
    content = 1 - words[:, 5].astype(np.int64)
    idf = words[:, 6].astype(np.float64) / 1000.0
    content_cum = np.concatenate([[0], np.cumsum(content)])
    idf_cum = np.concatenate([[0.0], np.cumsum(idf * content)])
    for length in range(1, min(max_span_words, n) + 1):
        first = np.arange(n - length + 1)
        last = first + length - 1
        n_content = content_cum[last + 1] - content_cum[first]
        keep = (
            (sentence[first] == sentence[last])
            & (words[first, 2] >= 0)
            & (words[last, 3] >= 0)
            & (n_content > 0)
        )
        first, last, n_content = first[keep], last[keep], n_content[keep]
        firsts.append(first)
        lasts.append(last)
        lengths.append(np.full(len(first), length, dtype=np.int64))
        idfs.append((idf_cum[last + 1] - idf_cum[first]) / n_content)
    return firsts, lasts, lengths, idfs
