"""Synthetic EM-like stacks with ground truth, for offline demos, tests and benchmarks.

The stack imitates the ISBI 2012 challenge data (serial-section TEM of Drosophila neural tissue,
4 x 4 x 50 nm voxels, 512 x 512 slices):

- cells are the sections of a 3D tessellation of random seeds in an anisotropic volume (slice
  ``z`` sits at ``ZSTEP * z``), so cross-sections change smoothly from slice to slice and cells
  appear and vanish as the slices pass their ends. It is a power diagram (each seed lifted into a
  4th dimension): sparse big seeds with small lifts and dense small seeds with large ones give the
  broad, skewed size distribution of ISBI's sections;
- the boundaries are wiggly (pixels are warped by a smooth displacement before the nearest-seed
  query), the corners rounded (a smooth minimum of the distances to the two nearest boundaries),
  and drawn as dark membranes whose half-width varies smoothly between 1.5 and 4 px;
- interiors get a per-cell mean intensity (a few darker cells), smooth multi-scale texture and
  fine grain, small dark vesicles (rings and dots, densities varying between cells) and darker
  mitochondria with cristae in some of the bigger cells -- none of which is membrane in the
  labels, and all of which fade out before the labelled membrane;
- the image is blurred (Gaussian, sigma 1 px) and noised. Its intensity statistics are calibrated
  on the ISBI training volume: membrane mean/std about 81/32 (ISBI 85/33), interior 138/38
  (ISBI 138/40), membrane fraction about 21 % (ISBI 22 %).

Labels use the ISBI ``train-labels.tif`` encoding: 255 = cell interior, 0 = membrane.

Everything is a deterministic function of (seed, position), generated slice by slice and each
slice in horizontal strips of about 2**19 pixels (with a halo, so the blur is exact and the
result does not depend on the strips): memory is bounded by one slice's outputs, a strip's
working arrays and the seeds (a few per ``cell_size**3 / ZSTEP`` voxels). Each pixel's nearest
three seeds are found exactly: one k-d tree query per 16 x 16 pixels gives the candidates, and a
vectorised brute force ranks them for every pixel.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from emseg.errors import BadInputError

__all__ = ["synthetic_stack", "synthetic_slices", "tile_isbi_like"]

#: Distance between two slices in pixel units of the anisotropic space the cells live in. ISBI
#: sections are 50 nm apart at 4 nm pixels (12.5 px), but neurites run mostly across the
#: sections, so a smaller step gives ISBI-like slice-to-slice change.
ZSTEP = 5.0
#: Mean spacing of the big and the small seeds, as multiples of ``cell_size``, and their lifts
#: into the 4th dimension (uniform in [0, _BIG_LIFT] and in _SMALL_LIFT, times ``cell_size``).
_BIG_SPACING = 1.4
_SMALL_SPACING = 0.8
_BIG_LIFT = 0.2
_SMALL_LIFT = (0.7, 1.0)
_KBITS = 6  # low bits of a squared distance that carry its candidate number
_BLOCK = 8  # pixels per side of the blocks that share one candidate list
_HALO = 4  # rows/columns computed beyond a strip so the blur (sigma 1, truncate 4) is exact
_STRIP_PIXELS = 1 << 19  # target pixels per strip (bounds the working memory)
_BLUR_SIGMA = 1.0
_WARP = (5.0, 0.9)  # px, amplitudes of the coarse and fine warp that makes boundaries wiggly
_WARP_MAX = 10.0  # px, bound of the displacement
_ROUND = 10.0  # px, range of the smooth minimum that rounds the cells' corners
_HALFWIDTH = 2.35  # px, mean membrane half-width (varies smoothly in 1.5 .. 4)
#: px kept free of vesicles and mitochondria along the boundaries (widest membrane + rounding).
_MARGIN = 4.0 + _ROUND / 4 + 1.0

# Intensity model (grey levels before blur and noise), calibrated against ISBI train-volume.tif.
_CELL_MEAN = 147.0
_CELL_MEAN_SD = 20.0
_MEMBRANE_LEVEL = 35.0
_TEX1 = 16.0
_TEX2 = 18.0
_LIGHT = 8.0
_GRAIN_SD = 36.0
_NOISE_SD = 11.0
_VESICLE_DENSITY = 1 / 300.0  # median vesicles per px^2 of a cell (log-normal over cells)
_VESICLE_DENSITY_MAX = 1 / 100.0  # cap
_MITO_P = 0.5

# Field tags (each smooth-noise field draws from its own random stream).
_TAG_SEEDS, _TAG_VESICLES, _TAG_GRAIN, _TAG_NOISE = 1, 2, 3, 4
_TAG_WARP_Y, _TAG_WARP_X, _TAG_WARP_Y2, _TAG_WARP_X2 = 10, 11, 12, 13
_TAG_WIDTH, _TAG_TEX1, _TAG_TEX2, _TAG_LIGHT = 20, 22, 23, 24


def synthetic_stack(
    shape: tuple[int, int, int] = (30, 512, 512),
    *,
    seed: int | np.random.Generator = 0,
    cell_size: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An EM-like stack with its ground truth.

    Returns ``(raw, labels)``: raw (Z, Y, X) uint8 and labels (Z, Y, X) uint8 with 255 = cell
    interior, 0 = membrane -- the same encoding as the ISBI ``train-labels.tif``.

    ``cell_size`` (pixels, at least 12) scales the cells. At the default 60 a 512 x 512 slice
    holds about 130 cell sections, median area 600-800 px^2 and mean 1500 px^2, from a few to
    ~150 px across, and neighbouring slices' labels agree on ~84 % of the pixels (ISBI: 116-136
    sections, 560 and 1500-1760 px^2, 72 %). Membranes keep their width in pixels, so small cells
    mean more membrane (about 33 % at 40, 14 % at 100).

    Deterministic for a given ``(shape, seed, cell_size)``, and equal to stacking
    :func:`synthetic_slices` with the same arguments. ``seed`` is a non-negative integer or a
    numpy Generator (which gives one integer seed, advancing its state).
    """
    z, y, x = _check_shape(shape)
    raw = np.empty((z, y, x), np.uint8)
    labels = np.empty((z, y, x), np.uint8)
    for i, (r, lab) in enumerate(synthetic_slices(shape, seed=seed, cell_size=cell_size)):
        raw[i] = r
        labels[i] = lab
    return raw, labels


