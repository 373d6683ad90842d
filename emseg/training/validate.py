"""Full-slice validation through the predict engine: loss, pixel accuracy, IoU, V_rand, V_info.

:func:`validator` builds it for whoever calls :func:`~emseg.training.loop.fit`, which takes it as a
:data:`Validate` callable: this is the one module of training that imports inference and evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from emseg.classes import LabelClass, membrane_value
from emseg.config import PredictConfig, TrainConfig
from emseg.evaluation.classes import object_classes
from emseg.evaluation.metrics import class_scores, evaluate_arrays
from emseg.evaluation.objects import match_objects, true_objects
from emseg.inference.engine import Engine
from emseg.inference.tiling import plan_block, read_reflected
from emseg.models.base import SegmentationNet
from emseg.probability import OBJECT_MIN_DISTANCE, OBJECT_MIN_SIZE, blob_objects
from emseg.training.data import Annotated
from emseg.training.losses import Loss, logits_of, make_loss

#: (network, held-out slices, their (mean, std) normalisation) -> scores by metrics.csv column, on
#: the device of the network's parameters; it may leave the network in training mode.
Validate = Callable[[SegmentationNet, Annotated, tuple[float, float]], dict[str, float]]


def validation_settings(config: TrainConfig) -> PredictConfig:
    """The engine's settings in validation: the run's precision, autocast and layout; float32 P(cell)."""
    return PredictConfig(
        batch_size=4, dtype="float32", precision=config.precision, amp=config.amp, channels_last=config.channels_last
    )


def _window(plane: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return plane[rows, cols]


def predict_planes(
    model: SegmentationNet, planes: np.ndarray, normalization: tuple[float, float], config: TrainConfig
) -> np.ndarray:
    """(N, H, W) raw slices -> (N, H, W) float32 P(cell), tiled and blended as ``emseg predict``
    does; a network of C > 1 classes gives (N, C, H, W) class probabilities."""
    divisor, device = model.divisor, next(model.parameters()).device
    tile = min(config.val_tile, -(-max(planes.shape[1:]) // divisor) * divisor)
    overlap = min(config.val_overlap, tile - divisor)
    channels = int(getattr(model, "out_channels", 1))
    out = np.empty((len(planes), *(() if channels == 1 else (channels,)), *planes.shape[1:]), np.float32)
    with Engine(model, device, *normalization, validation_settings(config)) as engine:
        for i, plane in enumerate(planes):
            plan = plan_block((0, plane.shape[0]), (0, plane.shape[1]), tile, overlap, divisor, shape=plane.shape)
            y0, y1, x0, x1 = plan.domain
            region = read_reflected(functools.partial(_window, plane), plane.shape, y0, y1, x0, x1)
            out[i] = engine.run_block(region, plan)[0]
    return out


def validator(config: TrainConfig) -> Validate:
    """The standard validation of a run with ``config``: the held-out slices predicted whole as
    ``emseg predict`` does (:func:`predict_planes`), scored with the run's loss and the ISBI 2012
    metrics; the network is left in training mode."""
    loss_fn = make_loss(config.loss)

    def validate(model: SegmentationNet, data: Annotated, normalization: tuple[float, float]) -> dict[str, float]:
        try:
            prob = predict_planes(model, data.raw, normalization, config)
        finally:
            model.train()
        if data.classes is not None:
            return validate_classes(prob, data, make_loss(config.loss, len(data.classes)))
        p = torch.from_numpy(prob)[:, None]
        target = torch.from_numpy(data.labels)[:, None].float()
        weight = torch.from_numpy(data.weights)[:, None]
        scores = evaluate_arrays(prob, data.labels)
        return {
            "val_loss": float(loss_fn(logits_of(p), target, weight)),
            "val_accuracy": scores.pixel_accuracy,
            "val_iou": scores.iou,
            "v_rand": scores.v_rand,
            "v_rand_threshold": scores.v_rand_threshold,
            "v_info": scores.v_info,
            "v_info_threshold": scores.v_info_threshold,
        }

    return validate


def validate_classes(prob: np.ndarray, data: Annotated, loss_fn: Loss) -> dict[str, float]:
    """Scores of (N, C, H, W) class probabilities on labelled slices: the loss, the accuracy on
    labelled pixels, each class's IoU and Dice (``iou_<name>``, ``dice_<name>``), their mean over
    the classes the slices hold (``mean_iou``, which chooses the weights) and, with a membrane class,
    the ISBI V_rand of membrane against the rest (P(not membrane) against labelled non-membrane)."""
    assert data.classes is not None
    pred = (prob.argmax(1) + 1).astype(np.uint8)
    labelled = data.labels > 0
    scores: dict[str, float] = {
        "val_loss": float(
            loss_fn(
                torch.log(torch.from_numpy(prob).clamp_min(1e-6)),
                torch.from_numpy(data.labels)[:, None].float(),
                torch.from_numpy(data.weights)[:, None],
            )
        ),
        "val_accuracy": float((pred == data.labels)[labelled].mean()) if labelled.any() else float("nan"),
    }
    per_class = class_scores(pred, data.labels, len(data.classes))
    for c in data.classes:
        if c.value in per_class and per_class[c.value]["truth_pixels"]:
            scores[f"iou_{c.name}"] = per_class[c.value]["iou"]
            scores[f"dice_{c.name}"] = per_class[c.value]["dice"]
    ious = [v for k, v in scores.items() if k.startswith("iou_")]
    scores["mean_iou"] = scores["val_iou"] = float(np.mean(ious)) if ious else float("nan")
    membrane = membrane_value(data.classes)
    if membrane is not None and labelled.any():
        rest = 1.0 - prob[:, membrane - 1]
        truth = (labelled & (data.labels != membrane)).astype(np.uint8)
        if truth.any() and (truth == 0).any():
            v = evaluate_arrays(rest, truth)
            scores.update({"v_rand": v.v_rand, "v_rand_threshold": v.v_rand_threshold, "v_info": v.v_info})
    return scores


# --- the end of a run of several classes (training.class_bias): scored as validation scores ---

#: Object settings tried per blob-like class: seed distances (0: touching objects not split) and
#: smallest sizes (pixels).
OBJECT_MIN_DISTANCES = (0, 3, 6, 10, 15, 25)
OBJECT_MIN_SIZES = (10, 30, 100, 200, 400, 800)


def blob_classes(classes: Sequence[LabelClass], truth: np.ndarray) -> list[LabelClass]:
    """The classes scored as objects (``emseg evaluate``'s: all but the membrane and the largest)."""
    return object_classes(list(classes), truth)


def mean_iou(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """The mean IoU over the classes ``truth`` holds (labelled pixels only), as validation scores it."""
    scores = class_scores(pred, truth, n_classes)
    ious = [s["iou"] for s in scores.values() if s["truth_pixels"]]
    return float(np.mean(ious)) if ious else float("nan")


def fit_object_settings(prob: np.ndarray, truth: np.ndarray, value: int) -> dict[str, Any]:
    """The object settings of class ``value`` (its probability ``prob[:, value - 1]`` where it is
    the most probable class) that maximise the object F1 against ``truth``'s objects of that class
    on these slices, among :data:`OBJECT_MIN_DISTANCES` x :data:`OBJECT_MIN_SIZES` (the defaults
    unless one does better): {"min_distance", "min_size", "f1", "precision", "recall",
    "f1_default"}, scores None where undefined (no object predicted)."""
    predicted = prob.argmax(1) + 1
    channel = prob[:, value - 1]
    reference = true_objects(truth == value)

    def score(min_distance: int, min_size: int) -> dict[str, Any]:
        objects = np.zeros(truth.shape, np.uint32)
        last = 0
        for i in range(len(channel)):
            labels = blob_objects(channel[i], predicted[i] == value, min_distance=min_distance, min_size=min_size)
            labels[labels > 0] += np.uint32(last)
            last = max(last, int(labels.max()))
            objects[i] = labels
        return match_objects(objects, reference)

    def entry(min_distance: int, min_size: int, r: dict[str, Any]) -> dict[str, Any]:
        finite = {k: (float(r[k]) if np.isfinite(r[k]) else None) for k in ("f1", "precision", "recall")}
        return {"min_distance": min_distance, "min_size": min_size, **finite}

    default = score(OBJECT_MIN_DISTANCE, OBJECT_MIN_SIZE)
    best = entry(OBJECT_MIN_DISTANCE, OBJECT_MIN_SIZE, default)  # kept unless a setting does better
    for min_distance in OBJECT_MIN_DISTANCES:
        for min_size in OBJECT_MIN_SIZES:
            r = score(min_distance, min_size)
            if np.isfinite(r["f1"]) and r["f1"] > (best["f1"] or 0.0) + 1e-9:
                best = entry(min_distance, min_size, r)
    best["f1_default"] = best["f1"] if not np.isfinite(default["f1"]) else float(default["f1"])
    return best
