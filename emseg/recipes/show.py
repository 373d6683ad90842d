"""``emseg show``: the first visual check of a store (and of a prediction of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emseg.errors import BadInputError
from emseg.evaluation.evaluate import as_probability
from emseg.io.outputs import Output, check_output
from emseg.io.zarr import first_slice, open_ome
from emseg.viz import overlay, panel_rows

#: The default level is the finest whose largest side is at most this many pixels.
MAX_SIDE = 2048


def show_slice(
    data: str | Path,
    output: str | Path,
    z: int = 0,
    pred: str | Path | None = None,
    level: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a PNG of slice ``z``: the image, its ``labels/cells`` mask when present, and with
    ``pred`` the predicted P(cell) and an overlay of the predicted membranes.

    ``level`` picks a pyramid level; by default the finest whose largest side is at most 2048 px.
    An existing ``output`` is replaced only with ``overwrite`` and only when emseg wrote it.
    """
    check_output(Path(output).absolute(), overwrite, kind="file", inputs=[data, pred])
    image = open_ome(data)
    if not 0 <= z < image.shape[0]:
        raise BadInputError(f"--slice {z}: {data} has slices 0-{image.shape[0] - 1}")
    if level is None:
        level = next((i for i, a in enumerate(image.levels) if max(a.shape[1:]) <= MAX_SIDE), len(image.levels) - 1)
    if not 0 <= level < len(image.levels):
        raise BadInputError(f"--level {level}: {data} has levels 0-{len(image.levels) - 1}")
    raw = np.asarray(image.levels[level][z])
    row: dict[str, np.ndarray] = {f"image (slice {z}, level {level})": raw}
    if "cells" in image.labels:
        cells = image.labels["cells"]
        row["truth: cells"] = np.asarray(cells.levels[min(level, len(cells.levels) - 1)][z]).astype(bool)
    if pred is not None:
        prediction = open_ome(pred)
        if prediction.shape[1:] != image.shape[1:]:
            raise BadInputError(f"--pred {pred}: shape {prediction.shape} does not match {data} {image.shape}")
        zp = z - first_slice(prediction)
        if not 0 <= zp < prediction.shape[0]:
            raise BadInputError(f"--pred {pred}: holds no prediction for slice {z}")
        prob = as_probability(np.asarray(prediction.levels[min(level, len(prediction.levels) - 1)][zp]), pred)
        row["prob: P(cell)"] = prob
        row["overlay: predicted membranes"] = overlay(raw, prob < 0.5)
    with Output(output, overwrite=overwrite, kind="file", command="show", inputs=[data, pred]) as out:
        panel_rows([row], out.path)
    return Path(output)
