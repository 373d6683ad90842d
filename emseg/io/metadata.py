"""Voxel size of a TIFF from its metadata: OME-XML, ImageJ description or resolution tags.

Every source is converted to nanometres. A file that gives y and x but no z spacing (resolution
tags alone, an ImageJ description without ``spacing``, OME-XML without ``PhysicalSizeZ``) gets
z = 1 nm and says so (:attr:`FoundVoxelSize.z_known` is False), so the reader can warn.

Metadata is a courtesy: a file whose metadata cannot be understood has no voxel size (None),
it is never refused for it. The raw values are taken from tifffile at one boundary
(:func:`_raw_metadata`); everything after it is emseg's own parsing, which turns hostile
values into :class:`_Malformed` explicitly, so a bug in it keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import xml.etree.ElementTree as ET
from typing import Any

from emseg.errors import BadInputError
from emseg.io.untrusted import untrusted

log = logging.getLogger(__name__)

#: Nanometres per unit name found in TIFF / ImageJ / OME metadata.
UNIT_NM = {
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "\u03bcm": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "mm": 1e6,
    "millimeter": 1e6,
    "cm": 1e7,
    "centimeter": 1e7,
    "m": 1e9,
    "meter": 1e9,
    "a": 0.1,
    "å": 0.1,
    "angstrom": 0.1,
    "pm": 1e-3,
}
#: TIFF ResolutionUnit value meaning centimetre (2 is inch: a screen setting, not a voxel).
RESOLUTION_UNIT_CM = 3

VoxelSize = tuple[float, float, float]
#: z (nm) given to a file whose metadata has y and x but no z spacing.
MISSING_Z_NM = 1.0


class _Malformed(Exception):
    """A metadata value is present but not understood: the file has no usable voxel size."""


@dataclasses.dataclass(frozen=True)
class TiffMetadata:
    """The raw metadata of a TIFF's first page that carries a voxel size (values as tifffile
    gives them, unvalidated)."""

    ome_xml: str | None
    imagej: dict[str, Any] | None
    x_resolution: Any
    y_resolution: Any
    resolution_unit: Any


@dataclasses.dataclass(frozen=True)
class FoundVoxelSize:
    """A voxel size read from a file's metadata."""

    #: (z, y, x) in nm; z is :data:`MISSING_Z_NM` when ``z_known`` is False.
    zyx: VoxelSize
    #: Where it was read: "OME-XML", "ImageJ metadata" or "TIFF resolution tags".
    source: str
    #: Whether the metadata gave the z spacing.
    z_known: bool


def tiff_voxel_size(tif: Any) -> VoxelSize | None:
    """(z, y, x) voxel size in nm of an open ``tifffile.TiffFile`` (see :func:`tiff_voxel_info`)."""
    found = tiff_voxel_info(tif)
    return None if found is None else found.zyx


def tiff_voxel_info(tif: Any) -> FoundVoxelSize | None:
    """The voxel size of an open ``tifffile.TiffFile`` from OME-XML, ImageJ metadata or a
    centimetre resolution tag; None when the file carries none or none that makes sense
    (inch-based resolutions are screen settings, not voxels)."""
    meta = _raw_metadata(tif)
    if meta is None:
        return None
    try:
        return read_voxel_size(meta)
    except _Malformed as exc:  # metadata is a courtesy: never fail an ingest on it
        log.debug("could not parse TIFF resolution metadata: %s", exc)
        return None


def _raw_metadata(tif: Any) -> TiffMetadata | None:
    try:
        with untrusted("unreadable TIFF metadata"):  # tifffile parses the header lazily here
            ome_xml = tif.ome_metadata if tif.is_ome else None
            imagej = tif.imagej_metadata if tif.is_imagej else None
            tags = tif.pages[0].tags
            xres, yres, unit = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
            values = [None if tag is None else tag.value for tag in (xres, yres, unit)]
    except BadInputError as exc:  # metadata is a courtesy: never fail an ingest on it
        log.debug("%s", exc)
        return None
    return TiffMetadata(
        ome_xml=ome_xml if isinstance(ome_xml, str) and ome_xml else None,
        imagej=imagej if isinstance(imagej, dict) else None,
        x_resolution=values[0],
        y_resolution=values[1],
        resolution_unit=values[2],
    )


def voxel_size_from(meta: TiffMetadata) -> VoxelSize | None:
    """(z, y, x) nm from raw metadata (see :func:`read_voxel_size`); z is 1 nm when not given."""
    found = read_voxel_size(meta)
    return None if found is None else found.zyx


