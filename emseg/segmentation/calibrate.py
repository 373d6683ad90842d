"""Segmentation settings chosen on the user's own labelled slices.

:func:`calibrate` segments only the labelled slices, for a grid of seedings (seed threshold x min
distance), and scores every merge threshold and minimum size of each against the ground truth
with the foreground-restricted V_rand that ``emseg evaluate`` gives the result. It is cheap
because the mean agglomeration is a merge tree: one agglomeration per seeding
(:func:`~emseg.segmentation.agglomerate.merge_tree`), then every merge threshold is a cut of it,
and a cut is scored from tables made once per seeding (:class:`_Scorer`), without relabelling a
pixel. The map itself competes: the best of the ISBI thresholds of P(cell), as ``emseg evaluate``
scores it; when no setting beats it, the cells are that threshold's thinned components (the
``components`` setting), so the cells never score below the map on the slices that chose them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from emseg.config import SEGMENT_DEFAULTS, SegmentConfig
from emseg.errors import BadInputError
from emseg.probability import DEFAULT_THRESHOLDS, FOUR, check_both_classes, fiji_cells, thinned_segmentation
from emseg.segmentation.agglomerate import _absorb_small, cut_tree, merge_tree, region_edges
from emseg.segmentation.watershed import fragments

log = logging.getLogger(__name__)

#: The grid searched: every seeding x merge threshold x minimum size.
SEED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
MIN_DISTANCES = (1, 2, 4, 6)
MERGE_THRESHOLDS = tuple(round(0.3 + 0.02 * i, 2) for i in range(35))  # 0.30 ... 0.98
MIN_SIZES = (1, 50, 100, 200, 400)
#: Merge-threshold steps on either side whose scores judge a setting with it (see :func:`_search`).
PLATEAU = 3


@dataclass(frozen=True)
class Calibration:
    """The settings chosen on labelled slices and what they scored there (mean V_rand over the
    slices, as ``emseg evaluate`` scores a segmentation)."""

    #: seed_threshold, min_distance, merge_threshold, min_size and components (None, or the
    #: threshold of P(cell) whose components are the cells).
    settings: dict[str, Any]
    v_rand: float
    #: The best ISBI threshold of P(cell) and its V_rand on the same slices.
    map_threshold: float
    map_v_rand: float
    #: What the built-in defaults scored there.
    defaults_v_rand: float
    #: The slices scored, as indices of the labelled store.
    slices: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: How many settings were scored.
    settings_scored: int = 0

    @property
    def fallback(self) -> bool:
        return self.settings.get("components") is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fallback": self.fallback}


def calibrate(
    prob: np.ndarray,
    truth: np.ndarray,
    *,
    mode: str = SegmentConfig.mode,
    seeds: str = SegmentConfig.seeds,
    voxel_size: Sequence[float] | None = None,
    slices: Sequence[int] = (),
) -> Calibration:
    """The settings that maximise the mean V_rand of the cells of ``prob`` ((Z, Y, X) uint8 P(cell))
    against ``truth`` ((Z, Y, X), cells > 0, membrane 0), segmented as ``emseg segment`` would in
    ``mode`` with ``seeds`` (3d: with the distances of ``voxel_size``, z y x); see the module docstring."""
    start = time.perf_counter()
    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.dtype != np.uint8 or prob.ndim != 3 or prob.shape != truth.shape:
        raise BadInputError(f"calibration needs (Z, Y, X) uint8 P(cell) and truth of one shape, got {prob.shape}")
    check_both_classes(truth, "calibration")
    truths = [ndi.label(t > 0, structure=FOUR)[0] for t in truth]
    map_threshold, map_v_rand, _ = _best_map(prob, truths)
    defaults = SEGMENT_DEFAULTS
    grid = {(t, d) for t in SEED_THRESHOLDS for d in MIN_DISTANCES} | {
        (defaults["seed_threshold"], defaults["min_distance"])
    }
    seedings = {key: _Seeding(prob, truths, key[0], key[1], mode, seeds, voxel_size) for key in sorted(grid)}
    default_seeding = seedings[defaults["seed_threshold"], defaults["min_distance"]]
    defaults_v_rand = default_seeding.score(defaults["merge_threshold"], defaults["min_size"])
    v_rand, settings = _search(seedings)
    if not v_rand > map_v_rand:  # never below the map: its own thresholded cells
        settings = {**settings, "components": map_threshold}
        log.info(
            "no segmentation setting beats P(cell)'s best threshold on the labelled slices (V_rand %.4f <= %.4f): "
            "the cells are the connected components of P(cell) > %.1f",
            v_rand,
            map_v_rand,
            map_threshold,
        )
        v_rand = map_v_rand
    return Calibration(
        settings, float(v_rand), float(map_threshold), float(map_v_rand), float(defaults_v_rand),
        [int(s) for s in slices], round(time.perf_counter() - start, 3),
        len(seedings) * len(MERGE_THRESHOLDS) * len(MIN_SIZES),
    )  # fmt: skip


def _search(seedings: dict[tuple[float, int], _Seeding]) -> tuple[float, dict[str, Any]]:
    """(V_rand, settings) of the setting whose neighbourhood scores best: every seeding x merge
    threshold x minimum size is scored, and each is judged by the mean score of the merge
    thresholds within :data:`PLATEAU` steps of it. A V_rand curve over a few slices is a
    staircase (one merge more or less moves a slice by 0.01-0.1), and its highest step is often
    a lucky one; the middle of a high plateau transfers to other slices better (benchmarks/README.md)."""
    best: tuple[float, float, tuple[float, int], float, int] | None = None
    for key, seeding in seedings.items():
        scores = seeding.grid(MERGE_THRESHOLDS, MIN_SIZES)
        plateau = ndi.uniform_filter1d(scores, size=2 * PLATEAU + 1, axis=0, mode="nearest")
        i, j = np.unravel_index(int(np.argmax(plateau)), plateau.shape)
        if best is None or plateau[i, j] > best[0]:
            best = (float(plateau[i, j]), float(scores[i, j]), key, MERGE_THRESHOLDS[i], MIN_SIZES[j])
    assert best is not None
    _, v_rand, (seed_threshold, min_distance), merge_threshold, min_size = best
    settings = {
        "seed_threshold": seed_threshold, "min_distance": min_distance, "merge_threshold": merge_threshold,
        "min_size": min_size, "components": None,
    }  # fmt: skip
    return v_rand, settings


def _best_map(prob: np.ndarray, truths: list[np.ndarray]) -> tuple[float, float, list[float]]:
    """(threshold, mean V_rand, per-threshold scores) of P(cell)'s best ISBI threshold, the
    lowest of equal scores, as ``emseg evaluate`` chooses it."""
    prob32 = prob.astype(np.float32) / np.float32(255.0)
    scores = []
    for t in DEFAULT_THRESHOLDS:
        labels = np.stack([thinned_segmentation(fiji_cells(p, t)) for p in prob32])
        scores.append(_Scorer(labels, truths, lines=False).score(np.arange(int(labels.max()) + 1)))
    best = int(np.argmax(scores))
    return DEFAULT_THRESHOLDS[best], float(scores[best]), scores


class _Seeding:
    """One seeding of the labelled slices: its fragments, their merge tree and the scorer of cuts."""

    def __init__(
        self,
        prob: np.ndarray,
        truths: list[np.ndarray],
        seed_threshold: float,
        min_distance: int,
        mode: str,
        seeds: str,
        voxel_size: Sequence[float] | None,
    ) -> None:
        if mode == "3d":
            sampling = tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
            frags, heights = fragments(prob, seed_threshold, min_distance, sampling, seeds)
        else:  # each slice its own fragments, numbered on from the last slice's: one graph, no edge between slices
            frags, heights = np.zeros(prob.shape, np.int64), np.empty_like(prob)
            top = 0
            for z in range(prob.shape[0]):
                f, heights[z] = fragments(prob[z], seed_threshold, min_distance, None, seeds)
                frags[z] = f + top
                top += int(f.max())
        self.n = int(frags.max()) + 1
        self.sizes = np.bincount(frags.reshape(-1), minlength=self.n)
        planes = [(frags, heights)] if mode == "3d" else list(zip(frags, heights, strict=True))
        edges = [region_edges(f, h) for f, h in planes]  # in 2d mode no edge between slices
        self.pairs, self.sums, self.counts = (np.concatenate(parts) for parts in zip(*edges, strict=True))
        _, self.merges, self.heights = merge_tree(self.n, self.pairs, self.sums, self.counts)
        self.scorer = _Scorer(frags, truths, lines=True)

    def score(self, merge_threshold: float, min_size: int) -> float:
        return float(self.per_slice(merge_threshold, min_size).mean())

    def per_slice(self, merge_threshold: float, min_size: int) -> np.ndarray:
        lut = cut_tree(self.n, self.merges, self.heights, merge_threshold)
        return self.scorer.per_slice(self._absorbed(lut, min_size))

    def grid(self, merge_thresholds: Sequence[float], min_sizes: Sequence[int]) -> np.ndarray:
        """(thresholds, sizes) mean V_rand: :meth:`score` of each pair, each tree cut once."""
        out = np.empty((len(merge_thresholds), len(min_sizes)))
        for i, t in enumerate(merge_thresholds):
            lut = cut_tree(self.n, self.merges, self.heights, t)
            out[i] = [self.scorer.score(self._absorbed(lut, size)) for size in min_sizes]
        return out

    def _absorbed(self, lut: np.ndarray, min_size: int) -> np.ndarray:
        if min_size > 1 and len(self.pairs):
            return _absorb_small(self.sizes, lut, self.pairs, self.sums, self.counts, min_size)
        return lut


class _Scorer:
    """The mean V_rand over slices of ``lut[labels]`` against the truth, as ``emseg evaluate``
    scores a segmentation (:func:`emseg.evaluation.instances.score_instances`: a one-pixel line
    where two objects meet, each line pixel inside a true cell a segment of its own), for any
    ``lut`` of the labels, from tables made once: the true-cell pixels whose right and lower
    neighbours have their label are counted per (label, true cell); only the others are looked at
    per ``lut``. With ``lines=False`` the labels are scored as they are (a thinned map, whose 0
    lines are already drawn)."""

    def __init__(self, labels: np.ndarray, truths: list[np.ndarray], lines: bool) -> None:
        n_truth = [int(t.max()) for t in truths]
        offsets = np.concatenate([[0], np.cumsum(n_truth)])
        self.slice_of_truth = np.repeat(np.arange(len(truths)), n_truth)
        self.n_slices = len(truths)
        sum_a2 = np.zeros(len(truths))
        inner_keys, edge = [], []
        for z, t in enumerate(truths):
            lab = labels[z].astype(np.int64)
            right, down = lab.copy(), lab.copy()
            if lines:
                right[:, :-1], down[:-1] = lab[:, 1:], lab[1:]
            inside = t > 0
            gt = t[inside] - 1 + offsets[z]  # global true-cell ids from 0
            sum_a2[z] = float(np.square(np.bincount(t[inside])[1:].astype(np.float64)).sum())
            same = (lab[inside] == right[inside]) & (lab[inside] == down[inside]) & (lab[inside] != 0)
            inner_keys.append(np.stack([lab[inside][same], gt[same]], axis=1))
            edge.append(np.stack([lab[inside][~same], right[inside][~same], down[inside][~same], gt[~same]], axis=1))
        self.sum_a2 = sum_a2
        self.n_truth = int(offsets[-1])
        inner = np.concatenate(inner_keys)
        keys, self.inner_counts = np.unique(inner[:, 0] * max(self.n_truth, 1) + inner[:, 1], return_counts=True)
        self.inner_label, self.inner_truth = np.divmod(keys, max(self.n_truth, 1))
        # the pixels of one border inside one true cell share a row: count each row once
        e, self.edge_counts = np.unique(np.concatenate(edge), axis=0, return_counts=True)
        self.edge_label, self.edge_right, self.edge_down, self.edge_truth = e.T

    def score(self, lut: np.ndarray) -> float:
        """Mean V_rand over the slices of the labels relabelled by ``lut`` (label -> object, 0 kept 0)."""
        return float(self.per_slice(lut).mean())

    def per_slice(self, lut: np.ndarray) -> np.ndarray:
        """V_rand of each slice of the labels relabelled by ``lut``."""
        lut = np.asarray(lut, np.int64)
        lut = np.where(np.arange(lut.size) == 0, -1, lut)  # label 0 (no object) is never an object
        own = lut[self.edge_label]
        line = (own != lut[self.edge_right]) & (lut[self.edge_right] != -1)
        line |= (own != lut[self.edge_down]) & (lut[self.edge_down] != -1)
        line |= own == -1
        slices = self.slice_of_truth
        n0 = np.bincount(slices[self.edge_truth[line]], weights=self.edge_counts[line], minlength=self.n_slices)
        obj = np.concatenate([lut[self.inner_label], own[~line]])
        tru = np.concatenate([self.inner_truth, self.edge_truth[~line]])
        weight = np.concatenate([self.inner_counts, self.edge_counts[~line]])
        k = int(obj.max()) + 1 if obj.size else 1
        key = tru * k + obj
        pair, inverse = np.unique(key, return_inverse=True)
        n_ij = np.bincount(inverse, weights=weight).astype(np.float64)
        pair_truth, pair_obj = np.divmod(pair, k)
        pair_slice = slices[pair_truth]
        sum_ab2 = np.bincount(pair_slice, weights=n_ij * n_ij, minlength=self.n_slices)
        per_obj_slice, inv2 = np.unique(pair_obj * self.n_slices + pair_slice, return_inverse=True)
        b = np.bincount(inv2, weights=n_ij)
        sum_b2 = np.bincount(per_obj_slice % self.n_slices, weights=b * b, minlength=self.n_slices)
        denominator = self.sum_a2 + sum_b2 + n0
        return np.where(self.sum_a2 > 0, 2.0 * (sum_ab2 + n0) / np.maximum(denominator, 1e-300), 1.0)


def describe_settings(settings: dict[str, Any]) -> str:
    """The settings of a calibration or a ``segmentation`` provenance block, in words."""
    if settings.get("components") is not None:
        return f"the components of P(cell) > {settings['components']:g} (no watershed setting beat them)"
    return (
        f"seed threshold {settings['seed_threshold']:g}, min distance {settings['min_distance']}, "
        f"merge threshold {settings['merge_threshold']:g}, min size {settings['min_size']}"
    )


def describe_calibration(record: dict[str, Any]) -> str:
    """What a calibration scored, in words."""
    return (
        f"V_rand {record['v_rand']:.4f} on slices {record['slices']} (P(cell) at {record['map_threshold']:g}: "
        f"{record['map_v_rand']:.4f}; emseg's defaults: {record['defaults_v_rand']:.4f})"
    )


__all__ = ["Calibration", "calibrate", "describe_calibration", "describe_settings"]
