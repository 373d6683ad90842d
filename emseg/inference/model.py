"""Rebuild a trained network from a checkpoint (safetensors + JSON, never pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from emseg.config import TrainConfig, from_dict
from emseg.device import resolve_device
from emseg.errors import BadInputError
from emseg.models.build import build_model
from emseg.models.checkpoint import read_checkpoint


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(eval-mode model on ``device``, checkpoint meta). The meta has ``config``,
    ``normalization`` {mean, std}, ``halo`` and ``divisor``."""
    tensors, meta = read_checkpoint(path)
    try:
        config = from_dict(TrainConfig, meta["config"])
        norm = meta["normalization"]
        float(norm["mean"]), float(norm["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"{path}: checkpoint config is incomplete or from an incompatible emseg ({exc})") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise BadInputError(f"{path}: weights do not fit the model its config describes ({str(exc).splitlines()[0]})") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev).eval()
    model.emseg_meta = meta  # type: ignore[attr-defined]
    return model, meta
