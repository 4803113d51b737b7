"""The one statistics function behind every reported figure (numpy semantics: the median of an even
number of values is the mean of the two middle ones; percentiles interpolate linearly)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _array(values: Iterable[float]) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64)  # float() refuses anything but a number


def median(values: Iterable[float]) -> float | None:
    """The median (None for no values)."""
    a = _array(values)
    return float(np.median(a)) if len(a) else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile, 0 <= q <= 100, linear interpolation (None for no values)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    a = _array(values)
    return float(np.percentile(a, q)) if len(a) else None


def summary(values: Iterable[float]) -> dict:
    """``n``, ``mean``, ``median`` and ``p95`` of the values (None for the statistics of no values)."""
    a = _array(values)
    if not len(a):
        return {"n": 0, "mean": None, "median": None, "p95": None}
    return {"n": len(a), "mean": float(a.mean()), "median": median(a), "p95": percentile(a, 95)}
