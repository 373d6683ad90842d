"""The OME-Zarr label image ``emseg segment`` writes, and listing it in its image's labels.

The image is a multiscales group with ``image-label`` metadata (NGFF "labels"), so napari opens
it as a labels layer, whether it stands alone (``SEG.zarr``) or sits in a prediction store as
``labels/cells``. IDs are uint32, or uint64 when there are 2**32 or more objects. Its levels
k > 0 are the 2x2 mode of level k - 1 (:func:`emseg.io.pyramid.build_levels` with "mode"); the
multiscales entry says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr

from emseg.io.zarr import LevelSpec, create_multiscale, ngff_for, ngff_metadata, ngff_payload


def create_label_image(
    group: zarr.Group,
    spec: LevelSpec,
    voxel_size: Sequence[float],
    version: str,
    attrs: dict[str, Any],
    in_image: bool,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    name: str = "cells",
) -> list[zarr.Array]:
    """Multiscale arrays "0", "1", ... of ``spec`` (its dtype: uint32 or uint64) in ``group``,
    with multiscales (called ``name``), image-label (naming the image two levels up when
    ``in_image``, i.e. the group is IMAGE/labels/NAME) and ``attrs`` metadata."""
    ngff = ngff_for(version)
    arrays = create_multiscale(group, spec, voxel_size, version, name, reduction="mode", origin=origin)
    payload = ngff_payload(group.attrs)
    payload["image-label"] = ngff.tag({"source": {"image": "../../"}} if in_image else {})
    group.attrs.update({**ngff_metadata(version, "label", payload), **attrs})
    return arrays


def list_label(image_group: Path, name: str, version: str) -> None:
    """Add ``name`` to the ``labels`` list of ``image_group``/labels (after it was written there),
    making ``labels`` a group of NGFF ``version`` when the store had no labels yet."""
    labels = zarr.open_group(str(image_group / "labels"), mode="a", zarr_format=ngff_for(version).zarr_format)
    attrs = dict(labels.attrs)
    payload = ngff_payload(attrs)
    names = [n for n in payload.get("labels", []) if n != name] + [name]
    built = ngff_metadata(version, "labels", {"labels": names})
    ome = attrs.get("ome")
    labels.attrs.update({"ome": {**ome, **built["ome"]}} if isinstance(ome, dict) and "ome" in built else built)


__all__ = ["create_label_image", "list_label"]
