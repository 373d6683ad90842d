"""napari reader for emseg's OME-Zarr stores: each kind of store opens as the layers that make sense.

- an image store (``emseg ingest``): the EM, then its ``labels/*`` (the annotation);
- a prediction store (``emseg predict``): the EM it was predicted from (found through the store's
  provenance, when that store still exists), P(cell) drawn translucent above it, then
  ``labels/membranes`` and, after ``segment --into``, ``labels/cells``;
- a multi-class prediction (a network of several classes): the EM, P(class) per class, each in
  its class's colour (the first non-membrane class shown), then ``labels/classes`` named and
  coloured per class;
- a label image (``emseg segment -o``): the EM and P(cell) of its prediction (P(cell) hidden),
  then the cells;
- any other 3D OME-Zarr image (NGFF 0.4/0.5): the image and its labels.

Layers are lazy (dask arrays; a pyramid is a list of them, level 0 first); the only pixels read
on opening are a bounded window for the EM's contrast limits. They are placed in nanometres
(scale = voxel size, translate = level 0's translation) and labelled z, y, x. Labels are visible,
in the colours of their ``image-label`` metadata. This module needs neither napari nor Qt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emseg.errors import BadInputError
from emseg.io.info import MAX_PREVIEW_PIXELS
from emseg.io.zarr import OmeImage, ngff_payload, open_ome

log = logging.getLogger(__name__)

#: (data, layer keywords, layer type): what a napari reader returns per layer.
LayerData = tuple[Any, dict[str, Any], str]

#: P(cell) over the EM: a translucent heat map (membranes dark purple, cells orange), so the EM
#: stays readable beneath it.
PROBABILITY_STYLE: dict[str, Any] = {"colormap": "magma", "opacity": 0.45, "blending": "translucent"}
#: Layer opacity of masks with colours in their metadata (their alpha applies too), and of
#: instance labels (napari's random colours): light enough to see P(cell) and the EM through.
MASK_OPACITY = 0.6
INSTANCE_OPACITY = 0.3
#: Side of the centred window of the smallest level's middle slice that contrast limits are taken
#: from: 2048 x 2048 = 2**22 pixels (32 MiB as float64), within MAX_PREVIEW_PIXELS. Layers
#: themselves are lazy; this is the only pixel data the reader reads.
CONTRAST_WINDOW = math.isqrt(MAX_PREVIEW_PIXELS) // 2
#: Axis units napari (pint) understands, as OME-Zarr spells them.
_UNITS = {"angstrom", "nanometer", "micrometer", "millimeter", "meter"}


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader for ``path`` when it is one OME-Zarr image emseg can open (``*.zarr``), else
    None so that napari asks another plugin."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.suffix.lower() != ".zarr" or not p.is_dir():
        return None
    try:
        open_ome(p, channels=True)
    except BadInputError:
        return None
    return read_store


def read_store(path: str | list[str]) -> list[LayerData]:
    """The layers of the emseg store (or other OME-Zarr image) at ``path``, bottom to top."""
    image = open_ome(path[0] if isinstance(path, list) else path, channels=True)
    provenance = _provenance(image)
    layers: list[LayerData] = []
    if image.channels:  # a multi-class prediction: the EM, a layer per class, the class image
        em = _open_source(image, provenance.get("data"))
        layers += [em_layer(em)] if em is not None else []
        layers += class_layers(image)
        return layers + [labels_layer(label, name) for name, label in image.labels.items()]
    if "image-label" in ngff_payload(image.attrs):  # a label image of its own (segment -o)
        prediction = _open_source(image, provenance.get("prediction"))
        if prediction is not None:
            em = _open_source(prediction, _provenance(prediction).get("data"))
            layers += [em_layer(em)] if em is not None else []
            layers.append(probability_layer(prediction, visible=False))
        return [*layers, labels_layer(image, "cells")]
    if is_probability(image):
        em = _open_source(image, provenance.get("data"))
        layers = ([em_layer(em)] if em is not None else []) + [probability_layer(image)]
    else:
        layers = [em_layer(image)]
    return layers + [labels_layer(label, name) for name, label in image.labels.items()]


# --- one layer each ---------------------------------------------------------------------------


def em_layer(image: OmeImage, name: str | None = None) -> LayerData:
    """The EM image, gray, with contrast limits from the middle slice of its smallest level (a
    bounded window of it: :func:`contrast_limits`)."""
    data, multiscale = pyramid(image)
    kwargs = {
        "name": name or image.path.stem,
        "colormap": "gray",
        "contrast_limits": contrast_limits(image),
        "multiscale": multiscale,
        "metadata": _metadata(image, "em"),
        **placement(image),
    }
    return data, kwargs, "image"


def probability_layer(image: OmeImage, name: str = "P(cell)", visible: bool = True) -> LayerData:
    """P(cell) (uint8 0-255 or float 0-1) as a translucent heat map to lay above the EM."""
    data, multiscale = pyramid(image)
    top = 255.0 if np.dtype(image.array.dtype) == np.uint8 else 1.0
    kwargs = {
        "name": name,
        **PROBABILITY_STYLE,
        "contrast_limits": [0.0, top],
        "visible": visible,
        "multiscale": multiscale,
        "metadata": _metadata(image, "probabilities"),
        **placement(image),
    }
    return data, kwargs, "image"


def class_layers(image: OmeImage) -> list[LayerData]:
    """One layer per channel of a (c, z, y, x) class-probability image, named and coloured as its
    class (``omero``: a transparent-to-colour ramp), additive so several read at once; hidden
    but the first non-membrane one, so the EM stays readable."""
    import dask.array as da

    omero = ngff_payload(image.attrs).get("omero")
    channels = omero.get("channels") if isinstance(omero, dict) else None
    channels = channels if isinstance(channels, list) and len(channels) == image.channels else []
    top = 255.0 if np.dtype(image.array.dtype) == np.uint8 else 1.0
    layers: list[LayerData] = []
    for c in range(image.channels):
        meta = channels[c] if c < len(channels) and isinstance(channels[c], dict) else {}
        name = str(meta.get("label", f"class {c + 1}"))
        hex_color = str(meta.get("color", "FFFFFF"))
        try:
            rgb = [int(hex_color[i : i + 2], 16) / 255 for i in (0, 2, 4)]
        except ValueError:
            rgb = [1.0, 1.0, 1.0]
        levels = [da.from_zarr(level)[c] for level in image.levels]
        kwargs = {
            "name": f"P({name})",
            "colormap": {"name": name, "colors": [[*rgb, 0.0], [*rgb, 1.0]]},
            "contrast_limits": [0.0, top],
            "blending": "additive",
            "opacity": 0.6,
            "visible": False,
            "multiscale": len(levels) > 1,
            "metadata": {"emseg": {"store": str(image.path), "kind": "class probabilities", "channel": c}},
            **placement(image),
        }
        layers.append((levels if len(levels) > 1 else levels[0], kwargs, "image"))
    shown = next((i for i, (_, kw, _) in enumerate(layers) if kw["name"] != "P(membrane)"), None)
    if shown is not None:
        layers[shown][1]["visible"] = True
    return layers


def labels_layer(image: OmeImage, name: str) -> LayerData:
    """A label image, visible: in the colours its ``image-label`` metadata gives (binary masks),
    else in napari's random colours (instance labels)."""
    data, multiscale = pyramid(image)
    colors = label_colors(image)
    kwargs: dict[str, Any] = {
        "name": name,
        "visible": True,
        "opacity": MASK_OPACITY if colors else INSTANCE_OPACITY,
        "multiscale": multiscale,
        "metadata": _metadata(image, "labels"),
        **placement(image),
    }
    if colors:
        kwargs["colormap"] = {None: "transparent", 0: "transparent", **colors}
    names = class_names(image)
    if names:  # a class image: napari shows each value's class name under the cursor
        kwargs["features"] = {"index": [0, *names.keys()], "class": ["unlabelled", *names.values()]}
    return data, kwargs, "labels"


