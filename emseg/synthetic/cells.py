"""The cell scene of one synthetic stack: where the cells are and what is in them.

Cells are the sections of a power diagram of random seeds in the anisotropic (y, x, ZSTEP * z)
space, each seed lifted into a 4th dimension: sparse big seeds with small lifts and dense small
seeds with large ones give the broad, skewed size distribution of ISBI's cell sections. Pixels
are warped by a smooth displacement before the nearest-seed query, so boundaries are wiggly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from emseg.synthetic.fields import SmoothField
from emseg.synthetic.params import (
    BIG_LIFT,
    BIG_SPACING,
    CELL_MEAN,
    CELL_MEAN_SD,
    LIGHT,
    MARGIN,
    MITO_P,
    ROUND,
    SMALL_LIFT,
    SMALL_SPACING,
    TAG_LIGHT,
    TAG_SEEDS,
    TAG_TEX1,
    TAG_TEX2,
    TAG_WARP_X,
    TAG_WARP_X2,
    TAG_WARP_Y,
    TAG_WARP_Y2,
    TAG_WIDTH,
    TEX1,
    TEX2,
    VESICLE_DENSITY,
    WARP,
    WARP_MAX,
    ZSTEP,
)

KBITS = 6  # low bits of a squared distance that carry its candidate number
BLOCK = 8  # pixels per side of the blocks that share one candidate list


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """min(a, b) less up to k/4 where |a - b| < k (polynomial smooth minimum; exact elsewhere)."""
    out = np.minimum(a, b)
    hh = np.abs(a - b)
    np.subtract(k, hh, out=hh)
    np.maximum(hh, 0.0, out=hh)
    hh *= hh
    hh *= 0.25 / k
    out -= hh
    return out


@dataclass(frozen=True)
class Mitochondria:
    """At most one mitochondrion per cell, arrays (n,) indexed by cell: an ellipsoid (long axis
    in the slice plane) with cristae and a dark rim, drawn only inside its own cell."""

    present: np.ndarray  # bool
    cy: np.ndarray  # float32 centre y
    cx: np.ndarray  # float32 centre x
    cz: np.ndarray  # float64 centre in the ZSTEP * z axis
    cos: np.ndarray  # float32 in-plane orientation
    sin: np.ndarray  # float32
    ia2: np.ndarray  # float32 inverse squared semi-axes
    ib2: np.ndarray  # float32
    ic2: np.ndarray  # float64
    dark: np.ndarray  # float32 darkening
    phase: np.ndarray  # float32 phase of the cristae


class CellScene:
    """Seeds, per-cell attributes and smooth fields of one synthetic stack of ``shape`` (Z, Y, X).

    Everything is drawn at construction from ``default_rng([seed, TAG_SEEDS])`` (in a fixed
    order) and from the fields' own streams. :meth:`displacement` warps pixel positions and
    :meth:`boundary` gives each warped pixel its cell and its distance to the cell's boundary.
    """

    def __init__(self, shape: tuple[int, int, int], seed: int, cell_size: float):
        self.shape = shape
        self.seed = seed
        nz, ny, nx = shape
        g = float(cell_size)
        rng = np.random.default_rng([seed, TAG_SEEDS])

        # Seeds in the anisotropic (y, x, ZSTEP * z) space, with a margin of 3 cells: two Poisson
        # populations, sparse "big" seeds and dense "small" ones, each lifted by h into a 4th
        # dimension. The slice h = 0 of the 4D Voronoi is a power diagram (squared distance
        # + h**2); the small seeds' larger lifts keep their cells small, which gives the broad,
        # skewed size distribution of ISBI's cell sections.
        lo = np.array([-3 * g, -3 * g, -3 * g])
        hi = np.array([ny + 3 * g, nx + 3 * g, (nz - 1) * ZSTEP + 3 * g])
        vol = float(np.prod(hi - lo))
        nbig = int(rng.poisson(vol / (g * BIG_SPACING) ** 3))
        nsmall = int(rng.poisson(vol / (g * SMALL_SPACING) ** 3))
        n = nbig + nsmall
        pts = lo + rng.random((n, 3)) * (hi - lo)
        lo_s, hi_s = SMALL_LIFT
        lift = g * np.concatenate([BIG_LIFT * rng.random(nbig), lo_s + (hi_s - lo_s) * rng.random(nsmall)])
        pts4 = np.concatenate([pts, lift[:, None]], axis=1)
        self.sy = pts[:, 0].astype(np.float32)
        self.sx = pts[:, 1].astype(np.float32)
        self.sz = pts[:, 2]
        self.sxy = (pts[:, 1] + 1j * pts[:, 0]).astype(np.complex64)
        self.lift2 = lift**2
        self.tree = cKDTree(pts4)
        self.ball = _inner_balls(pts, self.lift2, nbig)

        # Per-cell attributes: mean intensity (a few darker cells), vesicle density.
        dark_cell = rng.random(n) < 0.12
        mean = np.where(dark_cell, CELL_MEAN - 40.0, CELL_MEAN)
        self.cell_mean = (mean + CELL_MEAN_SD * rng.standard_normal(n)).astype(np.float32)
        self.vesicle_density = rng.lognormal(np.log(VESICLE_DENSITY), 1.2, n)
        self.vesicle_density *= rng.random(n) < 0.85  # some cells have none
        self.mito = _mitochondria(rng, pts, self.ball)

        yx = (ny, nx)
        # smooth fields; coarse octaves ride on finer ones (nested spacings)
        wy_coarse = SmoothField(seed, TAG_WARP_Y, yx, 36, 6.0)
        wx_coarse = SmoothField(seed, TAG_WARP_X, yx, 36, 6.0)
        self.warp_y = SmoothField(seed, TAG_WARP_Y2, yx, 12, 3.0, ((wy_coarse, WARP[0] / WARP[1]),))
        self.warp_x = SmoothField(seed, TAG_WARP_X2, yx, 12, 3.0, ((wx_coarse, WARP[0] / WARP[1]),))
        self.width = SmoothField(seed, TAG_WIDTH, yx, 40, 6.0)
        tex1 = SmoothField(seed, TAG_TEX1, yx, 16, 1.0)
        light = SmoothField(seed, TAG_LIGHT, yx, 160, 8.0)
        self.texture = SmoothField(seed, TAG_TEX2, yx, 4, 1.0, ((tex1, TEX1 / TEX2), (light, LIGHT / TEX2)))

    def displacement(self, z: float, ys, xs, grid: bool) -> tuple[np.ndarray, np.ndarray]:
        """Displacement (dy, dx) in px: on the grid ys = (y0, h) x xs = (x0, w) ((h, w) float32),
        or at the points (ys[i], xs[i]) ((n,) float64)."""
        if grid:
            dy = self.warp_y.grid(z, *ys, *xs)
            dx = self.warp_x.grid(z, *ys, *xs)
        else:
            dy = self.warp_y.points(z, ys, xs)
            dx = self.warp_x.points(z, ys, xs)
        dy *= WARP[1]
        dx *= WARP[1]
        return np.clip(dy, -WARP_MAX, WARP_MAX), np.clip(dx, -WARP_MAX, WARP_MAX)

    def boundary(self, wy: np.ndarray, wx: np.ndarray, zq: float, dz2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance to the cell boundary ``t`` (h, w) float32 and cell id ``i1`` (h, w) int32 of
        every pixel.

        (wy, wx) are the pixels' warped coordinates ((h, w) float32, h and w multiples of
        2 * BLOCK), zq the slice's position and dz2 (n,) float32 each seed's squared distance to
        the slice plus its squared lift. Needs each pixel's nearest three seeds, found exactly: a
        k-d tree query per superblock of 2 x 2 blocks gives every seed that can be among the
        nearest three of one of its pixels (d_j(C) <= d_3(C) + 2R, by the triangle inequality, for
        centre C and radius R); each block narrows that list to d_j(c) <= d_3(c) + 2r with its own
        centre and radius, and a vectorised brute force ranks the candidates for every pixel. To
        rank without index bookkeeping, a squared distance (float32 >= 0, whose bits order like
        int32) carries its candidate number in its lowest KBITS bits (a relative change below 1e-5).
        """
        h, w = wy.shape
        B = BLOCK
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
        dc = np.sqrt((cy[:, None] - self.sy[bidx]) ** 2 + (cx[:, None] - self.sx[bidx]) ** 2 + dz2[bidx])
        dc[~valid] = np.inf
        rank = np.argsort(dc, axis=1, kind="stable")
        dc = np.take_along_axis(dc, rank, axis=1)
        cand = np.take_along_axis(bidx, rank, axis=1)
        ncand = (dc <= (dc[:, 2] + 2 * rad)[:, None]).sum(axis=1)
        # blocks with more than 2**KBITS candidates (only for tiny cells): query every pixel
        huge = ncand > (1 << KBITS)
        ncand[huge] = 0

        order = np.argsort(-ncand, kind="stable")
        py, px, cand = by[order], bx[order], cand[order]
        top = np.full((3, nb, B * B), np.iinfo(np.int32).max, np.int32)
        m1, m2, m3 = top
        clear = np.int32(~((1 << KBITS) - 1))
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
        kmask = (1 << KBITS) - 1
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

        # a smooth minimum of the distances to the two nearest boundaries rounds the cells' corners
        t = smooth_min(_bisector(d, sxy, 1), _bisector(d, sxy, 2), ROUND)
        del sxy, d, top, flat

        inv = np.empty_like(order)
        inv[order] = np.arange(nb)

        def unblock(a):
            return a[inv].reshape(hs, ws, 2, 2, B, B).transpose(0, 2, 4, 1, 3, 5).reshape(h, w)

        return unblock(t), unblock(i1)


