"""Export an OME-Zarr image (or one of its labels) to a TIFF stack that keeps its voxel size, or
to a folder of PNG slices, slice by slice, so memory stays at one slice whatever the stack's size.

``tif`` writes an ImageJ hyperstack when ImageJ can hold the data (classic TIFF under 4 GiB,
uint8 / uint16 / float32 pixels; other types converted when no value changes), so that Fiji's
plain File > Open shows a calibrated Z stack; otherwise, or with ``ome-tiff``, it writes a
compressed OME-TIFF (BigTIFF) with PhysicalSizeX/Y/Z, which Fiji opens through Bio-Formats.

The ImageJ hyperstack is written uncompressed: tifffile writes ImageJ hyperstacks only so
("ImageJ hyperstacks do not support BigTIFF or compression"), ImageJ's own reader and its
virtual stacks read uncompressed contiguous planes directly, and ``emseg ingest`` reads them
back with plain offsets. The OME-TIFF is zlib-compressed (with the horizontal predictor for
integer data), which Bio-Formats reads everywhere.

Every format is checked against the data's type and values before the output is opened, and a
type the format lacks is converted only when no value changes: float16 becomes float32, and
64-bit (or, for PNG, any) integers become the narrowest type of the format that holds every
value, found by one pass over the data. Data no type of the format holds unchanged (IDs that
need 64 bits: OME-XML has no 64-bit integers) is refused in one line and nothing is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import EXPORT_FORMATS, ExportConfig
from emseg.errors import BadInputError, EmsegRuntimeError
from emseg.io.outputs import Output, software_tag
from emseg.io.zarr import OmeImage, emseg_attrs, open_ome
from emseg.progress import Reporter, reporter_or_null

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
#: Pixel types ImageJ 1.x opens (8-bit, 16-bit, 32-bit float).
IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
#: A classic TIFF addresses 4 GiB; ImageJ cannot read BigTIFF.
CLASSIC_TIFF_BYTES = 2**32
#: Room left in a classic TIFF for headers: one IFD per slice and the ImageJ description.
_IFD_BYTES = 512
_HEADER_BYTES = 2**20
#: ImageJ holds a slice in one Java array.
IMAGEJ_SLICE_PIXELS = 2**31 - 1
#: Integers float32 holds exactly.
FLOAT32_EXACT = 2**24
#: Integer pixel types OME-XML's Pixels Type has, narrowest first (it has no 64-bit integers).
OME_UNSIGNED = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
OME_SIGNED = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32))
#: Pixel types an OME-TIFF holds as they are.
OME_DTYPES = (*OME_UNSIGNED, *OME_SIGNED, np.dtype(np.float32), np.dtype(np.float64))
#: Pixel types a PNG slice holds, narrowest first.
PNG_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


@dataclasses.dataclass(frozen=True)
class ValueRange:
    """What a pass over the data found: its minimum and maximum, and (for floats) whether every
    value survives a float32 round trip."""

    low: float
    high: float
    float32_exact: bool = True


def export_store(
    source: str | Path, output: str | Path, config: ExportConfig | None = None, progress: Reporter | None = None
) -> Path:
    """Write level ``config.level`` of ``source`` (or of ``labels/<config.labels>``) with its
    voxel size: ``file_format="tif"`` (the default for a .tif/.tiff output) an ImageJ
    hyperstack, or an OME-TIFF when ImageJ cannot hold the data; ``"ome-tiff"`` (the default for
    .ome.tif) an OME-TIFF; ``"png"`` one PNG per slice in a folder. Binary label masks are
    written as 0/255 so they are visible."""
    config = config or ExportConfig()
    output, label, level, overwrite = Path(output), config.labels, config.level, config.overwrite
    fmt = config.file_format or default_format(output)
    if fmt not in FORMATS:
        raise BadInputError(
            f"--format {fmt}: give tif (an ImageJ hyperstack, OUT.tif), ome-tiff (OUT.ome.tif) or png (a folder)"
        )
    image, array = _exported(source, label, level)
    # a mask is written as 0/255 so it is visible; instance IDs (uint32/uint64 labels) and class
    # numbers (labels/classes: 1 = the first class) as they are
    classes = emseg_attrs(image).get("classes")
    binary = (label is not None and array.dtype == np.uint8 and not classes) or array.dtype == np.bool_
    dtype = np.dtype(np.uint8) if array.dtype == np.bool_ else np.dtype(array.dtype).newbyteorder("=")
    progress = reporter_or_null(progress)
    shape = tuple(int(s) for s in array.shape)
    what = f"{source}/labels/{label}" if label is not None else str(source)

    def planes(out_dtype: np.dtype) -> Iterator[np.ndarray]:
        for z in range(shape[0]):
            plane = np.asarray(array[z])
            plane = (plane != 0).astype(np.uint8) * np.uint8(255) if binary else plane
            yield cast_exactly(plane, out_dtype, what)
            progress.advance(1)

    scanned: list[ValueRange] = []

    def scan() -> ValueRange:  # one pass over the data, at most
        if not scanned:
            progress.start(f"check the values of {output.name}", total=shape[0], unit="slices")
            scanned.append(value_range(planes(dtype)))
            progress.finish()
        return scanned[0]

    # level k is 2^k times coarser in y and x (see emseg.io.zarr)
    voxel = tuple(v * (2**level if i else 1) for i, v in enumerate(image.voxel_size))
    # every refusal comes here, before the output is opened: nothing is left behind
    writer, out_dtype = export_plan(fmt, shape, dtype, scan, what, output.name)
    # the earlier output (with --overwrite) stays until the new one is whole
    kind = "slices" if fmt == "png" else "file"
    with Output(output, overwrite=overwrite, kind=kind, command="export", inputs=[source]) as out:
        progress.start(f"export {output.name}", total=shape[0], unit="slices")
        if writer == "imagej":
            write_imagej(out.path, planes(out_dtype), shape, out_dtype, voxel)
        elif writer == "ome-tiff":
            write_ome_tiff(out.path, planes(out_dtype), shape, out_dtype, voxel)
        else:
            width = max(4, len(str(shape[0] - 1)))
            for z, plane in enumerate(planes(out_dtype)):
                write_png(out.path / f"slice_{z:0{width}d}.png", plane)
        progress.finish()
    return output


def export_plan(
    fmt: str, shape: Sequence[int], dtype: np.dtype, scan: Callable[[], ValueRange], what: str, name: str
) -> tuple[str, np.dtype]:
    """The writer ("imagej", "ome-tiff" or "png") and pixel type that hold a (Z, Y, X) stack of
    ``dtype`` in format ``fmt`` with no value changed; ``tif`` falls back to an OME-TIFF when
    ImageJ cannot hold the data. Raises :class:`BadInputError` (naming ``what``) when the format
    cannot hold the values at all. ``scan`` is called only for types the format lacks; each
    conversion is logged (INFO) under the output's ``name``."""
    if fmt == "png":
        writer, target = "png", png_dtype(dtype, scan, what)
    elif fmt == "tif":
        imagej_dtype, why_not = imagej_plan(shape, dtype, scan)
        if imagej_dtype is None:
            writer, target = "ome-tiff", ome_tiff_dtype(dtype, scan, what)
            log.warning(
                "%s: %s; wrote an OME-TIFF instead (open it in Fiji with File > Import > Bio-Formats)",
                name,
                why_not,
            )
        else:
            writer, target = "imagej", imagej_dtype
    else:
        writer, target = "ome-tiff", ome_tiff_dtype(dtype, scan, what)
    if target != dtype:
        kind = {"imagej": "ImageJ", "ome-tiff": "OME-TIFF", "png": "PNG"}[writer]
        log.info("%s: %s written as %s for %s (no value changes)", name, dtype, target, kind)
    return writer, target


