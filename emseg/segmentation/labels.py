"""The OME-Zarr label image ``emseg segment`` writes, and its pyramid.

The image is a multiscales group with ``image-label`` metadata (NGFF "labels"), so napari opens
it as a labels layer, whether it stands alone (``SEG.zarr``) or sits in a prediction store as
``labels/cells``. IDs are uint32, or uint64 when there are 2**32 or more objects. Level k > 0 is
the 2x2 mode (the most frequent ID of each 2x2 block; top-left on a four-way tie) of level k - 1,
so labels are never averaged into IDs that do not exist; the multiscales entry says so.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg.io.zarr import LevelSpec, create_multiscale, ngff_for, ngff_payload


def create_label_image(
    group: zarr.Group,
    spec: LevelSpec,
    voxel_size: Sequence[float],
    version: str,
    attrs: dict[str, Any],
    in_image: bool,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> list[zarr.Array]:
    """Multiscale arrays "0", "1", ... of ``spec`` (its dtype: uint32 or uint64) in ``group``,
    with multiscales, image-label (naming the image two levels up when ``in_image``, i.e. the
    group is IMAGE/labels/NAME) and ``attrs`` metadata."""
    ngff = ngff_for(version)
    arrays = create_multiscale(group, spec, voxel_size, version, "cells", reduction="mode", origin=origin)
    payload = ngff_payload(group.attrs)
    payload["image-label"] = ngff.tag({"source": {"image": "../../"}} if in_image else {})
    group.attrs.update({**ngff.wrap(payload), **attrs})
    return arrays


def mode2(band: np.ndarray) -> np.ndarray:
    """2x2 mode in y and x of a (Z, Y, X) label band -> (Z, ceil(Y/2), ceil(X/2)), same dtype."""
    z, y, x = band.shape
    if y % 2 or x % 2:
        band = np.pad(band, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    a, b = band[:, 0::2, 0::2], band[:, 0::2, 1::2]
    c, d = band[:, 1::2, 0::2], band[:, 1::2, 1::2]
    # a wins when it appears twice; else b when it does; else c when c == d; else a (all differ)
    out = np.where((b == c) | (b == d), b, np.where(c == d, c, a))
    return np.where((a == b) | (a == c) | (a == d), a, out)


def build_label_levels(group_path: Path) -> None:
    """Levels 1.. of the label image at ``group_path`` from level 0, one chunk row at a time."""
    group = zarr.open_group(str(group_path), mode="r+")
    levels = [array for _, array in sorted(group.arrays(), key=lambda item: int(item[0]))]
    for src, dst in itertools.pairwise(levels):
        rows = int(dst.chunks[1])
        for z in range(dst.shape[0]):
            for y in range(0, dst.shape[1], rows):
                block = np.asarray(src[z : z + 1, 2 * y : 2 * (y + rows)])
                dst[z : z + 1, y : y + rows] = mode2(block)[:, : min(rows, dst.shape[1] - y)]


def list_label(image_group: Path, name: str, version: str) -> None:
    """Add ``name`` to the ``labels`` list of ``image_group``/labels (after it was written there),
    making ``labels`` a group of NGFF ``version`` when the store had no labels yet."""
    labels = zarr.open_group(str(image_group / "labels"), mode="a", zarr_format=ngff_for(version).zarr_format)
    attrs = dict(labels.attrs)
    payload = ngff_payload(attrs)
    names = [n for n in payload.get("labels", []) if n != name] + [name]
    wrapped = {**payload, "labels": names}
    ome = attrs.get("ome")
    labels.attrs.update({"ome": {**ome, **wrapped}} if isinstance(ome, dict) else wrapped)


def spec_for(spec: LevelSpec, dtype: str) -> LevelSpec:
    return dataclasses.replace(spec, dtype=dtype)


__all__ = ["build_label_levels", "create_label_image", "list_label", "mode2", "spec_for"]