def read_voxel_size(meta: TiffMetadata) -> FoundVoxelSize | None:
    """The voxel size in raw metadata: OME-XML first, then the resolution tags (pixels per
    ImageJ's unit when the description names one, as ImageJ reads them, else per centimetre
    when ResolutionUnit says so) with ImageJ's z ``spacing`` (in the same unit).

    Raises :class:`_Malformed` for a value that is present but not understood.
    """
    if meta.ome_xml is not None:
        found = _ome_voxel_size(meta.ome_xml)
        if found is not None:
            return found
    ij = meta.imagej
    if ij and "unit" in ij:
        unit_nm = _unit_nm(ij["unit"])
        source = "ImageJ metadata"
    elif meta.resolution_unit is not None and _integer(meta.resolution_unit) == RESOLUTION_UNIT_CM:
        unit_nm, source = 1e7, "TIFF resolution tags"
    else:
        return None  # no unit, or inches (a screen setting)
    if unit_nm is None or meta.x_resolution is None or meta.y_resolution is None:
        return None  # e.g. ImageJ's "pixel": not calibrated
    xr, yr = _ratio(meta.x_resolution), _ratio(meta.y_resolution)
    if not (xr > 0 and yr > 0):
        return None
    y, x = _positive(unit_nm / yr), _positive(unit_nm / xr)
    if ij and "spacing" in ij:
        return FoundVoxelSize((_positive(_number(ij["spacing"]) * unit_nm), y, x), source, True)
    return FoundVoxelSize((MISSING_Z_NM, y, x), source, False)


def _unit_nm(unit: Any) -> float | None:
    """Nanometres per unit name (ImageJ writes µ as the escape ``\\u00B5``); None when unknown."""
    name = str(unit).strip().lower().replace("\\u00b5", "µ")
    return UNIT_NM.get(name)


def _positive(value: float) -> float:
    """A size in nm, finite and positive, rounded to 12 significant digits so that a round trip
    through micrometres (0.05 µm -> 50.00000000000001 nm) gives back the number written."""
    if not (math.isfinite(value) and value > 0):
        raise _Malformed(f"voxel size {value!r} is not a positive number")
    return float(f"{value:.12g}")


def _number(value: Any) -> float:
    """``float(value)`` for a number or numeric string; :class:`_Malformed` otherwise."""
    if not isinstance(value, (int, float, str)):
        raise _Malformed(f"{value!r} is not a number")
    try:
        return float(value)
    except (ValueError, OverflowError):
        raise _Malformed(f"{value!r} is not a number") from None


def _ratio(value: Any) -> float:
    """Pixels per unit of a RATIONAL tag value (numerator, denominator); 0.0 for a zero
    denominator."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _Malformed(f"resolution {value!r} is not a rational")
    num, den = _number(value[0]), _number(value[1])
    return num / den if den else 0.0


def _integer(value: Any) -> int:
    number = _number(value)
    if not math.isfinite(number):
        raise _Malformed(f"{value!r} is not an integer")
    return int(number)


def _ome_voxel_size(xml: str) -> FoundVoxelSize | None:
    """The voxel size of the first ``Pixels`` element of OME-XML (units default to µm, as in
    the OME schema); z is 1 nm, flagged unknown, when ``PhysicalSizeZ`` is not given."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _Malformed(f"OME-XML: {exc}") from None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    sizes: dict[str, float] = {}
    for axis in ("Z", "Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        factor = _unit_nm(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is not None and factor is not None:
            sizes[axis] = _positive(_number(value) * factor)
    if "Y" not in sizes or "X" not in sizes:
        return None
    if "Z" not in sizes:
        return FoundVoxelSize((MISSING_Z_NM, sizes["Y"], sizes["X"]), "OME-XML", False)
    return FoundVoxelSize((sizes["Z"], sizes["Y"], sizes["X"]), "OME-XML", True)


@dataclasses.dataclass(frozen=True)
class OmePlanes:
    """What OME-XML declares about a file's planes: how many IFDs its images need in all (for
    each image SizeZ x SizeT x SizeC / SamplesPerPixel), each image's (SizeZ, SizeC, SizeT), and
    whether planes live in other files (TiffData naming a UUID FileName)."""

    planes: int
    images: list[tuple[int, int, int]]
    multifile: bool


def ome_planes(xml: str) -> OmePlanes | None:
    """The planes OME-XML declares (see :class:`OmePlanes`); None when it declares no sizes that
    make sense (tifffile then reads no OME series either)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images, total = [], 0
    for pixels in (el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"):
        try:
            z, c, t = (int(pixels.get(f"Size{a}", "1")) for a in "ZCT")
        except ValueError:
            return None
        channel = next((el for el in pixels if el.tag.endswith("Channel")), None)
        try:
            samples = max(1, int(channel.get("SamplesPerPixel", "1"))) if channel is not None else 1
        except ValueError:
            samples = 1
        images.append((z, c, t))
        total += z * t * max(1, -(-c // samples))
    multifile = any(el.tag.endswith("UUID") and el.get("FileName") for el in root.iter())
    return OmePlanes(total, images, multifile) if images else None