def ome_tiff_dtype(dtype: np.dtype, scan: Callable[[], ValueRange], what: str) -> np.dtype:
    """The pixel type an OME-TIFF holds ``dtype`` data in with no value changed: its own type when
    OME-XML has it, float32 for float16, and for other integers (64-bit) the narrowest of
    uint8/16/32 (no negative value) or int8/16/32 that holds every value ``scan`` found. Raises
    :class:`BadInputError` when the values need 64 bits."""
    if dtype in OME_DTYPES:
        return dtype
    if dtype == np.float16:
        return np.dtype(np.float32)
    if not np.issubdtype(dtype, np.integer):
        raise BadInputError(f"{what}: OME-TIFF and ImageJ TIFF hold float32 or float64, not {dtype}")
    found = scan()
    target = _narrowest(OME_UNSIGNED if found.low >= 0 else OME_SIGNED, found)
    if target is None:
        raise BadInputError(
            f"{what}: {dtype} values {_int(found.low)} to {_int(found.high)} need 64-bit integers, which OME-TIFF "
            "and ImageJ TIFF lack (32 bits at most); the OME-Zarr keeps them: read it as it is (e.g. napari), or "
            "export labels with fewer IDs"
        )
    return target


def png_dtype(dtype: np.dtype, scan: Callable[[], ValueRange], what: str) -> np.dtype:
    """The pixel type a PNG slice holds ``dtype`` data in with no value changed: uint8 or uint16
    as they are, other integers as the narrowest of the two that holds every value ``scan``
    found. Raises :class:`BadInputError` for floats and for values neither holds."""
    if dtype in PNG_DTYPES:
        return dtype
    if not np.issubdtype(dtype, np.integer):
        raise BadInputError(f"{what}: PNG holds 8- or 16-bit integers; {dtype} data needs --format tif")
    found = scan()
    target = _narrowest(PNG_DTYPES, found)
    if target is None:
        raise BadInputError(
            f"{what}: {dtype} values {_int(found.low)} to {_int(found.high)} do not fit PNG's 8- or 16-bit "
            "unsigned integers; use --format tif"
        )
    return target


