"""OME-Zarr stores: create image and label groups with multiscales metadata, and open them.

emseg writes NGFF 0.4 (zarr v2, ``/`` chunk keys) by default, the version napari and Fiji read
today, and NGFF 0.5 (zarr v3, metadata under ``"ome"``, optional sharding) on request. A store
holds one image group::

    DATA.zarr/            multiscales image: arrays "0", "1", ... (2x downsampled in y and x)
    DATA.zarr/labels/     {"labels": ["cells"]}
    DATA.zarr/labels/cells  multiscales + image-label, uint8 {0, 1}

All arrays are (z, y, x) with axes in nanometres; levels k > 0 are 2x2 block means of level k-1
(block majority for labels), so level k has scale (z, 2^k y, 2^k x) and a translation of
(2^k - 1)/2 pixels of level 0 in y and x.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg.errors import BadInputError

NGFF_VERSIONS = ("0.4", "0.5")
#: Largest array (elements) emseg opens: 2**50, a petavoxel; metadata claiming more is hostile.
MAX_ELEMENTS = 2**50
AXES = [
    {"name": "z", "type": "space", "unit": "nanometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]
#: Colour of each label value in viewers (RGBA 0-255).
LABEL_COLORS = {
    "cells": [{"label-value": 1, "rgba": [255, 200, 0, 128]}],
    "membranes": [{"label-value": 1, "rgba": [0, 160, 255, 160]}],
}


def pyramid_shapes(shape: Sequence[int], min_size: int = 1024) -> list[tuple[int, int, int]]:
    """Level shapes: level 0 is ``shape``; each next level halves y and x (rounding up) until the
    largest of y and x is at most ``min_size``."""
    z, y, x = (int(s) for s in shape)
    shapes = [(z, y, x)]
    while max(y, x) > min_size and min(y, x) > 1:
        y, x = math.ceil(y / 2), math.ceil(x / 2)
        shapes.append((z, y, x))
    return shapes


def clip_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """Chunk shape clipped to the array (a chunk never exceeds the array, never below 1)."""
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape))  # type: ignore[return-value]


def multiscales(
    name: str, n_levels: int, voxel_size: Sequence[float], version: str
) -> dict[str, Any]:
    """The ``multiscales`` entry for an image of ``n_levels`` 2x-in-(y, x) levels."""
    datasets = []
    for level in range(n_levels):
        factor = 2**level
        scale = [float(voxel_size[0]), voxel_size[1] * factor, voxel_size[2] * factor]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if level > 0:
            shift = (factor - 1) / 2
            transforms.append(
                {"type": "translation", "translation": [0.0, voxel_size[1] * shift, voxel_size[2] * shift]}
            )
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    entry: dict[str, Any] = {
        "name": name,
        "axes": AXES,
        "datasets": datasets,
        "type": "2x2 block mean in y and x",
    }
    if version == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def _ome_attrs(version: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Wrap NGFF metadata as the version wants it: top level for 0.4, under "ome" for 0.5."""
    if version == "0.4":
        return payload
    return {"ome": {"version": version, **payload}}


def _codec_kwargs(version: str, clevel: int, dtype: np.dtype) -> dict[str, Any]:
    if version == "0.4":
        import numcodecs

        shuffle = numcodecs.Blosc.BITSHUFFLE if np.dtype(dtype).itemsize == 1 else numcodecs.Blosc.SHUFFLE
        return {
            "compressors": numcodecs.Blosc(cname="zstd", clevel=clevel, shuffle=shuffle),
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
        }
    from zarr.codecs import BloscCodec

    shuffle = "bitshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
    return {
        "compressors": BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle),
        "dimension_names": ["z", "y", "x"],
    }


@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """Storage layout of one multiscale image: shape, dtype, chunks and shards of level 0."""

    shape: tuple[int, int, int]
    dtype: str
    chunks: tuple[int, int, int] = (1, 1024, 1024)
    shards: tuple[int, int, int] | None = None
    pyramid_min_size: int = 1024
    clevel: int = 5


