"""Tests of emseg.metrics: ISBI 2012 Rand / information scores, pixel error, IoU, Dice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.metrics import adapted_rand_error

from emseg.evaluation.metrics import (
    DEFAULT_THRESHOLDS,
    SCORE_NAMES,
    Scores,
    dice,
    evaluate_arrays,
    iou,
    pixel_error,
    rand_info_scores,
    slice_scores,
    thinned_segmentation,
)

ISBI_LABELS = Path("/work/shared/data/isbi2012/train-labels.tif")
FOUR = ndi.generate_binary_structure(2, 1)


def columns_truth(width: int = 10, n_cells: int = 3, rows: int = 10) -> np.ndarray:
    """(rows, n_cells * (width + 1) - 1) uint8: ``n_cells`` cells of ``width`` columns side by
    side, separated by one-pixel membrane columns."""
    truth = np.ones((rows, n_cells * (width + 1) - 1), dtype=np.uint8)
    truth[:, width :: width + 1] = 0
    return truth


labels_2d = st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).integers(0, 4, (5, 6)))


def entropy(sizes: list[int]) -> float:
    """Entropy (nats) of a partition with these segment sizes."""
    n = sum(sizes)
    return -sum(s / n * math.log(s / n) for s in sizes)


# --- thresholds and thinning ----------------------------------------------------------------


def test_default_thresholds_are_the_eleven_exact_decimals():
    assert DEFAULT_THRESHOLDS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_thinning_keeps_cells_and_leaves_one_pixel_lines():
    cells = np.zeros((9, 11), dtype=bool)
    cells[:, :3] = True  # cell A, then a 5-pixel membrane band, then cell B
    cells[:, 8:] = True
    labels = thinned_segmentation(cells)
    assert labels.dtype == np.int32 and labels.shape == cells.shape
    assert set(np.unique(labels[:, :3])) == {labels[0, 0]} != {labels[0, -1]}
    # the band is split by a single line in its middle column, the rest is flooded
    assert (labels[:, 5] == 0).all()
    assert (labels[:, 3:5] == labels[0, 0]).all() and (labels[:, 6:8] == labels[0, -1]).all()


def test_thinning_of_an_even_band_still_separates_the_cells():
    cells = np.zeros((6, 8), dtype=bool)
    cells[:, :3] = True
    cells[:, 5:] = True  # 2-pixel membrane band: one side of it becomes the line
    labels = thinned_segmentation(cells)
    assert ((labels[:, 3] == 0) ^ (labels[:, 4] == 0)).all()
    assert (labels != 0).sum() == cells.size - cells.shape[0]


def test_thinning_degenerate_masks():
    assert (thinned_segmentation(np.zeros((4, 5), bool)) == 1).all()  # Fiji: one flat basin
    assert (thinned_segmentation(np.ones((4, 5), bool)) == 1).all()
    with pytest.raises(ValueError, match="Y, X"):
        thinned_segmentation(np.ones((2, 4, 5), bool))


def assert_valid_thinning(cells: np.ndarray, labels: np.ndarray) -> None:
    reference, _ = ndi.label(cells, structure=FOUR)
    # the cells keep their 4-connected components (same partition, maybe other ids)
    pairs = np.unique(np.stack([reference[cells], labels[cells]]), axis=1)
    assert len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]
    assert (labels[cells] > 0).all()
    # lines only on the membrane, and no two different labels are 4-neighbours
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        assert not ((a > 0) & (b > 0) & (a != b)).any()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(4, 24), st.integers(4, 24), st.floats(0.2, 0.8))
def test_thinning_properties(seed, height, width, fraction):
    cells = np.random.default_rng(seed).random((height, width)) < fraction
    labels = thinned_segmentation(cells)
    if cells.any():
        assert_valid_thinning(cells, labels)
    else:
        assert (labels == 1).all()


# --- hand-made cases ---------------------------------------------------------------------------


def test_perfect_prediction_scores_one():
    truth = columns_truth()
    scores = evaluate_arrays(truth.astype(np.float32), truth)
    assert scores.v_rand == 1.0 and scores.v_rand_split == 1.0 and scores.v_rand_merge == 1.0
    assert scores.v_info == pytest.approx(1.0, abs=1e-12)
    assert scores.v_info_split == pytest.approx(1.0, abs=1e-12)
    assert scores.v_info_merge == pytest.approx(1.0, abs=1e-12)
    assert scores.pixel_error == 0.0 and scores.pixel_accuracy == 1.0
    assert scores.iou == 1.0 and scores.dice == 1.0
    labels, _ = ndi.label(truth, structure=FOUR)
    assert rand_info_scores(labels, labels) == pytest.approx(dict.fromkeys(SCORE_NAMES, 1.0))


def test_merge_of_two_cells_lowers_only_the_merge_parts():
    truth = columns_truth(n_cells=3)  # cells of 100 pixels at columns 0-9, 11-20, 22-31
    prob = np.ones(truth.shape, np.float32)
    prob[:, 21] = 0.0  # the prediction misses the membrane at column 10: cells 1 and 2 merge
    s = slice_scores(prob, truth, thresholds=[0.5])
    # sum p_ij^2 = 3 * 100^2, sum a_i^2 = 3 * 100^2, sum b_j^2 = 200^2 + 100^2
    assert s.v_rand_split == (1.0,)
    assert s.v_rand_merge == (pytest.approx(30000 / 50000),)
    assert s.v_rand == (pytest.approx(2 * 30000 / 80000),)
    # the prediction coarsens the truth: I = H(S), so split = 1 and merge = H(S) / H(T)
    assert s.v_info_split == (pytest.approx(1.0),)
    assert s.v_info_merge == (pytest.approx(entropy([200, 100]) / entropy([100, 100, 100])),)
    assert s.v_info[0] < 1.0


def test_split_of_one_cell_lowers_only_the_split_parts():
    truth = columns_truth(n_cells=2)  # cells A (columns 0-9) and B (columns 11-20)
    prob = truth.astype(np.float32)
    prob[:, 15] = 0.0  # a false membrane splits B into 4 + 5 columns and a 1-pixel line
    s = slice_scores(prob, truth, thresholds=[0.5])
    # each of the 10 line pixels inside B is a segment of its own
    sum_p2 = 100**2 + 40**2 + 50**2 + 10
    assert s.v_rand_merge == (1.0,)
    assert s.v_rand_split == (pytest.approx(sum_p2 / 20000),)
    assert s.v_rand == (pytest.approx(2 * sum_p2 / (20000 + sum_p2)),)
    # the prediction refines the truth: I = H(T), so merge = 1 and split = H(T) / H(S)
    h_s = entropy([100, 40, 50] + [1] * 10)
    assert s.v_info_merge == (pytest.approx(1.0),)
    assert s.v_info_split == (pytest.approx(entropy([100, 100]) / h_s),)


def test_one_predicted_segment_everywhere():
    truth = columns_truth(n_cells=3)
    # P(cell) = 1 everywhere: one segment at every threshold, including Fiji's last one
    # (0.1 added ten times is 0.9999999999999999 < 1.0, so P = 1.0 is still a cell there).
    scores = evaluate_arrays(np.ones(truth.shape, np.float32), truth)
    n, sum_a2 = 300, 3 * 100**2
    expected_rand = 2 * sum_a2 / (sum_a2 + n**2)  # = 0.5
    assert len(scores.per_threshold) == 11
    for row in scores.per_threshold:
        assert row["v_rand"] == pytest.approx(expected_rand)
        assert row["v_rand_split"] == 1.0
        assert row["v_rand_merge"] == pytest.approx(sum_a2 / n**2)
        # H(S) = 0: nothing is split (1.0), everything is merged (I = 0)
        assert row["v_info_split"] == 1.0 and row["v_info_merge"] == 0.0 and row["v_info"] == 0.0
    assert scores.v_rand_threshold == 0.0  # ties: the first threshold, as Fiji's strict ">"
    # without any cell (P = 0 is not > 0) Fiji floods the slice as one basin: the same scores
    empty = slice_scores(np.zeros(truth.shape, np.float32), truth, thresholds=[0.0])
    assert empty.v_rand == (pytest.approx(expected_rand),)


def test_singleton_boundary_pixels():
    truth = np.ones((1, 4), np.int32)  # one ground-truth segment of 4 pixels
    pred = np.array([[1, 0, 0, 1]])
    fiji = rand_info_scores(truth, pred)
    # segments {0, 3}, {1}, {2}: sum p^2 = 4 + 1 + 1 = sum b^2, sum a^2 = 16
    assert fiji["v_rand_split"] == pytest.approx(6 / 16) and fiji["v_rand_merge"] == 1.0
    plain = rand_info_scores(truth, pred, boundary_as_singletons=False)
    # segments {0, 3}, {1, 2}: sum p^2 = 8 = sum b^2
    assert plain["v_rand_split"] == pytest.approx(8 / 16) and plain["v_rand_merge"] == 1.0


def test_degenerate_slices_give_numbers_not_nan():
    no_cells = evaluate_arrays(np.full((6, 6), 0.7, np.float32), np.zeros((6, 6), np.uint8))
    assert no_cells.v_rand == 1.0 and no_cells.v_info == 1.0  # nothing to split or merge
    one = np.ones((5, 5), np.uint8)
    single = evaluate_arrays(one.astype(np.float32), one)  # one cell, predicted as one
    assert single.v_rand == 1.0 and single.v_info == 1.0
    d = rand_info_scores(np.ones((3, 3), int), np.arange(9).reshape(3, 3) + 1)
    assert d["v_info"] == 0.0 and d["v_info_merge"] == 1.0 and d["v_info_split"] == 0.0
    assert all(math.isfinite(v) for v in d.values())


# --- pixel scores ------------------------------------------------------------------------------


def test_pixel_error_iou_dice_by_hand():
    truth = np.array([[1, 1, 0, 0]], np.uint8)
    prob = np.array([[0.9, 0.5, 0.6, 0.1]], np.float32)  # 0.5 is not > 0.5: membrane
    assert pixel_error(prob, truth) == pytest.approx(0.5)  # pixels 1 and 2 are wrong
    assert iou(prob, truth) == pytest.approx(1 / 3)
    assert dice(prob, truth) == pytest.approx(2 * 1 / (2 + 2))
    assert pixel_error(prob, truth, threshold=0.55) == pytest.approx(0.5)
    assert pixel_error(prob, truth, threshold=0.05) == pytest.approx(0.5)
    assert pixel_error(prob, truth, threshold=0.65) == pytest.approx(0.25)
    scores = evaluate_arrays(prob, truth, threshold=0.65)
    assert scores.pixel_error == pytest.approx(0.25)
    assert scores.pixel_accuracy == pytest.approx(0.75)
    nothing = np.zeros((2, 2))
    assert iou(nothing, nothing) == 1.0 and dice(nothing, nothing) == 1.0


# --- against scikit-image ----------------------------------------------------------------------


def blocks(rng: np.random.Generator, shape: tuple[int, int], n_labels: int, scale: int) -> np.ndarray:
    """Random labels 0..n_labels-1 on a ``shape`` grid of ``scale`` x ``scale`` blocks."""
    return np.kron(rng.integers(0, n_labels, shape), np.ones((scale, scale), dtype=np.int64))


@pytest.mark.parametrize("seed", range(4))
def test_v_rand_matches_skimage_adapted_rand_error(seed):
    """skimage counts pairs of distinct pixels, n_ij (n_ij - 1), where Fiji counts n_ij^2: the two
    agree within K / (n - K) (K ground-truth segments). Pixels excluded from the ground truth
    (label 0) are left out by both; no pixel of the prediction is 0, so no singletons."""
    rng = np.random.default_rng(seed)
    truth = blocks(rng, (6, 6), 5, 40)  # label 0 = excluded, labels 1..4 = segments
    pred = blocks(rng, (3, 3), 3, 80) + 1  # coarser than the truth: merges dominate
    ours = rand_info_scores(truth, pred)
    are, sk_precision, sk_recall = adapted_rand_error(truth, pred)
    n = int((truth > 0).sum())
    tolerance = 2 * 4 / (n - 4)
    assert ours["v_rand"] == pytest.approx(1 - are, abs=tolerance)
    # skimage's "precision" divides by the ground truth's pairs: it is the split score (its
    # precision and recall are swapped, scikit-image issue #6485); its "recall" is the merge score
    assert ours["v_rand_split"] == pytest.approx(sk_precision, abs=tolerance)
    assert ours["v_rand_merge"] == pytest.approx(sk_recall, abs=tolerance)
    # and the comparison is not vacuous: split and merge differ
    assert abs(ours["v_rand_split"] - ours["v_rand_merge"]) > 10 * tolerance
    assert rand_info_scores(truth, pred, boundary_as_singletons=False) == ours


def fiji_scores(truth_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """Literal transcription of Fiji's RandError.getForegroundRestrictedRandIndexStatsN2 and
    VariationOfInformation.foregroundRestrictedFscore (Trainable_Segmentation), non-degenerate
    case: ground-truth label 0 pruned, prediction label 0 = one segment per pixel."""
    p1, p2 = truth_labels.ravel(), pred_labels.ravel()
    n = np.count_nonzero(p1)
    pij = np.zeros((p1.max() + 1, p2.max() + 1))
    np.add.at(pij, (p1, p2), 1)
    pij /= n
    ai, bj, aux = pij[1:].sum(axis=1), pij[1:, 1:].sum(axis=0), pij[1:, 0].sum()
    sum_a2, sum_b2 = ai @ ai, bj @ bj + aux / n
    sum_ab2 = (pij[1:, 1:] ** 2).sum() + aux / n

    def xlogx(v: np.ndarray) -> float:
        return float((v[v > 0] * np.log(v[v > 0])).sum())

    sum_a, sum_b = xlogx(ai), xlogx(bj) - aux * math.log(n)
    sum_ab = xlogx(pij[1:, 1:]) - aux * math.log(n)
    ha, hb, hab, hba = -sum_a, -sum_b, sum_b - sum_ab, sum_a - sum_ab
    return {
        "rand_precision": sum_ab2 / sum_b2,
        "rand_recall": sum_ab2 / sum_a2,
        "info_precision": (ha - hab) / ha,
        "info_recall": (hb - hba) / hb,
        "h_truth": ha,
        "h_pred": hb,
    }


@settings(max_examples=30, deadline=None)
@given(labels_2d, labels_2d)
def test_scores_follow_fiji_formulas(truth, pred):
    """Fiji's "precision" is the merge score, its "recall" the split score, for both metrics."""
    assume((truth > 0).any())
    fiji = fiji_scores(truth, pred)
    assume(fiji["h_truth"] > 1e-9 and fiji["h_pred"] > 1e-9)  # degenerate cases differ (doc)
    ours = rand_info_scores(truth, pred)
    assert ours["v_rand_merge"] == pytest.approx(fiji["rand_precision"])
    assert ours["v_rand_split"] == pytest.approx(fiji["rand_recall"])
    assert ours["v_info_merge"] == pytest.approx(fiji["info_precision"], abs=1e-12)
    assert ours["v_info_split"] == pytest.approx(fiji["info_recall"], abs=1e-12)
    for name in ("rand", "info"):
        p, r = fiji[f"{name}_precision"], fiji[f"{name}_recall"]
        f_score = 2 * p * r / (p + r) if p + r > 0 else 0.0
        assert ours[f"v_{name}"] == pytest.approx(f_score, abs=1e-12)


