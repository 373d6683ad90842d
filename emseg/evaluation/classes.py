"""``emseg evaluate`` of a multi-class prediction: per-class IoU and Dice, objects, membranes.

The prediction is a store from ``emseg predict`` with a network of several classes: (c, z, y, x)
probabilities and ``labels/classes`` (the most probable class). The truth is a store from
``emseg ingest --class`` with the same classes (names and order). Scored on the labelled pixels
(truth 0 is left out):

- each class's IoU and Dice, and their mean over the classes the truth holds;
- object classes (every class but the membrane and the class covering most labelled pixels, the
  cell interior or background): objects of P(class) (:func:`~emseg.probability.blob_objects`,
  the objects ``emseg segment --objects`` draws, with the settings the run learned when the
  prediction records them) matched to the truth's 4-connected components
  per section at IoU >= 0.5: precision, recall, F1;
- with a membrane class, the ISBI V_rand of P(not membrane) against labelled non-membrane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emseg.classes import LabelClass, membrane_value, not_membrane
from emseg.errors import BadInputError
from emseg.evaluation.metrics import class_scores, evaluate_arrays
from emseg.evaluation.objects import match_objects, true_objects
from emseg.io.zarr import OmeImage, emseg_attrs, first_slice, open_ome, store_classes
from emseg.probability import blob_objects, object_settings, probability_float


def is_class_prediction(pred: str | Path) -> bool:
    """Whether ``pred`` is a multi-class prediction store ((c, z, y, x) with ``labels/classes``)."""
    path = Path(pred)
    if not path.is_dir():
        return False
    try:
        image = open_ome(path, channels=True)
    except BadInputError:
        return False
    return image.channels > 0


def _classes(image: OmeImage, what: str) -> list[LabelClass]:
    classes = store_classes(image)
    if classes is None:
        raise BadInputError(f"{image.path}: {what} has no labels/classes with recorded classes")
    return classes


def object_classes(classes: list[LabelClass], truth: np.ndarray) -> list[LabelClass]:
    """The classes scored as objects: all but the membrane and the most frequent labelled one."""
    counts = np.bincount(truth.ravel(), minlength=len(classes) + 1)[1 : len(classes) + 1]
    largest = int(np.argmax(counts)) + 1 if counts.any() else None
    membrane = membrane_value(classes)
    return [c for c in classes if c.value not in (largest, membrane)]


def evaluate_classes(pred: str | Path, data: str | Path, slices: tuple[int, int] | None = None) -> dict[str, Any]:
    """Scores of a multi-class prediction against ``data``'s ``labels/classes`` (see the module docstring)."""
    prediction = open_ome(pred, channels=True)
    truth_image = open_ome(data)
    classes, truth_classes = _classes(prediction, "the prediction"), _classes(truth_image, "the data")
    if [c.name for c in classes] != [c.name for c in truth_classes]:
        raise BadInputError(
            f"{pred} predicts {[c.name for c in classes]} but {data} is labelled "
            f"{[c.name for c in truth_classes]}; they must be the same classes in the same order"
        )
    if prediction.shape[1:] != truth_image.shape[1:]:
        raise BadInputError(f"{pred}: slices are {prediction.shape[1:]}, the data's are {truth_image.shape[1:]}")
    offset, n = first_slice(prediction), prediction.shape[0]
    lo, hi = slices if slices is not None else (offset, offset + n)
    if not (0 <= lo < hi <= truth_image.shape[0]) or lo < offset or hi > offset + n:
        raise BadInputError(f"--slices {lo}:{hi}: the prediction covers data slices {offset}-{offset + n - 1}")
    truth = np.asarray(truth_image.labels["classes"].array[lo:hi])
    if not truth.any():
        raise BadInputError(f"{data}: slices {lo}-{hi - 1} are unlabelled everywhere")
    predicted = np.asarray(prediction.labels["classes"].array[lo - offset : hi - offset])
    per = class_scores(predicted, truth, len(classes))
    result: dict[str, Any] = {"kind": "classes", "n_slices": hi - lo, "slices": [lo, hi], "classes": {}}
    for c in classes:
        result["classes"][c.name] = {"value": c.value, **per.get(c.value, {"truth_pixels": 0, "pred_pixels": 0})}
    present = [s["iou"] for s in per.values() if s["truth_pixels"]]
    result["mean_iou"] = float(np.mean(present))

    def probability(c: LabelClass) -> np.ndarray:
        return np.stack(
            [probability_float(np.asarray(prediction.array[c.value - 1, z - offset]), str(pred)) for z in range(lo, hi)]
        )

    learned = emseg_attrs(prediction).get("objects")  # the run's object settings, if it learned them
    for c in object_classes(classes, truth):
        if not (truth == c.value).any():
            continue
        prob = probability(c)
        min_distance, min_size, _ = object_settings(learned, c.name)
        objects = np.stack(
            [
                blob_objects(prob[i], predicted[i] == c.value, min_distance=min_distance, min_size=min_size)
                for i in range(len(prob))
            ]
        )
        result["classes"][c.name]["objects"] = match_objects(objects, true_objects(truth == c.value))
    membrane = membrane_value(classes)
    if membrane is not None and not_membrane(truth, membrane).any() and (truth == membrane).any():
        rest = not_membrane(truth, membrane)
        scores = evaluate_arrays(1.0 - probability(classes[membrane - 1]), rest)
        result.update(v_rand=scores.v_rand, v_rand_threshold=scores.v_rand_threshold, v_info=scores.v_info)
    return result


__all__ = ["evaluate_classes", "is_class_prediction", "object_classes"]