def _bisector(d: np.ndarray, sxy: np.ndarray, j: int) -> np.ndarray:
    """In-plane distance to the bisector line of the nearest and the j-th nearest seeds:
    (d_j^2 - d_1^2) / (2 |s_j - s_1|_xy), exact for a section of a power diagram. ``d`` (3, ...)
    float32 are the squared distances to the nearest three seeds, ``sxy`` (3, ...) complex64 their
    in-plane positions."""
    sep = np.abs(sxy[j] - sxy[0])
    np.maximum(sep, 1e-3, out=sep)
    sep *= 2
    t = d[j] - d[0]
    t /= sep
    return t


def _inner_balls(pts: np.ndarray, lift2: np.ndarray, nbig: int) -> np.ndarray:
    """Radius (n,) float64 of the ball around each big seed (in the 3D h = 0 space) inside its cell.

    The least distance to its power bisectors (|D|^2 + h_j^2 - h_i^2) / (2|D|) over the 12
    nearest seeds, and a bound that holds for all farther ones. (The small seeds' lifts leave them
    no such ball worth having: 0, which is always a valid bound.) ``pts`` (n, 3) are the seeds,
    the first ``nbig`` of them big; ``lift2`` (n,) their squared lifts.
    """
    n = len(pts)
    tree3 = cKDTree(pts)
    kn = min(13, n)
    ball = np.zeros(n)
    for c0 in range(0, nbig, 65536):  # in chunks: bounded memory for huge stacks
        sl = slice(c0, min(nbig, c0 + 65536))
        dn, jn = tree3.query(pts[sl], k=kn)
        dn, jn = np.maximum(dn[:, 1:], 1e-6), jn[:, 1:]
        power = (dn**2 + lift2[jn] - lift2[sl, None]) / (2 * dn)
        far = (dn[:, -1] ** 2 - lift2[sl]) / (2 * dn[:, -1])
        ball[sl] = np.maximum(np.minimum(power.min(axis=1), far), 0.0)
    return ball


