"""``emseg predict``: a trained network over every block of an OME-Zarr image.

The steps of :func:`predict_store`: validate the checkpoint, the settings and the input; plan
the output store (the input's chunks and pyramid depth, probabilities plus a membranes label)
and its blocks; open the output (:class:`~emseg.io.outputs.Output`: locked, written into a hidden
partial, resumable; :func:`~emseg.io.outputs.complete_output` first says whether ``--resume`` has
nothing left to do); run the unfinished blocks (:func:`~emseg.blocks.run_blocks`); build the
pyramid levels from level 0; mark the store complete and commit it under its name.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg.blocks import run_blocks
from emseg.classes import classes_record, from_record
from emseg.cluster import check_local_workers, check_scheduler_address
from emseg.config import PredictConfig, runtime_fields, to_dict
from emseg.device import resolve_device
from emseg.errors import BadInputError
from emseg.inference.blocks import Run, drop_caches, plan_tasks, run_block, with_torch_threads
from emseg.inference.tiling import check_tiling
from emseg.io.outputs import Output, check_inputs, complete_output, provenance
from emseg.io.pyramid import build_levels
from emseg.io.zarr import (
    LevelSpec,
    OmeImage,
    create_image_store,
    create_label,
    create_multiscale,
    emseg_attrs,
    omero_channels,
    open_ome,
    probability_omero,
)
from emseg.models.checkpoint import check_trained
from emseg.models.normalization import slice_normalization, stack_normalization
from emseg.progress import Reporter, reporter_or_null

log = logging.getLogger(__name__)

#: Settings that may differ between an interrupted run and its ``--resume`` (declared in config.py).
RUNTIME_ONLY = runtime_fields(PredictConfig)


def predict_store(
    model: str | Path, data: str | Path, output: str | Path, config: PredictConfig, progress: Reporter | None = None
) -> Path:
    """Predict every block of ``data`` (level 0, slices ``config.slices``) into the OME-Zarr store
    ``output``: P(cell) in ``config.dtype`` and ``labels/membranes`` (uint8, P < threshold), both
    (Z, Y, X) with the input's chunks, voxel size and pyramid depth. A network of several classes
    writes (C, Z, Y, X) probabilities (one channel per class, named and coloured in ``omero``) and
    ``labels/classes`` (the most probable class, 1 = the first). Returns ``output``."""
    progress = reporter_or_null(progress)
    final = Path(output).absolute()
    check_inputs(final, [model, data])  # before anything: the output never overlaps what is read
    model_path, meta = _checked_model(model, config)
    image, z_range = _checked_input(data, config)
    _check_runtime(config)
    factor = _rescale(meta, image, config)
    record = _resume_record(model_path, image, config)
    if complete_output(final, record, overwrite=config.overwrite, resume=config.resume):
        log.info("%s is complete; nothing to resume", final)
        return final
    shape = (z_range[1] - z_range[0], *image.shape[1:])
    chunks = (1, int(image.array.chunks[1]), int(image.array.chunks[2]))
    spec = LevelSpec(
        shape=shape, dtype=config.dtype, chunks=chunks, pyramid_min_size=_pyramid_min(image), clevel=config.clevel
    )
    classes = from_record(meta["classes"]) if meta.get("classes") else None
    label = "membranes" if classes is None else "classes"
    # a network of several classes: one probability channel per class, (c, z, y, x)
    image_spec = spec if classes is None else replace(spec, shape=(len(classes), *shape), chunks=(1, *chunks))
    # slice A of --slices A:B sits where it sits in the input, for viewers and for later commands
    origin = (image.origin[0] + z_range[0] * image.voxel_size[0], *image.origin[1:])
    prov = provenance(
        "predict",
        resume_record=record,
        model=str(model_path),
        data=str(image.path.resolve()),
        slices=list(z_range),
        settings={k: v for k, v in to_dict(config).items() if k not in ("overwrite", "resume")},
        rescaled=factor,
        **({} if classes is None else {"classes": classes_record(classes)}),
        model_meta={k: meta.get(k) for k in ("halo", "divisor", "normalization", "parameters")},
        # the run's calibrated segmentation settings, which emseg segment uses by default
        **({"segmentation": meta["segmentation"]} if isinstance(meta.get("segmentation"), dict) else {}),
        # how the run's blob-like classes become objects (segment --objects and evaluate use them)
        **({"objects": meta["class_bias"].get("objects", {})} if isinstance(meta.get("class_bias"), dict) else {}),
    )

    def create(path: Path) -> None:
        root = create_image_store(path, image.version, attrs={"emseg": {**prov, "complete": False}})
        top = 255 if config.dtype == "uint8" else 1
        omero = probability_omero(top) if classes is None else omero_channels(classes, top)
        create_multiscale(root, image_spec, image.voxel_size, image.version, "probabilities", omero, origin=origin)
        create_label(root, label, spec, image.voxel_size, image.version, origin, classes=classes)

    with Output(
        final,
        overwrite=config.overwrite,
        kind="store",
        command="predict",
        create=create,
        resume_record=record,
        resume=config.resume,
        inputs=[model, model_path, image.path],
    ) as out:
        run = Run(
            str(model_path),
            str(image.path.resolve()),
            str(out.path),
            str(out.done_dir),
            config,
            int(meta.get("divisor") or 1),
            normalization=stack_mean_std(meta, image, config),
            first_slice=z_range[0],
            zoom=factor,
            label=label,
        )
        norms = slice_mean_stds(meta, image, z_range, config, progress)
        total, tasks = plan_tasks(run, shape, chunks, norms)
        out.expect(total, "blocks")
        done = out.done_names()
        if out.resumed:
            log.info("resuming: %d of %d blocks already done", len(done), total)
        progress.start("predict", total=total, unit="blocks")
        progress.advance(len(done))
        run_blocks(
            run_block,
            (t for t in tasks if t.block.name not in done),
            threads=config.threads,
            workers=config.workers,
            scheduler=config.scheduler,
            progress=progress,
            key=lambda t: f"emseg-block-{t.block.name}",
            for_worker=with_torch_threads,
            cleanup=drop_caches,
        )
        progress.finish()
        build_levels(out.path, "mean")
        build_levels(out.path / "labels" / label, "majority" if classes is None else "mode")
        zarr.open_group(str(out.path), mode="r+").attrs["emseg"] = {**prov, "complete": True}
    return final


def _rescale(meta: dict[str, Any], image: OmeImage, config: PredictConfig) -> float:
    """How many times the input's size the model runs at: its training pixel size (recorded by
    built-in models) over the store's, unless within 10 % or ``--no-rescale``; said when it is not 1."""
    from emseg.models.rescale import rescale_factor

    model_pixel = (meta.get("builtin") or {}).get("pixel_size_nm")
    if model_pixel and emseg_attrs(image).get("voxel_size_from") == "default":
        log.warning(
            "%s has no voxel size (ingested without one): predicting at its own pixels, not rescaled to the "
            "model's %g nm (ingest with --voxel-size Z Y X)",
            image.path,
            model_pixel,
        )
        return 1.0
    factor = rescale_factor(model_pixel, float(image.voxel_size[-1])) if config.rescale else 1.0
    if factor != 1.0:
        log.warning(
            "the model was trained at %g nm pixels, %s has %g nm: predicting on the input resampled by %.3f "
            "(and the output back; --no-rescale turns it off)",
            model_pixel,
            image.path,
            image.voxel_size[-1],
            factor,
        )
    return factor


