"""95 % intervals for held-out figures: the percentile bootstrap over items, paired for before/after.

Every held-out figure here is a mean over items (a rate, a reward, an information gain) or a ratio of
sums over items (negative log-likelihood per token: summed NLL over summed tokens). Items are resampled
with replacement, ``resamples`` times, with a seeded generator, and the interval is the 2.5th and 97.5th
percentiles of the resampled statistic. A before/after difference resamples the *same* item indices for
both (the paired bootstrap): each item's own difficulty cancels, so a change of a few points is visible
on a few hundred items where two independent intervals would overlap.

numpy only; written here because the statistic is two lines and scipy's ``bootstrap`` resamples one
function of several arrays less directly than this (it is used as a cross-check in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


@dataclass
class Interval:
    """A statistic, its bootstrap interval ``[low, high]`` and the number of items it came from."""

    value: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def format(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _statistic(values: np.ndarray, weights: Optional[np.ndarray], idx) -> np.ndarray:
    """Mean of ``values`` (or sum(values) / sum(weights), the ratio of sums) over each row of ``idx``."""
    if weights is None:
        return values[idx].mean(axis=-1)
    return values[idx].sum(axis=-1) / np.maximum(weights[idx].sum(axis=-1), 1e-300)


def _check(values: Sequence[float], weights: Optional[Sequence[float]], name: str):
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"{name}: need a non-empty list of per-item values, got shape {v.shape}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != v.shape:
        raise ValueError(f"{name}: {len(w)} weights for {len(v)} values")
    return v, w


def bootstrap(values: Sequence[float], weights: Optional[Sequence[float]] = None, resamples: int = RESAMPLES,
              seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of per-item ``values`` (``weights`` given: sum(values) / sum(weights)) with its interval."""
    v, w = _check(values, weights, "bootstrap")
    stats = _statistic(v, w, _indices(len(v), resamples, seed))
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(_statistic(v, w, np.arange(len(v)))), float(lo), float(hi), len(v))


def paired_difference(before: Sequence[float], after: Sequence[float],
                      weights_before: Optional[Sequence[float]] = None,
                      weights_after: Optional[Sequence[float]] = None,
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """after - before on the same items (item i of ``before`` is item i of ``after``), with the paired interval."""
    b, wb = _check(before, weights_before, "paired_difference (before)")
    a, wa = _check(after, weights_after, "paired_difference (after)")
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(b)} items before and {len(a)} after; the items must be the same")
    if (wb is None) != (wa is None):
        raise ValueError("paired_difference: give weights for both sides or for neither")
    idx = _indices(len(a), resamples, seed)
    stats = _statistic(a, wa, idx) - _statistic(b, wb, idx)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    every = np.arange(len(a))
    return Interval(float(_statistic(a, wa, every) - _statistic(b, wb, every)), float(lo), float(hi), len(a))
