"""``emseg info``: what an OME-Zarr store holds, as a JSON-ready dict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from emseg.io.zarr import emseg_attrs, open_ome

#: Largest label level (elements) whose foreground fraction is computed exactly.
MAX_COUNTED = 2**30


def describe_store(path: str | Path) -> dict[str, Any]:
    """Shape, dtype, chunks, voxel size, levels and labels (with foreground fraction) of a store.

    The foreground fraction is exact when the label's level 0 is under 1 Gi elements, else
    estimated from the finest level that is (``fraction_level`` says which; None when none is).
    """
    image = open_ome(path)
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
        "labels": {},
        "emseg": emseg_attrs(image),
    }
    for name, label in image.labels.items():
        level = next((i for i, a in enumerate(label.levels) if math.prod(a.shape) <= MAX_COUNTED), None)
        fraction = None if level is None else _mean_of(label.levels[level])
        result["labels"][name] = {"foreground_fraction": fraction, "fraction_level": level}
    return result


def _mean_of(array: Any) -> float:
    """Mean of a zarr array, chunk by chunk (dask), in float64."""
    import dask.array as da

    return float(da.from_zarr(array).astype(np.float64).mean().compute())
