"""TIFF stacks and slice folders into chunked OME-Zarr, streamed band by band.

The source is read in bands of whole chunk rows (``chunks[0]`` slices x ``chunks[1]`` rows x all
columns); each band is written to level 0 and reduced 2x2 into the pyramid levels, whose rows are
buffered until a whole chunk row is ready, so every write covers whole chunks and peak memory is
a few bands whatever the stack's size. Reading the next band overlaps writing the current one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from emseg.classes import CodeCount, classes_record, label_classes, map_codes
from emseg.config import IngestConfig
from emseg.errors import BadInputError
from emseg.io.outputs import Output, check_inputs, provenance
from emseg.io.pyramid import PyramidWriter, band_rows, pyramid_shapes
from emseg.io.stacks import Stack, open_stack
from emseg.io.zarr import LevelSpec, create_image_store, create_label, create_multiscale
from emseg.progress import Reporter, reporter_or_null

log = logging.getLogger(__name__)
#: Largest band (bytes of source pixels) ingest holds at once.
BAND_BYTES = 2**30


def _bands(shape: tuple[int, int, int], zstep: int, ystep: int) -> Iterator[tuple[int, int, int, int]]:
    for z0 in range(0, shape[0], zstep):
        for y0 in range(0, shape[1], ystep):
            yield z0, min(z0 + zstep, shape[0]), y0, min(y0 + ystep, shape[1])


def _resolve_voxel_size(config: IngestConfig, stack: Stack) -> tuple[tuple[float, float, float], str]:
    if config.voxel_size is not None:
        vs = tuple(float(v) for v in config.voxel_size)
        if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
            raise BadInputError(f"--voxel-size {config.voxel_size}: expected three positive numbers Z Y X (nm)")
        return vs, "option"
    if stack.voxel_size is not None:
        if stack.voxel_size_note is not None:
            log.warning("%s", stack.voxel_size_note)
            return stack.voxel_size, "metadata (no z spacing: z = 1 nm)"
        return stack.voxel_size, "metadata"
    return (1.0, 1.0, 1.0), "default"


def _check_config(config: IngestConfig) -> None:
    if config.ngff not in ("0.4", "0.5"):
        raise BadInputError(f"--ngff {config.ngff}: supported versions are 0.4 and 0.5")
    if len(config.chunks) != 3 or any(int(c) < 1 for c in config.chunks):
        raise BadInputError(f"--chunks {config.chunks}: expected three positive integers Z Y X")
    if config.shards is not None:
        if config.ngff == "0.4":
            raise BadInputError("--shards needs --ngff 0.5 (zarr v3); NGFF 0.4 has no sharding")
        if len(config.shards) != 3 or any(
            int(s) < int(c) or int(s) % int(c) for s, c in zip(config.shards, config.chunks, strict=True)
        ):
            raise BadInputError(f"--shards {config.shards}: each must be a multiple of the chunk size {config.chunks}")


def ingest_stack(
    source: str | Path,
    output: str | Path,
    config: IngestConfig = IngestConfig(),
    labels: str | Path | None = None,
    progress: Reporter | None = None,
) -> Path:
    """Convert a TIFF stack, slice folder or 2D image (and optionally its labels) to OME-Zarr.

    The image keeps its dtype; labels are binarised (value > 0 -> 1, uint8) into
    ``labels/cells``, or with ``config.classes`` mapped to class numbers (uint8, 0 unlabelled)
    into ``labels/classes``, each class named and coloured in its metadata. Writes through
    :class:`~emseg.io.outputs.Output`: on any failure nothing new exists under ``output`` (an
    earlier output it was to replace stays). Returns ``output``.
    """
    _check_config(config)
    if config.classes is not None and labels is None:
        raise BadInputError("--class names the codes of a label image: give it with --labels")
    progress = reporter_or_null(progress)
    output = Path(output)
    check_inputs(output, [source, labels])
    with open_stack(source, config.series, config.channel) as stack:
        lab = open_stack(labels) if labels is not None else None
        try:
            if lab is not None and lab.shape != stack.shape:
                raise BadInputError(
                    f"labels {lab.path.name} have shape {lab.shape} (z, y, x) but the image {stack.path.name} "
                    f"has {stack.shape}; they must match exactly"
                )
            voxel_size, vs_source = _resolve_voxel_size(config, stack)
            return _write(stack, lab, output, config, voxel_size, vs_source, progress)
        finally:
            if lab is not None:
                lab.close()


def _write(  # noqa: C901 - the streaming loop: read ahead, check, write each pyramid level, report
    stack: Stack,
    lab: Stack | None,
    output: Path,
    config: IngestConfig,
    voxel_size: tuple[float, float, float],
    vs_source: str,
    progress: Reporter,
) -> Path:
    spec = LevelSpec(
        shape=stack.shape,
        dtype=str(stack.dtype),
        chunks=tuple(int(c) for c in config.chunks),
        shards=None if config.shards is None else tuple(int(s) for s in config.shards),
        pyramid_min_size=config.pyramid_min_size,
        clevel=config.clevel,
    )
    n_levels = len(pyramid_shapes(spec.shape, spec.pyramid_min_size))
    unit = spec.shards or spec.chunks
    zstep = min(unit[0], stack.shape[0])
    ystep = band_rows(min(unit[1], stack.shape[1]), n_levels, stack.shape[1], stack.row_block)
    row_bytes = zstep * stack.shape[2] * stack.dtype.itemsize * (3 if stack.rgb else 1)
    if ystep * row_bytes > BAND_BYTES:  # rather decode a strip twice than hold a huge band
        ystep = band_rows(min(unit[1], stack.shape[1]), n_levels, stack.shape[1])
    if ystep * row_bytes > BAND_BYTES:
        raise BadInputError(
            f"{stack.path}: one band of {ystep} rows x {stack.shape[2]} columns would need "
            f"{ystep * row_bytes / 2**30:.1f} GiB; use smaller --chunks"
        )
    classes = None if config.classes is None else label_classes(config.classes)
    prov = provenance(
        "ingest",
        source=stack.describe(),
        labels=None if lab is None else lab.describe(),
        **({} if classes is None or lab is None else {"classes": classes_record(classes)}),
        voxel_size_from=vs_source,
    )
    inputs = [stack.path, None if lab is None else lab.path]
    with Output(output, overwrite=config.overwrite, kind="store", command="ingest", inputs=inputs) as out:
        root = create_image_store(out.path, config.ngff, attrs={"emseg": prov})
        image_arrays = create_multiscale(root, spec, voxel_size, config.ngff, stack.path.stem)
        label_arrays = None
        if lab is not None:
            name = "cells" if classes is None else "classes"
            label_arrays = create_label(root, name, spec, voxel_size, config.ngff, classes=classes)
        codes = CodeCount()
        seen_label_values: set[float] = set()
        floating = np.issubdtype(stack.dtype, np.floating)
        progress.start(f"ingest {stack.path.name}", total=stack.shape[0], unit="slices")
        t0, done_bytes = time.perf_counter(), 0

        def read(z0: int, z1: int, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
            return stack.read(z0, z1, y0, y1), None if lab is None else lab.read(z0, z1, y0, y1)

        bands = list(_bands(stack.shape, zstep, ystep))
        with ThreadPoolExecutor(1, "emseg-read") as reader, ThreadPoolExecutor(2, "emseg-write") as writer:
            image_writer = PyramidWriter(image_arrays, "mean", writer)
            reduction = "majority" if classes is None else "mode"
            label_writer = None if label_arrays is None else PyramidWriter(label_arrays, reduction, writer)
            future = reader.submit(read, *bands[0])
            try:
                for i, (z0, z1, y0, y1) in enumerate(bands):
                    image, label = future.result()
                    if i + 1 < len(bands):
                        future = reader.submit(read, *bands[i + 1])
                    if floating and not np.isfinite(image).all():
                        raise BadInputError(
                            f"{stack.path}: non-finite values (NaN or infinity) in slices {z0}-{z1 - 1}; "
                            "fix the source first"
                        )
                    image_writer.write(z0, y0, image)
                    if label is not None and label_writer is not None and classes is not None:
                        codes.add(label)
                        label_writer.write(z0, y0, map_codes(label, classes))
                    elif label is not None and label_writer is not None:
                        if len(seen_label_values) <= 2:
                            seen_label_values.update(np.unique(label).tolist()[:3])
                        label_writer.write(z0, y0, (label > 0).astype(np.uint8))
                    done_bytes += image.nbytes
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    progress.advance((z1 - z0) * (y1 - y0) / stack.shape[1], mb_per_s=done_bytes / elapsed / 1e6)
                image_writer.drain()
                if label_writer is not None:
                    label_writer.drain()
            finally:
                future.cancel()
        progress.finish()
        _add_display_window(root, image_arrays[-1], config.ngff)
        if vs_source == "default":
            log.warning("%s carries no voxel size; used 1 x 1 x 1 nm (set it with --voxel-size Z Y X)", stack.path.name)
        if classes is not None and lab is not None:
            for note in codes.report(classes, lab.path.name):
                log.warning("%s", note)
        if len(seen_label_values) > 2:
            log.warning(
                "labels %s have more than two values; binarised as value > 0 -> cell (1)", lab.path.name if lab else ""
            )
    return output


#: Percentiles of the display window of an ingested image (viewers that read ``omero``).
DISPLAY_PERCENTILES = (0.5, 99.5)
#: At most this many pixels are read for it.
DISPLAY_SAMPLE = 1 << 20


def _add_display_window(root: Any, coarsest: Any, version: str) -> None:
    """The image's ``omero`` block: a grey channel windowed on robust percentiles of nine evenly
    spaced slices of its coarsest level (about 1 kpx a side), strided to at most
    ``DISPLAY_SAMPLE`` pixels in all so that memory stays flat, within the dtype's range (the
    sample's for floats)."""
    from emseg.io.zarr import intensity_omero, ngff_metadata, ngff_payload

    depth = int(coarsest.shape[0])
    zs = sorted(set(np.linspace(0, depth - 1, min(9, depth)).round().astype(int).tolist()))
    plane = int(coarsest.shape[-2]) * int(coarsest.shape[-1])
    step = max(1, math.ceil(math.sqrt(plane * len(zs) / DISPLAY_SAMPLE)))
    sample = np.concatenate([np.asarray(coarsest[z, ::step, ::step]).ravel() for z in zs])
    if sample.dtype == np.bool_:  # percentiles need numbers
        sample = sample.astype(np.uint8)
    start, end = (float(v) for v in np.percentile(sample, DISPLAY_PERCENTILES))
    dtype = np.dtype(coarsest.dtype)
    if np.issubdtype(dtype, np.integer):
        low, high = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        low, high = float(sample.min()), float(sample.max())
    payload = {**ngff_payload(root.attrs), "omero": intensity_omero(low, high, start, max(end, start + 1e-6))}
    root.attrs.update(ngff_metadata(version, "image", payload))
