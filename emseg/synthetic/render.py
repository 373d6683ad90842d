"""Rendering one slice of a :class:`~emseg.synthetic.cells.CellScene`: membranes, organelles,
texture, grain, blur and noise.

A slice is rendered in horizontal strips of about STRIP_PIXELS pixels with a halo of HALO rows,
so the blur is exact and the result does not depend on the strips: memory is bounded by one
slice's outputs and a strip's working arrays.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from emseg.synthetic.cells import BLOCK, CellScene
from emseg.synthetic.params import (
    BLUR_SIGMA,
    GRAIN_SD,
    HALFWIDTH,
    HALO,
    MEMBRANE_LEVEL,
    NOISE_SD,
    ROUND,
    TAG_GRAIN,
    TAG_NOISE,
    TAG_VESICLES,
    TEX2,
    VESICLE_DENSITY_MAX,
    ZSTEP,
)

STRIP_PIXELS = 1 << 19  # target pixels per strip (bounds the working memory)


def _make_stamps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dark-blob kernels (n, 15, 15) float32 with peak 1 (rings of radius 1.8-3.4 px and filled
    dots), their radii (n,) and the kernels' pixel offsets dy, dx (225,)."""
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

Vesicles = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def render_slice(scene: CellScene, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``z`` of the scene: raw (Y, X) uint8 and label (Y, X) uint8 (255 = cell, 0 = membrane)."""
    ny, nx = scene.shape[1:]
    zq = z * ZSTEP
    dz2 = ((scene.sz - zq) ** 2 + scene.lift2).astype(np.float32)
    vesicles = _vesicles(scene, z, zq)
    raw = np.empty((ny, nx), np.uint8)
    lab = np.empty((ny, nx), np.uint8)
    noise_rng = np.random.default_rng([scene.seed, TAG_NOISE, z])
    rows = min(max(BLOCK, (STRIP_PIXELS // (nx + 2 * HALO)) // BLOCK * BLOCK), ny)
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        img, membrane = _render_strip(scene, z, zq, dz2, y0, y1, vesicles)
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * NOISE_SD
        np.clip(img, 0, 255, out=img)
        raw[y0:y1] = np.rint(img)
        lab[y0:y1] = np.where(membrane, 0, 255)
    return raw, lab


def _vesicles(scene: CellScene, z: int, zq: float) -> Vesicles:
    """Vesicles of slice z: pixel rows, columns (int64), kernel index and depth (float32), (m,) each.

    Candidates are uniform in the slice at the densest cells' density; each is kept with
    probability (its cell's density / that maximum) if it lies at least its radius plus the
    local membrane half-width from the boundary (exact distance at the warped position).
    """
    ny, nx = scene.shape[1:]
    rng = np.random.default_rng([scene.seed, TAG_VESICLES, z])
    r = _STAMP_R
    area = (ny + 2 * r) * (nx + 2 * r)
    m = rng.poisson(VESICLE_DENSITY_MAX * area)
    py = rng.uniform(-r, ny + r, m)
    px = rng.uniform(-r, nx + r, m)
    kind = rng.integers(0, len(_STAMPS), m)
    depth = rng.uniform(35.0, 85.0, m).astype(np.float32)
    accept = rng.random(m)
    if m:
        dy, dx = scene.displacement(float(z), py, px, grid=False)
        pts = np.stack([py + dy, px + dx, np.full(m, zq), np.zeros(m)], axis=1)
        dd, ii = scene.tree.query(pts, k=2)
        d2 = dd**2
        sep = np.abs(scene.sxy[ii[:, 1]] - scene.sxy[ii[:, 0]])
        t = (d2[:, 1] - d2[:, 0]) / (2 * np.maximum(sep, 1e-3))
        half = np.clip(HALFWIDTH + 0.9 * scene.width.points(float(z), py, px), 1.5, 4.0)
        keep = (accept * VESICLE_DENSITY_MAX < scene.vesicle_density[ii[:, 0]]) & (
            t > half + _STAMP_RADIUS[kind] + ROUND / 4
        )
        py, px, kind, depth = py[keep], px[keep], kind[keep], depth[keep]
    return np.rint(py).astype(np.int64), np.rint(px).astype(np.int64), kind, depth


def _render_strip(
    scene: CellScene, z: int, zq: float, dz2: np.ndarray, y0: int, y1: int, vesicles: Vesicles
) -> tuple[np.ndarray, np.ndarray]:
    """Rows y0..y1-1 of slice z: the image (y1 - y0, X) float32 before noise and its membrane
    mask (y1 - y0, X) bool."""
    nx = scene.shape[2]
    B, H = 2 * BLOCK, HALO
    h = -(-(y1 - y0 + 2 * H) // B) * B
    w = -(-(nx + 2 * H) // B) * B
    ys = np.arange(y0 - H, y0 - H + h, dtype=np.float64)
    xs = np.arange(-H, -H + w, dtype=np.float64)
    zf = float(z)

    grid = (y0 - H, h, -H, w)
    dy, dx = scene.displacement(zf, grid[:2], grid[2:], grid=True)
    wy = (ys[:, None] + dy).astype(np.float32)
    wx = (xs[None, :] + dx).astype(np.float32)
    del dy, dx
    t, i1 = scene.boundary(wy, wx, zq, dz2)

    halfwidth = np.clip(HALFWIDTH + 0.9 * scene.width.grid(zf, *grid), 1.5, 4.0)
    membrane = t < halfwidth

    # interior: per-cell mean, smooth texture, slow illumination changes
    img = scene.cell_mean[i1]
    tex = scene.texture.grid(zf, *grid)
    tex *= TEX2
    img += tex
    del tex

    # Organelles, faded out within 2 px of the labelled membrane so that they never darken it.
    organelles = np.zeros((h, w), np.float32)
    _add_mitochondria(scene, organelles, i1, wy, wx, zq)
    _add_vesicles(organelles, vesicles, y0)
    organelles *= np.clip((t - halfwidth) * 0.5, 0.0, 1.0)
    img -= organelles
    del organelles

    # membranes: pull towards a dark level with a profile narrower than the labelled band
    contrast = np.clip(0.9 + 0.3 * (halfwidth - HALFWIDTH), 0.55, 1.2)  # wider: darker
    s = 0.4 * halfwidth + 0.3
    prof = np.exp(-0.5 * (t / s) ** 2) * contrast
    img -= (img - MEMBRANE_LEVEL) * np.minimum(prof, 1.0)

    # fine grain, deterministic per row band so strips agree in their halos
    img += GRAIN_SD * _grain(scene.seed, z, y0 - H, h, w)

    img = ndi.gaussian_filter(img, BLUR_SIGMA, truncate=4.0, mode="nearest")
    out = img[H : H + (y1 - y0), H : H + nx]
    return np.ascontiguousarray(out), membrane[H : H + (y1 - y0), H : H + nx]


def _add_mitochondria(
    scene: CellScene, organelles: np.ndarray, i1: np.ndarray, wy: np.ndarray, wx: np.ndarray, zq: float
) -> None:
    """Darken ``organelles`` (h, w) float32 with the mitochondria: darker ellipses with cristae
    and a dark rim, inside their cell (``i1`` (h, w), at the warped positions ``wy``, ``wx``)."""
    mito = scene.mito
    hit = np.nonzero(mito.present[i1].ravel())[0]
    if not len(hit):
        return
    c = i1.ravel()[hit]
    ry = wy.ravel()[hit] - mito.cy[c]
    rx = wx.ravel()[hit] - mito.cx[c]
    u = rx * mito.cos[c] + ry * mito.sin[c]
    v = -rx * mito.sin[c] + ry * mito.cos[c]
    qz = ((zq - mito.cz[c]) ** 2 * mito.ic2[c]).astype(np.float32)
    qq = u * u * mito.ia2[c] + v * v * mito.ib2[c] + qz
    inner = np.clip((1.0 - qq) * 8.0, 0.0, 1.0)  # soft edge
    rim = np.exp(-(((qq - 0.9) / 0.12) ** 2))
    cristae = 0.5 + 0.5 * np.cos(u * (2 * np.pi / 5.0) + mito.phase[c])
    dark = mito.dark[c] * inner * (0.5 + 0.8 * cristae) + 40.0 * rim
    organelles.ravel()[hit] = dark


def _add_vesicles(organelles: np.ndarray, vesicles: Vesicles, y0: int) -> None:
    """Add the vesicles' stamped dark rings and dots to ``organelles`` (h, w) float32, the strip
    whose first row (without its halo) is y0."""
    h, w = organelles.shape
    H = HALO
    vy, vx, kind, depth = vesicles
    sel = np.nonzero((vy >= y0 - H - _STAMP_R) & (vy < y0 - H + h + _STAMP_R))[0]
    if not len(sel):
        return
    py = vy[sel, None] + _STAMP_DY[None, :] - (y0 - H)
    px = vx[sel, None] + _STAMP_DX[None, :] + H
    vals = _STAMPS[kind[sel]].reshape(len(sel), -1) * depth[sel, None]
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    stamp = np.bincount((py * w + px)[ok], vals[ok], minlength=h * w)
    organelles += stamp.reshape(h, w)


def _grain(seed: int, z: int, row0: int, h: int, w: int) -> np.ndarray:
    """White noise (h, w) float32 for rows row0..row0+h-1 of slice z, the same whichever strip asks."""
    band = 16
    b0 = math.floor(row0 / band)
    b1 = math.floor((row0 + h - 1) / band)
    parts = [
        np.random.default_rng([seed, TAG_GRAIN, z, b + 1_000_000]).standard_normal((band, w), dtype=np.float32)
        for b in range(b0, b1 + 1)
    ]
    g = np.concatenate(parts, axis=0)
    start = row0 - b0 * band
    return g[start : start + h]
