"""Export an OME-Zarr image (or one of its labels) to a BigTIFF stack or a folder of PNG slices,
slice by slice, so memory stays at one slice whatever the stack's size."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from emseg.errors import BadInputError
from emseg.io.outputs import Output, software_tag
from emseg.io.zarr import open_ome
from emseg.progress import Reporter, reporter_or_null

FORMATS = ("tif", "png")


def export_store(
    source: str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    label: str | None = None,
    level: int = 0,
    overwrite: bool = False,
    progress: Reporter | None = None,
) -> Path:
    """Write level ``level`` of ``source`` (or of ``labels/<label>``) as a compressed BigTIFF
    (``fmt="tif"``, the default for .tif/.tiff outputs) or as one PNG per slice in a folder
    (``fmt="png"``). Binary label masks are written as 0/255 so they are visible."""
    output = Path(output)
    fmt = fmt or ("tif" if output.suffix.lower() in (".tif", ".tiff") else None)
    if fmt not in FORMATS:
        raise BadInputError(f"--format {fmt}: give tif (an OUT.tif file) or png (a folder)")
    image = open_ome(source)
    if label is not None:
        if label not in image.labels:
            raise BadInputError(f"--labels {label}: {source} has labels {sorted(image.labels) or 'none'}")
        image = image.labels[label]
    if not 0 <= level < len(image.levels):
        raise BadInputError(f"--level {level}: {source} has levels 0-{len(image.levels) - 1}")
    array = image.levels[level]
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        if array.dtype != np.bool_:
            raise BadInputError(f"{source}: pixel type {array.dtype} cannot be exported (integers, floats or bool)")
    if fmt == "png" and array.dtype not in (np.uint8, np.uint16, np.bool_):
        raise BadInputError(f"PNG holds 8- or 16-bit integers; {array.dtype} data needs --format tif")
    # a mask is written as 0/255 so it is visible; instance IDs (uint32/uint64 labels) as they are
    binary = (label is not None and array.dtype == np.uint8) or array.dtype == np.bool_
    dtype = np.dtype(np.uint8) if array.dtype == np.bool_ else array.dtype
    progress = reporter_or_null(progress)

    def planes() -> Iterator[np.ndarray]:
        for z in range(array.shape[0]):
            plane = np.asarray(array[z])
            yield (plane != 0).astype(np.uint8) * np.uint8(255) if binary else plane
            progress.advance(1)

    voxel = tuple(v * (2**level if i else 1) for i, v in enumerate(image.voxel_size))
    # the earlier output (with --overwrite) stays until the new one is whole
    kind = "file" if fmt == "tif" else "slices"
    with Output(output, overwrite=overwrite, kind=kind, command="export", inputs=[source]) as out:
        progress.start(f"export {output.name}", total=array.shape[0], unit="slices")
        if fmt == "tif":
            write_tiff(out.path, planes(), array.shape, dtype, voxel)
        else:
            width = max(4, len(str(array.shape[0] - 1)))
            for z, plane in enumerate(planes()):
                write_png(out.path / f"slice_{z:0{width}d}.png", plane)
        progress.finish()
    return output


def write_tiff(
    path: Path, slices: Iterable[np.ndarray], shape: Sequence[int], dtype: np.dtype, voxel_size: Sequence[float]
) -> None:
    """Write an iterable of (Y, X) slices of ``dtype`` as one zlib-compressed BigTIFF whose
    centimetre resolution tags carry the (y, x) voxel size in nm (ImageJ reads it) and whose
    Software tag marks it as emseg's (``--overwrite`` replaces only such a file)."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for plane in slices:
            tw.write(
                np.asarray(plane, dtype=dtype),
                compression="zlib",
                predictor=True,
                resolution=(1e7 / voxel_size[2], 1e7 / voxel_size[1]),
                resolutionunit="CENTIMETER",
                metadata=None,
                software=software_tag(),
                contiguous=False,
            )


def write_png(path: Path, plane: np.ndarray) -> None:
    """Write one (Y, X) uint8 or uint16 slice as PNG, marked as emseg's (a Software text chunk)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", software_tag())
    Image.fromarray(np.ascontiguousarray(plane)).save(path, format="PNG", pnginfo=info)
