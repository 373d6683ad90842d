"""The U-Net pixel weight map of Ronneberger, Fischer & Brox (2015), numpy/scipy only.

.. math::

    w(x) = w_c(x) + w_0 \\exp\\left(-\\frac{(d_1(x) + d_2(x))^2}{2\\sigma^2}\\right)

* ``w_c`` balances the classes: ``w_c(x) = 1 / (n * f(x))`` where ``f(x)`` is the fraction of
  the slice's pixels that share ``x``'s class and ``n`` the number of classes present (2 in
  any ordinary slice, giving the paper's ``0.5 / f``). ``w_c`` therefore has mean exactly 1;
  a slice with a single class gets ``w_c = 1`` everywhere (no division by zero).
* ``d1``/``d2`` are the Euclidean distances (in pixels) to the nearest and second-nearest
  *cell*, the cells being the 4-connected components of ``label != 0`` (label 1 = cell
  interior, 0 = membrane). A pixel inside a cell is at distance 0 from its own cell.
* **Choice:** the border term is added to membrane pixels (``label == 0``) only, as most
  reference implementations do, not to every pixel as the paper's formula reads literally.
  Its purpose is to make the network learn the thin membranes separating touching cells;
  cell pixels keep ``w_c``. Pixels with fewer than two cells in range get no border term.

Speed: the border term is negligible once ``d1 + d2`` exceeds the cut-off

.. math::

    R = \\sigma \\sqrt{2 \\ln(1 / \\varepsilon)},\\qquad \\varepsilon = 10^{-4}

(``w0 * exp(-R^2 / (2 sigma^2)) = eps * w0``; R = 21.46 px for sigma = 5). Both ``d1`` and
``d2`` are at most ``R`` wherever the term matters, so :func:`unet_weight_map` computes each
cell's distance transform only inside the cell's bounding box dilated by ``ceil(R)`` pixels
(every pixel within distance ``R`` of the cell lies inside it, and the whole cell does, so the
distances there are exact) and keeps running minima ``d1 <= d2``. Where the true
``d1 + d2 <= R`` the result is exact; elsewhere both the true and the computed term are below
``eps * w0`` (the computed ``d1``/``d2`` can only be larger than the true ones), so
``|fast - reference| <= eps * w0`` everywhere, up to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from emseg.config import TrainConfig

W0, SIGMA = TrainConfig.w0, TrainConfig.sigma  # the defaults are training's
#: How much of their rarity the classes other than membrane gain in weight (the share of class k
#: among them goes as ``count ** (1 - REST_POWER)``; 1 would weigh each of them the same in total).
REST_POWER = 0.5
#: Relative size (of w0) below which the border term is treated as zero by the fast version.
BORDER_EPS = 1e-4

#: 4-connectivity for cells (an immutable structuring element for ``ndimage.label``).
_FOUR_CONNECTED = ((0, 1, 0), (1, 1, 1), (0, 1, 0))


def border_cutoff(sigma: float = SIGMA, eps: float = BORDER_EPS) -> float:
    """The distance sum R (pixels) beyond which ``exp(-R^2 / (2 sigma^2)) < eps``."""
    return float(sigma * math.sqrt(2.0 * math.log(1.0 / eps)))


def _check(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {label.shape}")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise ValueError(f"label must have an integer or bool dtype, got {label.dtype}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if w0 < 0:
        raise ValueError(f"w0 must be non-negative, got {w0}")
    return label != 0


def _balance(counts: np.ndarray, classes: list[int], total: float, power: float) -> dict[int, float]:
    """Per-pixel weights of ``classes`` (those with pixels) whose pixels weigh ``total`` in all,
    class k's share proportional to ``counts[k] ** (1 - power)`` (power 1: every class the same)."""
    present = [k for k in classes if counts[k]]
    shares = {k: counts[k] ** (1.0 - power) for k in present}
    norm = sum(shares.values())
    return {k: total * shares[k] / (norm * counts[k]) for k in present}


def _class_weights(cell: np.ndarray, balance: bool) -> np.ndarray:
    """(H, W) bool cell mask -> (H, W) float64 class-balance weights with mean 1."""
    if not balance:
        return np.ones(cell.shape, dtype=np.float64)
    n_cell = int(np.count_nonzero(cell))
    counts = np.array([cell.size - n_cell, n_cell], np.float64)  # membrane, cell
    weights = _balance(counts, [0, 1], float(cell.size), 1.0)
    if len(weights) < 2:
        return np.ones(cell.shape, dtype=np.float64)
    return np.where(cell, weights[1], weights[0])


def _combine(cell: np.ndarray, d1: np.ndarray, d2: np.ndarray, w0: float, sigma: float, balance: bool) -> np.ndarray:
    """Class weights plus the border term on membrane pixels -> (H, W) float32."""
    w = _class_weights(cell, balance)
    membrane = ~cell
    s = d1[membrane] + d2[membrane]  # inf where fewer than two cells are in range
    w[membrane] += w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))
    return w.astype(np.float32)


