"""Voxel size of a TIFF from its metadata: OME-XML, ImageJ description or resolution tags.

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


def tiff_voxel_size(tif: Any) -> VoxelSize | None:
    """(z, y, x) voxel size in nm of an open ``tifffile.TiffFile`` from OME-XML, ImageJ metadata
    or a centimetre resolution tag; None when the file carries none or none that makes sense
    (inch-based resolutions are screen settings, not voxels)."""
    meta = _raw_metadata(tif)
    if meta is None:
        return None
    try:
        return voxel_size_from(meta)
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
    """(z, y, x) nm from raw metadata: OME first, then the resolution tags (in ImageJ's unit when
    it names one, else only a centimetre ResolutionUnit) with ImageJ's z spacing (else z = 1).

    Raises :class:`_Malformed` for a value that is present but not understood.
    """
    if meta.ome_xml is not None:
        vs = _ome_voxel_size(meta.ome_xml)
        if vs is not None:
            return vs
    xy = _resolution_nm(meta)
    if xy is None:
        return None
    z = 1.0
    ij = meta.imagej
    if ij and "spacing" in ij:
        unit_nm = UNIT_NM.get(str(ij.get("unit", "micron")).strip().lower().replace("\\u00b5", "µ"))
        if unit_nm is not None:
            z = _number(ij["spacing"]) * unit_nm
    return (z, xy[0], xy[1])


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


def _resolution_nm(meta: TiffMetadata) -> tuple[float, float] | None:
    if meta.x_resolution is None or meta.y_resolution is None:
        return None
    xr, yr = _ratio(meta.x_resolution), _ratio(meta.y_resolution)
    if not (xr > 0 and yr > 0):
        return None
    if meta.imagej and "unit" in meta.imagej:
        unit = str(meta.imagej["unit"]).strip().lower()
        unit_nm = UNIT_NM.get(unit) or UNIT_NM.get(unit.replace("\\u00b5", "µ"))
        if unit_nm is None:
            return None
        return (unit_nm / yr, unit_nm / xr)
    unit_tag = meta.resolution_unit
    if unit_tag is not None and _integer(unit_tag) == RESOLUTION_UNIT_CM:
        return (1e7 / yr, 1e7 / xr)
    return None


def _integer(value: Any) -> int:
    number = _number(value)
    if not math.isfinite(number):
        raise _Malformed(f"{value!r} is not an integer")
    return int(number)


def _ome_voxel_size(xml: str) -> VoxelSize | None:
    """(z, y, x) nm from the first ``Pixels`` element of OME-XML; z is 1 when not given."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _Malformed(f"OME-XML: {exc}") from None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    out = []
    for axis in ("Z", "Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        factor = UNIT_NM.get(unit.strip().lower())
        if value is None or factor is None:
            if axis == "Z":
                out.append(1.0)
                continue
            return None
        out.append(_number(value) * factor)
    return (out[0], out[1], out[2])
