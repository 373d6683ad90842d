"""The end of a run of several classes: each class's decision threshold learned on the held-out slices.

A class-balanced loss makes a network over-predict its rare classes (mitochondria, synapses):
every rare pixel weighs more than a common one, so where the network is unsure it picks the
rare class. The most probable class after adding one offset per class to the log-probabilities
(a logit adjustment: the prior the loss's weights changed, taken back) is a better decision; the
offsets are chosen on the run's validation slices, by coordinate ascent over a grid, to maximise
the mean IoU of the classes they hold (the score that chose the weights). They are added to the
bias of the network's output layer in ``best.safetensors``, so predict, validation, export and
every other reader of the checkpoint apply them without knowing; ``class_bias.json`` and the
checkpoint's metadata record them and the scores before and after. When no offset helps, nothing
changes.

The same slices then choose how each blob-like class (every class but the membrane and the
largest) becomes objects (:func:`fit_object_settings`): whether touching objects are split and
how far apart their seeds lie, and the smallest object kept, by object F1 at IoU 0.5. A
prediction made with the run carries them in its provenance; ``emseg segment --objects`` and
``emseg evaluate`` use them by default.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from emseg.classes import from_record
from emseg.config import TrainConfig
from emseg.io.outputs import write_json_atomic
from emseg.models.base import SegmentationNet
from emseg.models.checkpoint import load_trained, save_checkpoint
from emseg.progress import Reporter, reporter_or_null
from emseg.training.data import open_training_store
from emseg.training.validate import blob_classes, fit_object_settings, mean_iou, predict_planes

log = logging.getLogger(__name__)

#: Where a run keeps its class offsets.
CLASS_BIAS_FILE = "class_bias.json"
#: The offsets tried for each class (natural-log units of probability).
OFFSETS = np.round(np.arange(-3.0, 3.01, 0.25), 2)
#: Rounds of coordinate ascent over the classes.
ROUNDS = 2
#: Labelled pixels the search scores at most (an even subsample beyond).
MAX_PIXELS = 2**21


def fit_class_bias(prob: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(offsets (C,), mean IoU without them, with them) for (N, C, H, W) class probabilities and
    (N, H, W) class numbers (0 unlabelled): the offsets of :data:`OFFSETS` that maximise the mean
    IoU of the most probable class of log(prob) + offset, one class at a time, :data:`ROUNDS`
    times; all zero when none helps."""
    n_classes = prob.shape[1]
    labelled = truth > 0
    logp = np.log(np.clip(np.moveaxis(prob, 1, -1)[labelled], 1e-6, None)).astype(np.float32)  # (P, C)
    target = truth[labelled].astype(np.uint8)
    if len(target) > MAX_PIXELS:
        step = -(-len(target) // MAX_PIXELS)
        logp, target = logp[::step], target[::step]
    bias = np.zeros(n_classes, np.float32)

    def score(b: np.ndarray) -> float:
        return mean_iou((np.argmax(logp + b, axis=1) + 1).astype(np.uint8), target, n_classes)

    before = best = score(bias)
    for _ in range(ROUNDS):
        for c in range(n_classes):
            for offset in OFFSETS:
                trial = bias.copy()
                trial[c] = offset
                value = score(trial)
                if value > best + 1e-6:
                    best, bias = value, trial
    return bias, before, best


def with_offsets(prob: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, C, H, W) class probabilities after adding ``bias`` (C,) to their logarithms (softmax)."""
    logits = np.log(np.clip(prob, 1e-6, None)) + bias[None, :, None, None]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def output_layer(model: nn.Module, n_classes: int) -> nn.Conv2d:
    """The network's output layer: its last 2D convolution with ``n_classes`` outputs and a bias."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == n_classes]
    if not layers or layers[-1].bias is None:
        raise RuntimeError(f"no output convolution with {n_classes} channels and a bias in {type(model).__name__}")
    return layers[-1]


def calibrate_class_bias(
    data: str | Path, run_dir: str | Path, config: TrainConfig, progress: Reporter | None = None
) -> dict[str, Any] | None:
    """Learn the class offsets of the run's chosen weights on its validation slices and fold them
    into ``best.safetensors``; returns what ``class_bias.json`` holds, or None for a run without
    validation slices (the network has seen every other labelled slice)."""
    progress = reporter_or_null(progress)
    run = Path(run_dir)
    checkpoint = run / "best.safetensors"
    if not checkpoint.is_file():
        return None
    model, meta = load_trained(checkpoint, config.device)
    slices = [int(z) for z in meta.get("val_slices", [])]
    if not slices or not meta.get("classes"):
        return None
    if isinstance(meta.get("class_bias"), dict):  # already folded into these weights: never twice
        return dict(meta["class_bias"])
    progress.start("calibrate class decisions", total=None, unit="offsets")
    image = open_training_store(str(data))
    raw = np.stack([np.asarray(image.array[z]) for z in slices])
    truth = np.stack([np.asarray(image.labels["classes"].array[z]) for z in slices])
    norm = meta["normalization"]
    prob = predict_planes(cast(SegmentationNet, model), raw, (float(norm["mean"]), float(norm["std"])), config)
    bias, before, after = fit_class_bias(prob, truth)
    names = [c["name"] for c in meta["classes"]]
    prob = with_offsets(prob, bias)
    objects = {}
    for c in blob_classes(from_record(meta["classes"]), truth):
        if (truth == c.value).any():
            objects[c.name] = fit_object_settings(prob, truth, c.value)
    progress.finish()
    record: dict[str, Any] = {
        "offsets": {n: float(b) for n, b in zip(names, bias, strict=True)},
        "mean_iou_before": before,
        "mean_iou_after": after,
        "objects": objects,
        "slices": slices,
        "applied": bool(np.any(bias)),
    }
    layer = output_layer(model, len(names))
    with torch.no_grad():
        assert layer.bias is not None
        layer.bias += torch.from_numpy(bias).to(layer.bias.device, layer.bias.dtype)
    save_checkpoint(checkpoint, model, {**meta, "class_bias": record})
    log.info(
        "class decisions calibrated on slices %s: mean IoU %.4f -> %.4f (offsets %s); objects: %s",
        slices,
        before,
        after,
        ", ".join(f"{n} {b:+.2f}" for n, b in zip(names, bias, strict=True)),
        "; ".join(
            f"{n} min distance {o['min_distance']}, min size {o['min_size']} "
            f"(F1 {o['f1_default'] or 0:.3f} -> {o['f1'] or 0:.3f})"
            for n, o in objects.items()
        )
        or "none",
    )
    write_json_atomic(run / CLASS_BIAS_FILE, record)
    return record


__all__ = [
    "CLASS_BIAS_FILE",
    "calibrate_class_bias",
    "fit_class_bias",
    "output_layer",
    "with_offsets",
]
