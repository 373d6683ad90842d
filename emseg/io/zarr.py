"""OME-Zarr stores: create image and label groups with multiscales metadata, and open them.

emseg writes NGFF 0.4 (zarr v2, ``/`` chunk keys) by default, the version napari and Fiji read
today, and NGFF 0.5 (zarr v3, metadata under ``"ome"``, optional sharding) on request. What
differs between the two lives in one :class:`Ngff` object per version (:data:`NGFF_04`,
:data:`NGFF_05`). A store holds one image group::

    DATA.zarr/            multiscales image: arrays "0", "1", ... (2x downsampled in y and x)
    DATA.zarr/labels/     {"labels": ["cells"]}
    DATA.zarr/labels/cells  multiscales + image-label, uint8 {0, 1}

All arrays are (z, y, x) with axes in nanometres; levels k > 0 are 2x2 block means of level k-1
(block majority for labels), so level k has scale (z, 2^k y, 2^k x) and a translation of
(2^k - 1)/2 pixels of level 0 in y and x, plus the origin of level 0 (e.g. the z of the first
slice a ``predict --slices A:B`` store holds).

A store to open may come from anywhere: every zarr call on it sits in a small
:func:`~emseg.io.untrusted.untrusted` block, and the JSON it holds is checked field by field,
so malformed metadata is one :class:`BadInputError` line and a bug in emseg keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from emseg.classes import LabelClass, classes_record, from_record, image_label_metadata
from emseg.config import IngestConfig, Limits
from emseg.errors import BadInputError
from emseg.io.pyramid import pyramid_shapes
from emseg.io.untrusted import check_source, untrusted

#: How a store is opened: read only, read/write, ...
OpenMode = Literal["r", "r+", "a", "w", "w-"]
#: Largest array (elements) emseg opens: 2**50, a petavoxel; metadata claiming more is hostile.
MAX_ELEMENTS = 2**50
AXES = [
    {"name": "z", "type": "space", "unit": "nanometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]
#: The channel axis of a (c, z, y, x) image (one channel per class of a multi-class prediction).
CHANNEL_AXIS = {"name": "c", "type": "channel"}
#: Colour of each label value in viewers (RGBA 0-255).
LABEL_COLORS = {
    "cells": [{"label-value": 1, "rgba": [255, 200, 0, 128]}],
    "membranes": [{"label-value": 1, "rgba": [0, 160, 255, 160]}],
}


# --- the NGFF versions ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ngff:
    """What one NGFF version fixes about a store: the zarr format, where the metadata goes,
    where the version is written, the compressor and chunk keys, and whether shards exist."""

    version: str
    zarr_format: Literal[2, 3]
    sharding: bool

    def wrap(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Group attributes holding the NGFF metadata ``payload`` ({"multiscales": ...} etc.)."""
        raise NotImplementedError

    def tag(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A multiscales or image-label entry with the version key this version puts in it."""
        raise NotImplementedError

    def codec_kwargs(self, clevel: int, dtype: np.dtype) -> dict[str, Any]:
        """Keywords of ``zarr.Group.create_array``: Blosc zstd (bit-shuffled for 1-byte data)."""
        raise NotImplementedError

    def create_group(self, path: Path, attrs: dict[str, Any] | None = None) -> zarr.Group:
        """A new, empty root group at ``path`` in this version's zarr format."""
        return zarr.create_group(str(path), zarr_format=self.zarr_format, attributes=attrs or {})


@dataclasses.dataclass(frozen=True)
class _Ngff04(Ngff):
    """NGFF 0.4: zarr v2, metadata at the top level, "version" in each entry, numcodecs Blosc and
    "/" chunk keys (what napari and Fiji read)."""

    def wrap(self, payload: dict[str, Any]) -> dict[str, Any]:
        return dict(payload)

    def tag(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {"version": self.version, **entry}

    def codec_kwargs(self, clevel: int, dtype: np.dtype) -> dict[str, Any]:
        import numcodecs

        shuffle = numcodecs.Blosc.BITSHUFFLE if np.dtype(dtype).itemsize == 1 else numcodecs.Blosc.SHUFFLE
        return {
            "compressors": numcodecs.Blosc(cname="zstd", clevel=clevel, shuffle=shuffle),
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
        }


@dataclasses.dataclass(frozen=True)
class _Ngff05(Ngff):
    """NGFF 0.5: zarr v3, metadata under "ome" with the version beside it, zarr's BloscCodec,
    named dimensions, optional sharding."""

    def wrap(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"ome": {"version": self.version, **payload}}

    def tag(self, entry: dict[str, Any]) -> dict[str, Any]:
        return dict(entry)

    def codec_kwargs(self, clevel: int, dtype: np.dtype) -> dict[str, Any]:
        from zarr.codecs import BloscCodec

        shuffle: Literal["bitshuffle", "shuffle"] = "bitshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
        return {
            "compressors": BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle),
            "dimension_names": ["z", "y", "x"],
        }


NGFF_04: Ngff = _Ngff04("0.4", zarr_format=2, sharding=False)
NGFF_05: Ngff = _Ngff05("0.5", zarr_format=3, sharding=True)
NGFF_VERSIONS = (NGFF_04.version, NGFF_05.version)


def ngff_for(version: str) -> Ngff:
    """The :class:`Ngff` of ``version`` ("0.4" or "0.5"); BadInputError for any other."""
    for ngff in (NGFF_04, NGFF_05):
        if ngff.version == version:
            return ngff
    raise BadInputError(f"--ngff {version}: supported versions are {', '.join(NGFF_VERSIONS)}")


def ngff_payload(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The NGFF metadata in a group's attributes, whatever the version (0.5 nests it under
    "ome"; its "version" key is left out)."""
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        return {k: v for k, v in ome.items() if k != "version"}
    return dict(attrs)


def detect_version(attrs: Mapping[str, Any]) -> str:
    """The NGFF version a group's attributes declare: "ome"/"version" (0.5 and later), else the
    first multiscales entry's "version", else "0.4". Not checked against :data:`NGFF_VERSIONS`
    (use :func:`ngff_for` on it to write the same version)."""
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        return str(ome.get("version"))
    ms = attrs.get("multiscales")
    first = ms[0] if isinstance(ms, list) and ms else None
    return str(first.get("version", "0.4")) if isinstance(first, dict) else "0.4"


# --- writing -------------------------------------------------------------------------------------


def clip_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape clipped to the array (a chunk never exceeds the array, never below 1)."""
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=False))


