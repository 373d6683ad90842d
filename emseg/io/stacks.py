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
from emseg.io.metadata import MISSING_Z_NM, FoundVoxelSize, tiff_voxel_info
from emseg.io.untrusted import untrusted

log = logging.getLogger(__name__)
_PIL_LOCK = threading.Lock()

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".tf2"}
PNG_SUFFIXES = {".png"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | PNG_SUFFIXES
#: A header may not make emseg allocate more than this for one slice (protects against hostile
#: files that claim absurd sizes): 2**32 pixels, e.g. 65536 x 65536 (the default of
#: :class:`~emseg.config.Limits`; EMSEG_MAX_SLICE_PIXELS raises it).
MAX_SLICE_PIXELS = Limits.max_slice_pixels
#: Nor more slices than this.
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
        """Say so (a warning and :attr:`voxel_size_note`) when the metadata gave y and x but no
        z spacing for a stack of several slices: z is then 1 nm, which is rarely the truth."""
        if found is None or found.z_known or self.shape[0] < 2:
            return
        self.voxel_size_note = (
            f"{self.path.name}: no z spacing in its metadata ({found.source}: y {found.zyx[1]:g} nm, "
            f"x {found.zyx[2]:g} nm); z = {found.zyx[0]:g} nm unless --voxel-size Z Y X is given"
        )
        log.warning("%s", self.voxel_size_note)

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


class TiffStack(Stack):
    """A multi-page TIFF/BigTIFF, ImageJ hyperstack or OME-TIFF (first series, full resolution).

    Leading axes other than y, x and samples are flattened into z; a channel axis with more than
    one channel is refused (pick a channel first).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tif: Any = None
        self._fd: int | None = None
        try:
            self._open(path)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> None:
        import tifffile
        import zarr

        with _tifffile_errors() as errors:
            with untrusted(f"{path}: not a readable TIFF"):
                self._tif = tifffile.TiffFile(path)
                series = self._tif.series[0]
                axes, shape = series.axes, tuple(series.shape)
                self.dtype = np.dtype(series.dtype)
            check_tiff_pages(self._tif, path, errors)
        self.rgb = False
        if axes and axes[-1] == "S" and shape[-1] in (3, 4):
            self.rgb = True
            axes, shape = axes[:-1], shape[:-1]
        elif axes and axes[-1] == "S" and shape[-1] == 1:
            axes, shape = axes[:-1], shape[:-1]
        if "C" in axes and shape[axes.index("C")] > 1:
            raise BadInputError(
                f"{path}: {shape[axes.index('C')]} channels; emseg segments one channel (extract it first)"
            )
        if len(shape) < 2:
            raise BadInputError(f"{path}: not an image (shape {shape})")
        _check_size(path, shape, self.dtype)
        self._series_shape = shape
        self.shape = (int(math.prod(shape[:-2])), int(shape[-2]), int(shape[-1]))
        with untrusted(f"{path}: not a readable TIFF"):
            # level 0: a pyramidal OME-TIFF would otherwise open as a group of all its levels
            z = zarr.open(series.aszarr(level=0), mode="r")
        if not isinstance(z, zarr.Array):
            raise BadInputError(f"{path}: not a readable TIFF (its first series is not one image)")
        self._z = z
        found = tiff_voxel_info(self._tif)
        self.voxel_size = None if found is None else found.zyx
        self._note_missing_z(found)
        # Uncompressed data stored in one contiguous block (ImageJ, tifffile, many scanners) is
        # read with pread at exact offsets: no decoding and no strip larger than the band.
        self._offset = series.dataoffset if series.dataoffset is not None and not series.is_multifile else None
        self._file_dtype = np.dtype(series.dtype).newbyteorder(self._tif.byteorder)
        if self._offset is not None:
            self._fd = os.open(path, os.O_RDONLY)
            samples = 1 if not self.rgb else int(series.shape[-1])
            self._row_items = self.shape[2] * samples
            end = self._offset + self.shape[0] * self.shape[1] * self._row_items * self._file_dtype.itemsize
            if end > os.fstat(self._fd).st_size:
                raise BadInputError(f"{path}: file is truncated ({os.path.getsize(path)} bytes, header needs {end})")
        #: Rows the source stores together: bands aligned to it never decode a strip twice.
        self.row_block = 1 if self._offset is not None else int(self._z.chunks[len(self._series_shape) - 2])

    def _read(self, z0: int, z1: int, y0: int, y1: int) -> np.ndarray:
        if self._offset is not None:
            return self._pread(z0, z1, y0, y1)
        lead = self._series_shape[:-2]
        if len(lead) <= 1:  # (Y, X[, S]) or (Z, Y, X[, S])
            keys: list[tuple[int | slice, ...]] = [(slice(z0, z1), slice(y0, y1)) if lead else (slice(y0, y1),)]
        else:  # several leading axes flattened into z: one plane each
            keys = [(*(int(i) for i in np.unravel_index(z, lead)), slice(y0, y1)) for z in range(z0, z1)]
        with self._decoding(z0, z1):
            planes = [np.asarray(self._z[key]) for key in keys]
        data = planes[0] if len(lead) == 1 else np.stack(planes)
        if data.ndim == 4 and not self.rgb:  # a single-sample axis
            data = data[..., 0]
        return data

    def _pread(self, z0: int, z1: int, y0: int, y1: int) -> np.ndarray:
        assert self._fd is not None and self._offset is not None
        itemsize = self._file_dtype.itemsize
        row_bytes = self._row_items * itemsize
        plane_bytes = self.shape[1] * row_bytes
        trailing = (self._row_items // self.shape[2],) if self.rgb else ()
        if y0 == 0 and y1 == self.shape[1]:
            planes = [(z0, z1)]
        else:
            planes = [(z, z + 1) for z in range(z0, z1)]
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
                with untrusted(unreadable):
                    series = tif.series[0]
                    shape = tuple(int(s) for s in series.shape)
                    axes = str(series.axes)
                    dtype = np.dtype(series.dtype)
                check_tiff_pages(tif, path, errors)
            finally:
                tif.close()
        if len([s for s, a in zip(shape, axes, strict=False) if a not in "YXS" and s > 1]) > 0:
            raise BadInputError(f"{path}: a slice folder must hold 2D images; this file has shape {shape}")
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


def open_stack(source: str | Path) -> Stack:
    """Open a TIFF/BigTIFF stack, a slice folder or a single 2D image lazily.

    Raises :class:`BadInputError` for a missing path, an empty folder, a file that is not an
    image, slices of different sizes, more than one channel, or absurd header sizes.
    """
    path = Path(source)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory")
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
        return TiffStack(path)
    raise BadInputError(f"{path}: not a TIFF or PNG image (expected .tif, .tiff or .png, or a folder of them)")


def _looks_like_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
