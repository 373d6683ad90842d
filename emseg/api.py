"""The public functions: one per CLI command, with parameters named like the command's options.

``emseg.cli`` is a thin wrapper over these; notebooks and pipelines call them directly::

    import emseg
    emseg.ingest("train-volume.tif", "isbi.zarr", labels="train-labels.tif", voxel_size=(50, 4, 4))
    print(emseg.info("isbi.zarr"))

Each function delegates to one library function. Keywords default to ``None``: a keyword that is
given replaces the field of ``config`` (or of the config's defaults, :mod:`emseg.config`), one left
at ``None`` keeps it. Imports are lazy so that ``import emseg`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emseg.config import (
    ExportConfig,
    IngestConfig,
    PredictConfig,
    PreviewConfig,
    SegmentConfig,
    TrainConfig,
    merge,
    merge_train,
    slice_range,
)
from emseg.progress import Reporter

if TYPE_CHECKING:
    from torch import nn

    from emseg.recipes.demo import DemoResult

PathLike = str | Path


def ingest(
    source: PathLike,
    output: PathLike,
    *,
    labels: PathLike | None = None,
    voxel_size: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    ngff: str | None = None,
    shards: Sequence[int] | None = None,
    series: int | None = None,
    channel: int | None = None,
    overwrite: bool | None = None,
    config: IngestConfig | None = None,
    progress: Reporter | None = None,
) -> Path:
    """Convert a TIFF/BigTIFF stack, a folder of TIFF/PNG slices or a 2D image to OME-Zarr.

    ``labels`` (same kinds of source, same shape) are binarised into ``labels/cells``.
    ``voxel_size`` is (z, y, x) in nm; by default it comes from the TIFF metadata, else 1.
    ``series`` and ``channel`` pick one of a TIFF that holds several. Returns the output path.
    """
    from emseg.io.ingest import ingest_stack

    cfg = merge(
        IngestConfig,
        config,
        voxel_size=voxel_size,
        chunks=chunks,
        ngff=ngff,
        shards=shards,
        series=series,
        channel=channel,
        overwrite=overwrite,
    )
    return ingest_stack(source, output, cfg, labels=labels, progress=progress)


def info(path: PathLike) -> dict[str, Any]:
    """Shape, dtype, chunks, voxel size, levels and labels of a store: a mask's foreground
    fraction, an instance label image's object count."""
    from emseg.io.info import describe_store

    return describe_store(path)