#: How level k + 1 is made from level k, as the multiscales entry says it (type, description).
DOWNSAMPLING = {
    "mean": ("mean", "2x2 block mean in y and x (rounded for integers); z kept"),
    "majority": ("majority", "2x2 block majority in y and x (ties to 1); z kept"),
    "mode": ("mode", "2x2 mode in y and x (most frequent ID; top-left on ties); z kept"),
}


def multiscales(
    name: str,
    n_levels: int,
    voxel_size: Sequence[float],
    version: str,
    *,
    reduction: str = "mean",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    channels: bool = False,
) -> dict[str, Any]:
    """The ``multiscales`` entry for an image of ``n_levels`` 2x-in-(y, x) levels whose level 0
    starts at ``origin`` (nm; e.g. the z of slice A for ``predict --slices A:B``); with
    ``channels``, a (c, z, y, x) image (a channel axis first, unscaled)."""
    datasets = []
    head = [1.0] if channels else []
    for level in range(n_levels):
        factor = 2**level
        scale = [*head, float(voxel_size[0]), voxel_size[1] * factor, voxel_size[2] * factor]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        shift = (factor - 1) / 2  # a level-k pixel's centre, in level-0 pixels
        translation = [float(origin[0]), origin[1] + voxel_size[1] * shift, origin[2] + voxel_size[2] * shift]
        if any(translation):
            translation = [0.0] * len(head) + translation
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    kind, description = DOWNSAMPLING[reduction]
    entry: dict[str, Any] = {
        "name": name,
        "axes": [CHANNEL_AXIS, *AXES] if channels else AXES,
        "datasets": datasets,
        "type": kind,
        "metadata": {"description": description},
    }
    return ngff_for(version).tag(entry)