# --- thresholds --------------------------------------------------------------------------------


def test_best_threshold_is_reported_with_its_value():
    truth = columns_truth(n_cells=3)
    prob = np.where(truth == 1, 0.75, 0.25).astype(np.float32)
    scores = evaluate_arrays(prob, truth)
    rows = scores.per_threshold
    assert [row["threshold"] for row in rows] == list(DEFAULT_THRESHOLDS)
    assert all(set(row) == {"threshold", *SCORE_NAMES} for row in rows)
    # t < 0.25: one segment (merged); 0.25 <= t < 0.75: perfect; t >= 0.75: no cell, one basin
    assert rows[2]["v_rand"] < 1.0 and rows[3]["v_rand"] == 1.0 and rows[8]["v_rand"] < 1.0
    assert scores.v_rand_threshold == 0.3 and scores.v_rand == 1.0
    assert scores.v_info_threshold == 0.3 and scores.v_info == pytest.approx(1.0)
    best = max(rows, key=lambda row: row["v_rand"])
    assert scores.v_rand == best["v_rand"] and scores.v_rand_split == best["v_rand_split"]
    custom = evaluate_arrays(prob, truth, thresholds=[0.9, 0.5])
    assert len(custom.per_threshold) == 2 and custom.v_rand_threshold == 0.5


