"""Intensity normalisation that carries over to the next stack (pure numpy).

A network sees ``(raw - mean) / std``. Training takes ``mean`` and ``std`` from robust
percentiles (low, high) of its slices: ``mean`` is their midpoint and ``std`` their distance over
4.653 (the 1-99 % span of a normal distribution), so one dark speck or saturated pixel moves
nothing. The checkpoint's ``normalization`` block keeps ``mean`` and ``std`` (what every older
reader uses) and adds ``percentiles``, ``low`` and ``high``. Predict on another stack (another
session, contrast, animal) measures the same percentiles there and maps them onto the values
the training stack's percentiles had (:func:`for_stack`).

Predict measures them per slice by default (:func:`slice_percentiles`: every pixel of the slice,
numpy's linear percentiles), exactly as a bioimage.io package's per-sample ``scale_range``
computes them, so an exported model and ``emseg predict`` normalise alike; ``--normalization
stack`` measures them once on a sample of the stack instead, leaving out the dtype's extremes
(0 and 255 of uint8: alignment padding, saturation).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

#: The 1st-99th percentile span of a normal distribution in standard deviations.
NORMAL_SPAN = 4.6527

#: At most this many slices, and this many pixels a side of each, are read to measure a stack.
SAMPLE_SLICES = 9
SAMPLE_SIDE = 2048


#: Float (or wide integer) values kept per window to estimate percentiles: a strided subsample.
MAX_FLOAT_VALUES = 2**21


def _values(raw: np.ndarray, extremes: bool = False) -> np.ndarray:
    """The finite values of ``raw`` (any shape) as float64, without the integer dtype's extremes
    (unless nothing else is left, or ``extremes``), strided down to at most :data:`MAX_FLOAT_VALUES`."""
    values = np.asarray(raw).ravel()
    if values.size > MAX_FLOAT_VALUES:
        values = values[:: -(-values.size // MAX_FLOAT_VALUES)]
    if np.issubdtype(values.dtype, np.integer) and not extremes:
        info = np.iinfo(values.dtype)
        inner = values[(values != info.min) & (values != info.max)]
        values = inner if inner.size else values
    values = values.astype(np.float64)
    return values[np.isfinite(values)]


def _histogram(windows: Iterable[np.ndarray], dtype: np.dtype, extremes: bool = False) -> tuple[np.ndarray, int]:
    """(counts per value, the value of bin 0) of 8- or 16-bit integer ``windows`` of ``dtype``,
    without the dtype's extremes (unless nothing else is left, or ``extremes``). Memory: one
    window at a time, never a float copy of the whole sample."""
    info = np.iinfo(dtype)
    counts = np.zeros(int(info.max) - int(info.min) + 1, dtype=np.int64)
    for window in windows:
        flat = np.asarray(window).ravel()
        counts += np.bincount(flat.astype(np.int32) - int(info.min), minlength=counts.size)
    if extremes:
        return counts, int(info.min)
    inner = counts.copy()
    inner[0] = inner[-1] = 0
    return (inner if inner.sum() else counts), int(info.min)


def _histogram_percentile(counts: np.ndarray, offset: int, pct: float) -> float:
    """``np.percentile`` (linear interpolation) of the values a histogram counts."""
    cumulative = np.cumsum(counts)
    rank = (int(cumulative[-1]) - 1) * pct / 100.0
    lo, frac = int(np.floor(rank)), rank - np.floor(rank)
    v_lo = int(np.searchsorted(cumulative, lo, side="right"))
    v_hi = int(np.searchsorted(cumulative, min(lo + 1, int(cumulative[-1]) - 1), side="right"))
    return float(offset + v_lo + frac * (v_hi - v_lo))


def percentiles(
    raw: np.ndarray | Iterable[np.ndarray], pct: Sequence[float], extremes: bool = False
) -> tuple[float, float]:
    """(low, high) percentiles of the intensities of ``raw`` (an array of any shape, or windows of
    one dtype, e.g. a generator of a slice's rows read in bands): exact from a histogram for 8-
    and 16-bit integers, else from a strided subsample of each window (exact up to
    :data:`MAX_FLOAT_VALUES` values a window). The integer dtype's extremes are left out unless
    ``extremes``."""
    windows: Iterator[np.ndarray] = iter([raw]) if isinstance(raw, np.ndarray) else iter(raw)
    first = next(windows, None)
    if first is None:
        return 0.0, 1.0
    first = np.asarray(first)
    every = itertools.chain([first], windows)
    if np.issubdtype(first.dtype, np.integer) and first.dtype.itemsize <= 2:
        counts, offset = _histogram(every, first.dtype, extremes)
        if counts.sum() == 0:
            return 0.0, 1.0
        low, high = (_histogram_percentile(counts, offset, float(p)) for p in pct[:2])
        return low, high
    values = np.concatenate([_values(w, extremes) for w in every])
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [float(pct[0]), float(pct[1])])
    return float(low), float(high)


def robust_normalization(raw: np.ndarray, pct: Sequence[float] = (1.0, 99.0)) -> dict[str, Any]:
    """The checkpoint's ``normalization`` block for training slices ``raw`` (N, H, W)."""
    low, high = percentiles(raw, pct)
    span = max(high - low, 1e-6)
    return {
        "mean": (low + high) / 2,
        "std": span / NORMAL_SPAN,
        "method": "percentile",
        "percentiles": [float(pct[0]), float(pct[1])],
        "low": low,
        "high": high,
    }


def for_stack(norm: Mapping[str, Any], low: float, high: float) -> tuple[float, float]:
    """(mean, std) for a stack whose percentiles ``norm["percentiles"]`` are (low, high): the
    affine map that sends them where the training stack's ``norm["low"]``, ``norm["high"]`` went
    under the checkpoint's ``mean``, ``std``."""
    mean, std = float(norm["mean"]), float(norm["std"])
    scale = max(high - low, 1e-6) / max(float(norm["high"]) - float(norm["low"]), 1e-6)
    new_std = std * scale
    return low - (float(norm["low"]) - mean) * scale, new_std


def sample_stack(read: Callable[[int, slice, slice], np.ndarray], shape: Sequence[int]) -> list[np.ndarray]:
    """Up to :data:`SAMPLE_SLICES` evenly spaced slices of a (Z, Y, X) stack, each its central
    window of at most :data:`SAMPLE_SIDE` pixels a side; ``read(z, rows, cols)`` returns one
    window. Returns the windows, flattened, in the stack's dtype."""
    z_count, h, w = (int(s) for s in shape)
    zs = sorted(set(np.linspace(0, z_count - 1, min(SAMPLE_SLICES, z_count)).round().astype(int).tolist()))
    sy, sx = min(h, SAMPLE_SIDE), min(w, SAMPLE_SIDE)
    rows, cols = slice((h - sy) // 2, (h - sy) // 2 + sy), slice((w - sx) // 2, (w - sx) // 2 + sx)
    return [np.asarray(read(z, rows, cols)).ravel() for z in zs]


def stack_normalization(
    norm: Mapping[str, Any], read: Callable[[int, slice, slice], np.ndarray], shape: Sequence[int]
) -> tuple[float, float]:
    """(mean, std) for the stack ``read`` gives: its own percentiles mapped (:func:`for_stack`)
    when the checkpoint records them, else the checkpoint's mean and std (older checkpoints)."""
    if not {"percentiles", "low", "high"} <= set(norm):
        return float(norm["mean"]), float(norm["std"])
    low, high = percentiles(sample_stack(read, shape), norm["percentiles"])
    return for_stack(norm, low, high)


def slice_normalization(norm: Mapping[str, Any], windows: Iterable[np.ndarray]) -> tuple[float, float]:
    """(mean, std) for one slice given as ``windows`` (e.g. its rows in bands): its own
    percentiles over every pixel (the dtype's extremes included, as bioimage.io's per-sample
    ``scale_range`` measures them) mapped where the training stack's went; the checkpoint's mean
    and std when it records no percentiles."""
    if not {"percentiles", "low", "high"} <= set(norm):
        return float(norm["mean"]), float(norm["std"])
    low, high = percentiles(windows, norm["percentiles"], extremes=True)
    return for_stack(norm, low, high)


__all__ = [
    "NORMAL_SPAN",
    "for_stack",
    "percentiles",
    "robust_normalization",
    "sample_stack",
    "slice_normalization",
    "stack_normalization",
]
