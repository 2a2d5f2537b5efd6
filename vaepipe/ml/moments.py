"""Mergeable per-column mean and variance, for statistics streamed over chunks and files.

``Moments`` holds (n, mean, M2) in float64 for each column of a (N, Z) matrix. Moments of
separate chunks merge exactly (Chan, Golub & LeVeque 1979), without keeping the data and
without the cancellation of the sum-of-squares formula, so a statistic of a whole export can
be computed one chunk at a time and finished after the last one. ``vaepipe embed`` uses it
for the variance of the posterior means behind the active-unit mask (the same unbiased
variance as ``estimators.active_units``), recorded per shard as JSON (``to_dict``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Moments:
    """Count, per-column mean and per-column sum of squared deviations (M2) of some rows."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        """The moments of no rows, of ``dim`` columns: the identity of ``merge``."""
        return cls(0, np.zeros(dim), np.zeros(dim))

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """The moments of the rows of ``x`` (N, Z), computed in float64."""
        x = np.asarray(x, dtype=np.float64)
        if len(x) == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of rows together (Chan et al. pairwise update)."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * (other.n / n),
                       self.m2 + other.m2 + delta**2 * (self.n * other.n / n))

    @classmethod
    def merge_all(cls, parts: Iterable[Moments], dim: int) -> Moments:
        """All ``parts`` merged in order (``empty(dim)`` when there are none)."""
        acc = cls.empty(dim)
        for part in parts:
            acc = acc.merge(part)
        return acc

    def variance(self) -> np.ndarray:
        """Unbiased per-column variance (ddof=1); zeros when there are fewer than two rows."""
        if self.n < 2:
            return np.zeros_like(self.m2)
        return self.m2 / (self.n - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"n", "mean", "m2"}`` (floats round-trip exactly through ``json``)."""
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Moments:
        """The inverse of ``to_dict``."""
        return cls(int(d["n"]), np.asarray(d["mean"], dtype=np.float64), np.asarray(d["m2"], dtype=np.float64))
