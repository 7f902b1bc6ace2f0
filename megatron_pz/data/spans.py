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


def text_words(text: str, idf: IdfTable) -> np.ndarray:
    """``[num_words, 4]`` int64 rows of ``text``: char start, char end, stopword flag, IDF * 1000."""
    keys = word_keys(text)
    words = np.empty((len(keys), 4), dtype=np.int64)
    words[:, :2] = np.fromiter(  # a second regex pass, cheaper than keeping every match object
        itertools.chain.from_iterable(map(_MATCH_SPAN, WORD_RE.finditer(text))), dtype=np.int64,
        count=2 * len(keys),
    ).reshape(-1, 2)
    words[:, 2] = np.fromiter(map(STOPWORDS.__contains__, keys), dtype=bool, count=len(keys))
    words[:, 3] = idf.milli_many(keys)
    return words


def word_tables(
    text: str,
    idf: IdfTable,
    passages: np.ndarray,
    sentence_starts: np.ndarray,
    sentence_rank: np.ndarray,
    token_anchors: np.ndarray,
    token_ends: np.ndarray,
) -> list[np.ndarray]:
    """The ``[num_words, NUM_WORD_FIELDS]`` int32 table of each passage of an article, in one pass.

    ``passages`` holds one row per passage: char span ``p0, p1``, token span ``t0, t1`` and its first
    sentence; ``sentence_starts`` are the article's sentence starts and ``sentence_rank`` counts, up
    to each sentence, those that belong to a passage. Columns are relative to the passage: a word's
    ``token_start`` is the first of the passage's tokens anchored (first non-space character, -1:
    none) at its first character, its ``token_end`` one past the last ending at its last character,
    -1 where no token edge falls there; its ``sentence`` counts the passage's sentences before it.
    Words are searched once per article; a passage whose edge cuts an article word (never seen on
    Wikipedia: passages end at sentence ends) has its own text searched instead.
    """
    p0, p1, t0, t1, first_sentence = passages.T
    words = text_words(text, idf)
    w0, w1 = np.searchsorted(words[:, 0], p0), np.searchsorted(words[:, 0], p1)
    ends_before = np.concatenate([[-1], words[:, 1]])  # end of the word before index i, at i
    crossed = (ends_before[w0] > p0) | (ends_before[w1] > p1)
    pieces = [words[a:b] for a, b in zip(w0.tolist(), w1.tolist())]
    for k in np.flatnonzero(crossed).tolist():
        own = text_words(text[p0[k]:p1[k]], idf)
        own[:, :2] += p0[k]
        pieces[k] = own
    sizes = [len(piece) for piece in pieces]
    passage = np.repeat(np.arange(len(pieces)), sizes)
    words = np.concatenate(pieces)
    starts, ends = words[:, 0], words[:, 1]
    table = np.empty((len(words), NUM_WORD_FIELDS), dtype=np.int32)
    table[:, 0], table[:, 1] = starts - p0[passage], ends - p0[passage]
    t0, t1 = t0[passage], t1[passage]
    # Edges ascend with the token index, so "among tokens t0..t1-1" is a clip of the article-wide range.
    anchored = np.flatnonzero(token_anchors >= 0)
    lo, hi = _equal_range(token_anchors[anchored], starts)
    first = np.maximum(lo, np.searchsorted(anchored, t0))
    hit = first < np.minimum(hi, np.searchsorted(anchored, t1))
    table[:, 2] = np.where(hit, anchored[np.minimum(first, len(anchored) - 1)] - t0, -1)
    lo, hi = _equal_range(token_ends, ends)
    last_end = np.minimum(hi, t1)
    table[:, 3] = np.where(np.maximum(lo, t0) < last_end, last_end - t0, -1)
    sentence = np.searchsorted(sentence_starts, starts, side="right") - 1
    table[:, 4] = sentence_rank[sentence] - sentence_rank[first_sentence[passage]]
    table[:, 5], table[:, 6] = words[:, 2], words[:, 3]
    return np.split(table, np.cumsum(sizes)[:-1])


def _equal_range(edges: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position, the index range of the (ascending) ``edges`` equal to it."""
    return np.searchsorted(edges, positions, side="left"), np.searchsorted(edges, positions, side="right")


def count_candidates(words: np.ndarray, max_span_words: int, segments: np.ndarray | None = None) -> int:
    """How many spans :func:`candidate_arrays` gives for ``words``, without building them.

    ``segments`` numbers the passage of each row when the tables of a whole article are stacked, so
    the count takes one call per article instead of one per passage (spans never cross passages).
    """
    return sum(int(np.count_nonzero(keep)) for _, keep in _maskable(words, max_span_words, segments))


def _maskable(words: np.ndarray, max_span_words: int, segments: np.ndarray | None = None):
    """The candidate rule, once: for each span length, which first words start a maskable span.

    Yields ``(length, keep)``; ``keep[i]`` is for words ``i .. i + length - 1``.
    """
    n = len(words)
    sentence = words[:, 4]
    start_ok, end_ok = words[:, 2] >= 0, words[:, 3] >= 0
    content_cum = np.concatenate([[0], np.cumsum(1 - words[:, 5].astype(np.int64))])
    for length in range(1, min(max_span_words, n) + 1):
        m = n - length + 1
        keep = (
            (sentence[:m] == sentence[length - 1:])
            & start_ok[:m]
            & end_ok[length - 1:]
            & (content_cum[length:] > content_cum[:m])
        )
        if segments is not None:
            keep &= segments[:m] == segments[length - 1:]
        yield length, keep


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
    firsts, lasts, lengths, idfs = [], [], [], []
    if len(words) == 0:
        return firsts, lasts, lengths, idfs
    content = 1 - words[:, 5].astype(np.int64)
    idf = words[:, 6].astype(np.float64) / 1000.0
    content_cum = np.concatenate([[0], np.cumsum(content)])
    idf_cum = np.concatenate([[0.0], np.cumsum(idf * content)])
    for length, keep in _maskable(words, max_span_words):
        first = np.flatnonzero(keep)
        last = first + length - 1
        n_content = content_cum[last + 1] - content_cum[first]
        firsts.append(first)
        lasts.append(last)
        lengths.append(np.full(len(first), length, dtype=np.int64))
        idfs.append((idf_cum[last + 1] - idf_cum[first]) / n_content)
    return firsts, lasts, lengths, idfs
