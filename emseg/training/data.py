"""Training data: annotated slices from an OME-Zarr store, split by slice, held on the device.

The raw slices, their binary labels and their U-Net weight maps live on the training device
(on a GPU, cropping then costs no host work); random crops are gathered with mirror reflection
at the slice edges (``reflect_index``, the one reflection rule of emseg), so a slice smaller than
the crop's context still works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from emseg.classes import LabelClass, membrane_value
from emseg.config import TrainConfig
from emseg.errors import BadInputError
from emseg.io.zarr import OmeImage, open_ome, store_classes
from emseg.models.normalization import robust_normalization
from emseg.probability import check_both_classes
from emseg.reflection import reflect_index
from emseg.training.weights import class_weight_map, unet_weight_map

log = logging.getLogger(__name__)


def split_slices(n: int, val_slices: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """(train, validation) slice indices: ``val_slices`` or the last 10 % (at least one)."""
    if val_slices is None:
        n_val = max(1, math.ceil(0.1 * n)) if n > 1 else 0
        val = list(range(n - n_val, n))
    else:
        val = sorted(set(int(v) for v in val_slices))
        bad = [v for v in val if not 0 <= v < n]
        if bad:
            raise BadInputError(f"--val-slices {bad}: the data has slices 0-{n - 1}")
    train = [z for z in range(n) if z not in set(val)]
    if not train:
        raise BadInputError(f"--val-slices leaves no slice to train on (the data has {n})")
    return train, val


@dataclass
class Annotated:
    """Slices of a store with their labels and weight maps, in host memory."""

    raw: np.ndarray  # (N, H, W) source dtype
    labels: np.ndarray  # (N, H, W) uint8: {0, 1} cell, or class numbers (0 unlabelled) with classes
    weights: np.ndarray  # (N, H, W) float32 (0 where unlabelled)
    indices: list[int]
    classes: list[LabelClass] | None = None


def training_label(image: OmeImage) -> str:
    """The label image training learns: ``classes`` (``ingest --class``) when the store has it, else ``cells``."""
    return "classes" if "classes" in image.labels else "cells"


def open_training_store(path: str) -> OmeImage:
    image = open_ome(path)
    name = training_label(image)
    if name not in image.labels:
        raise BadInputError(f"{path}: has no labels/cells; ingest it with --labels to train on it")
    if image.labels[name].shape != image.shape:
        raise BadInputError(
            f"{path}: labels/{name} shape {image.labels[name].shape} differs from the image {image.shape}"
        )
    if name == "classes" and store_classes(image) is None:
        raise BadInputError(f"{path}: labels/classes records no classes; ingest it again with --class")
    return image


def check_validation_labels(image: OmeImage, indices: Sequence[int]) -> None:
    """:func:`check_both_classes` on the labels of the validation slices ``indices`` (of a class
    image: that they hold labelled pixels, and a warning for classes they lack)."""
    name = training_label(image)
    labels = np.stack([np.asarray(image.labels[name].array[z]) for z in indices])
    where = f"{image.path}: validation slices {list(indices)}"
    if name == "cells":
        check_both_classes(labels, where)
        return
    if indices and not labels.any():
        raise BadInputError(f"{where} are unlabelled everywhere; choose others with --val-slices")
    missing = [c.name for c in store_classes(image) or [] if indices and not (labels == c.value).any()]
    if missing:
        log.warning("%s hold no %s: their scores are left out of validation", where, ", ".join(missing))


def load_slices(image: OmeImage, indices: Sequence[int], w0: float, sigma: float) -> Annotated:
    """Read slices (level 0) with their labels and compute their weight maps once."""
    raw = np.stack([np.asarray(image.array[z]) for z in indices]) if indices else np.zeros((0, *image.shape[1:]))
    name = training_label(image)
    labels = np.stack([np.asarray(image.labels[name].array[z]) for z in indices]).astype(np.uint8)
    if name == "classes":
        classes = store_classes(image)
        assert classes is not None  # open_training_store checked it
        membrane = membrane_value(classes)
        weights = np.stack([class_weight_map(lab, len(classes), membrane, w0=w0, sigma=sigma) for lab in labels])
        return Annotated(raw=raw, labels=labels, weights=weights, indices=list(indices), classes=classes)
    weights = np.stack([unet_weight_map(lab, w0=w0, sigma=sigma) for lab in labels])
    return Annotated(raw=raw, labels=(labels > 0).astype(np.uint8), weights=weights, indices=list(indices))


def normalization(raw: np.ndarray, pct: Sequence[float] = TrainConfig.norm_percentiles) -> tuple[float, float]:
    """(mean, std) of the training slices (N, H, W) as training takes them: from robust
    percentiles (see :mod:`emseg.models.normalization`)."""
    norm = robust_normalization(raw, pct)
    return float(norm["mean"]), float(norm["std"])


class CropSampler:
    """Random context patches of training slices, on the device.

    ``sample`` returns (B, 1, S, S) normalised images, labels and weights; each patch is centred
    so that its central ``crop`` x ``crop`` lies inside the slice when the slice is large enough.
    """

    def __init__(self, data: Annotated, mean: float, std: float, device: torch.device) -> None:
        self.device = device
        self.mean, self.std = mean, std
        weight_dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.raw = torch.from_numpy(np.ascontiguousarray(data.raw)).to(device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.weights = torch.from_numpy(data.weights).to(device=device, dtype=weight_dtype)
        self.n, self.h, self.w = data.raw.shape
        area = np.full(self.n, self.h * self.w, dtype=np.float64)
        self._p = torch.as_tensor(area / area.sum())

    def sample(
        self, batch: int, size: int, crop: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``generator`` is a CPU generator (positions are drawn on the host, data stays put)."""
        slices = torch.multinomial(self._p, batch, replacement=True, generator=generator)
        u = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
        images, labels, weights = [], [], []
        for i in range(batch):
            cy = self._center(float(u[i, 0]), self.h, crop)
            cx = self._center(float(u[i, 1]), self.w, crop)
            rows = reflect_index(torch.arange(cy - size // 2, cy - size // 2 + size, device=self.device), self.h)
            cols = reflect_index(torch.arange(cx - size // 2, cx - size // 2 + size, device=self.device), self.w)
            z = int(slices[i])
            images.append(self.raw[z][rows][:, cols])
            labels.append(self.labels[z][rows][:, cols])
            weights.append(self.weights[z][rows][:, cols])
        image = (torch.stack(images).float() - self.mean) / self.std
        return image[:, None], torch.stack(labels)[:, None].float(), torch.stack(weights)[:, None].float()

    @staticmethod
    def _center(u: float, n: int, crop: int) -> int:
        lo, hi = crop // 2, n - (crop - crop // 2)
        if hi < lo:
            return n // 2
        return lo + int(u * (hi - lo + 1)) if hi > lo else lo
