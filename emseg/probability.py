"""What emseg scores: P(cell) as it stores it (the one rule for what a map may hold) and the truth.

A map is uint8 (0-255, P = value / 255) or floating point (0-1). Every command that reads one
(``evaluate``, ``segment``, ``show``) checks it with :func:`check_probability`, so a map of NaNs or
of 0-255 values stored as floats is refused the same way everywhere instead of being clipped.
Ground truth is labels/cells (0 membrane, > 0 cell); ``emseg evaluate`` and training's validation
refuse truth without both with :func:`check_both_classes`, training before it writes anything.

Objects of a blob-like class (:func:`blob_objects`: mitochondria, synapses) are what ``emseg
evaluate`` scores and ``emseg segment --objects`` would draw: a mitochondrion is a compact blob,
not a cell between membranes. Its pixels are those where the class is the most probable (or its
probability exceeds ``threshold``), one seed per blob core (maxima of the distance to the blob's
edge at least ``min_distance`` apart, so two blobs that touch through a neck are split there),
flooded inside the mask; objects under ``min_size`` pixels are dropped. Slice by slice: EM
sections are far thicker than their pixels, as the field's 2D benchmarks count them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from emseg.errors import BadInputError

#: The ISBI 2012 challenge's thresholds on P(cell): 0.0, 0.1, ..., 1.0.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
#: 4-connectivity in 2-D: how the ground truth's cells and a thresholded map's cells connect.
FOUR = ndi.generate_binary_structure(2, 1)


def _fiji_loop_thresholds() -> tuple[float, ...]:
    """The threshold values Fiji's ``for (th = 0.0; th <= 1.0; th += 0.1)`` loop visits."""
    values, th = [], 0.0
    while th <= 1.0:
        values.append(th)
        th += 0.1
    return tuple(values)


# Threshold as reported -> value Fiji compares against (differs only for 0.3, 0.8, 0.9 and 1.0).
_FIJI_COMPARISON = dict(zip(DEFAULT_THRESHOLDS, _fiji_loop_thresholds(), strict=True))


def fiji_cells(prob32: np.ndarray, t: float) -> np.ndarray:
    """Cells at threshold ``t`` as Fiji sees them: float32 P(cell) > double threshold (for the
    :data:`DEFAULT_THRESHOLDS`, the value Fiji's loop reaches)."""
    return prob32 > np.float64(_FIJI_COMPARISON.get(t, t))


def thinned_segmentation(cells: np.ndarray) -> np.ndarray:
    """Label the 4-connected cells and grow them over the membrane, leaving one-pixel lines.

    ``cells``: (Y, X) bool, True = cell. Returns (Y, X) int32 labels 1..N, with 0 on the watershed
    lines between different cells; no two different labels touch (4-connectivity). Cell pixels
    keep the label of their 4-connected component; membrane pixels take the label of the cell
    they are flooded from, breadth-first. Without any cell the whole slice is one segment (all 1),
    as in Fiji's flooding. This is how the ISBI 2012 metrics (:mod:`emseg.evaluation.metrics`)
    turn a map into cells, and the cells ``emseg segment`` falls back to when no watershed
    setting beats them.
    """
    from skimage.segmentation import watershed

    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise BadInputError(f"cells must be a (Y, X) mask, got shape {cells.shape}")
    cells = cells.astype(bool, copy=False)
    labels, count = ndi.label(cells, structure=FOUR)
    labels = labels.astype(np.int32, copy=False)
    if count == 0:
        return np.ones(cells.shape, dtype=np.int32)
    if cells.all():
        return labels
    # Only the cell pixels that touch the membrane can flood it: seed from those alone (faster;
    # ties may break otherwise than with every cell pixel as a seed), then paint the cells back.
    edge = cells & ~ndi.binary_erosion(cells, structure=FOUR, border_value=1)
    out = watershed(
        np.zeros(cells.shape, dtype=np.uint8),
        markers=np.where(edge, labels, 0),
        mask=~cells | edge,
        connectivity=1,
        watershed_line=True,
    ).astype(np.int32, copy=False)
    np.copyto(out, labels, where=cells)
    return out


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


# --- objects of a blob-like class (mitochondria, synapses) ---------------------------------------

#: Defaults of ``emseg segment --objects``: P(class) above this is the class; seeds at least this
#: far apart (pixels); objects smaller than this (pixels) dropped.
OBJECT_THRESHOLD = 0.5
OBJECT_MIN_DISTANCE = 6
OBJECT_MIN_SIZE = 30


def blob_objects(
    prob: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    threshold: float = OBJECT_THRESHOLD,
    min_distance: int = OBJECT_MIN_DISTANCE,
    min_size: int = OBJECT_MIN_SIZE,
) -> np.ndarray:
    """Instances of one class in one slice: (Y, X) float P(class) in [0, 1] (and optionally the
    (Y, X) bool pixels where it is the most probable class) -> (Y, X) uint32 labels 1..N, 0 elsewhere.
    Touching objects are split by a watershed of the distance transform seeded at its maxima
    ``min_distance`` apart; ``min_distance`` 0: not split (each connected region is one object)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import relabel_sequential, watershed

    prob = np.asarray(prob, dtype=np.float32)
    inside = prob > threshold if mask is None else np.asarray(mask, bool)
    if not inside.any():
        return np.zeros(prob.shape, np.uint32)
    components, _ = ndi.label(inside)
    if min_distance <= 0:
        labels = components
        if min_size > 1:
            sizes = np.bincount(labels.ravel())
            labels[sizes[labels] < min_size] = 0
        return relabel_sequential(labels)[0].astype(np.uint32)
    distance = ndi.distance_transform_edt(inside)
    peaks = peak_local_max(distance, min_distance=int(min_distance), labels=components, exclude_border=False)
    markers = np.zeros(prob.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # a component without a peak (thinner than min_distance everywhere) keeps one seed: its core,
    # found for all of them in one pass
    unseeded = np.setdiff1d(np.arange(1, components.max() + 1), components[markers > 0])
    for i, (y, x) in enumerate(ndi.maximum_position(distance, components, unseeded), start=len(peaks) + 1):
        markers[int(y), int(x)] = i
    labels = watershed(-distance, markers, mask=inside)
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_size] = 0
    return relabel_sequential(labels)[0].astype(np.uint32)


def object_settings(learned: Any, name: str) -> tuple[int, int, str]:
    """(min_distance, min_size, where they came from) of the objects of class ``name``: those the
    run learned on its validation slices (``learned``: the ``objects`` block of a prediction's
    provenance, {name: {"min_distance", "min_size"}}), else :data:`OBJECT_MIN_DISTANCE` and
    :data:`OBJECT_MIN_SIZE`."""
    entry = learned.get(name) if isinstance(learned, dict) else None
    if isinstance(entry, dict):
        try:
            return int(entry["min_distance"]), int(entry["min_size"]), "learned by the run on its validation slices"
        except (KeyError, TypeError, ValueError):
            pass
    return OBJECT_MIN_DISTANCE, OBJECT_MIN_SIZE, "emseg's defaults"


__all__ = [
    "DEFAULT_THRESHOLDS",
    "OBJECT_MIN_DISTANCE",
    "OBJECT_MIN_SIZE",
    "OBJECT_THRESHOLD",
    "blob_objects",
    "check_both_classes",
    "check_probability",
    "fiji_cells",
    "object_settings",
    "probability_float",
    "probability_uint8",
    "thinned_segmentation",
]