def _mitochondria(rng: np.random.Generator, pts: np.ndarray, ball: np.ndarray) -> Mitochondria:
    """One ellipsoid in some of the big cells, long axis in the slice plane, sized by the seed's
    ball less the widest membrane (drawn only inside its own cell and faded out before the
    membrane, so a bigger one is only flattened against it). ``pts`` (n, 3) are the seeds."""
    n = len(pts)
    a = rng.uniform(10.0, 24.0, n)
    b = rng.uniform(7.0, 13.0, n)
    a = np.minimum(a, 1.4 * (ball - MARGIN))
    b = np.minimum(b, 0.75 * a)
    c = b * rng.uniform(1.0, 3.0, n)
    has = (rng.random(n) < MITO_P) & (b >= 4.0)
    off_len = 0.3 * ball * rng.random(n) ** (1 / 3)
    off_dir = rng.standard_normal((n, 3))
    off_dir /= np.linalg.norm(off_dir, axis=1, keepdims=True)
    mc = pts + off_len[:, None] * off_dir
    theta = rng.uniform(0, np.pi, n)
    return Mitochondria(
        present=has,
        cy=mc[:, 0].astype(np.float32),
        cx=mc[:, 1].astype(np.float32),
        cz=mc[:, 2],
        cos=np.cos(theta).astype(np.float32),
        sin=np.sin(theta).astype(np.float32),
        ia2=(1 / np.maximum(a, 1e-3) ** 2).astype(np.float32),
        ib2=(1 / np.maximum(b, 1e-3) ** 2).astype(np.float32),
        ic2=1 / np.maximum(c, 1e-3) ** 2,
        dark=rng.uniform(35.0, 60.0, n).astype(np.float32),
        phase=rng.uniform(0, 2 * np.pi, n).astype(np.float32),
    )
