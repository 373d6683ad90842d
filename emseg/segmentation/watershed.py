"""Fragments of one image: a seeded watershed of the boundary map ``1 - P(cell)``.

Seeds come from the distance transform of the confident cell pixels (``P(cell) >
seed_threshold``): by default their cores away from the membrane (one seed per cell body, a thin
bridge between two cells cut), or its maxima (more seeds per cell, which agglomeration merges
back). In 2D the distance is scipy's taxicab chamfer transform (ten times
faster than the exact one, and its maxima serve as seeds as well); in 3D the exact Euclidean one
with the voxel size as sampling, so anisotropic stacks get round seeds. Flooding is
:func:`~emseg.segmentation.flood.flood` (a bucket-queue watershed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from emseg.segmentation.flood import flood


def boundary_map(prob: np.ndarray) -> np.ndarray:
    """(..., Y, X) uint8 P(cell) 0-255 -> uint8 boundary height 0-255 (255 = membrane)."""
    return np.subtract(255, prob, dtype=np.uint8)


def cell_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(..., Y, X) uint8 P(cell) 0-255 -> bool, True where P(cell) > ``threshold`` (0-1)."""
    return prob > np.uint8(min(255, int(threshold * 255)))


def seeds(
    prob: np.ndarray,
    seed_threshold: float,
    min_distance: int,
    sampling: Sequence[float] | None = None,
    method: str = "cores",
) -> np.ndarray:
    """Seed labels of one image: (Y, X) or (Z, Y, X) uint8 P(cell) (0-255) -> int32 labels 1..N, 0 elsewhere.

    From the distance transform of the confident cells ``prob > seed_threshold``:

    * ``"cores"``: the connected cores farther than ``min_distance`` pixels from the membrane
      (a bridge narrower than twice that between two cells is cut), and every confident
      component without such a core whole (small cells keep their seed); ``min_distance`` 0 seeds
      each confident component;
    * ``"maxima"``: plateaus of distance maxima within ``2 * min_distance + 1`` pixels (more
      seeds per cell; agglomeration merges them back).

    In 3D the windows and distances are scaled by the voxel size ``sampling`` (finest axis =
    ``min_distance``)."""
    cells = cell_mask(prob, seed_threshold)
    if not cells.any():
        return np.zeros(prob.shape, dtype=np.int32)
    dist: np.ndarray
    if sampling is None:
        dist = np.minimum(ndi.distance_transform_cdt(cells, metric="taxicab"), 255).astype(np.uint8)
        finest = 1.0
    else:
        dist = ndi.distance_transform_edt(cells, sampling=sampling).astype(np.float32)
        finest = min(sampling)
    if method == "cores":
        components, n = ndi.label(cells)
        core = dist > min_distance * finest
        out, k = ndi.label(core)
        has_core = np.zeros(n + 1, bool)
        has_core[components[core]] = True
        lost = cells & ~has_core[components]
        out[lost] = components[lost] + k
        return out.astype(np.int32, copy=False)
    size: int | tuple[int, ...] = (
        2 * min_distance + 1
        if sampling is None
        else tuple(max(1, 2 * round(min_distance * finest / s) + 1) for s in sampling)
    )
    peaks = (dist == ndi.maximum_filter(dist, size=size)) & cells
    labels, _ = ndi.label(peaks, structure=np.ones((3,) * prob.ndim, dtype=bool))
    return labels.astype(np.int32, copy=False)


def fragments(
    prob: np.ndarray,
    seed_threshold: float,
    min_distance: int,
    sampling: Sequence[float] | None = None,
    method: str = "cores",
) -> tuple[np.ndarray, np.ndarray]:
    """(fragments, boundary map) of one image: (Y, X) or (Z, Y, X) uint8 P(cell) (0-255) -> int32
    labels 1..N covering every pixel (no watershed line) and the uint8 boundary map they were
    flooded on. An image without any confident cell pixel is one fragment."""
    heights = boundary_map(prob)
    markers = seeds(prob, seed_threshold, min_distance, sampling, method)
    if not markers.any():
        return np.ones(prob.shape, dtype=np.int32), heights
    return flood(heights, markers), heights


__all__ = ["boundary_map", "cell_mask", "fragments", "seeds"]