def create_multiscale(
    group: zarr.Group,
    spec: LevelSpec,
    voxel_size: Sequence[float],
    version: str,
    name: str,
    extra_attrs: dict[str, Any] | None = None,
) -> list[zarr.Array]:
    """Create the arrays "0", "1", ... of a multiscale image in ``group`` and write its metadata.

    Returns the arrays, level 0 first. Chunks are clipped to each level's shape; shards (NGFF 0.5
    only) are clipped likewise and rounded to whole chunks.
    """
    arrays = []
    for level, shape in enumerate(pyramid_shapes(spec.shape, spec.pyramid_min_size)):
        chunks = clip_chunks(spec.chunks, shape)
        kwargs = _codec_kwargs(version, spec.clevel, np.dtype(spec.dtype))
        if spec.shards is not None and version != "0.4":
            shards = clip_chunks(spec.shards, shape)
            kwargs["shards"] = tuple(max(c, (s // c) * c) for s, c in zip(shards, chunks))
        arrays.append(
            group.create_array(
                str(level), shape=shape, chunks=chunks, dtype=spec.dtype, fill_value=0,
                # Checking every chunk for emptiness costs more than it saves on EM data.
                config={"write_empty_chunks": True}, **kwargs
            )
        )
    attrs = _ome_attrs(version, {"multiscales": [multiscales(name, len(arrays), voxel_size, version)]})
    if extra_attrs:
        attrs.update(extra_attrs)
    group.attrs.update(attrs)
    return arrays


def create_image_store(path: Path, version: str, attrs: dict[str, Any] | None = None) -> zarr.Group:
    """A new, empty root group at ``path`` for an OME-Zarr image of NGFF ``version``."""
    if version not in NGFF_VERSIONS:
        raise BadInputError(f"--ngff {version}: supported versions are {', '.join(NGFF_VERSIONS)}")
    fmt = 2 if version == "0.4" else 3
    return zarr.create_group(str(path), zarr_format=fmt, attributes=attrs or {})


def create_label(
    image_group: zarr.Group, label_name: str, spec: LevelSpec, voxel_size: Sequence[float], version: str
) -> list[zarr.Array]:
    """Create ``labels/<label_name>`` (uint8 multiscale with image-label metadata) under the image."""
    labels = image_group.require_group("labels")
    existing = list(_ome(labels.attrs).get("labels", []))
    if label_name not in existing:
        existing.append(label_name)
    labels.attrs.update(_ome_attrs(version, {"labels": existing}))
    group = labels.create_group(label_name)
    image_label = {
        "colors": LABEL_COLORS.get(label_name, [{"label-value": 1, "rgba": [255, 0, 0, 128]}]),
        "source": {"image": "../../"},
    }
    if version == "0.4":
        image_label = {"version": "0.4", **image_label}
    arrays = create_multiscale(group, dataclasses.replace(spec, dtype="uint8"), voxel_size, version, label_name)
    group.attrs.update(_ome_attrs(version, {**_ome(group.attrs), "image-label": image_label}))
    return arrays


def _ome(attrs: Any) -> dict[str, Any]:
    """NGFF metadata of a group's attributes, whatever the version (0.5 nests it under "ome")."""
    attrs = dict(attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        return {k: v for k, v in attrs["ome"].items() if k != "version"}
    return attrs


@dataclasses.dataclass
class OmeImage:
    """An opened multiscale image: its levels (level 0 first), voxel size and labels."""

    path: Path
    group: zarr.Group
    version: str
    levels: list[zarr.Array]
    voxel_size: tuple[float, float, float]
    labels: dict[str, "OmeImage"]
    attrs: dict[str, Any]

    @property
    def array(self) -> zarr.Array:
        """Level 0, (Z, Y, X)."""
        return self.levels[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.levels[0].shape)  # type: ignore[return-value]


def open_ome(path: str | Path, *, mode: str = "r") -> OmeImage:
    """Open an OME-Zarr image written by emseg (or any NGFF 0.4/0.5 3D image).

    Raises :class:`BadInputError` with one clear line when ``path`` is missing, not a zarr group,
    has no multiscales image, or carries metadata that does not make sense (a store from an
    untrusted source can hold anything: every failure to read it is reported the same way).
    """
    try:
        return _open_ome(Path(path), mode, False)
    except (BadInputError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise BadInputError(f"{path}: malformed OME-Zarr metadata ({type(exc).__name__}: {exc})") from None


def _open_ome(path: Path, mode: str, _label: bool) -> OmeImage:
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for "not a group"
        raise BadInputError(f"{path}: not a zarr group ({type(exc).__name__}: {exc})") from None
    raw_attrs = dict(group.attrs)
    attrs = _ome(raw_attrs)
    ms = attrs.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise BadInputError(f"{path}: not an OME-Zarr image (no multiscales metadata)")
    version = str(raw_attrs["ome"].get("version")) if "ome" in raw_attrs else str(ms[0].get("version", "0.4"))
    try:
        datasets = ms[0]["datasets"]
        levels = [group[d["path"]] for d in datasets]
        scale = next(t["scale"] for t in datasets[0]["coordinateTransformations"] if t["type"] == "scale")
    except Exception as exc:
        raise BadInputError(f"{path}: malformed multiscales metadata ({type(exc).__name__}: {exc})") from None
    if not levels or any(not isinstance(a, zarr.Array) for a in levels):
        raise BadInputError(f"{path}: multiscales datasets are not arrays")
    if levels[0].ndim != 3 or len(scale) != 3:
        raise BadInputError(f"{path}: expected a 3D (z, y, x) image, found {levels[0].ndim} dimensions")
    if any(a.ndim != 3 or min(a.shape) < 1 for a in levels):
        raise BadInputError(f"{path}: a pyramid level is empty or not 3D")
    if any(math.prod(a.shape) > MAX_ELEMENTS for a in levels):
        raise BadInputError(f"{path}: an array of shape {max((a.shape for a in levels), key=math.prod)} is larger than emseg accepts")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in scale):
        raise BadInputError(f"{path}: voxel size {scale} is not three positive numbers")
    labels: dict[str, OmeImage] = {}
    if not _label and "labels" in group:
        for name in _ome(group["labels"].attrs).get("labels", []):
            if f"labels/{name}" in group:
                labels[name] = _open_ome(path / "labels" / str(name), mode, True)
                if labels[name].shape != tuple(levels[0].shape):
                    raise BadInputError(f"{path}: labels/{name} has shape {labels[name].shape}, the image {levels[0].shape}")
    return OmeImage(
        path=path,
        group=group,
        version=version,
        levels=levels,
        voxel_size=tuple(float(s) for s in scale),  # type: ignore[arg-type]
        labels=labels,
        attrs=raw_attrs,
    )


def emseg_attrs(image: OmeImage) -> dict[str, Any]:
    """emseg's provenance block of a store ({} for stores emseg did not write)."""
    value = image.attrs.get("emseg", {})
    return value if isinstance(value, dict) else {}


def first_slice(prediction: OmeImage) -> int:
    """The input slice a prediction store's slice 0 corresponds to (``predict --slices A:B``)."""
    return int((emseg_attrs(prediction).get("slices") or [0])[0])
