"""``emseg info``: what an OME-Zarr store holds, as a JSON-ready dict; and bounded reads of it.

A label image is a *mask* when its dtype is bool or uint8 and its values lie within {0, 1} (the
``labels/cells`` of ``emseg ingest``): info gives its foreground fraction. Any other label image
holds *instances* (cell IDs, e.g. from ``emseg segment``): info gives its number of objects (the
distinct non-zero IDs), from emseg's provenance when ``segment`` recorded it, else counted chunk
by chunk. A fraction of IDs would mean nothing.

Readers that draw or sample a store (``emseg show``, the napari reader) read through the pyramid
or by chunks and never a whole plane of more than :data:`MAX_PREVIEW_PIXELS`:
:func:`preview_step` and :func:`strided_plane` read a larger plane downsampled, one chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emseg.io.zarr import OmeImage, emseg_attrs, ngff_payload, open_ome

#: Largest label level (elements) whose foreground fraction or objects are computed exactly.
MAX_COUNTED = 2**30
#: Most pixels of one plane a preview reads at once: 2**24 (4096 x 4096), 16 MiB as uint8 and
#: 128 MiB as float64, which a picture or a percentile handles in about a second on any machine.
MAX_PREVIEW_PIXELS = 2**24
#: Chunks whose unique IDs are merged at once when counting objects (a tree of merges).
_MERGE_FAN_IN = 8


def describe_store(path: str | Path) -> dict[str, Any]:
    """Shape, dtype, chunks, voxel size, levels and labels of a store.

    Each label is described by :func:`describe_label`. When the store is itself a label image
    (``emseg segment -o``), ``image_label`` describes it the same way and ``objects`` gives its
    number of objects (None for any other store, or when it could not be counted).
    """
    image = open_ome(path, channels=True)
    arr = image.array
    shards = getattr(arr, "shards", None)
    result: dict[str, Any] = {
        "path": str(image.path),
        "ngff": image.version,
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "shards": None if shards is None else list(shards),
        "voxel_size_nm": list(image.voxel_size),
        "levels": [list(a.shape) for a in image.levels],
        "size_bytes": math.prod(arr.shape) * arr.dtype.itemsize,
        "labels": {name: describe_label(label) for name, label in image.labels.items()},
        "image_label": None,
        "objects": None,
        "emseg": emseg_attrs(image),
        "channels": _channel_names(image),
    }
    if "image-label" in ngff_payload(image.attrs):
        result["image_label"] = describe_label(image)
        result["objects"] = result["image_label"]["objects"]
    return result


def _channel_names(image: OmeImage) -> list[str] | None:
    """The channel names of a (c, z, y, x) image (its ``omero`` labels, else c0, c1, ...); None for (z, y, x)."""
    if not image.channels:
        return None
    omero = ngff_payload(image.attrs).get("omero")
    channels = omero.get("channels") if isinstance(omero, dict) else None
    names = [str(c.get("label")) for c in channels if isinstance(c, dict)] if isinstance(channels, list) else []
    return names if len(names) == image.channels else [f"c{i}" for i in range(image.channels)]


def describe_label(label: OmeImage) -> dict[str, Any]:
    """What a label image holds, measured on its finest level of at most :data:`MAX_COUNTED`
    elements (exact when that is level 0; none measured when no level is that small):

    - a mask: ``{"kind": "mask", "foreground_fraction": f, "fraction_level": L}`` (f is None when
      no level was measured);
    - instances: ``{"kind": "instances", "objects": N, "objects_level": L, "objects_source": S}``
      with S "provenance" (``emseg segment`` recorded N for level 0: exact, nothing is read),
      "counted" (distinct non-zero IDs of level L; a lower bound when L > 0, where small objects
      may have vanished) or None (not counted: N and L are None too). Their
      ``foreground_fraction`` and ``fraction_level`` are None: their values are IDs.
    """
    level = next((i for i, a in enumerate(label.levels) if math.prod(a.shape) <= MAX_COUNTED), None)
    dtype = np.dtype(label.array.dtype)
    classes = emseg_attrs(label).get("classes")
    if isinstance(classes, list) and classes:
        return _classes(classes, label, level)
    recorded = _recorded_objects(label)
    if recorded is not None:
        return _instances(recorded, 0, "provenance")
    if dtype in (np.dtype(bool), np.dtype(np.uint8)):
        if level is None:  # nothing measurable: emseg's masks are uint8, so assume one
            return _mask(None, None)
        counts = _histogram(label.levels[level])
        if not counts[2:].any():
            return _mask(float(counts[1] / counts.sum()), level)
        return _instances(int(np.count_nonzero(counts[1:])), level, "counted")
    if level is None:
        return _instances(None, None, None)
    return _instances(count_objects(label.levels[level]), level, "counted")


def count_objects(array: Any) -> int:
    """Distinct non-zero values of a zarr array, counted chunk by chunk (dask): each chunk's IDs
    are merged in a tree, so memory holds a few chunks and the IDs, never the whole array."""
    ids = _reduce_chunks(array, _nonzero_ids, _union)
    return int(ids.size)


def preview_step(shape: tuple[int, ...], max_pixels: int = MAX_PREVIEW_PIXELS, max_side: int | None = None) -> int:
    """The smallest stride (1, 2, ...) in y and x that brings a (..., Y, X) plane within
    ``max_pixels`` pixels and, when given, within ``max_side`` pixels on its longest side."""
    ny, nx = int(shape[-2]), int(shape[-1])
    step = max(1, math.isqrt(max(0, ny * nx // max(1, max_pixels))))
    if max_side is not None:
        step = max(step, -(-max(ny, nx) // max(1, max_side)))
    while -(-ny // step) * -(-nx // step) > max_pixels:
        step += 1
    return step


def strided_plane(array: Any, z: int, step: int) -> np.ndarray:
    """Slice ``z`` of a (Z, Y, X) zarr array, every ``step``-th pixel in y and x from (0, 0):
    (ceil(Y / step), ceil(X / step)), its dtype. With step > 1 it is read one chunk at a time (the
    chunks that hold a kept pixel), so memory is the output and one chunk, whatever the plane."""
    if step == 1:
        return np.asarray(array[z])
    ny, nx = (int(s) for s in array.shape[1:])
    cy, cx = (int(c) for c in array.chunks[1:])
    out = np.empty((-(-ny // step), -(-nx // step)), dtype=array.dtype)
    for y0 in range(0, ny, cy):
        ys = -(-y0 // step) * step  # the first kept row in this chunk row
        if ys >= min(y0 + cy, ny):
            continue
        ye = min(y0 + cy, ny)
        for x0 in range(0, nx, cx):
            xs = -(-x0 // step) * step
            xe = min(x0 + cx, nx)
            if xs >= xe:
                continue
            part = np.asarray(array[z, ys:ye:step, xs:xe:step])
            out[ys // step : ys // step + part.shape[0], xs // step : xs // step + part.shape[1]] = part
    return out


# --- helpers ----------------------------------------------------------------------------------


def _mask(fraction: float | None, level: int | None) -> dict[str, Any]:
    return {"kind": "mask", "foreground_fraction": fraction, "fraction_level": level}


def _instances(objects: int | None, level: int | None, source: str | None) -> dict[str, Any]:
    return {
        "kind": "instances",
        "objects": objects,
        "objects_level": level,
        "objects_source": source,
        "foreground_fraction": None,
        "fraction_level": None,
    }


def _classes(classes: list[dict[str, Any]], label: OmeImage, level: int | None) -> dict[str, Any]:
    """A class image (``ingest --class``, a multi-class prediction): its classes and their shares
    of the pixels on ``level`` (None when none was measured), "unlabelled" for 0."""
    shares = None
    if level is not None:
        counts = _histogram(label.levels[level])
        total = max(int(counts.sum()), 1)
        shares = {"unlabelled": float(counts[0] / total)}
        shares.update({str(c["name"]): float(counts[int(c["value"])] / total) for c in classes})
    return {
        "kind": "classes",
        "classes": [str(c["name"]) for c in classes],
        "class_fractions": shares,
        "fraction_level": level,
        "objects": None,
        "foreground_fraction": None,
    }


def _recorded_objects(label: OmeImage) -> int | None:
    """The number of objects ``emseg segment`` recorded in the label image's attributes when it
    finished writing it; None otherwise."""
    prov = emseg_attrs(label)
    objects = prov.get("objects")
    if prov.get("command") != "segment" or prov.get("complete") is not True:
        return None
    if isinstance(objects, int) and not isinstance(objects, bool) and objects >= 0:
        return objects
    return None


def _histogram(array: Any) -> np.ndarray:
    """Counts of the values 0-255 of a bool or uint8 zarr array, chunk by chunk: (256,) int64."""
    return _reduce_chunks(array, _chunk_histogram, _sum)


def _chunk_histogram(block: np.ndarray) -> np.ndarray:
    return np.bincount(block.view(np.uint8).ravel(), minlength=256).astype(np.int64)


def _nonzero_ids(block: np.ndarray) -> np.ndarray:
    ids = np.unique(block)
    return ids[ids != 0]


def _union(*parts: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate(parts))


def _sum(*parts: np.ndarray) -> np.ndarray:
    return np.sum(parts, axis=0)


def _reduce_chunks(
    array: Any, per_chunk: Callable[[np.ndarray], np.ndarray], merge: Callable[..., np.ndarray]
) -> np.ndarray:
    """``per_chunk`` of each chunk of a zarr array, merged ``_MERGE_FAN_IN`` at a time into one
    result (dask's threads; only a few chunks are read at once)."""
    import dask
    import dask.array as da

    parts = [dask.delayed(per_chunk)(block) for block in da.from_zarr(array).to_delayed().ravel()]
    while len(parts) > 1:
        parts = [dask.delayed(merge)(*parts[i : i + _MERGE_FAN_IN]) for i in range(0, len(parts), _MERGE_FAN_IN)]
    result: np.ndarray = parts[0].compute()
    return result
