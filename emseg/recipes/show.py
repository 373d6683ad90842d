"""``emseg show``: the first visual check of a store (and of a prediction of it).

It reads at most :data:`~emseg.io.info.MAX_PREVIEW_PIXELS` pixels of a plane at once: the default
level fits, or, when even the coarsest level's slice does not (a single-level huge store), the
slice is read downsampled chunk by chunk; an explicit ``--level`` whose slice does not fit is refused.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import ShowConfig
from emseg.errors import BadInputError
from emseg.io.info import MAX_PREVIEW_PIXELS, preview_step, strided_plane
from emseg.io.outputs import Output, check_output
from emseg.io.zarr import first_slice, open_ome
from emseg.probability import probability_float
from emseg.viz import overlay, panel_rows

log = logging.getLogger(__name__)

#: The default level is the finest whose largest side is at most this many pixels (and a slice
#: read downsampled is brought to this size).
MAX_SIDE = 2048


def show_slice(
    data: str | Path,
    output: str | Path,
    config: ShowConfig,
    pred: str | Path | None = None,
    max_pixels: int = MAX_PREVIEW_PIXELS,
) -> Path:
    """Save a PNG of slice ``config.z``: the image, its ``labels/cells`` mask when present, and
    with ``pred`` the predicted P(cell) and an overlay of the predicted membranes.

    ``config.level`` picks a pyramid level; by default the finest whose largest side is at most 2048 px
    and whose slice has at most ``max_pixels`` pixels, else the coarsest, read downsampled to
    2048 px (every n-th pixel in y and x, chunk by chunk; the title says so) when its slice has
    more. An explicit ``level`` whose slice has more than ``max_pixels`` pixels is refused.
    An existing ``output`` is replaced only with ``config.overwrite`` and only when emseg wrote it.
    """
    z, level, overwrite = config.z, config.level, config.overwrite
    check_output(Path(output).absolute(), overwrite, kind="file", inputs=[data, pred])
    image = open_ome(data)
    if not 0 <= z < image.shape[0]:
        raise BadInputError(f"--slice {z}: {data} has slices 0-{image.shape[0] - 1}")
    if level is None:
        fits = [max(a.shape[1:]) <= MAX_SIDE and math.prod(a.shape[1:]) <= max_pixels for a in image.levels]
        level = fits.index(True) if True in fits else len(image.levels) - 1
    elif not 0 <= level < len(image.levels):
        raise BadInputError(f"--level {level}: {data} has levels 0-{len(image.levels) - 1}")
    elif math.prod(image.levels[level].shape[1:]) > max_pixels:
        raise BadInputError(_too_large(data, image.levels, level, max_pixels))
    step = _step(image.levels[level].shape, 1, max_pixels)
    raw = strided_plane(image.levels[level], z, step)
    title = f"image (slice {z}, level {level})"
    if step > 1:
        title = f"image (slice {z}, level {level}, downsampled {step}x)"
        log.info("%s: slice %d of level %d is too large to read whole; read downsampled %dx", data, z, level, step)
    row: dict[str, np.ndarray] = {title: raw}
    if "cells" in image.labels:
        row["truth: cells"] = _matching(image.labels["cells"].levels, level, z, step, raw.shape, max_pixels) > 0
    if pred is not None:
        prediction = open_ome(pred)
        if prediction.shape[1:] != image.shape[1:]:
            raise BadInputError(f"--pred {pred}: shape {prediction.shape} does not match {data} {image.shape}")
        zp = z - first_slice(prediction)
        if not 0 <= zp < prediction.shape[0]:
            raise BadInputError(f"--pred {pred}: holds no prediction for slice {z}")
        plane = _matching(prediction.levels, level, zp, step, raw.shape, max_pixels)
        prob = probability_float(plane, str(pred))
        row["prob: P(cell)"] = prob
        row["overlay: predicted membranes"] = overlay(raw, prob < 0.5)
    with Output(output, overwrite=overwrite, kind="file", command="show", inputs=[data, pred]) as out:
        panel_rows([row], out.path)
    return Path(output)


def _step(shape: tuple[int, ...], step: int, max_pixels: int) -> int:
    """``step`` when a (Z, Y, X) level's slice read every ``step``-th pixel has at most
    ``max_pixels`` pixels, else the stride that brings it to :data:`MAX_SIDE` (and the bound)."""
    if math.ceil(shape[1] / step) * math.ceil(shape[2] / step) <= max_pixels:
        return step
    return preview_step(shape, max_pixels, MAX_SIDE)


def _matching(levels: list[Any], level: int, z: int, step: int, shape: tuple[int, ...], max_pixels: int) -> np.ndarray:
    """Slice ``z`` of an image the size of the shown one (its labels, its prediction) at ``level``
    (its coarsest when it has fewer levels), read every n-th pixel so that it has the shown
    plane's ``shape`` where the 2x pyramids allow it, else within ``max_pixels``."""
    used = min(level, len(levels) - 1)
    array = levels[used]
    finer = step * 2 ** (level - used)
    if tuple(-(-int(n) // finer) for n in array.shape[1:]) == tuple(shape):
        return strided_plane(array, z, finer)
    return strided_plane(array, z, _step(array.shape, step, max_pixels))


def _too_large(data: str | Path, levels: list[Any], level: int, max_pixels: int) -> str:
    """The one line refusing an explicit ``--level`` whose slice is larger than ``max_pixels``."""
    ny, nx = levels[level].shape[1:]
    sizes = ", ".join(f"{i}: {a.shape[1]} x {a.shape[2]}" for i, a in enumerate(levels))
    return (
        f"--level {level}: a slice of it is {ny} x {nx} = {ny * nx} pixels, more than the {max_pixels} "
        f"emseg show reads at once; {data} has levels {sizes} (leave out --level for a downsampled view)"
    )
