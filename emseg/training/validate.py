"""Full-slice validation through the predict engine: loss, pixel accuracy, IoU, V_rand, V_info.

:func:`validator` builds it for whoever calls :func:`~emseg.training.loop.fit`, which takes it as a
:data:`Validate` callable: this is the one module of training that imports inference and evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from emseg.classes import membrane_value
from emseg.config import PredictConfig, TrainConfig
from emseg.evaluation.metrics import class_scores, evaluate_arrays
from emseg.inference.engine import Engine
from emseg.inference.tiling import plan_block, read_reflected
from emseg.models.base import SegmentationNet
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
