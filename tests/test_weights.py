"""Tests of emseg.training.weights: the U-Net weight map, fast (cut-off) versus direct."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

from emseg.training.weights import (
    BORDER_EPS,
    border_cutoff,
    unet_weight_map,
    unet_weight_map_reference,
    weight_maps,
)

ISBI_LABELS = Path("/work/shared/data/isbi2012/train-labels.tif")


def _tolerance(w0: float) -> float:
    """|fast - reference| bound: the neglected border term (< 1e-4 * w0 beyond the cut-off,
    see the module docstring) plus float32 rounding of weights up to ~w0 + a few."""
    return 1e-4 * w0 + 1e-6 * (w0 + 10.0)


def _brute_force(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The formula evaluated by explicit loops over pixels and cell pixels (tiny images)."""
    cell = label != 0
    cells, n = ndi.label(cell, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    f1 = cell.mean()
    w = np.where(cell, 0.5 / f1 if f1 > 0 else 1.0, 0.5 / (1 - f1) if f1 < 1 else 1.0)
    if f1 in (0.0, 1.0):
        w = np.ones(label.shape)
    coords = [np.argwhere(cells == k) for k in range(1, n + 1)]
    for y, x in np.argwhere(~cell):
        d = sorted(float(np.sqrt(((c - (y, x)) ** 2).sum(axis=1)).min()) for c in coords)
        if len(d) >= 2:
            w[y, x] += w0 * math.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return w.astype(np.float32)


def _blobs(rng: np.random.Generator, shape: tuple[int, int], smooth: float, level: float) -> np.ndarray:
    """Random cell-like {0, 1} uint8 label: smoothed noise thresholded."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), smooth)
    return (noise > level * noise.std()).astype(np.uint8)


def _two_cells(h: int = 40, w: int = 60, gap: int = 1) -> np.ndarray:
    """Two rectangular cells side by side separated by a vertical membrane `gap` px wide."""
    label = np.zeros((h, w), dtype=np.uint8)
    mid = w // 2
    label[5 : h - 5, 5:mid] = 1
    label[5 : h - 5, mid + gap : w - 5] = 1
    return label


def test_cutoff_value() -> None:
    r = border_cutoff(5.0)
    assert BORDER_EPS <= 1e-4
    assert r == pytest.approx(21.46, abs=0.01)
    assert math.exp(-(r**2) / (2 * 25.0)) == pytest.approx(BORDER_EPS)


@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    label = _blobs(rng, (14, 17), 1.2, 0.0)
    for w0, sigma in [(10.0, 5.0), (7.0, 2.0)]:
        ref = unet_weight_map_reference(label, w0=w0, sigma=sigma)
        np.testing.assert_allclose(ref, _brute_force(label, w0, sigma), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "label",
    [
        _two_cells(gap=1),
        _two_cells(gap=3),
        _two_cells(h=30, w=120, gap=35),  # cells far apart: beyond the cut-off
        np.pad(np.ones((3, 3), np.uint8), 20),  # a single cell
        np.eye(12, dtype=np.uint8),  # diagonal pixels: 12 separate 4-connected cells
    ],
    ids=["gap1", "gap3", "gap35", "single", "diagonal"],
)
def test_fast_matches_reference_hand_made(label: np.ndarray) -> None:
    for w0, sigma in [(10.0, 5.0), (5.0, 3.0), (10.0, 8.0)]:
        fast = unet_weight_map(label, w0=w0, sigma=sigma)
        ref = unet_weight_map_reference(label, w0=w0, sigma=sigma)
        np.testing.assert_allclose(fast, ref, rtol=0, atol=_tolerance(w0))


@pytest.mark.parametrize("seed", range(6))
def test_fast_matches_reference_random(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(60, 140)), int(rng.integers(60, 140)))
    smooth, level = float(rng.uniform(1.5, 3.5)), float(rng.uniform(-0.3, 0.6))
    label = _blobs(rng, shape, smooth=smooth, level=level)
    for balance in (True, False):
        fast = unet_weight_map(label, balance=balance)
        ref = unet_weight_map_reference(label, balance=balance)
        assert fast.dtype == np.float32 and fast.shape == label.shape
        np.testing.assert_allclose(fast, ref, rtol=0, atol=_tolerance(10.0))
    # Make sure the case is non-trivial: several cells, a border term present somewhere.
    assert ndi.label(label)[1] >= 3 and ref.max() > 3.0


@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 48), st.integers(1, 48))))
def test_fast_matches_reference_property(label: np.ndarray) -> None:
    fast = unet_weight_map(label)
    ref = unet_weight_map_reference(label)
    assert np.isfinite(fast).all()
    np.testing.assert_allclose(fast, ref, rtol=0, atol=_tolerance(10.0))


def test_thin_membrane_between_touching_cells_is_heavy() -> None:
    label = _two_cells(h=40, w=60, gap=1)
    w = unet_weight_map(label)
    wc = unet_weight_map(label, w0=0.0)
    membrane_line = w[10:30, 30]  # the 1-px membrane between the two cells
    # d1 = d2 = 1 px there: border term w0 * exp(-4 / 50) = 9.23.
    np.testing.assert_allclose(membrane_line - wc[10:30, 30], 10 * math.exp(-4 / 50), rtol=1e-5)
    assert membrane_line.min() > wc.max() + 9.0
    # The outer membrane (next to one cell only, > 20 px from the other) gets ~no border term.
    outer = w[20, 0:3]
    assert np.all(outer - wc[20, 0:3] < 1e-2)
    # Far from any cell: exactly the class weight.
    big = np.zeros((120, 120), np.uint8)
    big[:30, :50] = 1
    big[:30, 51:] = 1
    wb = unet_weight_map(big)
    np.testing.assert_array_equal(wb[80:, :], unet_weight_map(big, w0=0.0)[80:, :])
    assert wb[0:20, 50].min() > 9.0
    # Cells touching only at a corner are separate (4-connectivity): the membrane pixels
    # beside the corner lie at distance 1 from both.
    diag = np.zeros((20, 20), np.uint8)
    diag[:10, :10] = 1
    diag[10:, 10:] = 1
    wd = unet_weight_map(diag, balance=False)
    assert wd[9, 10] == pytest.approx(1.0 + 10 * math.exp(-4 / 50), rel=1e-6)


def test_class_balance_mean_is_one() -> None:
    rng = np.random.default_rng(7)
    label = _blobs(rng, (200, 150), 3.0, -0.6)  # mostly cell, like EM
    f = label.mean()
    wc = unet_weight_map(label, w0=0.0)
    assert wc.mean() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(wc[label == 1], 0.5 / f, rtol=1e-6)
    np.testing.assert_allclose(wc[label == 0], 0.5 / (1 - f), rtol=1e-6)
    assert np.all(unet_weight_map(label, w0=0.0, balance=False) == 1.0)
    # With balance off, the membrane weight is 1 + border term (>= 1), cells exactly 1.
    wu = unet_weight_map(label, balance=False)
    assert np.all(wu[label == 1] == 1.0) and np.all(wu >= 1.0)


@pytest.mark.parametrize("fill", [0, 1])
def test_all_cell_and_no_cell_slices(fill: int) -> None:
    label = np.full((64, 48), fill, dtype=np.uint8)
    for fn in (unet_weight_map, unet_weight_map_reference):
        w = fn(label)
        assert w.dtype == np.float32 and np.isfinite(w).all()
        np.testing.assert_array_equal(w, 1.0)


def test_single_cell_has_no_border_term() -> None:
    label = np.zeros((50, 50), np.uint8)
    label[10:30, 10:30] = 1
    w = unet_weight_map(label)
    np.testing.assert_array_equal(w, unet_weight_map(label, w0=0.0))
    assert np.isfinite(w).all()


def test_label_dtypes_and_255() -> None:
    rng = np.random.default_rng(3)
    label = _blobs(rng, (80, 90), 2.5, 0.0)
    expected = unet_weight_map(label)
    for variant in (label.astype(bool), label.astype(np.int64), label * np.uint8(255)):
        np.testing.assert_array_equal(unet_weight_map(variant), expected)


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        unet_weight_map(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError):
        unet_weight_map(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        unet_weight_map(np.zeros((4, 4), np.uint8), sigma=0.0)
    with pytest.raises(ValueError):
        weight_maps(np.zeros((4, 4), np.uint8))


def test_weight_maps_stack() -> None:
    rng = np.random.default_rng(11)
    stack = np.stack([_blobs(rng, (70, 60), 2.0, 0.2) for _ in range(3)])
    maps = weight_maps(stack, sigma=4.0)
    assert maps.shape == stack.shape and maps.dtype == np.float32
    for z in range(3):
        np.testing.assert_array_equal(maps[z], unet_weight_map(stack[z], sigma=4.0))


def test_isbi_slice_fast_matches_reference(record_property: pytest.RecordProperty) -> None:
    if not ISBI_LABELS.exists():
        pytest.skip(f"{ISBI_LABELS} not present")
    tifffile = pytest.importorskip("tifffile")
    label = tifffile.imread(ISBI_LABELS, key=0) > 0  # (512, 512), 255 = cell
    t0 = time.perf_counter()
    fast = unet_weight_map(label)
    t1 = time.perf_counter()
    ref = unet_weight_map_reference(label)
    t2 = time.perf_counter()
    record_property("weight_map_fast_s", t1 - t0)  # timing is recorded, never asserted
    record_property("weight_map_reference_s", t2 - t1)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=_tolerance(10.0))
    assert fast.mean() > 1.0  # class weights average 1, the border term adds to it
    assert fast[label].max() < 1.0 < fast[~label].min()  # ISBI is mostly cell