@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """Storage layout of one multiscale image: shape, dtype, chunks and shards of level 0."""

    shape: tuple[int, ...]  # (Z, Y, X), or (C, Z, Y, X) for a multi-channel image
    dtype: str
    chunks: tuple[int, ...] = IngestConfig.chunks
    shards: tuple[int, ...] | None = None
    pyramid_min_size: int = IngestConfig.pyramid_min_size
    clevel: int = IngestConfig.clevel


def ngff_metadata(version: str, kind: Literal["image", "label", "labels"], payload: dict[str, Any]) -> dict[str, Any]:
    """The group attributes of NGFF ``payload`` ({"multiscales": ..., "omero": ...} of an image,
    with "image-label" of a label image, {"labels": ...} of a labels group), built by
    ome-zarr-models' classes for ``version``: every field validated, then dumped back and wrapped
    as the version stores it. Invalid metadata is a bug in emseg: it raises and nothing is written."""
    import pydantic

    if version == "0.4":
        from ome_zarr_models.v04.image import ImageAttrs
        from ome_zarr_models.v04.image_label import ImageLabelAttrs
        from ome_zarr_models.v04.labels import LabelsAttrs
    else:
        from ome_zarr_models.v05.image import ImageAttrs  # type: ignore[assignment]
        from ome_zarr_models.v05.image_label import ImageLabelAttrs  # type: ignore[assignment]
        from ome_zarr_models.v05.labels import LabelsAttrs  # type: ignore[assignment]
    from ome_zarr_models.v04.omero import Omero  # the same rendering block in 0.4 and 0.5

    model: Any = {"image": ImageAttrs, "label": ImageLabelAttrs, "labels": LabelsAttrs}[kind]
    ngff = ngff_for(version)
    content = {k: v for k, v in payload.items() if k != "omero"}
    try:
        built = model.model_validate(content if version == "0.4" else {"version": version, **content})
        omero = None if "omero" not in payload else Omero.model_validate(payload["omero"])
    except pydantic.ValidationError as exc:
        raise RuntimeError(f"emseg built invalid NGFF {version} {kind} metadata: {exc}") from exc
    dumped = built.model_dump(by_alias=True, exclude_none=True, mode="json")
    dumped.pop("version", None)
    if omero is not None:
        dumped["omero"] = omero.model_dump(by_alias=True, exclude_none=True, mode="json")
    return ngff.wrap(dumped)


