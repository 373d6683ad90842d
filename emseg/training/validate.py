"""Full-slice validation through the predict engine: loss, pixel accuracy, IoU, V_rand, V_info."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from emseg.config import TrainConfig
from emseg.evaluation.metrics import evaluate_arrays
from emseg.inference.engine import Engine, EngineSettings
from emseg.inference.tiling import plan_block, read_reflected
from emseg.training.data import Annotated
from emseg.training.losses import Loss, logits_of


def _window(plane: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return plane[rows, cols]


def predict_planes(
    model: nn.Module,
    planes: np.ndarray,
    mean: float,
    std: float,
    device: torch.device,
    config: TrainConfig,
    divisor: int,
) -> np.ndarray:
    """(N, H, W) raw slices -> (N, H, W) float32 P(cell), tiled and blended like ``emseg predict``."""
    settings = EngineSettings(
        batch_size=4, output_dtype="float32", channels_last=config.channels_last, autocast=config.amp
    )
    tile = min(config.val_tile, -(-max(planes.shape[1:]) // divisor) * divisor)
    overlap = min(config.val_overlap, tile - divisor)
    out = np.empty(planes.shape, np.float32)
    with Engine(model, device, mean, std, settings) as engine:
        for i, plane in enumerate(planes):
            plan = plan_block((0, plane.shape[0]), (0, plane.shape[1]), tile, overlap, divisor, shape=plane.shape)
            y0, y1, x0, x1 = plan.domain
            region = read_reflected(functools.partial(_window, plane), plane.shape, y0, y1, x0, x1)
            out[i] = engine.run_block(region, plan)[0]
    return out


def validate(
    model: nn.Module,
    data: Annotated,
    mean: float,
    std: float,
    device: torch.device,
    config: TrainConfig,
    loss_fn: Loss,
    divisor: int,
) -> dict[str, Any]:
    """Scores of the model on the held-out slices (the model is left in training mode)."""
    try:
        prob = predict_planes(model, data.raw, mean, std, device, config, divisor)
    finally:
        model.train()
    p = torch.from_numpy(prob)[:, None]
    target = torch.from_numpy(data.labels)[:, None].float()
    weight = torch.from_numpy(data.weights)[:, None]
    loss = float(loss_fn(logits_of(p), target, weight))
    scores = evaluate_arrays(prob, data.labels)
    return {
        "val_loss": loss,
        "val_accuracy": scores.pixel_accuracy,
        "val_iou": scores.iou,
        "v_rand": scores.v_rand,
        "v_rand_threshold": scores.v_rand_threshold,
        "v_info": scores.v_info,
        "v_info_threshold": scores.v_info_threshold,
    }