def unet_weight_map(label: np.ndarray, *, w0: float = W0, sigma: float = SIGMA, balance: bool = True) -> np.ndarray:
    """The U-Net weight map of one slice, exact within the cut-off (see the module docstring).

    label: (H, W) {0, 1} of any integer or bool dtype (every non-zero value counts as cell,
    so 0/255 labels work too). Returns (H, W) float32 weights, ``w_c + border``; the border
    term is added to membrane (label 0) pixels only. Agrees with
    :func:`unet_weight_map_reference` within ``1e-4 * w0`` (plus float32 rounding).
    """
    cell = _check(label, w0, sigma)
    h, w = cell.shape
    d1 = np.full((h, w), np.inf)
    d2 = np.full((h, w), np.inf)
    cells, n = ndi.label(cell, structure=_FOUR_CONNECTED)
    if n >= 2 and w0 > 0:
        r = int(math.ceil(border_cutoff(sigma)))
        for k, box in enumerate(ndi.find_objects(cells), start=1):
            if box is None:
                continue
            ys, xs = box
            win = (
                slice(max(ys.start - r, 0), min(ys.stop + r, h)),
                slice(max(xs.start - r, 0), min(xs.stop + r, w)),
            )
            # Distance to cell k; the whole cell lies inside the window, so this is exact.
            dk = ndi.distance_transform_edt(cells[win] != k)
            d1w = d1[win]
            d2w = d2[win]
            np.minimum(d2w, np.maximum(d1w, dk), out=d2w)
            np.minimum(d1w, dk, out=d1w)
    return _combine(cell, d1, d2, w0, sigma, balance)


def unet_weight_map_reference(
    label: np.ndarray, *, w0: float = W0, sigma: float = SIGMA, balance: bool = True
) -> np.ndarray:
    """Slow direct computation (one full-image EDT per cell, no cut-off), for tests.

    Same conventions as :func:`unet_weight_map`: (H, W) {0, 1} label -> (H, W) float32.
    """
    cell = _check(label, w0, sigma)
    d1 = np.full(cell.shape, np.inf)
    d2 = np.full(cell.shape, np.inf)
    cells, n = ndi.label(cell, structure=_FOUR_CONNECTED)
    for k in range(1, n + 1):
        dk = ndi.distance_transform_edt(cells != k)
        d2 = np.minimum(d2, np.maximum(d1, dk))
        d1 = np.minimum(d1, dk)
    return _combine(cell, d1, d2, w0, sigma, balance)


def class_weight_map(
    label: np.ndarray,
    n_classes: int,
    membrane: int | None,
    *,
    w0: float = W0,
    sigma: float = SIGMA,
    rest_power: float = REST_POWER,
) -> np.ndarray:
    """The U-Net weight map generalised to classes 1..``n_classes`` (0 = unlabelled).

    label: (H, W) uint8 class numbers. Returns (H, W) float32: 0 on unlabelled pixels, mean
    exactly 1 over the labelled ones.

    * Without a ``membrane`` class every class present weighs the same in total (``w_k = 1 /
      (n f_k)``, ``f_k`` the share of class k among the slice's labelled pixels, ``n`` the
      classes present).
    * With one, the weights are those of the binary map first: membrane and the rest weigh half
      each, exactly as :func:`unet_weight_map` weighs membrane against cell, plus the paper's
      border term on the membrane, the cells being the 4-connected components of every other
      labelled class (what a membrane separates: cell interior, mitochondria, ... of one cell
      are one region). The rest's half is then shared among its classes in proportion to
      ``count ** (1 - rest_power)`` (0.5: rare classes gain by the square root of their rarity,
      not by all of it). So the membrane decision is learned as a membrane-only model
      learns it, and a rare class (synapses: a fraction of a percent of the pixels) cannot
      outweigh the membranes between touching cells.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {label.shape}")
    counts = np.bincount(label.ravel(), minlength=n_classes + 1)[: n_classes + 1].astype(np.float64)
    labelled = counts[1:].sum()
    if labelled == 0:
        return np.zeros(label.shape, np.float32)
    classes = list(range(1, n_classes + 1))
    rest = [k for k in classes if k != membrane]
    weights: dict[int, float]
    if membrane is None or not counts[membrane] or not counts[rest].sum():
        weights = _balance(counts, classes, labelled, 1.0)
    else:
        weights = {membrane: labelled / (2 * counts[membrane])}
        weights.update(_balance(counts, rest, labelled / 2, rest_power))
    table = np.zeros(256, np.float64)
    for k, w in weights.items():
        table[k] = w
    out = table[label]
    if membrane is not None and w0 > 0:
        inside = (label > 0) & (label != membrane)
        border = unet_weight_map(inside, w0=w0, sigma=sigma, balance=False) - 1.0  # the term, on ~inside
        is_membrane = label == membrane
        out[is_membrane] += border[is_membrane]
    return out.astype(np.float32)


def weight_maps(labels: np.ndarray, **kw: Any) -> np.ndarray:
    """(Z, H, W) {0, 1} labels -> (Z, H, W) float32 weight maps, slice by slice.

    Keyword arguments go to :func:`unet_weight_map`. Compute once per stack and cache: the
    maps depend on the labels only, not on the augmentation.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (Z, H, W), got shape {labels.shape}")
    out = np.empty(labels.shape, dtype=np.float32)
    for z in range(labels.shape[0]):
        out[z] = unet_weight_map(labels[z], **kw)
    return out


__all__ = [
    "BORDER_EPS",
    "REST_POWER",
    "border_cutoff",
    "class_weight_map",
    "unet_weight_map",
    "unet_weight_map_reference",
    "weight_maps",
]
