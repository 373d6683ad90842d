"""Object-level scores of a blob-like class (mitochondria): precision, recall and F1 of matched objects."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def match_objects(pred: np.ndarray, truth: np.ndarray, iou_at: float = 0.5) -> dict[str, float]:
    """Object-level scores of predicted instances against true ones, (Y, X) or (Z, Y, X) label
    images (0 = background; per slice when 3D, as objects of a section): a prediction matches a
    true object when their IoU is at least ``iou_at`` (>= 0.5 makes every match one-to-one).
    Returns precision, recall, f1, and the counts (``true_positives``, ``predicted``, ``true``)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"predicted {pred.shape} and true {truth.shape} objects differ in shape")
    if pred.ndim == 2:
        pred, truth = pred[None], truth[None]
    tp = n_pred = n_true = 0
    for p, t in zip(pred, truth, strict=True):
        p, t = p.astype(np.int64), t.astype(np.int64)
        ps, ts = np.bincount(p.ravel()), np.bincount(t.ravel())
        n_pred += int(np.count_nonzero(ps[1:]))
        n_true += int(np.count_nonzero(ts[1:]))
        both = (p > 0) & (t > 0)
        if not both.any():
            continue
        pairs, inter = np.unique(p[both] * (int(t.max()) + 1) + t[both], return_counts=True)
        pi, ti = pairs // (int(t.max()) + 1), pairs % (int(t.max()) + 1)
        iou = inter / (ps[pi] + ts[ti] - inter)
        good = iou >= iou_at
        if iou_at < 0.5:  # matches may not be one-to-one: count each object once
            tp += min(len(np.unique(pi[good])), len(np.unique(ti[good])))
        else:
            tp += int(np.count_nonzero(good))
    precision = tp / n_pred if n_pred else float("nan")
    recall = tp / n_true if n_true else float("nan")
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": tp,
        "predicted": n_pred,
        "true": n_true,
    }


def true_objects(truth: np.ndarray) -> np.ndarray:
    """(Y, X) or (Z, Y, X) bool mask of one class -> its 4-connected components per slice (uint32)."""
    truth = np.asarray(truth, bool)
    if truth.ndim == 2:
        return ndi.label(truth)[0].astype(np.uint32)
    return np.stack([ndi.label(t)[0] for t in truth]).astype(np.uint32)


__all__ = ["match_objects", "true_objects"]