def class_names(image: OmeImage) -> dict[int, str]:
    """{class value: name} from the ``image-label`` ``properties`` (empty for masks and instances)."""
    meta = ngff_payload(image.attrs).get("image-label")
    props = meta.get("properties") if isinstance(meta, dict) else None
    out: dict[int, str] = {}
    for p in props if isinstance(props, list) else []:
        if isinstance(p, dict) and isinstance(p.get("label-value"), int) and isinstance(p.get("name"), str):
            out[p["label-value"]] = p["name"]
    return out


# --- helpers ----------------------------------------------------------------------------------


def pyramid(image: OmeImage) -> tuple[Any, bool]:
    """(data, multiscale): a list of dask arrays, level 0 first, or one array for one level."""
    import dask.array as da

    arrays = [da.from_zarr(level) for level in image.levels]
    return (arrays, True) if len(arrays) > 1 else (arrays[0], False)


def placement(image: OmeImage) -> dict[str, Any]:
    """Layer keywords that put ``image`` where its metadata says: scale, translate, axis labels
    and units (when the axes name units napari knows)."""
    out: dict[str, Any] = {
        "scale": list(image.voxel_size),
        "translate": list(level0_translation(image)),
        "axis_labels": ("z", "y", "x"),
    }
    units = _units(image)
    if units is not None:
        out["units"] = units
    return out


