"""The one pyramid builder: level shapes, the 2x2 reduction, and the two ways levels get written.

Level k > 0 of an image is the 2x2 block mean of level k - 1 in y and x (block majority for
{0, 1} label masks, the 2x2 mode for label IDs, so IDs are never averaged into ones that do not
exist); z is never reduced. Ingest streams its source once and feeds every level band by band
(:class:`PyramidWriter`); predict and segment write level 0 block by block and then build the
levels from it (:func:`build_levels`). Both write whole chunk rows, so no two writes share a chunk.

This module knows zarr arrays but not OME-Zarr metadata (``emseg.io.zarr`` imports it).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from emseg.config import IngestConfig

#: The reductions: "mean" for images (rounded for integers), "majority" for {0, 1} masks, "mode"
#: for label IDs.
REDUCTIONS = ("mean", "majority", "mode")


def pyramid_shapes(shape: Sequence[int], min_size: int = IngestConfig.pyramid_min_size) -> list[tuple[int, ...]]:
    """Level shapes: level 0 is ``shape`` ((Z, Y, X), or (C, Z, Y, X) whose C stays); each next
    level halves y and x (rounding up) until the largest of y and x is at most ``min_size``."""
    if len(shape) == 4:
        return [(int(shape[0]), *s) for s in pyramid_shapes(shape[1:], min_size)]
    z, y, x = (int(s) for s in shape)
    shapes: list[tuple[int, ...]] = [(z, y, x)]
    while max(y, x) > min_size and min(y, x) > 1:
        y, x = math.ceil(y / 2), math.ceil(x / 2)
        shapes.append((z, y, x))
    return shapes


def reduce2(band: np.ndarray, kind: str) -> np.ndarray:
    """2x2 reduction in y and x of a (Z, Y, X) band: block mean ("mean", in the band's dtype,
    rounded for integers), block majority of a {0, 1} band ("majority", ties to 1; uint8) or the
    most frequent ID ("mode", in the band's dtype; top-left on a four-way tie). Odd sizes are
    padded by edge replication, so the output is (Z, ceil(Y/2), ceil(X/2))."""
    z, y, x = band.shape
    if y % 2 or x % 2:
        band = np.pad(band, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    if kind == "mode":
        a, b = band[:, 0::2, 0::2], band[:, 0::2, 1::2]
        c, d = band[:, 1::2, 0::2], band[:, 1::2, 1::2]
        # a wins when it appears twice; else b when it does; else c when c == d; else a (all differ)
        out = np.where((b == c) | (b == d), b, np.where(c == d, c, a))
        return np.where((a == b) | (a == c) | (a == d), a, out)
    if kind == "majority":
        acc = band[:, 0::2].astype(np.uint8) + band[:, 1::2]
        acc = acc[:, :, 0::2] + acc[:, :, 1::2]
        return (acc >= 2).astype(np.uint8)
    if np.issubdtype(band.dtype, np.integer):
        wide = np.int64 if band.dtype.itemsize >= 4 else np.int32 if band.dtype.itemsize == 2 else np.uint16
        acc = band[:, 0::2].astype(wide) + band[:, 1::2]
        acc = acc[:, :, 0::2] + acc[:, :, 1::2]
        acc += 2
        acc //= 4
        return acc.astype(band.dtype)
    work = np.float64 if band.dtype == np.float64 else np.float32
    acc = band[:, 0::2].astype(work) + band[:, 1::2]
    return ((acc[:, :, 0::2] + acc[:, :, 1::2]) * 0.25).astype(band.dtype)


def band_rows(chunk_rows: int, n_levels: int, height: int, row_block: int = 1) -> int:
    """Rows per band: the least common multiple of the chunk rows, 2^(levels-1) (so every level
    gets whole rows) and the source's row block (so no strip is decoded twice), at most ``height``."""
    return min(math.lcm(chunk_rows, 2 ** max(0, n_levels - 1), max(1, row_block)), height)


class PyramidWriter:
    """Writes bands of level 0 in order and feeds the reduced levels chunk row by chunk row.

    ``arrays`` are the (Z, Y, X) levels 0..n; ``kind`` is a reduction of :data:`REDUCTIONS`.
    Writes run on ``pool`` (at most ``max_pending`` at once, so memory stays bounded) while the
    caller reads and reduces the next band; :meth:`drain` waits for them and raises their errors.
    """

    def __init__(self, arrays: list[zarr.Array], kind: str, pool: ThreadPoolExecutor, max_pending: int = 1) -> None:
        self.arrays = arrays
        self.kind = kind
        self._pool = pool
        self._max_pending = max_pending
        self._futures: deque[Future[None]] = deque()
        self._pending: list[list[np.ndarray]] = [[] for _ in arrays]
        self._start: list[int] = [0] * len(arrays)

    def write(self, z0: int, y0: int, band: np.ndarray) -> None:
        """Write level-0 rows ``y0:y0+len`` of slices ``z0:z0+band.shape[0]``; bands of one
        z-group must arrive top to bottom."""
        self._submit(0, (slice(z0, z0 + band.shape[0]), slice(y0, y0 + band.shape[1])), band)
        last = y0 + band.shape[1] == self.arrays[0].shape[1]
        for level in range(1, len(self.arrays)):
            band = reduce2(band, self.kind)
            self._push(level, z0, band, last)

    def _submit(self, level: int, where: tuple[slice, slice], data: np.ndarray) -> None:
        while len(self._futures) >= self._max_pending:
            self._futures.popleft().result()
        self._futures.append(self._pool.submit(self.arrays[level].__setitem__, where, data))

    def drain(self) -> None:
        """Wait for every pending write; raises the first write's error."""
        while self._futures:
            self._futures.popleft().result()

    def _push(self, level: int, z0: int, band: np.ndarray, last: bool) -> None:
        pending = self._pending[level]
        pending.append(band)
        rows = sum(b.shape[1] for b in pending)
        chunk_rows = self.arrays[level].chunks[1]
        if rows < chunk_rows and not last:
            return
        data = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
        n = rows if last else (rows // chunk_rows) * chunk_rows
        start = self._start[level]
        self._submit(level, (slice(z0, z0 + data.shape[0]), slice(start, start + n)), data[:, :n])
        rest = data[:, n:]
        self._pending[level] = [rest] if rest.shape[1] else []
        self._start[level] = 0 if last else start + n


def build_levels(group_path: Path, kind: str) -> None:
    """Compute levels 1.. of the multiscale group at ``group_path`` (arrays "0", "1", ...) from
    level 0, one slice and one chunk row of the target level at a time; ``kind`` is a reduction
    of :data:`REDUCTIONS`."""
    group = zarr.open_group(str(group_path), mode="r+")
    levels = [array for _, array in sorted(group.arrays(), key=lambda item: int(item[0]))]
    for src, dst in itertools.pairwise(levels):
        channels = range(dst.shape[0]) if dst.ndim == 4 else (None,)  # (C, Z, Y, X): channel by channel
        for c in channels:
            head = () if c is None else (c,)
            rows = int(dst.chunks[-2])
            for z in range(dst.shape[-3]):
                for y in range(0, dst.shape[-2], rows):
                    block = np.asarray(src[head + (slice(z, z + 1), slice(2 * y, 2 * (y + rows)))])
                    reduced = reduce2(block, kind)[:, : min(rows, dst.shape[-2] - y)]
                    dst[head + (slice(z, z + 1), slice(y, y + rows))] = reduced


__all__ = ["REDUCTIONS", "PyramidWriter", "band_rows", "build_levels", "pyramid_shapes", "reduce2"]
