"""The end of a training run: the segmentation settings calibrated on the run's held-out slices.

The chosen weights (``best.safetensors``) predict the validation slices as validation does, and
:func:`~emseg.segmentation.calibrate.calibrate` chooses ``emseg segment``'s settings on them. The
result goes into ``segmentation.json`` in the run directory and into the metadata of its
checkpoints, so a prediction made with the run carries it in its provenance and ``emseg segment``
uses it by default. A run without validation slices calibrates on the last tenth of its training
slices, with a warning: the network has seen those.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from emseg.config import INIT_WARMUP_STEPS, ModelConfig, TrainConfig
from emseg.io.outputs import write_json_atomic
from emseg.models.base import SegmentationNet
from emseg.models.checkpoint import add_meta, checked_config, load_trained, read_checkpoint, resolve_checkpoint
from emseg.probability import probability_uint8
from emseg.progress import Reporter, reporter_or_null
from emseg.segmentation.calibrate import calibrate
from emseg.training.data import open_training_store, training_label
from emseg.training.loop import fit
from emseg.training.validate import Validate, predict_planes, validator

log = logging.getLogger(__name__)

#: Where a run keeps its calibration.
SEGMENTATION_FILE = "segmentation.json"


def train(data: str | Path, run_dir: str | Path, config: TrainConfig, progress: Reporter | None = None) -> dict:
    """:func:`~emseg.training.loop.fit` with the standard validation, then on the main process
    :func:`calibrate_run` (the summary gains ``segmentation``), or for a network of several
    classes :func:`~emseg.training.class_bias.calibrate_class_bias` (``class_bias``)."""
    config = with_init(config)
    validate: Validate = validator(config)
    summary = fit(data, run_dir, config, validate=validate, progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        if training_label(open_training_store(str(data))) == "cells":
            summary["segmentation"] = calibrate_run(data, run_dir, config, progress)
        else:
            from emseg.training.class_bias import calibrate_class_bias

            bias = calibrate_class_bias(data, run_dir, config, progress)
            if bias is not None:
                summary["class_bias"] = bias
    return summary


def with_init(config: TrainConfig) -> TrainConfig:
    """``config`` for a run that starts from ``config.init``'s weights: that model's network (and
    its checked config, before anything trains) and a warm-up of at most
    :data:`~emseg.config.INIT_WARMUP_STEPS` steps; unchanged without ``init``."""
    if config.init is None:
        return config
    path = resolve_checkpoint(config.init)
    tensors, meta = read_checkpoint(path)
    source = checked_config(path, tensors, meta)
    if source.model != config.model and config.model != ModelConfig():
        log.warning(
            "--init %s: training its network (%s), not the options' (%s)", config.init, source.model, config.model
        )
    log.info("starting from the weights of %s", config.init)
    return replace(
        config,
        model=source.model,
        init=str(path),
        warmup_steps=min(config.warmup_steps, INIT_WARMUP_STEPS),
        warmup_fraction=min(config.warmup_fraction, 0.02),
    )


def calibrate_run(
    data: str | Path, run_dir: str | Path, config: TrainConfig, progress: Reporter | None = None
) -> dict[str, Any]:
    """Calibrate the segmentation on the run's held-out slices with its chosen weights; returns
    what ``segmentation.json`` holds (the settings, their V_rand, P(cell)'s best threshold and
    its V_rand on the same slices, the slices and where they came from)."""
    progress = reporter_or_null(progress)
    run = Path(run_dir)
    checkpoint = run / "best.safetensors" if (run / "best.safetensors").is_file() else run / "last.safetensors"
    model, meta = load_trained(checkpoint, config.device)
    image = open_training_store(str(data))
    slices, role = [int(z) for z in meta.get("val_slices", [])], "validation slices"
    if not slices:
        trained = [int(z) for z in meta.get("train_slices", [])]
        slices, role = trained[-max(1, math.ceil(0.1 * len(trained))) :], "training slices (no validation slices)"
        log.warning(
            "calibrating the segmentation on training slices %s: the run has no validation slices, and the "
            "network has seen these; choose --val-slices for settings that transfer",
            slices,
        )
    progress.start("calibrate segmentation", total=None, unit="settings")
    raw = np.stack([np.asarray(image.array[z]) for z in slices])
    truth = np.stack([np.asarray(image.labels["cells"].array[z]) for z in slices])
    norm = meta["normalization"]
    prob = predict_planes(cast(SegmentationNet, model), raw, (float(norm["mean"]), float(norm["std"])), config)
    result = calibrate(probability_uint8(prob, "validation P(cell)"), truth, slices=slices)
    progress.advance(result.settings_scored)
    progress.finish()
    record = {**result.to_dict(), "slices_role": role, "run": str(run.resolve()), "data": str(Path(data).resolve())}
    write_json_atomic(run / SEGMENTATION_FILE, record)
    for name in ("best.safetensors", "last.safetensors"):
        if (run / name).is_file():
            add_meta(run / name, segmentation=record)
    log.info("segmentation calibrated on %s %s: %s", role, slices, result.settings)
    return record


__all__ = ["SEGMENTATION_FILE", "calibrate_run", "train"]