def test_scores_to_dict_is_json_ready():
    truth = columns_truth()
    scores = evaluate_arrays(truth.astype(np.float32) * 0.8, truth)
    data = json.loads(json.dumps(scores.to_dict()))
    assert data["n_slices"] == 1 and len(data["per_threshold"]) == 11
    assert set(data) == {f for f in Scores.__dataclass_fields__}
    assert data["v_rand"] == scores.v_rand


def test_stacks_average_over_slices():
    truth = columns_truth(n_cells=3)
    good = truth.astype(np.float32)
    merged = np.ones(truth.shape, np.float32)
    stack = evaluate_arrays(np.stack([good, merged]), np.stack([truth, truth]), thresholds=[0.5])
    assert stack.n_slices == 2
    assert stack.v_rand == pytest.approx((1.0 + 0.5) / 2)


def test_bad_inputs_raise_value_errors():
    truth = columns_truth()
    prob = truth.astype(np.float32)
    with pytest.raises(ValueError, match="shape"):
        evaluate_arrays(prob, truth[:, :-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_arrays(prob * 255, truth)
    with pytest.raises(ValueError, match="0 = membrane"):
        evaluate_arrays(prob, truth * 255)
    with pytest.raises(ValueError, match="Z, Y, X"):
        evaluate_arrays(prob[None, None], truth[None, None])
    with pytest.raises(ValueError, match="thresholds"):
        evaluate_arrays(prob, truth, thresholds=[1.5])
    with pytest.raises(ValueError, match="shape"):
        rand_info_scores(truth, truth[:1])


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels_2d, labels_2d, st.booleans())
def test_scores_in_unit_interval_and_label_invariant(truth, pred, singletons):
    scores = rand_info_scores(truth, pred, boundary_as_singletons=singletons)
    assert set(scores) == set(SCORE_NAMES)
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    renamed = np.array([7, 3, 11, 5])[pred] * (pred > 0)  # same segments, other ids (0 kept)
    assert rand_info_scores(truth, renamed, boundary_as_singletons=singletons) == pytest.approx(scores)


@settings(max_examples=30, deadline=None)
@given(labels_2d, labels_2d)
def test_swapping_truth_and_prediction_swaps_split_and_merge(a, b):
    a, b = a + 1, b + 1  # no excluded pixel and no boundary: the definitions are symmetric
    ab, ba = rand_info_scores(a, b), rand_info_scores(b, a)
    assert ab["v_rand"] == pytest.approx(ba["v_rand"])
    assert ab["v_rand_split"] == pytest.approx(ba["v_rand_merge"])
    assert ab["v_info"] == pytest.approx(ba["v_info"])
    assert ab["v_info_split"] == pytest.approx(ba["v_info_merge"])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_evaluate_random_inputs_stays_in_range(seed, depth):
    rng = np.random.default_rng(seed)
    truth = (rng.random((depth, 7, 9)) < 0.7).astype(np.uint8)
    prob = rng.random((depth, 7, 9)).astype(np.float32)
    scores = evaluate_arrays(prob, truth)
    values = [v for row in scores.per_threshold for k, v in row.items() if k != "threshold"]
    values += [scores.v_rand, scores.v_info, scores.pixel_error, scores.iou, scores.dice]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert scores.v_rand == max(row["v_rand"] for row in scores.per_threshold)
    assert scores.v_info == max(row["v_info"] for row in scores.per_threshold)
    assert scores.n_slices == depth


# --- the real ISBI labels ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def isbi_labels() -> np.ndarray:
    if not ISBI_LABELS.exists():
        pytest.skip(f"{ISBI_LABELS} is absent")
    tifffile = pytest.importorskip("tifffile")
    return tifffile.imread(ISBI_LABELS)[[0, 15, 29]]  # (3, 512, 512) uint8, 255 = cell


def test_isbi_labels_as_prediction_score_one(isbi_labels):
    truth = (isbi_labels == 255).astype(np.uint8)
    prob = isbi_labels.astype(np.float32) / 255
    scores = evaluate_arrays(prob, truth)
    assert scores.v_rand >= 0.999 and scores.v_info >= 0.999
    assert scores.pixel_error == 0.0 and scores.n_slices == 3
    assert all(row["v_rand"] >= 0.999 for row in scores.per_threshold)  # also at Fiji's "1.0"


def test_isbi_degraded_prediction_scores_lower(isbi_labels):
    truth = (isbi_labels == 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    blurred = np.stack([ndi.gaussian_filter(s.astype(np.float32) / 255, 3) for s in isbi_labels])
    noisy = np.clip(blurred + rng.normal(0, 0.2, blurred.shape), 0, 1).astype(np.float32)
    scores = evaluate_arrays(noisy, truth)
    assert 0.0 < scores.v_rand < 0.99 and 0.0 < scores.v_info < 0.99
    assert 0.0 < scores.pixel_error < 0.5
