"""Tile grids, halos, padding and blending windows. Pure numpy, no torch.

Coordinates are global pixel coordinates of a slice ``[0, H) x [0, W)``. A *block* is the part of
the output one task computes; its tiles cover the block extended by ``context`` pixels: real
neighbouring pixels where it borders another block, the slice's mirror image beyond its true
edges, so pixels at block borders and slice edges have as much context as pixels inside it.

Tile origins are multiples of ``align`` (the model's size divisor) in global coordinates, so every
tile sees the same pooling phase as one whole-slice pass; with ``blend="crop"`` and
``overlap >= 2 * halo`` the tiled result therefore equals one pass over the whole slice mirrored
by the context (:func:`mirrored_context`) exactly (up to floating-point summation order),
whatever the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emseg.config import BLENDS, PredictConfig
from emseg.errors import BadInputError
from emseg.reflection import reflect_index

#: Smallest blending weight relative to the largest (keeps the normalisation finite everywhere).
MIN_WEIGHT = 1e-3


def check_tiling(tile: int, overlap: int, divisor: int, blend: str = PredictConfig.blend) -> None:
    """Raise :class:`BadInputError` for a tile the model cannot take or overlap >= tile."""
    if blend not in BLENDS:
        raise BadInputError(f"--blend {blend}: expected one of {', '.join(BLENDS)}")
    if tile < divisor or tile % divisor:
        raise BadInputError(f"--tile {tile}: the model needs a multiple of {divisor}")
    if overlap < 0 or overlap >= tile:
        raise BadInputError(f"--overlap {overlap}: must be at least 0 and smaller than the tile ({tile})")
    if overlap > tile - divisor:
        raise BadInputError(
            f"--overlap {overlap}: tiles start on multiples of {divisor} (the model's size divisor), so the "
            f"overlap can be at most {tile - divisor} for --tile {tile}"
        )


def read_reflected(
    read: Callable[[slice, slice], np.ndarray], shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """Rows ``y0:y1`` and columns ``x0:x1`` of a (H, W) plane, reflected beyond its edges.

    ``read(rows, cols)`` returns the plane's pixels for two in-range slices; only the bounding box
    of the reflected coordinates is read.
    """
    ys = reflect_index(np.arange(y0, y1, dtype=np.int64), shape[0])
    xs = reflect_index(np.arange(x0, x1, dtype=np.int64), shape[1])
    ylo, yhi, xlo, xhi = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    data = np.asarray(read(slice(ylo, yhi), slice(xlo, xhi)))
    if ylo == y0 and yhi == y1 and xlo == x0 and xhi == x1:
        return data
    return data[np.ix_(ys - ylo, xs - xlo)] if data.ndim == 2 else data[..., ys - ylo, :][..., xs - xlo]


def axis_origins(
    b0: int, b1: int, tile: int, overlap: int, align: int, context: int, length: int | None = None
) -> np.ndarray:
    """Tile origins along one axis covering ``[b0 - context, b1 + context)``.

    The context is real neighbouring pixels where the block borders another block and the
    slice's mirror image beyond its true edges (0 and ``length``), as the U-Net paper extrapolates
    missing context by mirroring: a pixel at the slice's edge is predicted from as much context
    as one inside it, and every view of test-time augmentation sees the same mirrored context.
    The covered domain is widened to multiples of ``align``; origins are multiples of ``align``,
    the first tile starts at the domain's start and the last ends at its end, and neighbouring
    tiles overlap by at least ``overlap``. A domain shorter than a tile gets one tile (mirror-padded
    beyond the edge); at the slice's end it ends there, with more real context before it.
    """
    if tile % align:
        raise ValueError("tile must be a multiple of align")
    at_end = length is not None and b1 >= length
    d0 = ((b0 - context) // align) * align
    d1 = -(-(b1 + context) // align) * align
    span = d1 - d0 - tile
    if span <= 0:  # one tile
        return np.array([d1 - tile if at_end and b0 > 0 else d0], dtype=np.int64)
    units = span // align
    max_gap = max(1, (tile - overlap) // align)
    n = math.ceil(units / max_gap) + 1
    return d0 + align * np.round(np.linspace(0, units, n)).astype(np.int64)


def mirrored_context(overlap: int, align: int) -> int:
    """Pixels of context each tile grid adds around a block: half the overlap, rounded up to
    ``align`` (real neighbours inside the slice, its mirror image beyond the edges)."""
    return -(-(overlap // 2) // align) * align if overlap else 0


def window_1d(kind: str, tile: int, overlap: int) -> np.ndarray:
    """(tile,) float64 blending profile: a Gaussian with sigma = tile / 8, or a trapezoid ramping
    linearly over ``overlap`` pixels at each end; both clamped below at ``MIN_WEIGHT``."""
    i = np.arange(tile, dtype=np.float64)
    if kind == "gaussian":
        sigma = tile / 8
        w = np.exp(-((i - (tile - 1) / 2) ** 2) / (2 * sigma**2))
    elif kind == "linear":
        ramp = max(overlap, 1)
        w = np.minimum(1.0, np.minimum(i + 1, tile - i) / (ramp + 1))
    else:
        raise ValueError(f"no 1D window for {kind!r}")
    return np.maximum(w / w.max(), MIN_WEIGHT)


def crop_windows_1d(origins: np.ndarray, tile: int) -> np.ndarray:
    """(n, tile) 0/1 windows: each position belongs to the tile whose centre is nearest (ties to
    the later tile), so every covered position is owned by exactly one tile."""
    n = len(origins)
    windows = np.zeros((n, tile))
    bounds = [-np.inf] + [(origins[i] + origins[i + 1] + tile) / 2 for i in range(n - 1)] + [np.inf]
    for i, o in enumerate(origins):
        pos = o + np.arange(tile) + 0.5
        windows[i] = (pos >= bounds[i]) & (pos < bounds[i + 1])
    return windows


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one 2D block: origins per axis, 1D weights per tile, and the block's extent."""

    block: tuple[int, int, int, int]  # y0, y1, x0, x1 of the output
    tile: int
    y_origins: np.ndarray
    x_origins: np.ndarray
    y_windows: np.ndarray  # (n_y, tile)
    x_windows: np.ndarray  # (n_x, tile)

    @property
    def domain(self) -> tuple[int, int, int, int]:
        """y0, y1, x0, x1 covered by the tiles (the input region to read)."""
        t = self.tile
        return (
            int(self.y_origins[0]),
            int(self.y_origins[-1]) + t,
            int(self.x_origins[0]),
            int(self.x_origins[-1]) + t,
        )

    def weight_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(block_h,) and (block_w,) float64 sums of the tiles' 1D windows over the block.

        The tiles form a Cartesian product of the two axes' origins, so the sum of all tiles'
        2D weights at (y, x) is ``sy[y] * sx[x]``: the blend divides by that outer product.
        """
        t = self.tile
        out = []
        for origins, windows, (b0, b1) in (
            (self.y_origins, self.y_windows, self.block[:2]),
            (self.x_origins, self.x_windows, self.block[2:]),
        ):
            d0 = int(origins[0])
            total = np.zeros(int(origins[-1]) + t - d0)
            for origin, window in zip(origins, windows, strict=True):
                total[int(origin) - d0 : int(origin) - d0 + t] += window
            out.append(total[b0 - d0 : b1 - d0])
        return out[0], out[1]

    def tiles(self) -> list[tuple[int, int, int, int]]:
        """(iy, ix, y, x): index along each axis and global origin of every tile, row by row."""
        return [(iy, ix, int(y), int(x)) for iy, y in enumerate(self.y_origins) for ix, x in enumerate(self.x_origins)]


def tile_origins(
    y: tuple[int, int], x: tuple[int, int], tile: int, overlap: int, align: int, shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row origins, column origins) of :func:`plan_block`'s tiles, without their windows: the
    block's read region is rows ``ys[0]:ys[-1] + tile`` and columns ``xs[0]:xs[-1] + tile``."""
    context = mirrored_context(overlap, align)
    h, w = shape if shape is not None else (None, None)
    return (
        axis_origins(y[0], y[1], tile, overlap, align, context, h),
        axis_origins(x[0], x[1], tile, overlap, align, context, w),
    )


def plan_block(
    y: tuple[int, int],
    x: tuple[int, int],
    tile: int,
    overlap: int,
    align: int,
    blend: str = PredictConfig.blend,
    shape: tuple[int, int] | None = None,
) -> TilePlan:
    """Tiles for the output block ``y[0]:y[1], x[0]:x[1]`` of a slice of ``shape`` (H, W), with
    ``overlap // 2`` pixels of context (rounded up to ``align``) on every side."""
    ys, xs = tile_origins(y, x, tile, overlap, align, shape)
    if blend == "crop":
        wy, wx = crop_windows_1d(ys, tile), crop_windows_1d(xs, tile)
    else:
        window = window_1d(blend, tile, overlap)
        wy, wx = np.broadcast_to(window, (len(ys), tile)), np.broadcast_to(window, (len(xs), tile))
    return TilePlan((y[0], y[1], x[0], x[1]), tile, ys, xs, np.asarray(wy), np.asarray(wx))
