"""The public functions: one per CLI command, with parameters named like the command's options.

``emseg.cli`` is a thin wrapper over these; notebooks and pipelines call them directly::

    import emseg
    emseg.ingest("train-volume.tif", "isbi.zarr", labels="train-labels.tif", voxel_size=(50, 4, 4))
    print(emseg.info("isbi.zarr"))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import IngestConfig
from emseg.errors import BadInputError
from emseg.progress import Reporter

log = logging.getLogger(__name__)


def _slice_range(slices: Sequence[int] | str | None) -> tuple[int, int] | None:
    """``"A:B"`` or ``(A, B)`` -> (A, B); None stays None."""
    if slices is None:
        return None
    if isinstance(slices, str):
        try:
            a, b = slices.split(":", 1)
            return int(a), int(b)
        except ValueError:
            raise BadInputError(f"--slices {slices!r}: expected A:B") from None
    return int(slices[0]), int(slices[1])


def ingest(
    source: str | Path,
    output: str | Path,
    *,
    labels: str | Path | None = None,
    voxel_size: Sequence[float] | None = None,
    chunks: Sequence[int] = IngestConfig.chunks,
    ngff: str = IngestConfig.ngff,
    shards: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: Reporter | None = None,
) -> Path:
    """Convert a TIFF/BigTIFF stack, a folder of TIFF/PNG slices or a 2D image to OME-Zarr.

    ``labels`` (same kinds of source, same shape) are binarised into ``labels/cells``.
    ``voxel_size`` is (z, y, x) in nm; by default it comes from the TIFF metadata, else 1.
    Returns the output path.
    """
    from emseg.io.ingest import ingest_stack

    config = IngestConfig(
        ngff=str(ngff),
        chunks=tuple(int(c) for c in chunks),  # type: ignore[arg-type]
        shards=None if shards is None else tuple(int(s) for s in shards),  # type: ignore[arg-type]
        voxel_size=None if voxel_size is None else tuple(float(v) for v in voxel_size),  # type: ignore[arg-type]
        overwrite=overwrite,
    )
    return ingest_stack(source, output, config, labels=labels, progress=progress)


def info(path: str | Path) -> dict[str, Any]:
    """Shape, dtype, chunks, voxel size, levels and labels (with foreground fraction) of a store.

    The foreground fraction is exact when the label's level 0 is under 1 GiB, else estimated
    from the finest level that is (the key ``fraction_level`` says which; None when no level is).
    """
    from emseg.io.zarr import emseg_attrs, open_ome

    image = open_ome(path)
    arr = image.array
    result: dict[str, Any] = {
        "path": str(image.path),
        "ngff": image.version,
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "shards": None if getattr(arr, "shards", None) is None else list(arr.shards),
        "voxel_size_nm": list(image.voxel_size),
        "levels": [list(a.shape) for a in image.levels],
        "size_bytes": math.prod(arr.shape) * arr.dtype.itemsize,
        "labels": {},
        "emseg": emseg_attrs(image),
    }
    for name, label in image.labels.items():
        level = next((i for i, a in enumerate(label.levels) if math.prod(a.shape) <= 2**30), None)
        fraction = None if level is None else _mean_of(label.levels[level])
        result["labels"][name] = {"foreground_fraction": fraction, "fraction_level": level}
    return result


def _mean_of(array: Any) -> float:
    import dask.array as da

    return float(da.from_zarr(array).astype(np.float64).mean().compute())


def show(
    data: str | Path,
    output: str | Path,
    *,
    slice: int = 0,
    pred: str | Path | None = None,
    level: int | None = None,
) -> Path:
    """Save a PNG of slice ``slice``: the image, its ``labels/cells`` mask when present, and with
    ``pred`` the predicted P(cell) and an overlay of the predicted membranes.

    ``level`` picks a pyramid level; by default the finest whose largest side is at most 2048 px.
    """
    from emseg.io.zarr import first_slice, open_ome
    from emseg.scoring import as_probability
    from emseg.viz import overlay, panel_rows

    image = open_ome(data)
    if not 0 <= slice < image.shape[0]:
        raise BadInputError(f"--slice {slice}: {data} has slices 0-{image.shape[0] - 1}")
    if level is None:
        level = next((i for i, a in enumerate(image.levels) if max(a.shape[1:]) <= 2048), len(image.levels) - 1)
    if not 0 <= level < len(image.levels):
        raise BadInputError(f"--level {level}: {data} has levels 0-{len(image.levels) - 1}")
    raw = np.asarray(image.levels[level][slice])
    row: dict[str, np.ndarray] = {f"image (slice {slice}, level {level})": raw}
    if "cells" in image.labels:
        cells = image.labels["cells"]
        row["truth: cells"] = np.asarray(cells.levels[min(level, len(cells.levels) - 1)][slice]).astype(bool)
    if pred is not None:
        prediction = open_ome(pred)
        if prediction.shape[1:] != image.shape[1:]:
            raise BadInputError(f"--pred {pred}: shape {prediction.shape} does not match {data} {image.shape}")
        z = slice - first_slice(prediction)
        if not 0 <= z < prediction.shape[0]:
            raise BadInputError(f"--pred {pred}: holds no prediction for slice {slice}")
        prob = as_probability(np.asarray(prediction.levels[min(level, len(prediction.levels) - 1)][z]), pred)
        row["prob: P(cell)"] = prob
        row["overlay: predicted membranes"] = overlay(raw, prob < 0.5)
    return panel_rows([row], Path(output))


def demo(
    *,
    data: str | Path | None = None,
    output: str | Path = "emseg-demo",
    device: str = "auto",
    minutes: float | None = None,
    progress: Reporter | None = None,
) -> Any:
    """Ingest, train (``minutes`` of it: 3 on a CPU, 4 on a GPU by default), predict, evaluate and
    draw, on the ISBI 2012 stacks (``data`` or found nearby) or, offline, a synthetic EM-like stack;
    returns a :class:`emseg.quickstart.DemoResult` with the paths and the validation scores."""
    from emseg.quickstart import run_demo

    return run_demo(data=data, output=output, device=device, minutes=minutes, progress=progress)


def train(
    data: str | Path,
    output: str | Path,
    *,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    batch_size: int | None = None,
    crop: int | None = None,
    lr: float | None = None,
    arch: str | None = None,
    depth: int | None = None,
    base_channels: int | None = None,
    encoder_weights: str | None = None,
    loss: str | None = None,
    val_slices: Sequence[int] | str | None = None,
    seed: int | None = None,
    time_limit: float | None = None,
    device: str = "auto",
    compile: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    config: Any = None,
    progress: Reporter | None = None,
) -> dict[str, Any]:
    """Train a U-Net on ``data`` (OME-Zarr with labels/cells) into the run directory ``output``.

    Options left at None take their defaults from :class:`emseg.config.TrainConfig` (or from
    ``config`` when given, e.g. to set augmentation). Returns a summary with the last
    validation scores and the metrics rows.
    """
    import dataclasses

    from emseg.config import ModelConfig, TrainConfig
    from emseg.training.data import parse_slices
    from emseg.training.loop import fit

    base = config if config is not None else TrainConfig()
    model_changes = {k: v for k, v in dict(arch=arch, depth=depth, base_channels=base_channels,
                                           encoder_weights=encoder_weights).items() if v is not None}
    if isinstance(val_slices, str):
        val_slices = parse_slices(val_slices)
    changes = {k: v for k, v in dict(
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, crop=crop, lr=lr, loss=loss,
        val_slices=None if val_slices is None else tuple(int(v) for v in val_slices), seed=seed, time_limit=time_limit,
    ).items() if v is not None}
    for name in ("epochs", "steps_per_epoch", "batch_size", "crop"):
        if name in changes and int(changes[name]) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} {changes[name]}: must be at least 1")
    model_config = dataclasses.replace(base.model if isinstance(base.model, ModelConfig) else ModelConfig(), **model_changes)
    cfg = dataclasses.replace(base, model=model_config, device=device, compile=compile or base.compile, **changes)
    return fit(data, output, cfg, resume=resume, overwrite=overwrite, progress=progress)


def load_model(path: str | Path, device: str = "cpu") -> Any:
    """The trained network of a run directory or checkpoint, as an eval-mode torch module.

    The module carries ``emseg_meta`` (config, normalisation ``mean``/``std``, ``halo``,
    ``divisor``): feed it ``(x - mean) / std`` of shape (B, 1, H, W) with H, W multiples of
    ``divisor``; it returns logits of P(cell).
    """
    from emseg.inference.model import load_trained

    return load_trained(path, device)[0]


def augment_preview(
    data: str | Path, output: str | Path, *, slice: int = 0, crop: int = 256, samples: int = 6, seed: int = 0
) -> Path:
    """Save a PNG: a crop of a slice with its mask, then ``samples`` augmented image/mask pairs."""
    import torch

    from emseg.config import AugmentConfig
    from emseg.training.augment import augment_batch, context_size, identity_config
    from emseg.training.data import CropSampler, load_slices, normalization, open_training_store
    from emseg.viz import overlay, panel_rows

    image = open_training_store(str(data))
    if not 0 <= slice < image.shape[0]:
        raise BadInputError(f"--slice {slice}: {data} has slices 0-{image.shape[0] - 1}")
    if crop < 16 or samples < 1:
        raise BadInputError("--crop must be at least 16 and --samples at least 1")
    annotated = load_slices(image, [slice], 10.0, 5.0)
    mean, std = normalization(annotated.raw)
    sampler = CropSampler(annotated, mean, std, torch.device("cpu"))
    config = AugmentConfig()
    ctx = context_size(crop, config)
    gen = torch.Generator().manual_seed(seed)
    img, lab, w = sampler.sample(1, ctx, crop, gen)
    rows = []
    plain = augment_batch(img, lab, w, crop, identity_config(), gen)
    rows.append({"image": plain[0][0, 0].numpy(), "mask": plain[1][0, 0].numpy() > 0.5,
                 "weight map": plain[2][0, 0].numpy(), "overlay": overlay(plain[0][0, 0].numpy(), plain[1][0, 0].numpy() < 0.5)})
    batch = augment_batch(img.repeat(samples, 1, 1, 1), lab.repeat(samples, 1, 1, 1), w.repeat(samples, 1, 1, 1),
                          crop, config, gen)
    for i in range(samples):
        a, m, ww = (t[i, 0].numpy() for t in batch)
        rows.append({f"augmented {i + 1}": a, "mask": m > 0.5, "weight map": ww, "overlay": overlay(a, m < 0.5)})
    return panel_rows(rows, Path(output))


def predict(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    blend: str = "gaussian",
    tta: bool = False,
    threshold: float = 0.5,
    dtype: str = "uint8",
    slices: Sequence[int] | str | None = None,
    device: str = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    compile: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    config: Any = None,
    progress: Reporter | None = None,
) -> Path:
    """Segment ``data`` (OME-Zarr) with a trained ``model`` (run directory or checkpoint) into an
    OME-Zarr ``output`` holding ``probabilities`` (P(cell)) and ``labels/membranes``.

    Tiles of ``tile``² pixels overlap by ``overlap`` and are blended (gaussian, linear or crop);
    ``slices`` is (start, stop) or "A:B". ``workers`` starts a local dask.distributed cluster,
    ``scheduler`` connects to one; otherwise dask's threads run the blocks. ``config`` (a
    :class:`emseg.config.PredictConfig`) sets the rest, e.g. the block size.
    """
    import dataclasses

    from emseg.config import PredictConfig
    from emseg.inference.graph import predict_store

    base = config if config is not None else PredictConfig()
    cfg = dataclasses.replace(
        base, tile=tile, overlap=overlap, batch_size=batch_size, blend=blend, tta=tta, threshold=threshold,
        dtype=dtype, slices=_slice_range(slices), device=device,
        workers=workers, scheduler=scheduler, compile=compile, overwrite=overwrite, resume=resume,
    )
    return predict_store(model, data, output, cfg, progress=progress)


def export(
    source: str | Path,
    output: str | Path,
    *,
    format: str | None = None,
    labels: str | None = None,
    level: int = 0,
    overwrite: bool = False,
    progress: Reporter | None = None,
) -> Path:
    """Export a store (e.g. a prediction) to a compressed BigTIFF (``OUT.tif``) or, with
    ``format="png"``, a folder of PNG slices; ``labels="membranes"`` exports a label mask."""
    from emseg.io.export import export_store

    return export_store(source, output, fmt=format, label=labels, level=level, overwrite=overwrite, progress=progress)


def evaluate(
    pred: str | Path,
    data: str | Path,
    *,
    slices: Sequence[int] | str | None = None,
    json: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``pred`` (an ``emseg predict`` store, or a TIFF stack of P(cell), uint8 or float 0-1)
    against ``data``'s labels/cells: pixel error, IoU, Dice, and the ISBI 2012 foreground-restricted
    V_rand and V_info (best over thresholds 0.0-1.0, with their split and merge parts).
    ``slices`` ("A:B" or (A, B)) picks data slices; ``json`` also writes the scores there."""
    import json as _json

    from emseg.scoring import evaluate_prediction
    from emseg.io.atomic import write_json_atomic

    scores = evaluate_prediction(pred, data, _slice_range(slices))
    result = scores.to_dict()
    if json is not None:
        write_json_atomic(Path(json), _json.loads(_json.dumps(result)))
    return result


def bench(
    *,
    device: str = "auto",
    model: str | Path | None = None,
    compile: bool = False,
    monai: bool = True,
    quick: bool = False,
    json: str | Path | None = None,
) -> dict[str, Any]:
    """Time the forward pass (per precision and layout), end-to-end predict (against MONAI's
    sliding window when installed) and training steps on ``device``; smaller sizes on the CPU.
    ``model`` is a run directory (default: an untrained default U-Net, and a small one on the CPU);
    ``quick`` uses tiny sizes (a check that everything runs, not a measurement)."""
    import json as _json

    from emseg.benchmark import run_bench
    from emseg.device import resolve_device
    from emseg.io.atomic import write_json_atomic

    result = run_bench(resolve_device(device), model, compile=compile, skip_monai=not monai, quick=quick)
    if json is not None:
        write_json_atomic(Path(json), _json.loads(_json.dumps(result, default=str)))
    return result


def export_model(run: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Export a trained model to ``output``: TorchScript, ONNX, the normalisation and halo as JSON,
    and a bioimage.io package (rdf.yaml with test tensors) for ilastik, deepImageJ and QuPath."""
    from emseg.models.export import export_model as _export

    return _export(run, output, overwrite=overwrite)
