"""ISBI 2012 segmentation metrics: foreground-restricted Rand and information scores after thinning.

The ISBI 2012 challenge (Arganda-Carreras et al. 2015, Frontiers in Neuroanatomy 9:142) ranked
membrane probability maps with Fiji's Trainable Segmentation metrics,
``RandError.getMaximalVRandAfterThinning(0.0, 1.0, 0.1, true)`` and
``VariationOfInformation.getMaximalVInfoAfterThinning(0.0, 1.0, 0.1)``
(``src/main/java/trainableSegmentation/metrics/RandError.java``, ``VariationOfInformation.java``,
``ClassificationStatistics.java``, ``InformationStatistics.java`` and
``utils/WatershedTransform2D.java`` in github.com/fiji/Trainable_Segmentation). This module
computes the same scores with numpy, scipy and scikit-image. Per slice and threshold ``t``:

* ground truth ``T``: the 4-connected components of ``truth == 1``; membrane pixels of the ground
  truth (``truth == 0``) are left out of every sum, and ``n`` is the number of cell pixels.
  (Fiji binarizes the 0/255 labels with the same ``> t``, which selects the 255s at every t.)
* prediction ``S``: the cells are the pixels with ``P(cell) > t`` (strict, as in Fiji, which
  compares the 32-bit float pixel with a double threshold; probabilities are therefore cast to
  float32 first). The 4-connected cells are grown over the membrane by a watershed that leaves a
  one-pixel line between them (Fiji: ``WatershedTransform2D`` on the inverted binary image with
  connectivity 4). Each line pixel inside a ground-truth cell is a segment of its own.
* with ``p_ij`` the fraction of the ``n`` pixels in ground-truth cell ``i`` and predicted segment
  ``j``, ``a_i`` (ground truth) and ``b_j`` (prediction) its marginals::

      V_rand_split = sum p_ij^2 / sum a_i^2      (Fiji's Rand "recall"; 1 = no split)
      V_rand_merge = sum p_ij^2 / sum b_j^2      (Fiji's Rand "precision"; 1 = no merge)
      V_rand       = 2 sum p_ij^2 / (sum a_i^2 + sum b_j^2)
      V_info_split = I(S;T) / H(S)               (Fiji's information "recall")
      V_info_merge = I(S;T) / H(T)               (Fiji's information "precision")
      V_info       = 2 I(S;T) / (H(S) + H(T))

  V_rand and V_info are the harmonic means of their split and merge parts (Fiji's F-scores).
* scores are computed per slice and averaged over slices (Fiji's macro average), for each
  threshold; the reported V_rand and V_info are the best slice-averaged scores over the
  thresholds, with the first (lowest) threshold reaching it, as Fiji's strict ``>`` search does.

Where this differs from Fiji:

* Fiji's threshold loop ``for (th = 0.0; th <= 1.0; th += 0.1)`` accumulates rounding error; for
  float32 probabilities only its last value matters: it is 0.9999999999999999, so at "1.0" the
  pixels with P = 1.0 are cells. For the eleven :data:`DEFAULT_THRESHOLDS` the comparison uses
  Fiji's loop values, reproducing this; any other threshold is used as given.
* the watershed is scikit-image's (``watershed_line=True``, connectivity 1) rather than Fiji's
  FIFO Soille-Vincent flooding. Both flood the flat membrane from the cells breadth-first and
  leave a line where two floods meet, but they break ties differently and scikit-image leaves a
  few percent more line pixels. Against a literal Python port of Fiji's code on ISBI slices the
  scores agree to about 2e-4 for smooth probability maps; for maps with pixel noise, whose lines
  are long and tangled, they come out lower by up to about 3e-3. With no cell at all Fiji's
  flooding makes the whole slice one basin; :func:`thinned_segmentation` does the same.
* degenerate cases return numbers, never NaN: a slice without ground-truth cell pixels scores
  1.0 everywhere (Fiji: NaN). When a segmentation is a single segment its entropy is 0; the
  split part ``I/H(S)`` is then 1.0 (nothing is split) and the merge part ``I/H(T)`` is 1.0 when
  ``T`` is a single segment, so a single ground-truth cell predicted as a single segment scores
  V_info = 1.0 (Fiji: 0). When only one of them is a single segment V_info = 0, as in Fiji.
* Fiji reports split/merge of the best threshold from pixel-pair counts summed over slices;
  here they are slice averages like V_rand and V_info.

Pixel error, IoU and Dice (cells = foreground) are computed over all pixels of all slices at one
threshold (default 0.5), with ``P(cell) > threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from emseg.errors import BadInputError
from emseg.probability import DEFAULT_THRESHOLDS, FOUR, fiji_cells, thinned_segmentation
from emseg.system import available_cpus

__all__ = [
    "DEFAULT_THRESHOLDS",
    "SCORE_NAMES",
    "Scores",
    "SliceScores",
    "class_scores",
    "dice",
    "evaluate_arrays",
    "iou",
    "pixel_error",
    "rand_info_scores",
    "slice_scores",
    "thinned_segmentation",
]

#: Keys of the dict returned by :func:`rand_info_scores`, in order.
SCORE_NAMES: tuple[str, ...] = (
    "v_rand",
    "v_rand_split",
    "v_rand_merge",
    "v_info",
    "v_info_split",
    "v_info_merge",
)

#: P(cell) above this is cell for the pixel metrics (pixel error, IoU, Dice): the ISBI challenge's
#: definition, not predict's --threshold.
CELL_AT = 0.5


# --- inputs -------------------------------------------------------------------------------------


def _as_prob(prob: np.ndarray, name: str = "prob") -> np.ndarray:
    """Return ``prob`` as float32, checking it is finite and in [0, 1]."""
    prob = np.asarray(prob)
    if prob.dtype == bool or not np.issubdtype(prob.dtype, np.number):
        raise BadInputError(f"{name} must be a float array of P(cell) in [0, 1], got {prob.dtype}")
    prob = prob.astype(np.float32, copy=False)
    if prob.size and not (np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0):
        raise BadInputError(
            f"{name} must hold P(cell) in [0, 1] (divide uint8 maps by 255); "
            f"got values in [{np.nanmin(prob)}, {np.nanmax(prob)}]"
        )
    return prob


def _as_truth(truth: np.ndarray) -> np.ndarray:
    """Return ``truth`` as a bool cell mask, checking its values are 0 and 1 only."""
    truth = np.asarray(truth)
    if truth.dtype == bool:
        return truth
    if not np.issubdtype(truth.dtype, np.number):
        raise BadInputError(f"truth must be a {{0, 1}} array, got dtype {truth.dtype}")
    cells = truth == 1
    if not (cells | (truth == 0)).all():
        raise BadInputError(
            "truth must hold 1 = cell and 0 = membrane only "
            f"(got values {np.unique(truth)[:6].tolist()}...; divide 0/255 labels by 255)"
        )
    return cells


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise BadInputError("thresholds must not be empty")
    if not all(0.0 <= t <= 1.0 for t in values):
        raise BadInputError(f"thresholds must lie in [0, 1], got {values}")
    return values


# --- scores from labels -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Truth:
    """The ground-truth side of one slice, shared by every threshold."""

    index: np.ndarray  # flat indices of the cell pixels, int64
    labels: np.ndarray  # ground-truth segment of each of them, 0..K-1, int64
    sizes: np.ndarray  # a_i: pixels per segment, int64 (K,)
    sum_a2: int  # sum a_i^2
    h: float  # H(T) in nats

    @property
    def n(self) -> int:
        return int(self.index.size)

    @classmethod
    def from_labels(cls, truth_labels: np.ndarray) -> _Truth:
        flat = np.asarray(truth_labels).ravel()
        index = np.flatnonzero(flat > 0)
        labels = _compact(flat[index])
        sizes = np.bincount(labels).astype(np.int64)
        n = index.size
        h = _entropy(sizes, n)
        return cls(index, labels, sizes, int(sizes @ sizes), h)


def _compact(values: np.ndarray) -> np.ndarray:
    """Map non-negative integer labels onto 0..K-1 (int64), cheaply when they are already dense."""
    values = values.astype(np.int64, copy=False)
    if values.size == 0:
        return values
    top = int(values.max())
    if top < 4 * values.size + 1024:
        present = np.bincount(values, minlength=top + 1) > 0
        return (np.cumsum(present) - 1)[values]
    return np.unique(values, return_inverse=True)[1].astype(np.int64).ravel()


def _entropy(sizes: np.ndarray, n: int) -> float:
    """Entropy (nats) of a partition of ``n`` items with these segment sizes (zeros ignored).

    Summed as ``sum (c/n) log(n/c)``: every term is >= 0, so a partition of more than one
    segment never rounds to zero entropy.
    """
    c = sizes[sizes > 0].astype(np.float64)
    return float(c @ (np.log(n) - np.log(c))) / n if n else 0.0


def _scores(truth: _Truth, pred: np.ndarray, singletons: bool) -> dict[str, float]:
    """Scores of one slice; ``pred``: predicted segment of each ground-truth cell pixel, >= 0."""
    n = truth.n
    if n == 0:
        return dict.fromkeys(SCORE_NAMES, 1.0)
    t = truth.labels
    if singletons:
        alone = pred == 0
        n0 = int(np.count_nonzero(alone))
        n0_per_truth = np.bincount(t[alone], minlength=truth.sizes.size)
        keep = ~alone
        t, pred = t[keep], pred[keep]
    else:
        n0 = 0
        n0_per_truth = np.zeros(truth.sizes.size, dtype=np.int64)
    s = _compact(pred)
    k_t, k_s = truth.sizes.size, (int(s.max()) + 1 if s.size else 0)
    b = np.bincount(s, minlength=k_s).astype(np.int64)  # predicted segment sizes b_j
    key = t * k_s + s
    if k_t * k_s <= max(4 * key.size, 1 << 22):
        table = np.bincount(key, minlength=k_t * k_s)
        cell = np.flatnonzero(table)
        n_ij = table[cell].astype(np.int64)
    else:
        cell, n_ij = np.unique(key, return_counts=True)
        n_ij = n_ij.astype(np.int64)
    row, col = np.divmod(cell, k_s) if k_s else (cell, cell)

    # Rand: each singleton adds 1 to sum n_ij^2 and to sum b_j^2 (Fiji's "+ sum(p_i0)/n").
    sum_ab2 = int(n_ij @ n_ij) + n0
    sum_b2 = int(b @ b) + n0
    sum_a2 = truth.sum_a2
    v_rand_split = sum_ab2 / sum_a2
    v_rand_merge = sum_ab2 / sum_b2
    v_rand = 2.0 * sum_ab2 / (sum_a2 + sum_b2)

    # Information, in nats; a singleton has probability 1/n.
    log_n = float(np.log(n))
    h_t = truth.h
    h_s = _entropy(b, n) + n0 * log_n / n
    log_a = np.log(truth.sizes.astype(np.float64))
    mutual = (
        float(n_ij @ (log_n + np.log(n_ij) - log_a[row] - np.log(b[col].astype(np.float64))))
        + float(n0_per_truth @ (log_n - log_a))
    ) / n
    single_s, single_t = not h_s > 0.0, not h_t > 0.0  # one segment: nothing to split / merge
    mutual = 0.0 if (single_s or single_t) else min(max(mutual, 0.0), h_s, h_t)
    v_info_split = 1.0 if single_s else mutual / h_s
    v_info_merge = 1.0 if single_t else mutual / h_t
    v_info = 1.0 if (single_s and single_t) else 2.0 * mutual / (h_s + h_t)
    return {
        "v_rand": v_rand,
        "v_rand_split": v_rand_split,
        "v_rand_merge": v_rand_merge,
        "v_info": v_info,
        "v_info_split": v_info_split,
        "v_info_merge": v_info_merge,
    }


def rand_info_scores(
    truth_labels: np.ndarray,
    pred_labels: np.ndarray,
    *,
    boundary_as_singletons: bool = True,
) -> dict[str, float]:
    """Foreground-restricted Rand and information scores of one labelled slice (or volume).

    ``truth_labels``: (Y, X) non-negative int segment ids, 0 = excluded (membrane).
    ``pred_labels``: same shape, non-negative int segment ids; 0 = boundary pixels, each of
    which is a segment of its own when ``boundary_as_singletons`` (Fiji's convention), or one
    ordinary segment otherwise (as in ``skimage.metrics.adapted_rand_error``).
    Returns the keys of :data:`SCORE_NAMES`, each in [0, 1]; see the module docstring.
    """
    truth_labels = np.asarray(truth_labels)
    pred_labels = np.asarray(pred_labels)
    if truth_labels.shape != pred_labels.shape:
        raise BadInputError(f"truth_labels {truth_labels.shape} and pred_labels {pred_labels.shape} differ in shape")
    for name, arr in (("truth_labels", truth_labels), ("pred_labels", pred_labels)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise BadInputError(f"{name} must be an integer label image, got {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise BadInputError(f"{name} must be non-negative")
    truth = _Truth.from_labels(truth_labels)
    pred = pred_labels.ravel()[truth.index].astype(np.int64, copy=False)
    return _scores(truth, pred, boundary_as_singletons)


# --- thresholds and slices ----------------------------------------------------------------------


@dataclass(frozen=True)
class SliceScores:
    """Rand and information scores of one slice at each threshold.

    Every field but ``thresholds`` is a tuple of floats in [0, 1], one per threshold.
    """

    thresholds: tuple[float, ...]
    v_rand: tuple[float, ...]
    v_rand_split: tuple[float, ...]
    v_rand_merge: tuple[float, ...]
    v_info: tuple[float, ...]
    v_info_split: tuple[float, ...]
    v_info_merge: tuple[float, ...]

    def as_array(self) -> np.ndarray:
        """(len(thresholds), 6) float64 array, columns in :data:`SCORE_NAMES` order."""
        return np.array([getattr(self, name) for name in SCORE_NAMES], dtype=np.float64).T


def slice_scores(
    prob: np.ndarray,
    truth: np.ndarray,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> SliceScores:
    """Rand and information scores of one slice at each threshold.

    ``prob``: (Y, X) float P(cell) in [0, 1]; ``truth``: (Y, X) {0, 1} (uint8 or bool),
    1 = cell interior, 0 = membrane.
    """
    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.ndim != 2 or prob.shape != truth.shape:
        raise BadInputError(f"prob {prob.shape} and truth {truth.shape} must be (Y, X) slices of one shape")
    thresholds = _check_thresholds(thresholds)
    return _score_slices(_as_prob(prob)[None], _as_truth(truth)[None], thresholds)[0]


def _workers(n_jobs: int) -> int:
    """Threads for the thinning: the watershed releases the GIL, so slices x thresholds can run
    side by side; at most 4, and no more than the CPUs this process may use."""
    return max(1, min(n_jobs, available_cpus(), 4))


def _score_slices(prob32: np.ndarray, cells_truth: np.ndarray, thresholds: tuple[float, ...]) -> list[SliceScores]:
    """Scores of each slice: ``prob32`` (Z, Y, X) float32, ``cells_truth`` (Z, Y, X) bool."""
    truths = [_Truth.from_labels(ndi.label(c, structure=FOUR)[0]) for c in cells_truth]
    # The cell masks of one slice are nested, so two thresholds giving as many cell pixels give
    # the same mask and the same scores: thin and score each distinct mask once.
    counts = [[int(np.count_nonzero(fiji_cells(p, t))) for t in thresholds] for p in prob32]
    jobs: dict[tuple[int, int], float] = {}  # (slice, cell count) -> first threshold giving it
    for z, row in enumerate(counts):
        for t, count in zip(thresholds, row, strict=True):
            jobs.setdefault((z, count), t)

    def run(job: tuple[int, int]) -> dict[str, float]:
        z, t = job[0], jobs[job]
        labels = thinned_segmentation(fiji_cells(prob32[z], t))
        pred = labels.ravel()[truths[z].index].astype(np.int64, copy=False)
        return _scores(truths[z], pred, singletons=True)

    workers = _workers(len(jobs))
    if workers == 1:
        results = dict(zip(jobs, map(run, jobs), strict=True))
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = dict(zip(jobs, pool.map(run, jobs), strict=True))
    out = []
    for z in range(len(prob32)):
        rows = [results[z, count] for count in counts[z]]
        columns = {name: tuple(row[name] for row in rows) for name in SCORE_NAMES}
        out.append(SliceScores(thresholds=thresholds, **columns))
    return out


# --- pixel scores -------------------------------------------------------------------------------


def _pixel_pair(prob: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(predicted cells, true cells) as bool arrays, after checking shapes and values."""
    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.shape != truth.shape:
        raise BadInputError(f"prob {prob.shape} and truth {truth.shape} differ in shape")
    if not 0.0 <= threshold <= 1.0:
        raise BadInputError(f"threshold must lie in [0, 1], got {threshold}")
    return _as_prob(prob) > np.float64(threshold), _as_truth(truth)


def _pixel_scores(pred: np.ndarray, cells: np.ndarray) -> tuple[float, float, float]:
    """(pixel error, IoU, Dice) of two bool cell masks of one shape."""
    both = int(np.count_nonzero(pred & cells))
    n_pred, n_cells = int(np.count_nonzero(pred)), int(np.count_nonzero(cells))
    wrong = n_pred + n_cells - 2 * both
    union = n_pred + n_cells - both
    return (
        wrong / pred.size if pred.size else 0.0,
        both / union if union else 1.0,
        2.0 * both / (n_pred + n_cells) if union else 1.0,
    )


def pixel_error(prob: np.ndarray, truth: np.ndarray, threshold: float = CELL_AT) -> float:
    """Fraction of pixels where the cells ``prob > threshold`` disagree with ``truth == 1``.

    ``prob``: any shape, float P(cell) in [0, 1]; ``truth``: same shape, {0, 1} (uint8 or
    bool). An empty array has error 0.0.
    """
    return _pixel_scores(*_pixel_pair(prob, truth, threshold))[0]


def iou(prob: np.ndarray, truth: np.ndarray, threshold: float = CELL_AT) -> float:
    """Intersection over union of the cells ``prob > threshold`` with ``truth == 1``.

    Shapes and dtypes as in :func:`pixel_error`; 1.0 when neither has a cell pixel.
    """
    return _pixel_scores(*_pixel_pair(prob, truth, threshold))[1]


def dice(prob: np.ndarray, truth: np.ndarray, threshold: float = CELL_AT) -> float:
    """Dice coefficient of the cells ``prob > threshold`` with ``truth == 1``.

    Shapes and dtypes as in :func:`pixel_error`; 1.0 when neither has a cell pixel.
    """
    return _pixel_scores(*_pixel_pair(prob, truth, threshold))[2]


# --- whole evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """ISBI 2012 scores of a stack of slices.

    ``pixel_error``, ``pixel_accuracy``, ``iou`` and ``dice`` are at the single pixel threshold
    given to :func:`evaluate_arrays` (default 0.5), over all pixels. ``v_rand`` and ``v_info``
    are the best slice-averaged scores over the thresholds, at ``v_rand_threshold`` and
    ``v_info_threshold``; their split and merge parts are at the same thresholds.
    ``per_threshold`` holds the slice-averaged scores of every threshold, as dicts with the keys
    ``threshold`` and :data:`SCORE_NAMES`.
    """

    pixel_error: float
    pixel_accuracy: float
    iou: float
    dice: float
    v_rand: float
    v_rand_threshold: float
    v_info: float
    v_info_threshold: float
    v_rand_split: float
    v_rand_merge: float
    v_info_split: float
    v_info_merge: float
    per_threshold: tuple[dict[str, float], ...]
    n_slices: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (floats, ints, a list of dicts)."""
        out = asdict(self)
        out["per_threshold"] = [dict(row) for row in self.per_threshold]
        return out


def evaluate_arrays(
    prob: np.ndarray,
    truth: np.ndarray,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    threshold: float = CELL_AT,
) -> Scores:
    """Score membrane predictions against ground truth, in the ISBI 2012 challenge's terms.

    ``prob``: (Z, Y, X) or (Y, X) float (float32 or float64) P(cell) in [0, 1] (divide uint8
    maps by 255). ``truth``: same shape, {0, 1} (uint8 or bool), 1 = cell interior, 0 = membrane.
    ``thresholds``: the values in [0, 1] at which the Rand and information scores are computed
    (best one reported); ``threshold``: the one for pixel error, IoU and Dice.
    Raises :class:`~emseg.errors.BadInputError` (a ValueError) on bad shapes or values.
    """
    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.shape != truth.shape:
        raise BadInputError(f"prob {prob.shape} and truth {truth.shape} differ in shape")
    if prob.ndim == 2:
        prob, truth = prob[np.newaxis], truth[np.newaxis]
    if prob.ndim != 3 or 0 in prob.shape:
        raise BadInputError(f"prob must be a non-empty (Z, Y, X) or (Y, X) array, got {prob.shape}")
    thresholds = _check_thresholds(thresholds)
    pred, cells = _pixel_pair(prob, truth, threshold)
    err, iou_, dice_ = _pixel_scores(pred, cells)
    prob32 = prob.astype(np.float32, copy=False)  # checked by _pixel_pair
    per_slice = np.stack([s.as_array() for s in _score_slices(prob32, cells, thresholds)])
    mean = per_slice.mean(axis=0)  # (thresholds, 6)
    col = {name: k for k, name in enumerate(SCORE_NAMES)}
    best_rand = int(np.argmax(mean[:, col["v_rand"]]))  # first maximum, as Fiji's strict ">"
    best_info = int(np.argmax(mean[:, col["v_info"]]))
    per_threshold = tuple(
        {"threshold": t, **{name: float(mean[k, col[name]]) for name in SCORE_NAMES}} for k, t in enumerate(thresholds)
    )
    return Scores(
        pixel_error=err,
        pixel_accuracy=1.0 - err,
        iou=iou_,
        dice=dice_,
        v_rand=float(mean[best_rand, col["v_rand"]]),
        v_rand_threshold=thresholds[best_rand],
        v_info=float(mean[best_info, col["v_info"]]),
        v_info_threshold=thresholds[best_info],
        v_rand_split=float(mean[best_rand, col["v_rand_split"]]),
        v_rand_merge=float(mean[best_rand, col["v_rand_merge"]]),
        v_info_split=float(mean[best_info, col["v_info_split"]]),
        v_info_merge=float(mean[best_info, col["v_info_merge"]]),
        per_threshold=per_threshold,
        n_slices=int(prob.shape[0]),
    )


# --- several classes ----------------------------------------------------------------------------


def class_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[int, dict[str, float]]:
    """IoU and Dice of each class 1..``n_classes`` over the labelled pixels (truth > 0).

    ``pred``, ``truth``: same shape, uint8 class numbers (truth 0 = unlabelled, left out).
    Returns {class: {"iou", "dice", "truth_pixels", "pred_pixels"}} for the classes present in
    the truth or the prediction there (a class in neither has no score).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise BadInputError(f"predicted classes {pred.shape} and truth {truth.shape} differ in shape")
    labelled = truth > 0
    p, t = pred[labelled].astype(np.int64), truth[labelled].astype(np.int64)
    size = n_classes + 1
    confusion = np.bincount(t * size + np.clip(p, 0, n_classes), minlength=size * size).reshape(size, size)
    out: dict[int, dict[str, float]] = {}
    for k in range(1, size):
        inter, in_truth, in_pred = confusion[k, k], confusion[k].sum(), confusion[:, k].sum()
        if in_truth + in_pred == 0:
            continue
        out[k] = {
            "iou": float(inter / (in_truth + in_pred - inter)),
            "dice": float(2 * inter / (in_truth + in_pred)),
            "truth_pixels": int(in_truth),
            "pred_pixels": int(in_pred),
        }
    return out
