"""``emseg augment-preview``: see what the network is trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emseg.config import AugmentConfig, PreviewConfig, TrainConfig
from emseg.errors import BadInputError
from emseg.io.outputs import Output, check_output
from emseg.training.augment import augment_batch, context_size, identity_config
from emseg.training.data import CropSampler, load_slices, normalization, open_training_store
from emseg.viz import overlay, panel_rows


def _row(image: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, title: str) -> dict[str, np.ndarray]:
    """One row of panels from (1, S, S) tensors: image, mask, weight map and membranes overlaid."""
    a, m, w = image[0].numpy(), mask[0].numpy(), weight[0].numpy()
    return {title: a, "mask": m > 0.5, "weight map": w, "overlay": overlay(a, m < 0.5)}


def augment_preview_png(
    data: str | Path, output: str | Path, config: PreviewConfig, augment: AugmentConfig | None = None
) -> Path:
    """Save a PNG: a crop of slice ``config.z`` with its mask and weight map, then
    ``config.samples`` augmented image/mask/weight triples drawn with ``augment`` (default:
    training's). An existing ``output`` is replaced only with ``config.overwrite`` and only when
    emseg wrote it."""
    z, overwrite = config.z, config.overwrite
    check_output(Path(output).absolute(), overwrite, kind="file", inputs=[data])
    augment = augment or AugmentConfig()
    train = TrainConfig()
    image = open_training_store(str(data))
    if not 0 <= z < image.shape[0]:
        raise BadInputError(f"--slice {z}: {data} has slices 0-{image.shape[0] - 1}")
    annotated = load_slices(image, [z], train.w0, train.sigma)
    mean, std = normalization(annotated.raw)
    sampler = CropSampler(annotated, mean, std, torch.device("cpu"))
    gen = torch.Generator().manual_seed(config.seed)
    img, lab, w = sampler.sample(1, context_size(config.crop, augment), config.crop, gen)
    a, m, ww = augment_batch(img, lab, w, config.crop, identity_config(), gen)
    assert ww is not None  # a weight map in, a weight map out
    rows = [_row(a[0], m[0], ww[0], "image")]
    n = config.samples
    a, m, ww = augment_batch(
        img.repeat(n, 1, 1, 1), lab.repeat(n, 1, 1, 1), w.repeat(n, 1, 1, 1), config.crop, augment, gen
    )
    assert ww is not None
    rows += [_row(a[i], m[i], ww[i], f"augmented {i + 1}") for i in range(n)]
    with Output(output, overwrite=overwrite, kind="file", command="augment-preview", inputs=[data]) as out:
        panel_rows(rows, out.path)
    return Path(output)