def show(
    data: PathLike,
    output: PathLike,
    *,
    z: int = 0,
    pred: PathLike | None = None,
    level: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a PNG of slice ``z``: the image, its ``labels/cells`` mask when present, and with
    ``pred`` the predicted P(cell) and an overlay of the predicted membranes. ``level`` picks a
    pyramid level (default: the finest at most 2048 px wide); ``overwrite`` replaces a PNG emseg wrote."""
    from emseg.recipes.show import show_slice

    return show_slice(data, output, z, pred, level, overwrite)


def demo(
    *,
    data: PathLike | None = None,
    output: PathLike = "emseg-demo",
    device: str = "auto",
    minutes: float | None = None,
    progress: Reporter | None = None,
) -> DemoResult:
    """Ingest, train (``minutes`` of it: 3 on a CPU, 4 on a GPU by default), predict, evaluate and
    draw, on the ISBI 2012 stacks (``data`` or found nearby) or, offline, a synthetic EM-like stack;
    returns a :class:`emseg.recipes.demo.DemoResult` with the paths and the validation scores."""
    from emseg.recipes.demo import run_demo

    return run_demo(data=data, output=output, device=device, minutes=minutes, progress=progress)


def train(
    data: PathLike,
    output: PathLike,
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
    device: str | None = None,
    precision: str | None = None,
    torch_compile: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    config: TrainConfig | None = None,
    progress: Reporter | None = None,
) -> dict[str, Any]:
    """Train a U-Net on ``data`` (OME-Zarr with labels/cells) into the run directory ``output``.

    ``val_slices`` is "A:B", "a,b,c" or a sequence (default: the last 10 %). Returns a summary
    with the last validation scores and the metrics rows.
    """
    from emseg.training.loop import fit

    cfg = merge_train(
        config,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        arch=arch,
        depth=depth,
        base_channels=base_channels,
        encoder_weights=encoder_weights,
        loss=loss,
        val_slices=val_slices,
        seed=seed,
        time_limit=time_limit,
        device=device,
        precision=precision,
        compile=torch_compile,
    )
    return fit(data, output, cfg, resume=resume, overwrite=overwrite, progress=progress)


def load_model(path: PathLike, device: str = "cpu") -> nn.Module:
    """The trained network of a run directory or checkpoint, as an eval-mode torch module.

    The module carries ``emseg_meta`` (config, normalisation ``mean``/``std``, ``halo``,
    ``divisor``): feed it ``(x - mean) / std`` of shape (B, 1, H, W) with H, W multiples of
    ``divisor``; it returns logits of P(cell).
    """
    from emseg.models.checkpoint import load_trained

    return load_trained(path, device)[0]


def augment_preview(
    data: PathLike,
    output: PathLike,
    *,
    z: int = 0,
    crop: int | None = None,
    samples: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    config: PreviewConfig | None = None,
) -> Path:
    """Save a PNG: a crop of slice ``z`` with its mask, then ``samples`` augmented image/mask pairs
    (``overwrite`` replaces a PNG emseg wrote)."""
    from emseg.recipes.preview import augment_preview_png

    cfg = merge(PreviewConfig, config, crop=crop, samples=samples, seed=seed)
    return augment_preview_png(data, output, z, cfg, overwrite=overwrite)


def predict(
    model: PathLike,
    data: PathLike,
    output: PathLike,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    blend: str | None = None,
    tta: bool | None = None,
    threshold: float | None = None,
    dtype: str | None = None,
    slices: Sequence[int] | str | None = None,
    device: str | None = None,
    block: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    torch_compile: bool | None = None,
    precision: str | None = None,
    normalization: str | None = None,
    overwrite: bool | None = None,
    resume: bool | None = None,
    config: PredictConfig | None = None,
    progress: Reporter | None = None,
) -> Path:
    """Segment ``data`` (OME-Zarr) with a trained ``model`` (run directory or checkpoint) into an
    OME-Zarr ``output`` holding ``probabilities`` (P(cell)) and ``labels/membranes``.

    Tiles of ``tile``² pixels overlap by ``overlap`` and are blended (gaussian, linear or crop);
    ``slices`` is (start, stop) or "A:B". ``workers`` starts a local dask.distributed cluster,
    ``scheduler`` connects to one; otherwise dask's threads run the blocks.
    """
    from emseg.inference.predict import predict_store

    cfg = merge(
        PredictConfig,
        config,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
        tta=tta,
        threshold=threshold,
        dtype=dtype,
        slices=slices,
        device=device,
        block=block,
        workers=workers,
        scheduler=scheduler,
        compile=torch_compile,
        precision=precision,
        normalization=normalization,
        overwrite=overwrite,
        resume=resume,
    )
    return predict_store(model, data, output, cfg, progress=progress)


def segment(
    pred: PathLike,
    output: PathLike | None = None,
    *,
    mode: str | None = None,
    seed_threshold: float | None = None,
    seeds: str | None = None,
    min_distance: int | None = None,
    merge_threshold: float | None = None,
    min_size: int | None = None,
    block: int | None = None,
    halo: int | None = None,
    threads: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    into: bool | None = None,
    overwrite: bool | None = None,
    resume: bool | None = None,
    config: SegmentConfig | None = None,
    progress: Reporter | None = None,
) -> Path:
    """Instance labels (one ID per cell) from the P(cell) of ``pred`` (an ``emseg predict``
    store): seeded watershed of 1 - P(cell), fragments merged along weak borders, blockwise
    without seams. Writes the OME-Zarr label image ``output``, or with ``into=True`` the
    prediction store's ``labels/cells``; ``mode`` "2d" (per slice) or "3d"."""
    from emseg.segmentation.segment import segment_store

    cfg = merge(
        SegmentConfig,
        config,
        mode=mode,
        seed_threshold=seed_threshold,
        seeds=seeds,
        min_distance=min_distance,
        merge_threshold=merge_threshold,
        min_size=min_size,
        block=block,
        halo=halo,
        threads=threads,
        workers=workers,
        scheduler=scheduler,
        into=into,
        overwrite=overwrite,
        resume=resume,
    )
    return segment_store(pred, output, cfg, progress=progress)


def export(
    source: PathLike,
    output: PathLike,
    *,
    file_format: str | None = None,
    labels: str | None = None,
    level: int | None = None,
    overwrite: bool | None = None,
    config: ExportConfig | None = None,
    progress: Reporter | None = None,
) -> Path:
    """Export a store (e.g. a prediction) with its voxel size to an ImageJ hyperstack (``OUT.tif``;
    an OME-TIFF when ImageJ cannot hold the data), an OME-TIFF (``file_format="ome-tiff"``) or a
    folder of PNG slices (``file_format="png"``); ``labels="membranes"`` exports a label mask."""
    from emseg.io.export import export_store

    cfg = merge(ExportConfig, config, file_format=file_format, labels=labels, level=level, overwrite=overwrite)
    return export_store(
        source,
        output,
        fmt=cfg.file_format,
        label=cfg.labels,
        level=cfg.level,
        overwrite=cfg.overwrite,
        progress=progress,
    )


def evaluate(
    pred: PathLike,
    data: PathLike,
    *,
    slices: Sequence[int] | str | None = None,
    json_path: PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score ``pred`` (an ``emseg predict`` store, or a TIFF stack of P(cell), uint8 or float 0-1)
    against ``data``'s labels/cells: pixel error, IoU, Dice, and the ISBI 2012 foreground-restricted
    V_rand and V_info (best over thresholds 0.0-1.0, with their split and merge parts).
    ``slices`` ("A:B" or (A, B)) picks data slices; ``json_path`` also writes the scores there
    (``overwrite`` replaces a JSON file emseg wrote)."""
    from emseg.evaluation.evaluate import evaluate as _evaluate

    return _evaluate(pred, data, None if slices is None else slice_range(slices), json_path, overwrite)


def bench(
    *,
    device: str = "auto",
    model: PathLike | None = None,
    torch_compile: bool = False,
    monai: bool = True,
    quick: bool = False,
    json_path: PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Time the forward pass (per precision and layout), end-to-end predict (against MONAI's
    sliding window when installed) and training steps on ``device``; smaller sizes on the CPU.
    ``model`` is a run directory (default: an untrained default U-Net, and a small one on the CPU);
    ``quick`` uses tiny sizes (a check that everything runs, not a measurement)."""
    from emseg.recipes.bench import bench as _bench

    return _bench(
        device, model, torch_compile=torch_compile, monai=monai, quick=quick, json_path=json_path, overwrite=overwrite
    )


def export_model(run: PathLike, output: PathLike, *, overwrite: bool = False) -> Path:
    """Export a trained model to ``output``: TorchScript, ONNX, the normalisation and halo as JSON,
    and a bioimage.io package (rdf.yaml with test tensors) for ilastik, deepImageJ and QuPath."""
    from emseg.models.export import export_model as _export

    return _export(run, output, overwrite=overwrite)
