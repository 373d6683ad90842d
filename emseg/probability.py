"""What emseg scores: P(cell) as it stores it (the one rule for what a map may hold) and the truth.

A map is uint8 (0-255, P = value / 255) or floating point (0-1). Every command that reads one
(``evaluate``, ``segment``, ``show``) checks it with :func:`check_probability`, so a map of NaNs or
of 0-255 values stored as floats is refused the same way everywhere instead of being clipped.
Ground truth is labels/cells (0 membrane, > 0 cell); ``emseg evaluate`` and training's validation
refuse truth without both with :func:`check_both_classes`, training before it writes anything.
"""

from __future__ import annotations

import numpy as np

from emseg.errors import BadInputError


def check_probability(values: np.ndarray, where: str) -> None:
    """Refuse P(cell) ``values`` that are not uint8 or finite floats within [0, 1]; ``where``
    names them in the one-line error."""
    if values.dtype == np.uint8:
        return
    if not np.issubdtype(values.dtype, np.floating):
        raise BadInputError(f"{where}: P(cell) must be uint8 (0-255) or float (0-1), not {values.dtype}")
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        raise BadInputError(f"{where}: P(cell) holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise BadInputError(
            f"{where}: float P(cell) must lie within [0, 1], found {low:g} to {high:g} "
            "(a 0-255 map must be stored as uint8)"
        )


def probability_float(values: np.ndarray, where: str) -> np.ndarray:
    """Checked P(cell) as float32 in [0, 1], same shape."""
    check_probability(values, where)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    return values.astype(np.float32, copy=False)


def probability_uint8(values: np.ndarray, where: str) -> np.ndarray:
    """Checked P(cell) as uint8 0-255 (256 levels), same shape."""
    check_probability(values, where)
    if values.dtype == np.uint8:
        return values
    return np.round(values.astype(np.float32, copy=False) * 255).astype(np.uint8)


def check_both_classes(labels: np.ndarray, what: str) -> None:
    """Refuse ground truth without both classes (cells > 0 and membrane 0): every score against it
    (V_rand 1.0 for all-background truth) would be meaningless."""
    cells = int(np.count_nonzero(labels))
    if cells == 0 or cells == labels.size:
        kind = "membrane (0)" if cells == 0 else "cell (> 0)"
        raise BadInputError(
            f"{what}: the ground truth holds only {kind} pixels; scores need both cells and membranes "
            "(check the labels, or choose other slices)"
        )


__all__ = ["check_both_classes", "check_probability", "probability_float", "probability_uint8"]