def cast_exactly(plane: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``plane`` as ``dtype``; a narrowing cast is checked value by value, so that data that
    changed since it was scanned is never written altered (:class:`EmsegRuntimeError`)."""
    out = plane.astype(dtype, copy=False)
    if not np.can_cast(plane.dtype, dtype, "safe") and not np.array_equal(out, plane, equal_nan=True):
        raise EmsegRuntimeError(f"{what}: values changed while exporting (no longer fit {dtype}); export it again")
    return out


def _narrowest(candidates: Sequence[np.dtype], found: ValueRange) -> np.dtype | None:
    for candidate in candidates:
        info = np.iinfo(candidate)
        if info.min <= found.low and found.high <= info.max:
            return candidate
    return None


def _int(value: float) -> str:
    return str(int(value)) if math.isfinite(value) else str(value)


def _exported(source: str | Path, label: str | None, level: int) -> tuple[OmeImage, Any]:
    """(the image or its ``labels/<label>``, its level ``level``), refusing a label, level or
    pixel type the store does not have in one line."""
    image = open_ome(source, channels=label is not None)
    if label is not None:
        if label not in image.labels:
            raise BadInputError(f"--labels {label}: {source} has labels {sorted(image.labels) or 'none'}")
        image = image.labels[label]
    if not 0 <= level < len(image.levels):
        raise BadInputError(f"--level {level}: {source} has levels 0-{len(image.levels) - 1}")
    array = image.levels[level]
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not numeric and array.dtype != np.bool_:
        raise BadInputError(f"{source}: pixel type {array.dtype} cannot be exported (integers, floats or bool)")
    return image, array


def default_format(output: Path) -> str | None:
    """``ome-tiff`` for OUT.ome.tif(f), ``tif`` for OUT.tif(f), else None (the caller must say)."""
    name = output.name.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith((".tif", ".tiff")):
        return "tif"
    return None


def value_range(planes: Iterable[np.ndarray]) -> ValueRange:
    """Minimum, maximum and float32 exactness of (Y, X) planes (one plane in memory at a time);
    NaN is ignored in the range and survives float32."""
    low, high, exact = math.inf, -math.inf, True
    for plane in planes:
        if plane.size == 0:
            continue
        if np.issubdtype(plane.dtype, np.floating):
            if plane.dtype.itemsize > 4 and exact:
                exact = bool(np.array_equal(plane.astype(np.float32), plane, equal_nan=True))
            if np.isnan(plane).all():
                continue
            low, high = min(low, float(np.nanmin(plane))), max(high, float(np.nanmax(plane)))
        else:
            low, high = min(low, float(plane.min())), max(high, float(plane.max()))
    if low > high:  # empty or all NaN
        low = high = 0.0
    return ValueRange(low, high, exact)


def imagej_plan(shape: Sequence[int], dtype: np.dtype, scan: Callable[[], ValueRange]) -> tuple[np.dtype | None, str]:
    """The pixel type to write a (Z, Y, X) stack of ``dtype`` as an ImageJ hyperstack, or None
    and the reason when ImageJ cannot hold it. ``scan`` is called (one pass over the data) only
    for types ImageJ lacks: integers become uint8/uint16 when their values fit, else float32
    when every value is an integer float32 holds exactly (|v| <= 2^24); float64 becomes float32
    when no value changes. Nothing is converted that would change a value."""
    z, y, x = (int(s) for s in shape)
    if y * x > IMAGEJ_SLICE_PIXELS:
        return None, f"slices of {y} x {x} pixels are more than ImageJ holds"
    target: np.dtype | None
    if dtype in IMAGEJ_DTYPES:
        target = dtype
    elif dtype == np.float16:
        target = np.dtype(np.float32)
    else:
        found = scan()
        target = _lossless_imagej_dtype(dtype, found)
        if target is None and np.issubdtype(dtype, np.floating):
            return None, f"{dtype} values would change in float32, ImageJ's widest pixel type"
        if target is None:
            return None, (
                f"{dtype} values {found.low:g} to {found.high:g} do not fit ImageJ's 8-bit, 16-bit or 32-bit float "
                "pixels unchanged"
            )
    nbytes = z * y * x * target.itemsize + z * _IFD_BYTES + _HEADER_BYTES
    if nbytes > CLASSIC_TIFF_BYTES:
        return None, f"{nbytes / 2**30:.1f} GiB is more than a classic TIFF (which ImageJ needs) holds (4 GiB)"
    return target, ""


def _lossless_imagej_dtype(dtype: np.dtype, found: ValueRange) -> np.dtype | None:
    if np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32) if found.float32_exact else None
    if found.low >= 0 and found.high <= 255 and dtype.itemsize == 1:
        return np.dtype(np.uint8)
    if found.low >= 0 and found.high <= 65535:
        return np.dtype(np.uint16)
    if -FLOAT32_EXACT <= found.low and found.high <= FLOAT32_EXACT:
        return np.dtype(np.float32)
    return None


def write_imagej(
    path: Path, slices: Iterable[np.ndarray], shape: Sequence[int], dtype: np.dtype, voxel_size: Sequence[float]
) -> None:
    """Write (Y, X) slices of ``dtype`` (uint8, uint16 or float32) as one uncompressed ImageJ
    hyperstack (classic TIFF, axes ZYX) calibrated in nm: resolution tags in pixels per nm,
    ``spacing`` = z nm and ``unit=nm`` in the ImageJ description, as ImageJ reads them. The
    Software tag marks it as emseg's (``--overwrite`` replaces only such a file)."""
    import tifffile

    z_nm, y_nm, x_nm = (float(v) for v in voxel_size)
    with tifffile.TiffWriter(path, bigtiff=False, imagej=True) as tw:
        tw.write(
            iter(slices),
            shape=tuple(shape),
            dtype=dtype,
            photometric="minisblack",
            resolution=(1.0 / x_nm, 1.0 / y_nm),
            metadata={"axes": "ZYX", "spacing": z_nm, "unit": "nm"},
            software=software_tag(),
        )


def write_ome_tiff(
    path: Path, slices: Iterable[np.ndarray], shape: Sequence[int], dtype: np.dtype, voxel_size: Sequence[float]
) -> None:
    """Write (Y, X) slices of ``dtype`` as one zlib-compressed OME-TIFF (BigTIFF, axes ZYX) whose
    OME-XML gives PhysicalSizeX/Y/Z in nm; the Software tag marks it as emseg's."""
    import tifffile

    z_nm, y_nm, x_nm = (float(v) for v in voxel_size)
    metadata = {
        "axes": "ZYX",
        "PhysicalSizeX": x_nm,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": y_nm,
        "PhysicalSizeYUnit": "nm",
        "PhysicalSizeZ": z_nm,
        "PhysicalSizeZUnit": "nm",
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            iter(slices),
            shape=tuple(shape),
            dtype=dtype,
            photometric="minisblack",
            compression="zlib",
            # the horizontal predictor (2) is read everywhere (tifffile applies it to integers of
            # at most 32 bits); the floating-point one (3) is not
            predictor=bool(np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize <= 4),
            # for readers that ignore OME-XML: pixels per centimetre, the one TIFF length unit
            resolution=(1e7 / x_nm, 1e7 / y_nm),
            resolutionunit="CENTIMETER",
            metadata=metadata,
            software=software_tag(),
        )


def write_png(path: Path, plane: np.ndarray) -> None:
    """Write one (Y, X) uint8 or uint16 slice as PNG, marked as emseg's (a Software text chunk)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", software_tag())
    Image.fromarray(np.ascontiguousarray(plane)).save(path, format="PNG", pnginfo=info)