def synthetic_slices(
    shape: tuple[int, int, int],
    *,
    seed: int | np.random.Generator = 0,
    cell_size: float = 60.0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(raw (Y, X) uint8, label (Y, X) uint8)`` slice by slice.

    For stacks too big for memory (e.g. 64 x 8192 x 8192): working memory is about one slice's
    outputs, a strip of 2**19 pixels and the seeds. The arguments are checked and the seeds drawn
    at the call, not at the first ``next()``.
    """
    model = _Model(_check_shape(shape), _check_seed(seed), _check_cell_size(cell_size))
    return (model.render_slice(z) for z in range(model.shape[0]))


def tile_isbi_like(slice_yx: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """A (Y, X) slice of ``shape_yx`` made by mirror-tiling ``slice_yx`` (``np.pad`` "symmetric").

    The result starts with ``slice_yx`` in its top-left corner, continues with its mirror image
    (edge pixels repeated, so no seam) and so on; a smaller ``shape_yx`` crops. For benchmarks that
    make big inputs from real ISBI slices.
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


# --------------------------------------------------------------------------------------------
# argument checks


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        dims = tuple(operator.index(v) for v in shape)
    except TypeError:
        raise BadInputError(f"shape must be three integers (Z, Y, X), got {shape!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise BadInputError(f"shape must be three positive integers (Z, Y, X), got {shape!r}")
    return dims  # type: ignore[return-value]


def _check_seed(seed) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BadInputError(
            f"seed must be a non-negative integer or a numpy Generator, got {seed!r}"
        )
    return int(seed)


def _check_cell_size(cell_size) -> float:
    try:
        c = float(cell_size)
    except (TypeError, ValueError):
        raise BadInputError(f"cell_size must be a number, got {cell_size!r}") from None
    if not math.isfinite(c) or c < 12.0:
        raise BadInputError(f"cell_size must be at least 12 pixels, got {cell_size!r}")
    return c


# --------------------------------------------------------------------------------------------
# smooth noise: Catmull-Rom interpolation of random lattices, separable, in z, y and x


def _catmull_rom(f: np.ndarray) -> np.ndarray:
    """Weights (..., 4) of the 4 taps at offsets -1, 0, 1, 2 for fractional positions f."""
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


def _upsample(
    lat: np.ndarray, axis: int, spacing: int, origin: int, start: int, n: int
) -> np.ndarray:
    """Catmull-Rom interpolation of ``lat`` along ``axis`` (0 or 1) at the integer coordinates
    start..start+n-1, lattice point i being at ``origin + i * spacing``.

    BLAS-free (multithreaded BLAS on tiny products is slow on loaded machines): the outputs of one
    lattice interval share their four taps, so each tap is one broadcast multiply-add.
    """
    u0 = start - origin
    j0, r0 = divmod(u0, spacing)
    nblk = -(-(r0 + n) // spacing)
    w = _catmull_rom(np.arange(spacing) / spacing).astype(np.float32)  # (spacing, 4)
    if axis == 0:
        out = lat[j0 - 1 : j0 - 1 + nblk, None, :] * w[None, :, 0, None]
        for t in range(1, 4):
            out += lat[j0 - 1 + t : j0 - 1 + t + nblk, None, :] * w[None, :, t, None]
        return out.reshape(nblk * spacing, lat.shape[1])[r0 : r0 + n]
    out = lat[:, j0 - 1 : j0 - 1 + nblk, None] * w[None, None, :, 0]
    for t in range(1, 4):
        out += lat[:, j0 - 1 + t : j0 - 1 + t + nblk, None] * w[None, None, :, t]
    return out.reshape(lat.shape[0], nblk * spacing)[:, r0 : r0 + n]


class _Field:
    """Smooth Gaussian-ish noise of unit-order amplitude, a deterministic function of (z, y, x).

    Random lattices with ``spacing`` px in y and x, one per ``zspacing`` slices (knot k drawn from
    ``default_rng([seed, tag, k + 10**6])``), interpolated with Catmull-Rom splines; the result is
    scaled to about unit standard deviation. ``extras`` are coarser fields (spacing at least twice
    this one's, so their lattices cover this one's) added with a weight at this lattice's nodes,
    which costs one full-resolution interpolation for the sum instead of one per field.
    """

    _SCALE = 1.0 / 0.77  # Catmull-Rom interpolation of white noise has std ~0.77 (2D+z average)

    def __init__(
        self,
        seed: int,
        tag: int,
        yx: tuple[int, int],
        spacing: int,
        zspacing: float,
        extras: tuple[tuple[_Field, float], ...] = (),
    ):
        self.seed, self.tag, self.spacing, self.zspacing = seed, tag, int(spacing), float(zspacing)
        pad = _HALO + 2 * self.spacing
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
            w = _catmull_rom(np.array(u - k)) * self._SCALE
            plane = sum(float(w[t]) * self._knot(k - 1 + t) for t in range(4))
            if self.extras:
                ys = self.origin + self.spacing * np.arange(self.ny, dtype=np.float64)
                xs = self.origin + self.spacing * np.arange(self.nx, dtype=np.float64)
                for field, weight in self.extras:
                    plane += weight * field.separable(z, ys, xs)
            self._plane = plane
            self._plane_z = z
        return self._plane  # type: ignore[return-value]

    def grid(self, z: float, y0: int, h: int, x0: int, w: int) -> np.ndarray:
        """Values on the pixel grid rows y0..y0+h-1, columns x0..x0+w-1 of slice z (float32)."""
        lat = self.plane(z)
        s, o = self.spacing, self.origin
        jlo = (y0 - o) // s - 1
        jhi = (y0 + h - 1 - o) // s + 3
        rows = _upsample(lat[jlo:jhi], 0, s, o + jlo * s, y0, h)
        return np.ascontiguousarray(_upsample(rows, 1, s, o, x0, w))

    def separable(self, z: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values on the grid ys x xs (any coordinates inside the lattice) of slice z (float32)."""
        lat = self.plane(z)
        uy = (ys - self.origin) / self.spacing
        iy = np.floor(uy).astype(np.int64)
        wy = _catmull_rom(uy - iy).astype(np.float32)
        rows = sum(wy[:, t, None] * lat[iy - 1 + t] for t in range(4))
        ux = (xs - self.origin) / self.spacing
        ix = np.floor(ux).astype(np.int64)
        wx = _catmull_rom(ux - ix).astype(np.float32)
        return sum(rows[:, ix - 1 + t] * wx[None, :, t] for t in range(4))

    def points(self, z: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at scattered points (ys[i], xs[i]) of slice z."""
        lat = self.plane(z)
        uy = (ys - self.origin) / self.spacing
        ux = (xs - self.origin) / self.spacing
        iy = np.floor(uy).astype(np.int64)
        ix = np.floor(ux).astype(np.int64)
        wy = _catmull_rom(uy - iy)
        wx = _catmull_rom(ux - ix)
        out = np.zeros(len(ys), np.float64)
        for a in range(4):
            for b in range(4):
                out += wy[:, a] * wx[:, b] * lat[iy - 1 + a, ix - 1 + b]
        return out


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """min(a, b) less up to k/4 where |a - b| < k (polynomial smooth minimum; exact elsewhere)."""
    out = np.minimum(a, b)
    hh = np.abs(a - b)
    np.subtract(k, hh, out=hh)
    np.maximum(hh, 0.0, out=hh)
    hh *= hh
    hh *= 0.25 / k
    out -= hh
    return out


# --------------------------------------------------------------------------------------------
# vesicle stamps


def _make_stamps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark-blob kernels (n, 15, 15) with peak 1: rings of radius 1.8-3.4 px and filled dots."""
    r = 7
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    rad = np.hypot(yy, xx)
    kernels = []
    radii = []
    for r0 in (1.8, 2.4, 3.0, 3.4):
        kernels.append(np.exp(-(((rad - r0) / 0.75) ** 2)))
        radii.append(r0 + 1.0)
    for s in (1.0, 1.4):
        kernels.append(np.exp(-0.5 * (rad / s) ** 2))
        radii.append(2.0 * s)
    k = np.stack(kernels).astype(np.float32)
    return k, np.array(radii), yy.ravel(), xx.ravel()


_STAMPS, _STAMP_RADIUS, _STAMP_DY, _STAMP_DX = _make_stamps()
_STAMP_R = 7


# --------------------------------------------------------------------------------------------
# the model


class _Model:
    """Seeds, per-cell attributes and noise fields of one synthetic stack; renders its slices."""

    def __init__(self, shape: tuple[int, int, int], seed: int, cell_size: float):
        self.shape = shape
        self.seed = seed
        nz, ny, nx = shape
        g = float(cell_size)
        rng = np.random.default_rng([seed, _TAG_SEEDS])

        # Seeds in the anisotropic (y, x, ZSTEP * z) space, with a margin of 3 cells: two Poisson
        # populations, sparse "big" seeds and dense "small" ones, each lifted by h into a 4th
        # dimension. The slice h = 0 of the 4D Voronoi is a power diagram (squared distance
        # + h**2); the small seeds' larger lifts keep their cells small, which gives the broad,
        # skewed size distribution of ISBI's cell sections.
        lo = np.array([-3 * g, -3 * g, -3 * g])
        hi = np.array([ny + 3 * g, nx + 3 * g, (nz - 1) * ZSTEP + 3 * g])
        vol = float(np.prod(hi - lo))
        nbig = int(rng.poisson(vol / (g * _BIG_SPACING) ** 3))
        nsmall = int(rng.poisson(vol / (g * _SMALL_SPACING) ** 3))
        n = nbig + nsmall
        pts = lo + rng.random((n, 3)) * (hi - lo)
        lo_s, hi_s = _SMALL_LIFT
        lift = g * np.concatenate(
            [_BIG_LIFT * rng.random(nbig), lo_s + (hi_s - lo_s) * rng.random(nsmall)]
        )
        pts4 = np.concatenate([pts, lift[:, None]], axis=1)
        self.sy = pts[:, 0].astype(np.float32)
        self.sx = pts[:, 1].astype(np.float32)
        self.sz = pts[:, 2]
        self.sxy = (pts[:, 1] + 1j * pts[:, 0]).astype(np.complex64)
        self.lift2 = lift**2
        self.tree = cKDTree(pts4)
        # Radius of the ball around each big seed (in the 3D h = 0 space) inside its cell: the
        # least distance to its power bisectors (|D|^2 + h_j^2 - h_i^2) / (2|D|) over the 12
        # nearest seeds, and a bound that holds for all farther ones. (The small seeds' lifts
        # leave them no such ball worth having: 0, which is always a valid bound.)
        tree3 = cKDTree(pts)
        kn = min(13, n)
        self.ball = np.zeros(n)
        for c0 in range(0, nbig, 65536):  # in chunks: bounded memory for huge stacks
            sl = slice(c0, min(nbig, c0 + 65536))
            dn, jn = tree3.query(pts[sl], k=kn)
            dn, jn = np.maximum(dn[:, 1:], 1e-6), jn[:, 1:]
            power = (dn**2 + self.lift2[jn] - self.lift2[sl, None]) / (2 * dn)
            far = (dn[:, -1] ** 2 - self.lift2[sl]) / (2 * dn[:, -1])
            self.ball[sl] = np.maximum(np.minimum(power.min(axis=1), far), 0.0)
        del tree3

        # Per-cell attributes: mean intensity (a few darker cells), vesicle density.
        dark_cell = rng.random(n) < 0.12
        mean = np.where(dark_cell, _CELL_MEAN - 40.0, _CELL_MEAN)
        self.cell_mean = (mean + _CELL_MEAN_SD * rng.standard_normal(n)).astype(np.float32)
        self.vesicle_density = rng.lognormal(np.log(_VESICLE_DENSITY), 1.2, n)
        self.vesicle_density *= rng.random(n) < 0.85  # some cells have none
        # Mitochondria: one ellipsoid in some of the big cells, long axis in the slice plane, sized
        # by the seed's ball less the widest membrane (drawn only inside its own cell and faded
        # out before the membrane, so a bigger one is only flattened against it).
        margin = _MARGIN
        a = rng.uniform(10.0, 24.0, n)
        b = rng.uniform(7.0, 13.0, n)
        a = np.minimum(a, 1.4 * (self.ball - margin))
        b = np.minimum(b, 0.75 * a)
        c = b * rng.uniform(1.0, 3.0, n)
        has = (rng.random(n) < _MITO_P) & (b >= 4.0)
        off_len = 0.3 * self.ball * rng.random(n) ** (1 / 3)
        off_dir = rng.standard_normal((n, 3))
        off_dir /= np.linalg.norm(off_dir, axis=1, keepdims=True)
        mc = pts + off_len[:, None] * off_dir
        theta = rng.uniform(0, np.pi, n)
        self.mito = has
        self.mito_cy = mc[:, 0].astype(np.float32)
        self.mito_cx = mc[:, 1].astype(np.float32)
        self.mito_cz = mc[:, 2]
        self.mito_cos = np.cos(theta).astype(np.float32)
        self.mito_sin = np.sin(theta).astype(np.float32)
        self.mito_ia2 = (1 / np.maximum(a, 1e-3) ** 2).astype(np.float32)
        self.mito_ib2 = (1 / np.maximum(b, 1e-3) ** 2).astype(np.float32)
        self.mito_ic2 = 1 / np.maximum(c, 1e-3) ** 2
        self.mito_dark = rng.uniform(35.0, 60.0, n).astype(np.float32)
        self.mito_phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)

        yx = (ny, nx)
        # smooth fields; coarse octaves ride on finer ones (nested spacings)
        wy_coarse = _Field(seed, _TAG_WARP_Y, yx, 36, 6.0)
        wx_coarse = _Field(seed, _TAG_WARP_X, yx, 36, 6.0)
        self.warp_y = _Field(seed, _TAG_WARP_Y2, yx, 12, 3.0, ((wy_coarse, _WARP[0] / _WARP[1]),))
        self.warp_x = _Field(seed, _TAG_WARP_X2, yx, 12, 3.0, ((wx_coarse, _WARP[0] / _WARP[1]),))
        self.width = _Field(seed, _TAG_WIDTH, yx, 40, 6.0)
        tex1 = _Field(seed, _TAG_TEX1, yx, 16, 1.0)
        light = _Field(seed, _TAG_LIGHT, yx, 160, 8.0)
        self.texture = _Field(
            seed, _TAG_TEX2, yx, 4, 1.0, ((tex1, _TEX1 / _TEX2), (light, _LIGHT / _TEX2))
        )

        rows = max(_BLOCK, (_STRIP_PIXELS // (nx + 2 * _HALO)) // _BLOCK * _BLOCK)
        self.strip_rows = min(rows, ny)

    # ---------------------------------------------------------------------------------------

    def _displacement(self, z: float, ys, xs, grid: bool):
        """Displacement (dy, dx): on the grid ys = (y0, h) x xs = (x0, w), or at points."""
        if grid:
            dy = self.warp_y.grid(z, *ys, *xs)
            dx = self.warp_x.grid(z, *ys, *xs)
        else:
            dy = self.warp_y.points(z, ys, xs)
            dx = self.warp_x.points(z, ys, xs)
        dy *= _WARP[1]
        dx *= _WARP[1]
        return np.clip(dy, -_WARP_MAX, _WARP_MAX), np.clip(dx, -_WARP_MAX, _WARP_MAX)

    def _vesicles(self, z: int, zq: float):
        """Vesicles of slice z: pixel rows, columns, kernel index and depth.

        Candidates are uniform in the slice at the densest cells' density; each is kept with
        probability (its cell's density / that maximum) if it lies at least its radius plus the
        local membrane half-width from the boundary (exact distance at the warped position).
        """
        ny, nx = self.shape[1:]
        rng = np.random.default_rng([self.seed, _TAG_VESICLES, z])
        r = _STAMP_R
        area = (ny + 2 * r) * (nx + 2 * r)
        m = rng.poisson(_VESICLE_DENSITY_MAX * area)
        py = rng.uniform(-r, ny + r, m)
        px = rng.uniform(-r, nx + r, m)
        kind = rng.integers(0, len(_STAMPS), m)
        depth = rng.uniform(35.0, 85.0, m).astype(np.float32)
        accept = rng.random(m)
        if m:
            dy, dx = self._displacement(float(z), py, px, grid=False)
            pts = np.stack([py + dy, px + dx, np.full(m, zq), np.zeros(m)], axis=1)
            dd, ii = self.tree.query(pts, k=2)
            d2 = dd**2
            sep = np.abs(self.sxy[ii[:, 1]] - self.sxy[ii[:, 0]])
            t = (d2[:, 1] - d2[:, 0]) / (2 * np.maximum(sep, 1e-3))
            half = np.clip(_HALFWIDTH + 0.9 * self.width.points(float(z), py, px), 1.5, 4.0)
            keep = (accept * _VESICLE_DENSITY_MAX < self.vesicle_density[ii[:, 0]]) & (
                t > half + _STAMP_RADIUS[kind] + _ROUND / 4
            )
            py, px, kind, depth = py[keep], px[keep], kind[keep], depth[keep]
        return np.rint(py).astype(np.int64), np.rint(px).astype(np.int64), kind, depth

    def render_slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = self.shape[1:]
        zq = z * ZSTEP
        dz2 = ((self.sz - zq) ** 2 + self.lift2).astype(np.float32)
        vesicles = self._vesicles(z, zq)
        raw = np.empty((ny, nx), np.uint8)
        lab = np.empty((ny, nx), np.uint8)
        noise_rng = np.random.default_rng([self.seed, _TAG_NOISE, z])
        for y0 in range(0, ny, self.strip_rows):
            y1 = min(ny, y0 + self.strip_rows)
            img, membrane = self._render_strip(z, zq, dz2, y0, y1, vesicles)
            img += noise_rng.standard_normal(img.shape, dtype=np.float32) * _NOISE_SD
            np.clip(img, 0, 255, out=img)
            raw[y0:y1] = np.rint(img)
            lab[y0:y1] = np.where(membrane, 0, 255)
        return raw, lab

    def _boundary(self, wy: np.ndarray, wx: np.ndarray, zq: float, dz2: np.ndarray):
        """Distance to the cell boundary ``t`` (float32) and cell id ``i1`` (int32) of every pixel.

        (wy, wx) are the pixels' warped coordinates, (h, w) multiples of 2 * _BLOCK. Needs each
        pixel's nearest three seeds, found exactly: a k-d tree query per superblock of 2 x 2
        blocks gives every seed that can be among the nearest three of one of its pixels (d_j(C)
        <= d_3(C) + 2R, by the triangle inequality, for centre C and radius R); each block narrows
        that list to d_j(c) <= d_3(c) + 2r with its own centre and radius, and a vectorised brute
        force ranks the candidates for every pixel. To rank without index bookkeeping, a squared
        distance (float32 >= 0, whose bits order like int32) carries its candidate number in its
        lowest _KBITS bits (a relative change below 1e-5).
        """
        h, w = wy.shape
        B = _BLOCK
        hs, ws = h // (2 * B), w // (2 * B)
        ns, nb = hs * ws, hs * ws * 4

        def blocked(a):  # (h, w) -> (nb, B*B); block = 4 * superblock + sub-block
            return a.reshape(hs, 2, B, ws, 2, B).transpose(0, 3, 1, 4, 2, 5).reshape(nb, B * B)

        by, bx = blocked(wy), blocked(wx)
        cy = by.mean(axis=1)
        cx = bx.mean(axis=1)
        rad = np.sqrt(((by - cy[:, None]) ** 2 + (bx - cx[:, None]) ** 2).max(axis=1))
        cy, cx = cy.astype(np.float64), cx.astype(np.float64)
        rad = rad.astype(np.float64) + 1e-3  # float32 rounding
        scy = cy.reshape(ns, 4).mean(axis=1)
        scx = cx.reshape(ns, 4).mean(axis=1)
        off = np.hypot(cy - np.repeat(scy, 4), cx - np.repeat(scx, 4))
        srad = (rad + off).reshape(ns, 4).max(axis=1)  # covers every pixel of the superblock

        ntree = self.tree.n
        kq = min(24, ntree)
        q = np.stack([scy, scx, np.full(ns, zq), np.zeros(ns)], axis=1)
        dist, idx = self.tree.query(q, k=kq)
        sbound = dist[:, 2] + 2 * srad
        scount = (dist <= sbound[:, None]).sum(axis=1)
        if kq < ntree and (scount >= kq).any():  # rare: more candidates than the query gave
            crowded = np.nonzero(scount >= kq)[0]
            k2 = min(4 * kq, ntree)
            while True:
                d_more, i_more = self.tree.query(q[crowded], k=k2)
                if k2 == ntree or (d_more[:, -1] > sbound[crowded]).all():
                    break
                k2 = min(4 * k2, ntree)
            idx = np.concatenate([idx, np.zeros((ns, k2 - kq), idx.dtype)], axis=1)
            dist = np.concatenate([dist, np.full((ns, k2 - kq), np.inf)], axis=1)
            idx[crowded], dist[crowded] = i_more, d_more
            scount[crowded] = (d_more <= sbound[crowded, None]).sum(axis=1)
        ks = int(scount.max())
        idx = idx[:, :ks].astype(np.int32)

        # per block: its superblock's candidates, ranked by distance from the block's centre
        bidx = np.repeat(idx, 4, axis=0)  # (nb, ks)
        valid = np.arange(ks)[None, :] < np.repeat(scount, 4)[:, None]
        dc = np.sqrt(
            (cy[:, None] - self.sy[bidx]) ** 2 + (cx[:, None] - self.sx[bidx]) ** 2 + dz2[bidx]
        )
        dc[~valid] = np.inf
        rank = np.argsort(dc, axis=1, kind="stable")
        dc = np.take_along_axis(dc, rank, axis=1)
        cand = np.take_along_axis(bidx, rank, axis=1)
        ncand = (dc <= (dc[:, 2] + 2 * rad)[:, None]).sum(axis=1)
        # blocks with more than 2**_KBITS candidates (only for tiny cells): query every pixel
        huge = ncand > (1 << _KBITS)
        ncand[huge] = 0

        order = np.argsort(-ncand, kind="stable")
        py, px, cand = by[order], bx[order], cand[order]
        top = np.full((3, nb, B * B), np.iinfo(np.int32).max, np.int32)
        m1, m2, m3 = top
        clear = np.int32(~((1 << _KBITS) - 1))
        lo = np.empty((nb, B * B), np.int32)
        for k in range(int(ncand.max(initial=0))):
            n = int(np.count_nonzero(ncand > k))
            ck = cand[:n, k]
            d = py[:n] - self.sy[ck][:, None]
            d *= d
            e = px[:n] - self.sx[ck][:, None]
            e *= e
            d += e
            d += dz2[ck][:, None]
            v = d.view(np.int32)
            v &= clear
            v |= k
            # insert v into the sorted (m1, m2, m3) of the first n blocks
            np.minimum(m1[:n], v, out=lo[:n])
            np.maximum(m1[:n], v, out=v)
            m1[:n] = lo[:n]
            np.minimum(m2[:n], v, out=lo[:n])
            np.maximum(m2[:n], v, out=v)
            m2[:n] = lo[:n]
            np.minimum(m3[:n], v, out=m3[:n])
        # decode: candidate number -> flat index into the (nb, ks) candidate table
        kmask = (1 << _KBITS) - 1
        ks = cand.shape[1]
        flat = np.empty((3, nb, B * B), np.int32)
        np.bitwise_and(top, kmask, out=flat)
        flat += (np.arange(nb, dtype=np.int32) * ks)[None, :, None]
        top &= clear
        d = top.view(np.float32)
        cxy = self.sxy[cand].ravel()  # in-plane seed positions as complex numbers
        sxy = np.take(cxy, flat, mode="clip")  # (clip: rows of "huge" blocks are redone below)
        i1 = np.take(cand.ravel(), flat[0], mode="clip")
        if huge.any():
            sel = np.nonzero(huge[order])[0]
            m = py[sel].size
            pts = np.stack([py[sel].ravel(), px[sel].ravel(), np.full(m, zq), np.zeros(m)], axis=1)
            dd, ii = self.tree.query(pts, k=3)
            d[:, sel] = (dd.T**2).reshape(3, len(sel), B * B)
            sxy[:, sel] = self.sxy[ii.T].reshape(3, len(sel), B * B)
            i1[sel] = ii[:, 0].reshape(len(sel), B * B)

        # In-plane distance to the bisector line of the nearest and the second (third) nearest
        # seeds: (d_j^2 - d_1^2) / (2 |s_j - s_1|_xy), exact for a section of a power diagram;
        # then a smooth minimum of the two, which rounds the cells' corners.
        def bisector(j):
            sep = np.abs(sxy[j] - sxy[0])
            np.maximum(sep, 1e-3, out=sep)
            sep *= 2
            t = d[j] - d[0]
            t /= sep
            return t

        t = _smooth_min(bisector(1), bisector(2), _ROUND)
        del sxy, d, top, flat

        inv = np.empty_like(order)
        inv[order] = np.arange(nb)

        def unblock(a):
            return a[inv].reshape(hs, ws, 2, 2, B, B).transpose(0, 2, 4, 1, 3, 5).reshape(h, w)

        return unblock(t), unblock(i1)

    def _render_strip(self, z, zq, dz2, y0, y1, vesicles):
        ny, nx = self.shape[1:]
        B, H = 2 * _BLOCK, _HALO
        h = -(-(y1 - y0 + 2 * H) // B) * B
        w = -(-(nx + 2 * H) // B) * B
        ys = np.arange(y0 - H, y0 - H + h, dtype=np.float64)
        xs = np.arange(-H, -H + w, dtype=np.float64)
        zf = float(z)

        grid = (y0 - H, h, -H, w)
        dy, dx = self._displacement(zf, grid[:2], grid[2:], grid=True)
        wy = (ys[:, None] + dy).astype(np.float32)
        wx = (xs[None, :] + dx).astype(np.float32)
        del dy, dx
        t, i1 = self._boundary(wy, wx, zq, dz2)

        halfwidth = np.clip(_HALFWIDTH + 0.9 * self.width.grid(zf, *grid), 1.5, 4.0)
        membrane = t < halfwidth

        # interior: per-cell mean, smooth texture, slow illumination changes
        img = self.cell_mean[i1]
        tex = self.texture.grid(zf, *grid)
        tex *= _TEX2
        img += tex
        del tex

        # Organelles, faded out within 2 px of the labelled membrane so that they never darken it.
        # Mitochondria: darker ellipses with cristae and a dark rim, inside their cell.
        organelles = np.zeros((h, w), np.float32)
        hit = np.nonzero(self.mito[i1].ravel())[0]
        if len(hit):
            c = i1.ravel()[hit]
            ry = wy.ravel()[hit] - self.mito_cy[c]
            rx = wx.ravel()[hit] - self.mito_cx[c]
            u = rx * self.mito_cos[c] + ry * self.mito_sin[c]
            v = -rx * self.mito_sin[c] + ry * self.mito_cos[c]
            qz = ((zq - self.mito_cz[c]) ** 2 * self.mito_ic2[c]).astype(np.float32)
            qq = u * u * self.mito_ia2[c] + v * v * self.mito_ib2[c] + qz
            inner = np.clip((1.0 - qq) * 8.0, 0.0, 1.0)  # soft edge
            rim = np.exp(-(((qq - 0.9) / 0.12) ** 2))
            cristae = 0.5 + 0.5 * np.cos(u * (2 * np.pi / 5.0) + self.mito_phase[c])
            dark = self.mito_dark[c] * inner * (0.5 + 0.8 * cristae) + 40.0 * rim
            organelles.ravel()[hit] = dark

        # Vesicles: stamped dark rings and dots.
        vy, vx, kind, depth = vesicles
        sel = np.nonzero((vy >= y0 - H - _STAMP_R) & (vy < y0 - H + h + _STAMP_R))[0]
        if len(sel):
            py = vy[sel, None] + _STAMP_DY[None, :] - (y0 - H)
            px = vx[sel, None] + _STAMP_DX[None, :] + H
            vals = _STAMPS[kind[sel]].reshape(len(sel), -1) * depth[sel, None]
            ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
            stamp = np.bincount((py * w + px)[ok], vals[ok], minlength=h * w)
            organelles += stamp.reshape(h, w)
        organelles *= np.clip((t - halfwidth) * 0.5, 0.0, 1.0)
        img -= organelles
        del organelles

        # membranes: pull towards a dark level with a profile narrower than the labelled band
        contrast = np.clip(0.9 + 0.3 * (halfwidth - _HALFWIDTH), 0.55, 1.2)  # wider: darker
        s = 0.4 * halfwidth + 0.3
        prof = np.exp(-0.5 * (t / s) ** 2) * contrast
        img -= (img - _MEMBRANE_LEVEL) * np.minimum(prof, 1.0)

        # fine grain, deterministic per row band so strips agree in their halos
        img += _GRAIN_SD * self._grain(z, y0 - H, h, w)

        img = ndi.gaussian_filter(img, _BLUR_SIGMA, truncate=4.0, mode="nearest")
        out = img[H : H + (y1 - y0), H : H + nx]
        return np.ascontiguousarray(out), membrane[H : H + (y1 - y0), H : H + nx]

    def _grain(self, z: int, row0: int, h: int, w: int) -> np.ndarray:
        """White noise for rows row0..row0+h-1 (columns -H..), the same whichever strip asks."""
        band = 16
        b0 = math.floor(row0 / band)
        b1 = math.floor((row0 + h - 1) / band)
        parts = [
            np.random.default_rng([self.seed, _TAG_GRAIN, z, b + 1_000_000]).standard_normal(
                (band, w), dtype=np.float32
            )
            for b in range(b0, b1 + 1)
        ]
        g = np.concatenate(parts, axis=0)
        start = row0 - b0 * band
        return g[start : start + h]
