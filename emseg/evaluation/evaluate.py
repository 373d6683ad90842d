"""``emseg evaluate``: score a prediction against a store's labels/cells in ISBI 2012 terms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import EvaluateConfig
from emseg.errors import BadInputError
from emseg.evaluation.metrics import Scores, evaluate_arrays
from emseg.io.stacks import TIFF_SUFFIXES, open_stack
from emseg.io.zarr import first_slice, open_ome
from emseg.probability import check_both_classes, probability_float


def load_probabilities(pred: str | Path, n_slices: int, shape_yx: tuple[int, int]) -> tuple[Any, int]:
    """(reader z -> (Y, X) float32 P(cell), index of the data slice its slice 0 corresponds to).

    ``pred`` is a store from ``emseg predict`` (its ``slices`` attribute aligns it with the data)
    or a TIFF stack of P(cell), uint8 0-255 or float 0-1, with as many slices as the data.
    """
    path = Path(pred)
    if path.suffix.lower() in TIFF_SUFFIXES and path.is_file():
        stack = open_stack(path)
        if stack.shape != (n_slices, *shape_yx):
            raise BadInputError(f"{path}: shape {stack.shape} differs from the data's {(n_slices, *shape_yx)}")

        def read_tiff(z: int) -> np.ndarray:
            return probability_float(stack.read(z, z + 1)[0], str(path))

        return read_tiff, 0
    image = open_ome(path)
    if image.shape[1:] != shape_yx:
        raise BadInputError(f"{path}: slices are {image.shape[1:]}, the data's are {shape_yx}")
    offset = first_slice(image)

    def read_store(z: int) -> np.ndarray:
        return probability_float(np.asarray(image.array[z]), str(path))

    return read_store, offset


def evaluate_prediction(pred: str | Path, data: str | Path, slices: tuple[int, int] | None = None) -> Scores:
    """Scores of ``pred`` against ``data``'s labels/cells on data slices ``slices`` (default: all
    the prediction covers)."""
    image = open_ome(data)
    if "cells" not in image.labels:
        raise BadInputError(f"{data}: has no labels/cells to evaluate against")
    truth = image.labels["cells"].array
    read, offset = load_probabilities(pred, image.shape[0], image.shape[1:])
    n_pred = _pred_slices(pred, image.shape[0])
    lo, hi = slices if slices is not None else (offset, offset + n_pred)
    if not (0 <= lo < hi <= image.shape[0]) or lo < offset or hi > offset + n_pred:
        raise BadInputError(f"--slices {lo}:{hi}: the prediction covers data slices {offset}-{offset + n_pred - 1}")
    prob = np.stack([read(z - offset) for z in range(lo, hi)])
    labels = np.asarray(truth[lo:hi])
    check_both_classes(labels, f"{data}: slices {lo}-{hi - 1}")
    return evaluate_arrays(prob, labels)


def _pred_slices(pred: str | Path, n_data: int) -> int:
    path = Path(pred)
    if path.suffix.lower() in TIFF_SUFFIXES and path.is_file():
        return n_data
    return open_ome(path).shape[0]


def evaluate(
    pred: str | Path, data: str | Path, config: EvaluateConfig | None = None, json_path: str | Path | None = None
) -> dict[str, Any]:
    """``emseg evaluate``: the scores of :func:`evaluate_prediction` (or of an instance
    segmentation) on ``config.slices`` as a dict, also written as JSON to ``json_path`` when given
    (with an ``emseg`` key saying what wrote it; an existing file is replaced only with
    ``config.overwrite`` and only when emseg wrote it)."""
    from emseg.io.outputs import Output, check_output, provenance, write_json_atomic

    config = config or EvaluateConfig()
    slices, overwrite = config.slices, config.overwrite

    if json_path is not None:  # before the work: a refused output should not cost an evaluation
        check_output(Path(json_path).absolute(), overwrite, kind="file", inputs=[pred, data])
    from emseg.evaluation.classes import evaluate_classes, is_class_prediction
    from emseg.evaluation.instances import evaluate_instances, is_instance_store

    if is_class_prediction(pred):  # a network of several classes: (c, z, y, x) and labels/classes
        result = evaluate_classes(pred, data, slices)
    elif is_instance_store(pred):  # an instance segmentation (emseg segment), not P(cell)
        result = evaluate_instances(pred, data, slices).to_dict()
    else:
        result = evaluate_prediction(pred, data, slices).to_dict()
    if json_path is not None:
        marker = provenance("evaluate", pred=str(pred), data=str(data))
        with Output(json_path, overwrite=overwrite, kind="file", command="evaluate", inputs=[pred, data]) as out:
            write_json_atomic(out.path, {**result, "emseg": marker})
    return result