def stack_mean_std(meta: dict[str, Any], image: OmeImage, config: PredictConfig) -> tuple[float, float] | None:
    """(mean, std) that map this stack's robust percentiles where the training stack's went, with
    ``config.normalization`` "stack" and a checkpoint that records them; None: the checkpoint's."""
    norm = meta["normalization"]
    if config.normalization != "stack" or not {"percentiles", "low", "high"} <= set(norm):
        return None
    mean, std = stack_normalization(norm, lambda z, rows, cols: np.asarray(image.array[z, rows, cols]), image.shape)
    log.info("stack normalisation: mean %.4g, std %.4g (training %.4g, %.4g)", mean, std, norm["mean"], norm["std"])
    return mean, std


def slice_mean_stds(
    meta: dict[str, Any], image: OmeImage, z_range: tuple[int, int], config: PredictConfig, progress: Reporter
) -> list[tuple[float, float]] | None:
    """(mean, std) of every slice of ``z_range`` (output slice order) with ``config.normalization``
    "slice" and a checkpoint that records percentiles: each slice's own percentiles
    (:func:`~emseg.models.normalization.slice_normalization`), read in bands of chunk rows on
    ``config.threads`` threads; None otherwise."""
    norm = meta["normalization"]
    if config.normalization != "slice" or not {"percentiles", "low", "high"} <= set(norm):
        return None
    from concurrent.futures import ThreadPoolExecutor

    array = image.array
    height, band = int(array.shape[1]), int(array.chunks[1])

    def one(z: int) -> tuple[float, float]:
        return slice_normalization(norm, (np.asarray(array[z, y : y + band]) for y in range(0, height, band)))

    progress.start("predict: slice intensities", total=z_range[1] - z_range[0], unit="slices")
    with ThreadPoolExecutor(max(1, int(config.threads))) as pool:
        result = []
        for pair in pool.map(one, range(*z_range)):
            result.append(pair)
            progress.advance(1)
    progress.finish()
    return result


def _checked_model(model: str | Path, config: PredictConfig) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, its meta), after checking the settings the checkpoint must allow."""
    model_path, meta = check_trained(model)  # config bounds, normalisation and finite weights
    model_path = model_path.resolve()
    check_tiling(config.tile, config.overlap, int(meta.get("divisor") or 1), config.blend)
    return model_path, meta


def _check_runtime(config: PredictConfig) -> None:
    """The device and the scheduler address, checked in this process before any output exists."""
    resolve_device(config.device)
    if config.scheduler is not None:
        check_scheduler_address(config.scheduler)
    elif config.workers is not None:
        check_local_workers(config.workers)


def _checked_input(data: str | Path, config: PredictConfig) -> tuple[OmeImage, tuple[int, int]]:
    """(the input image, the slice range [z0, z1) to predict)."""
    image = open_ome(data)
    if image.array.ndim != 3:
        raise BadInputError(f"{data}: expected a (z, y, x) image")
    z0, z1 = config.slices or (0, image.shape[0])
    if not 0 <= z0 < z1 <= image.shape[0]:
        raise BadInputError(f"--slices {z0}:{z1}: {data} has slices 0-{image.shape[0] - 1}")
    return image, (z0, z1)


def _resume_record(model: Path, image: OmeImage, config: PredictConfig) -> dict[str, Any]:
    """What an interrupted run must share with its ``--resume``: the model file (size and time),
    the input and every setting that changes the output."""
    stat = model.stat()
    kept = {k: v for k, v in to_dict(config).items() if k not in RUNTIME_ONLY}
    return {
        "model": str(model),
        "model_size": stat.st_size,
        "model_mtime": stat.st_mtime,
        "data": str(image.path.resolve()),
        "config": kept,
    }


def _pyramid_min(image: OmeImage) -> int:
    """The input's own pyramid depth: stop where its smallest level stops."""
    levels = image.levels
    if len(levels) <= 1:
        return max(image.shape[1:])
    return max(levels[-1].shape[1:])


__all__ = ["predict_store"]