def level0_translation(image: OmeImage) -> tuple[float, float, float]:
    """Level 0's translation (nm, z y x) from the multiscales metadata; zeros when it has none."""
    entry = ngff_payload(image.attrs)["multiscales"][0]
    transforms = entry["datasets"][0].get("coordinateTransformations", [])
    shift = next((t.get("translation") for t in transforms if t.get("type") == "translation"), None)
    if isinstance(shift, list) and len(shift) in (3, 4) and all(isinstance(v, (int, float)) for v in shift):
        return (float(shift[-3]), float(shift[-2]), float(shift[-1]))  # (a channel axis first has none)
    return (0.0, 0.0, 0.0)


def contrast_limits(image: OmeImage, side: int = CONTRAST_WINDOW) -> list[float]:
    """(low, high): the 0.5 and 99.5 percentiles of the middle slice of the smallest level, or of
    its centred ``side`` x ``side`` window when the slice is larger (a single-level huge store):
    a cheap, bounded read whatever the stack's size."""
    top = image.levels[-1]
    ny, nx = (int(s) for s in top.shape[1:])
    y0, x0 = max(0, (ny - side) // 2), max(0, (nx - side) // 2)
    plane = np.asarray(top[top.shape[0] // 2, y0 : y0 + side, x0 : x0 + side], dtype=np.float64)
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return [0.0, 1.0]
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return [low, high] if high > low else [low, low + 1.0]


def label_colors(image: OmeImage) -> dict[int, list[float]]:
    """{label value: RGBA 0-1} from the ``image-label`` metadata's ``colors`` (empty when none)."""
    meta = ngff_payload(image.attrs).get("image-label")
    entries = meta.get("colors") if isinstance(meta, dict) else None
    colors: dict[int, list[float]] = {}
    for entry in entries if isinstance(entries, list) else []:
        value, rgba = (entry.get("label-value"), entry.get("rgba")) if isinstance(entry, dict) else (None, None)
        if isinstance(value, int) and isinstance(rgba, list) and len(rgba) == 4:
            colors[value] = [float(c) / 255 for c in rgba]
    return colors


def is_probability(image: OmeImage) -> bool:
    """Whether ``image`` holds P(cell): written by ``emseg predict``, or named "probabilities"."""
    entry = ngff_payload(image.attrs)["multiscales"][0]
    return _provenance(image).get("command") == "predict" or entry.get("name") == "probabilities"


def _provenance(image: OmeImage) -> dict[str, Any]:
    prov = image.attrs.get("emseg")
    return prov if isinstance(prov, dict) else {}


def _open_source(image: OmeImage, source: Any) -> OmeImage | None:
    """The store ``source`` (a path from ``image``'s provenance) when it still opens, else None."""
    if not isinstance(source, str) or not Path(source).is_dir():
        return None
    try:
        found = open_ome(source)
    except BadInputError as exc:
        log.warning("%s: cannot show its source %s (%s)", image.path, source, exc)
        return None
    if found.shape[1:] != image.shape[1:]:
        log.warning("%s: its source %s has another shape; not shown", image.path, source)
        return None
    return found


def _units(image: OmeImage) -> tuple[str, ...] | None:
    axes = ngff_payload(image.attrs)["multiscales"][0].get("axes")
    if not isinstance(axes, list) or len(axes) != 3 + (1 if image.channels else 0):
        return None
    axes = axes[-3:]  # the spatial ones (a class-probability image has c first)
    units = tuple(a.get("unit") if isinstance(a, dict) else None for a in axes)
    return units if all(u in _UNITS for u in units) else None  # type: ignore[return-value]


def _metadata(image: OmeImage, kind: str) -> dict[str, Any]:
    """What the widget needs to predict from the store itself: its path and what it holds."""
    return {"emseg": {"store": str(image.path), "kind": kind}}


__all__ = [
    "LayerData",
    "class_layers",
    "class_names",
    "em_layer",
    "get_reader",
    "labels_layer",
    "probability_layer",
    "read_store",
]
