"""Lazy readers for image stacks: multi-page TIFF / BigTIFF (ImageJ and OME-TIFF included),
folders of TIFF or PNG slices, and single 2D images.

A :class:`Stack` knows its shape, dtype and voxel size from headers alone and reads any band
``[z0:z1, y0:y1, :]`` on demand, so ingesting never holds more than a band in memory. Every
failure a user can cause (missing path, not an image, truncated file, mismatched slices) is a
:class:`BadInputError` with one clear line.

Every call into tifffile or PIL on the user's file sits in its own small
:func:`~emseg.io.untrusted.untrusted` block: what they raise on a corrupt file becomes a
:class:`BadInputError`, while a bug in emseg's own code keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import Limits
from emseg.errors import BadInputError
from emseg.io.metadata import MISSING_Z_NM, FoundVoxelSize, ome_planes, tiff_voxel_info
from emseg.io.untrusted import check_source, untrusted

log = logging.getLogger(__name__)
_PIL_LOCK = threading.Lock()

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".tf2"}
PNG_SUFFIXES = {".png"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | PNG_SUFFIXES
#: A header may not make emseg allocate more than this for one slice (protects against hostile
#: files that claim absurd sizes): 2**32 pixels, e.g. 65536 x 65536 (the default of
#: :class:`~emseg.config.Limits`; EMSEG_MAX_SLICE_PIXELS raises it).
MAX_SLICE_PIXELS = Limits.max_slice_pixels
#: Nor more slices than this (the same bound as a store's, :data:`emseg.io.zarr.MAX_SLICES`).
MAX_SLICES = 2**24
#: Luminance weights (ITU-R BT.601) for RGB -> grayscale.
RGB_WEIGHTS = np.array([0.299, 0.587, 0.114])
#: PIL image mode -> (dtype, channels) of the decoded array.
PIL_MODES = {
    "1": (np.dtype(np.bool_), 1),
    "L": (np.dtype(np.uint8), 1),
    "P": (np.dtype(np.uint8), 3),
    "I;16": (np.dtype(np.uint16), 1),
    "I;16B": (np.dtype(np.uint16), 1),
    "I;16L": (np.dtype(np.uint16), 1),
    "I": (np.dtype(np.int32), 1),
    "F": (np.dtype(np.float32), 1),
    "RGB": (np.dtype(np.uint8), 3),
    "RGBA": (np.dtype(np.uint8), 4),
    "LA": (np.dtype(np.uint8), 1),
}


def natural_key(path: Path) -> list[Any]:
    """Sort key putting ``2.png`` before ``10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class Stack:
    """A lazily read (Z, Y, X) grayscale stack. Subclasses implement :meth:`_read`."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float] | None
    #: Why ``voxel_size`` is only partly known (z missing from the metadata, so 1 nm), else None.
    voxel_size_note: str | None = None
    rgb: bool
    #: Rows the source decodes together (a TIFF strip or tile row); bands are aligned to it.
    row_block: int = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, z0: int, z1: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
        """Rows ``y0:y1`` of slices ``z0:z1``, all columns: (z1-z0, y1-y0, X) of ``self.dtype``.

        RGB sources are converted to grayscale (BT.601 weights) in the source dtype.
        """
        y1 = self.shape[1] if y1 is None else y1
        data = self._read(z0, z1, y0, y1)
        if self.rgb:
            data = to_grayscale(data, self.dtype)
        expected = (z1 - z0, y1 - y0, self.shape[2])
        if data.shape != expected:
            raise BadInputError(
                f"{self.path}: slices {z0}-{z1 - 1} have shape {data.shape[1:]}, expected {expected[1:]}"
            )
        return data

    def _decoding(self, z0: int, z1: int) -> contextlib.AbstractContextManager[None]:
        """Reports a decoder failure on slices ``z0:z1`` as a truncated or corrupt file."""
        return untrusted(f"{self.path}: could not read slices {z0}-{z1 - 1}", "; the file is truncated or corrupt")

    def _read(self, z0: int, z1: int, y0: int, y1: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _note_missing_z(self, found: FoundVoxelSize | None) -> None:
        """Say so (:attr:`voxel_size_note`, which ingest warns with when it uses the metadata's
        voxel size) when the metadata gave y and x but no
        z spacing for a stack of several slices: z is then 1 nm, which is rarely the truth."""
        if found is None or found.z_known or self.shape[0] < 2:
            return
        self.voxel_size_note = (
            f"{self.path.name}: no z spacing in its metadata ({found.source}: y {found.zyx[1]:g} nm, "
            f"x {found.zyx[2]:g} nm); z = {found.zyx[0]:g} nm unless --voxel-size Z Y X is given"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.path.name,
            "path": str(self.path.resolve()),
            "bytes": _source_bytes(self.path),
            "shape": list(self.shape),
            "dtype": str(self.dtype),
        }


def _source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def to_grayscale(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(..., C) RGB(A) -> (...) grayscale in ``dtype`` (alpha ignored)."""
    gray = data[..., :3].astype(np.float32) @ RGB_WEIGHTS.astype(np.float32)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        gray = np.clip(np.rint(gray), info.min, info.max)
    return gray.astype(dtype)


