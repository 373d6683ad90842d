"""Scores of an instance segmentation (``emseg segment``) against ISBI-style ground truth.

Two families, per slice and averaged over slices:

* the ISBI 2012 foreground-restricted V_rand and V_info of :mod:`emseg.evaluation.metrics`, with
  the instance boundaries as the membrane: a pixel whose right or lower neighbour has another ID
  becomes a one-pixel line (each line pixel inside a ground-truth cell is a segment of its own,
  as after Fiji's thinning), so a segmentation and a P(cell) map are scored alike;
* the plain adapted Rand error and variation of information (false splits H(S|T) and false
  merges H(T|S), in nats) that CREMI and SNEMI3D report, from scikit-image
  (``adapted_rand_error``, ``variation_of_information``), on the instance IDs themselves with
  the ground truth's membrane pixels ignored.

The ground truth ``T`` is the 4-connected components of ``truth == 1`` in each slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import adapted_rand_error, variation_of_information

from emseg.errors import BadInputError
from emseg.evaluation.metrics import rand_info_scores
from emseg.io.zarr import first_slice, ngff_payload, open_ome

_FOUR = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class InstanceScores:
    """Slice-averaged scores of an instance segmentation (see the module docstring)."""

    v_rand: float
    v_rand_split: float
    v_rand_merge: float
    v_info: float
    v_info_split: float
    v_info_merge: float
    #: Adapted Rand error (1 - F-score of the pair precision and recall), CREMI/SNEMI3D.
    adapted_rand_error: float
    #: Variation of information H(S|T) + H(T|S), its split and merge parts, in nats.
    voi: float
    voi_split: float
    voi_merge: float
    n_slices: int
    #: Objects in the evaluated slices (distinct non-zero IDs).
    n_objects: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "instances", **asdict(self)}


def boundary_lines(labels: np.ndarray) -> np.ndarray:
    """(Y, X) int instance IDs -> the same with 0 on a one-pixel line wherever two objects meet
    (the pixel whose right or lower neighbour is another object). Pixels of no object (0) are
    boundary already: no line is drawn beside them, so labels with their own one-pixel lines
    (those of :func:`~emseg.probability.thinned_segmentation`) score as the map they came from."""
    out = np.array(labels, copy=True)
    for here, there in ((out[:-1], labels[1:]), (out[:, :-1], labels[:, 1:])):
        here[(here != there) & (there != 0)] = 0
    return out


def slice_instance_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Scores of one slice: ``labels`` (Y, X) int IDs (0 = no object), ``truth`` (Y, X) {0, 1}."""
    truth_cells = ndi.label(np.asarray(truth) == 1, structure=_FOUR)[0]
    labels = np.asarray(labels).astype(np.int64, copy=False)
    out = rand_info_scores(truth_cells, boundary_lines(labels))
    if truth_cells.any():
        error, _, _ = adapted_rand_error(truth_cells, labels, ignore_labels=(0,))
        split, merge = variation_of_information(truth_cells, labels, ignore_labels=(0,))  # H(S|T), H(T|S)
    else:
        error, merge, split = 0.0, 0.0, 0.0
    return {**out, "adapted_rand_error": float(error), "voi_split": float(split), "voi_merge": float(merge)}


def score_instances(labels: np.ndarray, truth: np.ndarray) -> InstanceScores:
    """Slice-averaged :class:`InstanceScores` of (Z, Y, X) int ``labels`` against (Z, Y, X) {0, 1} ``truth``."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.shape != truth.shape or labels.ndim != 3:
        raise BadInputError(f"labels {labels.shape} and truth {truth.shape} must be (Z, Y, X) of one shape")
    rows = [slice_instance_scores(lab, tru) for lab, tru in zip(labels, truth, strict=True)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    ids = np.unique(labels)
    return InstanceScores(
        **mean,
        voi=mean["voi_split"] + mean["voi_merge"],
        n_slices=int(labels.shape[0]),
        n_objects=int(np.count_nonzero(ids)),
    )


def is_instance_store(path: str | Path) -> bool:
    """Whether ``path`` is an OME-Zarr label image of integer IDs (``emseg segment``'s output or
    a ``labels/cells`` group of a prediction), rather than a P(cell) map."""
    path = Path(path)
    if not (path.is_dir() and ((path / ".zattrs").is_file() or (path / "zarr.json").is_file())):
        return False
    image = open_ome(path)
    dtype = np.dtype(image.array.dtype)
    return "image-label" in ngff_payload(image.attrs) and np.issubdtype(dtype, np.integer) and dtype != np.uint8


def evaluate_instances(seg: str | Path, data: str | Path, slices: tuple[int, int] | None = None) -> InstanceScores:
    """Scores of the label image ``seg`` against ``data``'s labels/cells on data slices ``slices``
    (default: all that the segmentation covers)."""
    image = open_ome(data)
    if "cells" not in image.labels:
        raise BadInputError(f"{data}: has no labels/cells to evaluate against")
    labels = open_ome(seg)
    if labels.shape[1:] != image.shape[1:]:
        raise BadInputError(f"{seg}: slices are {labels.shape[1:]}, the data's are {image.shape[1:]}")
    offset = _offset(Path(seg))
    lo, hi = slices if slices is not None else (offset, offset + labels.shape[0])
    if not (0 <= lo < hi <= image.shape[0]) or lo < offset or hi > offset + labels.shape[0]:
        raise BadInputError(
            f"--slices {lo}:{hi}: the segmentation covers data slices {offset}-{offset + labels.shape[0] - 1}"
        )
    return score_instances(
        np.asarray(labels.array[lo - offset : hi - offset]), np.asarray(image.labels["cells"].array[lo:hi])
    )


def _offset(seg: Path) -> int:
    """The data slice the segmentation's slice 0 is: that of the prediction it was made from."""
    candidates = [seg.parent.parent] if seg.parent.name == "labels" else []
    attrs = open_ome(seg).attrs.get("emseg", {})
    source = attrs.get("prediction") if isinstance(attrs, dict) else None
    if isinstance(source, str):
        candidates.append(Path(source))
    for path in candidates:
        if path.is_dir():
            try:
                return first_slice(open_ome(path))
            except BadInputError:
                continue
    return 0


__all__ = ["InstanceScores", "boundary_lines", "evaluate_instances", "is_instance_store", "score_instances"]
