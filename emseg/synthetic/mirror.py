"""Big ISBI-like slices from small real ones, by mirror tiling."""

from __future__ import annotations

import operator

import numpy as np

from emseg.errors import BadInputError


def tile_isbi_like(slice_yx: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """A (Y, X) slice of ``shape_yx`` made by mirror-tiling ``slice_yx`` (``np.pad`` "symmetric").

    The result starts with ``slice_yx`` in its top-left corner, continues with its mirror image
    (edge pixels repeated, so no seam) and so on; a smaller ``shape_yx`` crops. The dtype is kept.
    For benchmarks that make big inputs from real ISBI slices.
    """
    a = np.asarray(slice_yx)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise BadInputError(f"tile_isbi_like needs a non-empty 2D slice, got shape {a.shape}")
    try:
        ty, tx = (operator.index(v) for v in shape_yx)
    except (TypeError, ValueError):
        raise BadInputError(f"shape_yx must be two integers, got {shape_yx!r}") from None
    if ty < 1 or tx < 1:
        raise BadInputError(f"shape_yx must be positive, got {shape_yx!r}")
    h, w = a.shape
    # Symmetric padding of period 2n: index i maps to i mod 2n, mirrored in the second half.
    iy = np.arange(ty) % (2 * h)
    iy = np.where(iy < h, iy, 2 * h - 1 - iy)
    ix = np.arange(tx) % (2 * w)
    ix = np.where(ix < w, ix, 2 * w - 1 - ix)
    return a[iy[:, None], ix[None, :]]