def create_multiscale(
    group: zarr.Group,
    spec: LevelSpec,
    voxel_size: Sequence[float],
    version: str,
    name: str,
    omero: dict[str, Any] | None = None,
    *,
    reduction: str = "mean",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> list[zarr.Array]:
    """Create the arrays "0", "1", ... of a multiscale image in ``group`` and write its metadata
    (with ``omero``, its rendering block), built by :func:`ngff_metadata`.

    Returns the arrays, level 0 first. Chunks are clipped to each level's shape; shards (NGFF 0.5
    only; ignored for 0.4) are clipped likewise and rounded to whole chunks.
    """
    ngff = ngff_for(version)
    arrays = []
    for level, shape in enumerate(pyramid_shapes(spec.shape, spec.pyramid_min_size)):
        chunks = clip_chunks(spec.chunks, shape)
        kwargs = ngff.codec_kwargs(spec.clevel, np.dtype(spec.dtype))
        if spec.shards is not None and ngff.sharding:
            shards = clip_chunks(spec.shards, shape)
            kwargs["shards"] = tuple(max(c, (s // c) * c) for s, c in zip(shards, chunks, strict=False))
        arrays.append(
            group.create_array(
                str(level),
                shape=shape,
                chunks=chunks,
                dtype=spec.dtype,
                fill_value=0,
                # Checking every chunk for emptiness costs more than it saves on EM data.
                config={"write_empty_chunks": True},  # type: ignore[arg-type]  # zarr declares a TypedDict
                **kwargs,
            )
        )
    channels = len(spec.shape) == 4
    entry = multiscales(name, len(arrays), voxel_size, version, reduction=reduction, origin=origin, channels=channels)
    payload: dict[str, Any] = {"multiscales": [entry], **({} if omero is None else {"omero": omero})}
    group.attrs.update(ngff_metadata(version, "image", payload))
    return arrays


def _omero_channel(label: str, color: str, start: float, end: float, low: float, high: float) -> dict[str, Any]:
    return {
        "label": label,
        "color": color,
        "window": {"start": start, "end": end, "min": low, "max": high},
        "active": True,
        "coefficient": 1.0,
        "family": "linear",
        "inverted": False,
    }


#: P(cell)'s colour in viewers that read ``omero`` (the cells' label colour, amber).
PROBABILITY_COLOR = "FFC800"


def probability_omero(top: float = 255) -> dict[str, Any]:
    """The ``omero`` rendering block of a P(cell) image: one amber channel, a 0-``top`` window
    (255 for uint8 probabilities, 1 for floats)."""
    return {
        "channels": [_omero_channel("P(cell)", PROBABILITY_COLOR, 0, top, 0, top)],
        "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
    }


def intensity_omero(low: float, high: float, start: float, end: float) -> dict[str, Any]:
    """The ``omero`` rendering block of an EM image: one grey channel windowed on ``start``-``end``
    (robust percentiles) within its dtype's ``low``-``high``."""
    return {
        "channels": [_omero_channel("EM", "FFFFFF", start, end, low, high)],
        "rdefs": {"model": "greyscale", "defaultZ": 0, "defaultT": 0},
    }


def omero_channels(classes: Sequence[LabelClass], top: float = 255) -> dict[str, Any]:
    """The NGFF ``omero`` rendering block of a (c, z, y, x) probability image: one channel per
    class, named and coloured as its class, a 0-255 window (uint8 probabilities)."""
    return {
        "channels": [_omero_channel(c.name, "{:02X}{:02X}{:02X}".format(*c.rgb), 0, top, 0, top) for c in classes],
        "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
    }


def create_image_store(path: Path, version: str, attrs: dict[str, Any] | None = None) -> zarr.Group:
    """A new, empty root group at ``path`` for an OME-Zarr image of NGFF ``version``."""
    return ngff_for(version).create_group(path, attrs)


def create_label(
    image_group: zarr.Group,
    label_name: str,
    spec: LevelSpec,
    voxel_size: Sequence[float],
    version: str,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    classes: Sequence[LabelClass] | None = None,
) -> list[zarr.Array]:
    """Create ``labels/<label_name>`` (uint8 multiscale with image-label metadata) under the image;
    with ``classes``, the metadata names and colours each class (and ``emseg.classes`` records them)."""
    ngff = ngff_for(version)
    labels = image_group.require_group("labels")
    existing = list(ngff_payload(labels.attrs).get("labels", []))
    if label_name not in existing:
        existing.append(label_name)
    labels.attrs.update(ngff_metadata(version, "labels", {"labels": existing}))
    group = labels.create_group(label_name)
    colors = {"colors": LABEL_COLORS.get(label_name, [{"label-value": 1, "rgba": [255, 0, 0, 128]}])}
    image_label = ngff.tag(
        {**(colors if classes is None else image_label_metadata(classes)), "source": {"image": "../../"}}
    )
    arrays = create_multiscale(
        group,
        dataclasses.replace(spec, dtype="uint8"),
        voxel_size,
        version,
        label_name,
        reduction="majority" if classes is None else "mode",
        origin=origin,
    )
    group.attrs.update(ngff_metadata(version, "label", {**ngff_payload(group.attrs), "image-label": image_label}))
    if classes is not None:
        group.attrs["emseg"] = {"classes": classes_record(classes)}
    return arrays


# --- reading -------------------------------------------------------------------------------------


@dataclasses.dataclass
class OmeImage:
    """An opened multiscale image: its levels (level 0 first), voxel size and labels."""

    path: Path
    group: zarr.Group
    #: The NGFF version the store declares (may be one emseg does not write, e.g. "0.3").
    version: str
    levels: list[zarr.Array]
    voxel_size: tuple[float, float, float]
    #: Where level 0's first voxel lies (nm, z y x): its translation, (0, 0, 0) when it has none.
    origin: tuple[float, ...]
    labels: dict[str, OmeImage]
    attrs: dict[str, Any]
    #: Channels of a (c, z, y, x) image (open_ome(..., channels=True)); 0 for a (z, y, x) one.
    channels: int = 0

    @property
    def array(self) -> zarr.Array:
        """Level 0, (Z, Y, X) (or (C, Z, Y, X) with channels)."""
        return self.levels[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of level 0 (without the channel axis)."""
        return tuple(self.levels[0].shape[-3:])  # type: ignore[return-value]

    @property
    def ngff(self) -> Ngff:
        """The :class:`Ngff` of this store's version (BadInputError for one emseg cannot write)."""
        return ngff_for(self.version)


def store_classes(image: OmeImage, label: str = "classes") -> list[LabelClass] | None:
    """The classes ``labels/<label>`` records (``emseg ingest --class``, a multi-class prediction),
    or None when the store has no such class image."""
    lab = image.labels.get(label)
    record = None if lab is None else (lab.attrs.get("emseg") or {}).get("classes")
    if not record:
        return None
    try:
        return from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"{image.path}: labels/{label} has a malformed class record ({exc})") from None


def open_ome(path: str | Path, *, access: OpenMode = "r", channels: bool = False) -> OmeImage:
    """Open an OME-Zarr image written by emseg (or any NGFF 0.4/0.5 3D image); with ``channels``
    also a (c, z, y, x) image (a multi-class prediction: ``shape`` and ``voxel_size`` are then its
    (z, y, x) ones, ``array`` the 4D level 0, ``channels`` its channel count).

    Raises :class:`BadInputError` with one clear line when ``path`` is missing, not a zarr group,
    has no multiscales image, or carries metadata that does not make sense.
    """
    return _open_ome(Path(path), access, is_label=False, channels=channels)


#: The metadata files of a zarr v2 or v3 node.
_METADATA_FILES = (".zgroup", ".zattrs", ".zarray", "zarr.json")


def _check_metadata_files(node: Path) -> None:
    """Refuse a store whose metadata files are FIFOs, sockets or devices (zarr would block reading
    them) before zarr opens any of them."""
    for name in _METADATA_FILES:
        if (node / name).exists() or (node / name).is_symlink():
            check_source(node / name, "store's metadata")


def _open_ome(path: Path, access: OpenMode, is_label: bool, channels: bool = False) -> OmeImage:  # noqa: C901
    if check_source(path, "store").is_dir():
        for node in (path, path / "labels", *(p for p in path.iterdir() if p.name.isdigit() and p.is_dir())):
            _check_metadata_files(node)  # the group, its labels and levels, before zarr reads them
    with untrusted(f"{path}: not a zarr group"):
        group = zarr.open_group(str(path), mode=access)
    with untrusted(f"{path}: malformed OME-Zarr metadata"):
        raw_attrs = dict(group.attrs)
    if "ome" in raw_attrs and not isinstance(raw_attrs["ome"], dict):
        raise BadInputError(f'{path}: malformed OME-Zarr metadata ("ome" is not an object)')
    ms = ngff_payload(raw_attrs).get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise BadInputError(f"{path}: not an OME-Zarr image (no multiscales metadata)")
    paths, scale, origin = _parse_multiscale(path, ms[0])
    with untrusted(f"{path}: malformed multiscales metadata"):
        nodes = [group[p] for p in paths]
    levels = [a for a in nodes if isinstance(a, zarr.Array)]
    if len(levels) != len(nodes):
        raise BadInputError(f"{path}: multiscales datasets are not arrays")
    axes = ms[0].get("axes")
    first = axes[0] if isinstance(axes, list) and axes else None
    n_channels = 0
    if levels[0].ndim == 4 and isinstance(first, dict) and first.get("type") == "channel":
        if not channels:
            raise BadInputError(
                f"{path}: an image of {levels[0].shape[0]} channels (c, z, y, x: a multi-class prediction); "
                "this command reads (z, y, x) images (evaluate, export --labels classes and napari read it)"
            )
        n_channels, scale = int(levels[0].shape[0]), scale[1:]
        origin = origin[-3:]  # (a translation names the channel axis too; none gives (0, 0, 0))
    ndim = 4 if n_channels else 3
    if levels[0].ndim != ndim or len(scale) != 3:
        raise BadInputError(f"{path}: expected a 3D (z, y, x) image, found {levels[0].ndim} dimensions")
    if any(a.ndim != ndim or min(a.shape) < 1 for a in levels):
        raise BadInputError(f"{path}: a pyramid level is empty or not 3D")
    if any(math.prod(a.shape) > MAX_ELEMENTS for a in levels):
        largest = max((a.shape for a in levels), key=math.prod)
        raise BadInputError(f"{path}: an array of shape {largest} is larger than emseg accepts")
    _check_slices(path, tuple(int(s) for s in levels[0].shape[-3:]))
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in scale):
        raise BadInputError(f"{path}: voxel size {scale} is not three positive numbers")
    _check_chunks(path, levels)
    return OmeImage(
        path=path,
        group=group,
        version=detect_version(raw_attrs),
        levels=levels,
        voxel_size=tuple(float(s) for s in scale),  # type: ignore[arg-type]
        origin=origin,
        labels={} if is_label else _open_labels(path, group, access, tuple(levels[0].shape[-3:])),
        attrs=raw_attrs,
        channels=n_channels,
    )


#: Slices one store may hold: as many as a TIFF stack (:data:`emseg.io.stacks.MAX_SLICES`).
MAX_SLICES = 2**24


def _check_slices(path: Path, shape: tuple[int, ...]) -> None:
    """The same bound on a store's shape as on a TIFF's pages: a slice of at most
    ``Limits.max_slice_pixels`` (EMSEG_MAX_SLICE_PIXELS raises it) and at most 2**24 slices, so a
    command that reads one whole slice never allocates past it because the metadata says so."""
    limit = Limits.from_env().max_slice_pixels
    if shape[1] * shape[2] > limit:
        raise BadInputError(
            f"{path}: slices of {shape[1]} x {shape[2]} pixels are more than the limit of {limit} "
            "(raise it with EMSEG_MAX_SLICE_PIXELS when the data really is that large)"
        )
    if shape[0] > MAX_SLICES:
        raise BadInputError(f"{path}: {shape[0]} slices is more than emseg accepts ({MAX_SLICES})")


def _check_chunks(path: Path, levels: Sequence[zarr.Array]) -> None:
    """Refuse chunks (and shards) a reader could not sanely decode: a zero or negative side, or
    one chunk larger than ``Limits.max_chunk_bytes`` (EMSEG_MAX_CHUNK_BYTES raises it)."""
    limit = Limits.from_env().max_chunk_bytes
    for a in levels:
        with untrusted(f"{path}: malformed array metadata"):
            chunks = tuple(int(c) for c in a.chunks)
            sharded = getattr(a, "shards", None)
            shards = tuple(int(s) for s in sharded) if sharded else None
            itemsize = int(np.dtype(a.dtype).itemsize)
        for unit in (chunks, shards):
            if unit is None:
                continue
            if len(unit) != a.ndim or min(unit) < 1:
                raise BadInputError(f"{path}: malformed array metadata (chunks {unit} for shape {a.shape})")
            nbytes = math.prod(unit) * itemsize
            if unit is chunks and nbytes > limit:  # a shard is read chunk by chunk
                raise BadInputError(
                    f"{path}: one chunk of {unit} ({nbytes / 2**30:.2f} GiB) is more than the limit of "
                    f"{limit / 2**30:.2f} GiB (raise it with EMSEG_MAX_CHUNK_BYTES, or rechunk the store)"
                )


def _parse_multiscale(path: Path, entry: dict[str, Any]) -> tuple[list[str], list[Any], tuple[float, ...]]:
    """(dataset paths, level-0 scale, level-0 translation) of a multiscales entry; BadInputError
    when malformed."""

    def malformed(why: str) -> BadInputError:
        return BadInputError(f"{path}: malformed multiscales metadata ({why})")

    datasets = entry.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise malformed("no datasets")
    if not all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets):
        raise malformed("each dataset needs a string path")
    transforms = datasets[0].get("coordinateTransformations")
    if not isinstance(transforms, list) or not all(isinstance(t, dict) for t in transforms):
        raise malformed("coordinateTransformations is not a list of objects")
    scale = next((t.get("scale") for t in transforms if t.get("type") == "scale"), None)
    if not isinstance(scale, list):
        raise malformed("level 0 has no scale transformation")
    shift = next((t.get("translation") for t in transforms if t.get("type") == "translation"), None)
    if shift is None:
        return [d["path"] for d in datasets], scale, (0.0, 0.0, 0.0)
    if not (
        isinstance(shift, list)
        and len(shift) == len(scale)
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in shift)
    ):
        raise malformed("level 0's translation is not one finite number per axis")
    return [d["path"] for d in datasets], scale, tuple(float(v) for v in shift)


def _open_labels(path: Path, group: zarr.Group, access: OpenMode, shape: tuple[int, ...]) -> dict[str, OmeImage]:
    """The label images listed in ``labels/`` that exist, each of the image's shape."""
    with untrusted(f"{path}: malformed labels metadata"):
        label_attrs = dict(group["labels"].attrs) if "labels" in group else {}
    names = ngff_payload(label_attrs).get("labels", [])
    if not isinstance(names, list):
        raise BadInputError(f"{path}: malformed labels metadata (labels is not a list)")
    labels: dict[str, OmeImage] = {}
    for name in names:
        if not isinstance(name, str):
            continue  # not a label name: nothing to open
        with untrusted(f"{path}: malformed labels metadata"):
            present = f"labels/{name}" in group
        if present:
            labels[name] = _open_ome(path / "labels" / name, access, is_label=True)
            if labels[name].shape != shape:
                raise BadInputError(f"{path}: labels/{name} has shape {labels[name].shape}, the image {shape}")
    return labels


def emseg_attrs(image: OmeImage) -> dict[str, Any]:
    """emseg's provenance block of a store ({} for stores emseg did not write)."""
    value = image.attrs.get("emseg", {})
    return value if isinstance(value, dict) else {}


def first_slice(prediction: OmeImage) -> int:
    """The input slice a prediction store's slice 0 corresponds to (``predict --slices A:B``)."""
    slices = emseg_attrs(prediction).get("slices")
    if not slices:
        return 0
    if isinstance(slices, list) and isinstance(slices[0], (int, float)) and math.isfinite(slices[0]):
        return int(slices[0])
    raise BadInputError(f"{prediction.path}: malformed emseg metadata (slices {slices!r})")