def _check_size(path: Path, shape: Sequence[int], dtype: np.dtype) -> None:
    pixels = math.prod(int(s) for s in shape[-2:])
    if any(int(s) <= 0 for s in shape):
        raise BadInputError(f"{path}: empty image (shape {tuple(shape)})")
    limit = Limits.from_env().max_slice_pixels
    if pixels > limit:
        raise BadInputError(
            f"{path}: slice of {tuple(shape[-2:])} pixels is more than the limit of {limit} pixels "
            "(raise it with EMSEG_MAX_SLICE_PIXELS when the data really is that large)"
        )
    if math.prod(int(s) for s in shape[:-2]) > MAX_SLICES:
        raise BadInputError(f"{path}: {math.prod(int(s) for s in shape[:-2])} slices is more than emseg accepts")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        raise BadInputError(f"{path}: unsupported pixel type {dtype}")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Shape, dtype and axes of what a TIFF's pages hold when emseg reads them page by page."""

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str


class TiffStack(Stack):
    """A multi-page TIFF/BigTIFF, ImageJ hyperstack or OME-TIFF, at full resolution.

    The whole file is the stack: series whose planes agree in shape and dtype (a file written
    page by page, each page its own series; an OME file of several images) are read one after
    the other as one stack; series that differ are refused, naming them, unless ``series`` picks
    one. Leading axes other than y, x, samples and channels (z, time, ...) are flattened into z;
    more than one channel is refused unless ``channel`` picks one. Plane counts that metadata
    declares are checked against the pages present before tifffile sizes anything by them.
    """

    def __init__(self, path: Path, series: int | None = None, channel: int | None = None) -> None:
        self.path = path
        self._tif: Any = None
        self._fd: int | None = None
        self._pages: list[Any] | None = None
        self._cache: tuple[int, np.ndarray] | None = None
        try:
            self._open(path, series, channel)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, pick: int | None, channel: int | None) -> None:
        import tifffile

        with _tifffile_errors() as errors:
            with untrusted(f"{path}: not a readable TIFF"):
                self._tif = tifffile.TiffFile(path)
            check_tiff_pages(self._tif, path, errors)
            check_declared_planes(self._tif, path)
            with untrusted(f"{path}: not a readable TIFF"):
                found = list(self._tif.series)
            if errors.messages:
                raise BadInputError(f"{path}: its metadata does not match its pages ({errors.messages[0]})")
        if not found:
            raise BadInputError(f"{path}: not a readable TIFF (it holds no image)")
        series = self._whole_file(found, pick)
        axes, shape = str(series.axes), tuple(int(s) for s in series.shape)
        self.dtype = np.dtype(series.dtype)
        self.rgb = bool(axes and axes[-1] == "S" and shape[-1] in (3, 4))
        if axes and axes[-1] == "S" and shape[-1] in (1, 3, 4):
            axes, shape = axes[:-1], shape[:-1]
        if len(shape) < 2:
            raise BadInputError(f"{path}: not an image (shape {shape})")
        self._fixed = self._channel(axes, shape, channel)
        _check_size(path, shape, self.dtype)
        self._series_shape = shape
        free = [s for i, s in enumerate(shape[:-2]) if i not in self._fixed]
        self.shape = (int(math.prod(free)), int(shape[-2]), int(shape[-1]))
        if sum(s > 1 for s in free) > 1:
            log.info("%s: axes %s read as %d slices, the first axis slowest", path.name, axes, self.shape[0])
        voxel = tiff_voxel_info(self._tif)
        self.voxel_size = None if voxel is None else voxel.zyx
        self._note_missing_z(voxel)
        self._offset: int | None = None
        self.row_block = 1
        if self._pages is None:
            self._open_series(series)

    def _channel(self, axes: str, shape: tuple[int, ...], channel: int | None) -> dict[int, int]:
        """{axis: index} fixing the channel axis: ``channel``, or the only one."""
        channels = shape[axes.index("C")] if "C" in axes[:-2] else 1
        if channel is not None and not 0 <= channel < channels:
            raise BadInputError(f"--channel {channel}: {self.path} has channels 0-{channels - 1}")
        if channels > 1 and channel is None:
            raise BadInputError(
                f"{self.path}: {channels} channels; emseg segments one channel "
                f"(pick it with --channel 0-{channels - 1})"
            )
        return {axes.index("C"): channel or 0} if "C" in axes[:-2] else {}

    def _whole_file(self, found: list[Any], pick: int | None) -> Any:
        """The series to read: the one picked, the only one, or all of them as one stack when each
        page is one plane and the planes agree in shape and dtype; otherwise an error naming them."""
        if pick is not None:
            if not 0 <= pick < len(found):
                raise BadInputError(f"--series {pick}: {self.path} has series 0-{len(found) - 1}")
            return found[pick]
        if len(found) == 1:
            return found[0]
        pages = [p for s in found for p in s.pages]
        plane_shapes = {(tuple(p.shape), np.dtype(p.dtype).str) for p in pages if p is not None}
        one_plane_each = all(
            s.pages[0] is not None and math.prod(s.shape) == len(s.pages) * math.prod(s.pages[0].shape) for s in found
        )
        if len(plane_shapes) != 1 or not one_plane_each or any(p is None for p in pages):
            listed = ", ".join(f"{i}: {tuple(s.shape)} {np.dtype(s.dtype)}" for i, s in enumerate(found[:4]))
            more = f", ... ({len(found)} in all)" if len(found) > 4 else ""
            raise BadInputError(
                f"{self.path}: holds {len(found)} series that do not form one stack ({listed}{more}); "
                f"pick one with --series 0-{len(found) - 1}"
            )
        import tifffile

        log.info(
            "%s: %d series of one plane shape read as one stack of %d slices", self.path.name, len(found), len(pages)
        )
        plane, dtype = pages[0].shape, np.dtype(found[0].dtype)
        axes = "I" + ("YXS" if len(plane) == 3 else "YX")
        if len({p.hash for p in pages}) == 1:  # stored alike: tifffile reads them as one series, by chunks
            return tifffile.TiffPageSeries(pages, (len(pages), *plane), dtype, axes, parent=self._tif, kind="emseg")
        self._pages = pages  # stored differently (compression, tiling): decoded page by page
        return _Layout((len(pages), *plane), dtype, axes)

    def _open_series(self, series: Any) -> None:
        import zarr

        with untrusted(f"{self.path}: not a readable TIFF"):
            # level 0: a pyramidal OME-TIFF would otherwise open as a group of all its levels
            z = zarr.open(series.aszarr(level=0), mode="r")
        if not isinstance(z, zarr.Array):
            raise BadInputError(f"{self.path}: not a readable TIFF (its series is not one image)")
        self._z = z
        # Uncompressed data stored in one contiguous block (ImageJ, tifffile, many scanners) is
        # read with pread at exact offsets: no decoding and no strip larger than the band.
        self._offset = series.dataoffset if series.dataoffset is not None and not series.is_multifile else None
        self._file_dtype = np.dtype(series.dtype).newbyteorder(self._tif.byteorder)
        if self._offset is not None:
            self._fd = os.open(self.path, os.O_RDONLY)
            samples = 1 if not self.rgb else int(series.shape[-1])
            self._row_items = self.shape[2] * samples
            planes = math.prod(self._series_shape[:-2])
            end = self._offset + planes * self.shape[1] * self._row_items * self._file_dtype.itemsize
            if end > os.fstat(self._fd).st_size:
                raise BadInputError(
                    f"{self.path}: file is truncated ({os.path.getsize(self.path)} bytes, its header needs {end})"
                )
        #: Rows the source stores together: bands aligned to it never decode a strip twice.
        self.row_block = 1 if self._offset is not None else int(self._z.chunks[len(self._series_shape) - 2])

    def _index(self, z: int) -> tuple[int, ...]:
        """The index over the series' leading axes of slice ``z`` (the fixed channel in place)."""
        lead = self._series_shape[:-2]
        free = [i for i in range(len(lead)) if i not in self._fixed]
        index = dict(zip(free, (int(i) for i in np.unravel_index(z, [lead[i] for i in free])), strict=True))
        return tuple(index.get(i, self._fixed.get(i, 0)) for i in range(len(lead)))

    def _read(self, z0: int, z1: int, y0: int, y1: int) -> np.ndarray:
        if self._pages is not None:
            return np.stack([self._page(z)[y0:y1] for z in range(z0, z1)])
        if self._offset is not None:
            return self._pread(z0, z1, y0, y1)
        lead = self._series_shape[:-2]
        if len(lead) <= 1 and not self._fixed:  # (Y, X[, S]) or (Z, Y, X[, S])
            keys: list[tuple[int | slice, ...]] = [(slice(z0, z1), slice(y0, y1)) if lead else (slice(y0, y1),)]
        else:  # several leading axes flattened into z, or a channel picked: one plane each
            keys = [(*self._index(z), slice(y0, y1)) for z in range(z0, z1)]
        with self._decoding(z0, z1):
            planes = [np.asarray(self._z[key]) for key in keys]
        data = planes[0] if len(lead) == 1 and not self._fixed else np.stack(planes)
        if data.ndim == 4 and not self.rgb:  # a single-sample axis
            data = data[..., 0]
        return data

    def _page(self, z: int) -> np.ndarray:
        """Page ``z`` of a stack read page by page, decoded whole (its size is within the page
        limits :func:`check_tiff_pages` checked); the last one is kept for the next band."""
        assert self._pages is not None
        if self._cache is None or self._cache[0] != z:
            with self._decoding(z, z + 1):
                data = np.asarray(self._pages[z].asarray())
            if data.ndim == 3 and not self.rgb:
                data = data[..., 0]
            self._cache = (z, data)
        return self._cache[1]

    def _pread(self, z0: int, z1: int, y0: int, y1: int) -> np.ndarray:
        assert self._fd is not None and self._offset is not None
        itemsize = self._file_dtype.itemsize
        row_bytes = self._row_items * itemsize
        plane_bytes = self.shape[1] * row_bytes
        trailing = (self._row_items // self.shape[2],) if self.rgb else ()
        lead = self._series_shape[:-2]
        if not self._fixed and y0 == 0 and y1 == self.shape[1]:
            planes = [(z0, z1)]
        else:
            file_plane = [int(np.ravel_multi_index(self._index(z), lead)) if lead else 0 for z in range(z0, z1)]
            planes = [(p, p + 1) for p in file_plane]
        out = []
        for a, b in planes:
            start = self._offset + a * plane_bytes + y0 * row_bytes
            nbytes = (b - a - 1) * plane_bytes + (y1 - y0) * row_bytes
            try:
                buf = os.pread(self._fd, nbytes, start)
            except OSError as exc:  # EIO on a damaged disk or file
                raise BadInputError(
                    f"{self.path}: could not read slices {z0}-{z1 - 1} ({type(exc).__name__}: {exc}); "
                    "the file is truncated or corrupt"
                ) from None
            if len(buf) != nbytes:
                raise BadInputError(f"{self.path}: file is truncated at slice {a}")
            data = np.frombuffer(buf, dtype=self._file_dtype)
            out.append(data.reshape((b - a, y1 - y0, self.shape[2]) + trailing))
        data = out[0] if len(out) == 1 else np.concatenate(out)
        return data.astype(self._file_dtype.newbyteorder("="), copy=not data.flags.writeable)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None


def check_declared_planes(tif: Any, path: Path) -> None:
    """Check the planes a file's metadata declares against the pages it holds, before tifffile
    sizes a series by them: OME-XML that says ``SizeZ="9"`` over three pages would be read as
    nine slices (six of zeros), one that says 2**31 would allocate by it, and ImageJ's
    ``images=2`` over three pages would drop one. A mismatch is an error naming both counts.
    Exceptions the formats define: a multi-file OME image (planes in other files) and an ImageJ
    hyperstack over 4 GiB (one page; its data are checked to be in the file when opened)."""
    with untrusted(f"{path}: not a readable TIFF"):
        pages = len(tif.pages)
        xml = tif.pages[0].description if tif.is_ome else None
        imagej = tif.imagej_metadata if tif.is_imagej else None
    fix = "the metadata or the file is wrong (fix the metadata, or strip it, e.g. with tifffile)"
    declared = ome_planes(xml) if xml else None
    if declared is not None:
        sizes = ", ".join(f"SizeZ={z} SizeC={c} SizeT={t}" for z, c, t in declared.images[:3])
        if declared.planes > MAX_SLICES:
            raise BadInputError(
                f"{path}: its OME-XML declares {declared.planes} planes ({sizes}); emseg takes {MAX_SLICES}"
            )
        if declared.planes != pages and not declared.multifile:
            raise BadInputError(
                f"{path}: its OME-XML declares {declared.planes} planes ({sizes}) "
                f"but the file holds {pages} pages; {fix}"
            )
    if isinstance(imagej, dict) and declared is None:
        images = imagej.get("images", 1)
        if not isinstance(images, int) or not 1 <= images <= MAX_SLICES:
            raise BadInputError(f"{path}: its ImageJ metadata declares images={images!r}; {fix}")
        if pages > 1 and images != pages:
            raise BadInputError(
                f"{path}: its ImageJ metadata declares {images} images but the file holds {pages} pages; {fix}"
            )


class FolderStack(Stack):
    """A folder of 2D TIFF or PNG slices, in natural order (``2.png`` before ``10.png``), or a
    single 2D image file (one slice)."""

    def __init__(self, files: list[Path], path: Path) -> None:
        self.path = path
        self.files = files
        shapes: list[tuple[int, ...]] = []
        dtypes: list[np.dtype] = []
        for f in files:
            shape, dtype = _header(f)
            shapes.append(shape)
            dtypes.append(dtype)
        first, dtype0 = shapes[0], dtypes[0]
        for f, shape, dtype in zip(files, shapes, dtypes, strict=True):
            if shape[:2] != first[:2]:
                raise BadInputError(
                    f"{path}: slices have different sizes ({files[0].name} is {first[1]}x{first[0]}, "
                    f"{f.name} is {shape[1]}x{shape[0]})"
                )
            if dtype != dtype0:
                raise BadInputError(f"{path}: slices have different pixel types ({dtype0} and {dtype} in {f.name})")
        self.rgb = len(first) == 3 and first[2] in (3, 4)
        if len(first) == 3 and first[2] not in (1, 3, 4):
            raise BadInputError(f"{path}: {first[2]} channels per pixel; emseg segments one channel")
        _check_size(path, first, dtype0)
        self.dtype = dtype0
        self.shape = (len(files), int(first[0]), int(first[1]))
        #: The shape every decoded slice must have: (Y, X), or (Y, X, C) for RGB(A).
        self._slice_shape = self.shape[1:] + ((int(first[2]),) if self.rgb else ())
        self.voxel_size = None
        if files[0].suffix.lower() in TIFF_SUFFIXES:
            found = _slice_voxel_size(files[0])
            self.voxel_size = None if found is None else found.zyx
            self._note_missing_z(found)
        self._cache: tuple[int, np.ndarray] | None = None

    def _slice(self, z: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == z:
            return self._cache[1]
        f = self.files[z]
        with self._decoding(z, z + 1):
            data = _read_image(f)
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[..., 0]
        if data.shape != self._slice_shape:
            raise BadInputError(f"{f}: shape {data.shape} differs from the header's {self._slice_shape}")
        self._cache = (z, data)
        return data

    def _read(self, z0: int, z1: int, y0: int, y1: int) -> np.ndarray:
        return np.stack([self._slice(z)[y0:y1] for z in range(z0, z1)])


def _slice_voxel_size(path: Path) -> FoundVoxelSize | None:
    """The y/x voxel size of a slice folder from the metadata of its first TIFF slice; z is
    unknown (a 2D slice has no spacing), so 1 nm."""
    import tifffile

    # The file's header was parsed by _header just before; only a file changed since fails here.
    try:
        with tifffile.TiffFile(path) as tif:
            found = tiff_voxel_info(tif)
    except (OSError, ValueError):  # tifffile.TiffFileError is a ValueError
        return None
    if found is None:
        return None
    zyx = (MISSING_Z_NM, found.zyx[1], found.zyx[2])
    return dataclasses.replace(found, zyx=zyx, source=f"{found.source} of {path.name}", z_known=False)


#: What tifffile logs (and then carries on without) when pages of a file cannot all be read:
#: a broken chain of pages, a series it could not shape. Other errors it logs (one unreadable
#: private tag, say) leave the pixels intact and are not refused.
_LOST_PAGES = (
    "page offset",
    "offset to page",
    "next page",
    "circular reference",
    "corrupted tag list",
    "failed to reshape",
    "does not match",
    "metadata invalid",
    "incorrect Strip",
    "missing data",
)


class _LogErrors(logging.Handler):
    """Collects what tifffile logs at ERROR level while it parses a file about pages it could
    not reach (:data:`_LOST_PAGES`)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(s in message for s in _LOST_PAGES):
            self.messages.append(message)


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[_LogErrors]:
    handler = _LogErrors()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def check_tiff_pages(tif: Any, path: Path, errors: _LogErrors) -> None:
    """Check every page of an open ``tifffile.TiffFile`` from its headers alone, before a pixel
    is decoded: all pages reachable (a truncated multi-page file is an error, not a shorter
    stack), every strip or tile inside the file, every page within the slice limit, and no
    compressed strip or tile decoding to more than ``Limits.max_decode_bytes`` at once."""
    limits = Limits.from_env()
    size = path.stat().st_size
    with untrusted(f"{path}: not a readable TIFF"):
        pages = [tif.pages[i] for i in range(len(tif.pages))]
        for page in pages:
            if page is None:
                continue
            key = page.keyframe
            pixels = int(key.imagewidth) * int(key.imagelength) * int(key.imagedepth)
            if pixels > limits.max_slice_pixels:
                raise BadInputError(
                    f"{path}: page of {key.imagelength} x {key.imagewidth} pixels is more than the limit of "
                    f"{limits.max_slice_pixels} pixels (raise it with EMSEG_MAX_SLICE_PIXELS)"
                )
            if int(key.compression) != 1:
                chunk = math.prod(int(c) for c in key.chunks) * int(key.samplesperpixel if len(key.chunks) < 3 else 1)
                nbytes = chunk * max(1, int(key.bitspersample) // 8)
                if nbytes > limits.max_decode_bytes:
                    raise BadInputError(
                        f"{path}: one compressed strip or tile of {tuple(key.chunks)} decodes to "
                        f"{nbytes / 2**30:.2f} GiB, more than the limit of {limits.max_decode_bytes / 2**30:.2f} GiB "
                        "(raise it with EMSEG_MAX_DECODE_BYTES when the data really is that large)"
                    )
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                if count and int(offset) + int(count) > size:
                    raise BadInputError(
                        f"{path}: page {page.index} has data beyond the end of the file ({size} bytes); "
                        "the file is truncated"
                    )
    if errors.messages:
        raise BadInputError(
            f"{path}: not all pages can be read ({errors.messages[0]}); the file is truncated or corrupt"
        )


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a 2D image file from its header, without decoding pixels: (Y, X) or
    (Y, X, C)."""
    unreadable = f"{path}: not a readable image"
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with _tifffile_errors() as errors:
            with untrusted(unreadable):
                tif = tifffile.TiffFile(path)
            try:
                check_tiff_pages(tif, path, errors)
                check_declared_planes(tif, path)
                with untrusted(unreadable):
                    images = sum(not getattr(page, "is_reduced", False) for page in tif.pages)
                    series = tif.series[0]
                    shape = tuple(int(s) for s in series.shape)
                    axes = str(series.axes)
                    dtype = np.dtype(series.dtype)
            finally:
                tif.close()
        if images > 1 or len([s for s, a in zip(shape, axes, strict=False) if a not in "YXS" and s > 1]) > 0:
            raise BadInputError(
                f"{path}: a slice folder holds one 2D image per file; this file holds {images} pages "
                f"(first image {shape}): ingest it on its own"
            )
        keep = [s for s, a in zip(shape, axes, strict=False) if a in "YXS"]
        return tuple(keep), dtype
    from PIL import Image

    with untrusted(unreadable), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:  # reads the header only
            mode, (w, h) = str(img.mode), img.size
    if w * h > MAX_SLICE_PIXELS:
        raise BadInputError(f"{path}: slice of {(h, w)} pixels is larger than emseg accepts")
    with untrusted(unreadable), _PIL_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_SLICE_PIXELS
        try:
            with Image.open(path) as img:
                img.verify()
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if mode not in PIL_MODES:
        raise BadInputError(f"{path}: unsupported PNG mode {mode}")
    dtype, channels = PIL_MODES[mode]
    return ((h, w) if channels == 1 else (h, w, channels)), dtype


def _read_image(path: Path) -> np.ndarray:
    """Decode a whole 2D image file: (Y, X) or (Y, X, C). Calls tifffile or PIL only: the caller
    handles what they raise on a corrupt file."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        data = tifffile.imread(path)
        return np.squeeze(data) if data.ndim > 2 and data.shape[-1] not in (3, 4) else data
    from PIL import Image

    with _PIL_LOCK, warnings.catch_warnings():
        # The header's size was checked against MAX_SLICE_PIXELS; PIL's own bomb limit (89 Mpx)
        # would refuse ordinary large EM slices.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_SLICE_PIXELS
        try:
            img: Image.Image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        with img:
            if img.mode == "P":
                img = img.convert("RGB")
            elif img.mode == "LA":
                img = img.convert("L")
            data = np.asarray(img)
    return data


def list_slices(folder: Path) -> list[Path]:
    """Image files of a slice folder in natural order (hidden files skipped)."""
    files = [
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files, key=natural_key)


def open_stack(source: str | Path, series: int | None = None, channel: int | None = None) -> Stack:
    """Open a TIFF/BigTIFF stack, a slice folder or a single 2D image lazily; ``series`` and
    ``channel`` pick one series or channel of a TIFF that holds several (see :class:`TiffStack`).

    Raises :class:`BadInputError` for a missing path, an empty folder, a file that is not an
    image, slices of different sizes, series that do not form one stack, more than one channel,
    or absurd header sizes.
    """
    path = check_source(source, "stack")
    if path.is_dir():
        files = list_slices(path)
        if not files:
            raise BadInputError(f"{path}: folder holds no .tif, .tiff or .png slices")
        kinds = {f.suffix.lower() in TIFF_SUFFIXES for f in files}
        if len(kinds) > 1:
            raise BadInputError(f"{path}: folder mixes TIFF and PNG slices; keep one format")
        return FolderStack(files, path)
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        return FolderStack([path], path)
    if suffix in TIFF_SUFFIXES or _looks_like_tiff(path):
        return TiffStack(path, series, channel)
    if series is not None or channel is not None:
        raise BadInputError(f"{path}: --series and --channel pick from a multi-series or multi-channel TIFF")
    raise BadInputError(f"{path}: not a TIFF or PNG image (expected .tif, .tiff or .png, or a folder of them)")


def _looks_like_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
