"""Smooth random fields: random lattices interpolated with Catmull-Rom splines in z, y and x.

A field is a deterministic function of (seed, tag, z, y, x): each lattice knot is drawn from its
own random stream, so any strip of any slice can be evaluated on its own and agrees with its
neighbours.
"""

from __future__ import annotations

import math

import numpy as np

from emseg.synthetic.params import HALO


def catmull_rom(f: np.ndarray) -> np.ndarray:
    """Weights (..., 4) of the 4 taps at offsets -1, 0, 1, 2 for fractional positions f (...)."""
    f2 = f * f
    f3 = f2 * f
    return np.stack(
        [
            -0.5 * f3 + f2 - 0.5 * f,
            1.5 * f3 - 2.5 * f2 + 1.0,
            -1.5 * f3 + 2.0 * f2 + 0.5 * f,
            0.5 * f3 - 0.5 * f2,
        ],
        axis=-1,
    )


def upsample(lat: np.ndarray, axis: int, spacing: int, origin: int, start: int, n: int) -> np.ndarray:
    """Catmull-Rom interpolation of ``lat`` (2D float32) along ``axis`` (0 or 1) at the integer
    coordinates start..start+n-1, lattice point i being at ``origin + i * spacing``.

    BLAS-free (multithreaded BLAS on tiny products is slow on loaded machines): the outputs of one
    lattice interval share their four taps, so each tap is one broadcast multiply-add.
    """
    u0 = start - origin
    j0, r0 = divmod(u0, spacing)
    nblk = -(-(r0 + n) // spacing)
    w = catmull_rom(np.arange(spacing) / spacing).astype(np.float32)  # (spacing, 4)
    if axis == 0:
        out = lat[j0 - 1 : j0 - 1 + nblk, None, :] * w[None, :, 0, None]
        for t in range(1, 4):
            out += lat[j0 - 1 + t : j0 - 1 + t + nblk, None, :] * w[None, :, t, None]
        return out.reshape(nblk * spacing, lat.shape[1])[r0 : r0 + n]
    out = lat[:, j0 - 1 : j0 - 1 + nblk, None] * w[None, None, :, 0]
    for t in range(1, 4):
        out += lat[:, j0 - 1 + t : j0 - 1 + t + nblk, None] * w[None, None, :, t]
    return out.reshape(lat.shape[0], nblk * spacing)[:, r0 : r0 + n]


class SmoothField:
    """Smooth Gaussian-ish noise of unit-order amplitude, a deterministic function of (z, y, x).

    Random lattices with ``spacing`` px in y and x, one per ``zspacing`` slices (knot k drawn from
    ``default_rng([seed, tag, k + 10**6])``), interpolated with Catmull-Rom splines; the result is
    scaled to about unit standard deviation. The lattice covers the (Y, X) slice ``yx`` plus a
    margin of ``HALO`` pixels. ``extras`` are coarser fields (spacing at least twice this one's,
    so their lattices cover this one's) added with a weight at this lattice's nodes, which costs
    one full-resolution interpolation for the sum instead of one per field.
    """

    _SCALE = 1.0 / 0.77  # Catmull-Rom interpolation of white noise has std ~0.77 (2D+z average)

    def __init__(
        self,
        seed: int,
        tag: int,
        yx: tuple[int, int],
        spacing: int,
        zspacing: float,
        extras: tuple[tuple[SmoothField, float], ...] = (),
    ):
        self.seed, self.tag, self.spacing, self.zspacing = seed, tag, int(spacing), float(zspacing)
        pad = HALO + 2 * self.spacing
        self.origin = -pad
        self.ny = int(math.ceil((yx[0] + 2 * pad) / spacing)) + 4
        self.nx = int(math.ceil((yx[1] + 2 * pad) / spacing)) + 4
        if any(field.spacing < 2 * self.spacing for field, _ in extras):
            raise ValueError("an extra field's spacing must be at least twice the field's")
        self.extras = extras
        self._knots: dict[int, np.ndarray] = {}
        self._plane_z: float | None = None
        self._plane: np.ndarray | None = None

    def _knot(self, k: int) -> np.ndarray:
        """The (ny, nx) float32 random lattice of knot k (a small cache of the latest knots)."""
        if k not in self._knots:
            if len(self._knots) > 8:
                for old in sorted(self._knots)[:-4]:
                    del self._knots[old]
            rng = np.random.default_rng([self.seed, self.tag, k + 1_000_000])
            self._knots[k] = rng.standard_normal((self.ny, self.nx), dtype=np.float32)
        return self._knots[k]

    def plane(self, z: float) -> np.ndarray:
        """The (ny, nx) lattice interpolated at slice z (cached for the last z)."""
        if self._plane_z != z:
            u = z / self.zspacing
            k = math.floor(u)
            w = catmull_rom(np.array(u - k)) * self._SCALE
            plane = sum(float(w[t]) * self._knot(k - 1 + t) for t in range(4))
            if self.extras:
                ys = self.origin + self.spacing * np.arange(self.ny, dtype=np.float64)
                xs = self.origin + self.spacing * np.arange(self.nx, dtype=np.float64)
                for field, weight in self.extras:
                    plane += weight * field.separable(z, ys, xs)
            self._plane = plane  # type: ignore[assignment]
            self._plane_z = z
        return self._plane  # type: ignore[return-value]

    def grid(self, z: float, y0: int, h: int, x0: int, w: int) -> np.ndarray:
        """Values (h, w) float32 on the pixel grid rows y0..y0+h-1, columns x0..x0+w-1 of slice z."""
        lat = self.plane(z)
        s, o = self.spacing, self.origin
        jlo = (y0 - o) // s - 1
        jhi = (y0 + h - 1 - o) // s + 3
        rows = upsample(lat[jlo:jhi], 0, s, o + jlo * s, y0, h)
        return np.ascontiguousarray(upsample(rows, 1, s, o, x0, w))

    def separable(self, z: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values (len(ys), len(xs)) float32 on the grid ys x xs (any coordinates inside the
        lattice) of slice z."""
        lat = self.plane(z)
        uy = (ys - self.origin) / self.spacing
        iy = np.floor(uy).astype(np.int64)
        wy = catmull_rom(uy - iy).astype(np.float32)
        rows = sum(wy[:, t, None] * lat[iy - 1 + t] for t in range(4))
        ux = (xs - self.origin) / self.spacing
        ix = np.floor(ux).astype(np.int64)
        wx = catmull_rom(ux - ix).astype(np.float32)
        return sum(rows[:, ix - 1 + t] * wx[None, :, t] for t in range(4))

    def points(self, z: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values (n,) float64 at scattered points (ys[i], xs[i]) of slice z."""
        lat = self.plane(z)
        uy = (ys - self.origin) / self.spacing
        ux = (xs - self.origin) / self.spacing
        iy = np.floor(uy).astype(np.int64)
        ix = np.floor(ux).astype(np.int64)
        wy = catmull_rom(uy - iy)
        wx = catmull_rom(ux - ix)
        out = np.zeros(len(ys), np.float64)
        for a in range(4):
            for b in range(4):
                out += wy[:, a] * wx[:, b] * lat[iy - 1 + a, ix - 1 + b]
        return out
