"""The two block tasks of ``emseg segment``, as plain data and functions any dask worker runs.

:func:`segment_block` reads one block's P(cell) with its halo, makes fragments and merges them
(per slice in 2D mode, as one volume in 3D mode), writes the write region's local IDs (uint32
1..n) to the scratch array, saves its count and face planes (``faces/NAME.npz``) and leaves a
done-marker. :func:`relabel_block` writes a block's final IDs through its slice of the global
lookup table, and a done-marker of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg.blocks import Block, slices
from emseg.config import SegmentConfig
from emseg.probability import fiji_cells, probability_uint8, thinned_segmentation
from emseg.segmentation.agglomerate import agglomerate
from emseg.segmentation.stitch import face_planes
from emseg.segmentation.watershed import fragments


@dataclass(frozen=True)
class Job:
    """What every block of one segmentation shares."""

    #: Level 0 of the prediction, (Z, Y, X) uint8 (0-255) or float (0-1) P(cell).
    prob: str
    #: The scratch array of local IDs, (Z, Y, X) uint32.
    scratch: str
    #: The final labels' level 0, (Z, Y, X) uint32 or uint64.
    labels: str
    #: Folder of the blocks' counts and face planes.
    faces: str
    #: Folder of done-markers.
    done: str
    mode: str
    seed_threshold: float
    min_distance: int
    merge_threshold: float
    min_size: int
    #: Voxel size (z, y, x), the distance transform's sampling in 3D mode.
    voxel_size: tuple[float, float, float]
    #: "cores" or "maxima" (see :func:`~emseg.segmentation.watershed.seeds`).
    seeds: str = SegmentConfig.seeds
    #: Instead of watershed and merging, the thinned components of P(cell) above this, per slice.
    components: float | None = None
    #: With a (C, Z, Y, X) prediction of several classes: the membrane's channel, P(cell) being
    #: 255 - P(membrane); None for a (Z, Y, X) P(cell).
    channel: int | None = None


@dataclass(frozen=True)
class Task:
    job: Job
    block: Block
    #: For the relabel pass: final IDs of local IDs 0..n (None in the first pass).
    table: np.ndarray | None = None


def cell_probability(array: Any, region: tuple[slice, ...], channel: int | None, where: str) -> np.ndarray:
    """P(cell) of ``region`` (z, y, x) as uint8 0-255: the array's values, or with ``channel`` the
    complement of that channel (P(membrane)) of a (C, Z, Y, X) prediction of several classes."""
    if channel is None:
        return probability_uint8(np.asarray(array[region]), where)
    return np.uint8(255) - probability_uint8(np.asarray(array[(channel,) + region]), where)


def segment_image(prob: np.ndarray, job: Job) -> tuple[np.ndarray, int]:
    """(Z, Y, X) P(cell) (uint8 0-255 or float 0-1) -> (uint32 labels 1..n, n): per slice in 2D
    mode (IDs unique over the slices), as one volume in 3D mode."""
    prob = probability_uint8(prob, "P(cell)")
    if job.components is not None:
        return thinned_components(prob, job.components)
    if job.mode == "3d":
        frags, heights = fragments(prob, job.seed_threshold, job.min_distance, job.voxel_size, job.seeds)
        labels, n = agglomerate(frags, heights, job.merge_threshold, job.min_size)
        return labels.astype(np.uint32), n
    out = np.zeros(prob.shape, np.uint32)
    total = 0
    for z in range(prob.shape[0]):
        frags, heights = fragments(prob[z], job.seed_threshold, job.min_distance, None, job.seeds)
        labels, n = agglomerate(frags, heights, job.merge_threshold, job.min_size)
        out[z] = labels
        out[z][labels > 0] += np.uint32(total)
        total += n
    return out, total


def thinned_components(prob: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """(Z, Y, X) uint8 P(cell) -> (uint32 labels, n): per slice the 4-connected components of
    P(cell) > ``threshold`` grown to one-pixel lines (0), as the ISBI metrics see the map."""
    out = np.zeros(prob.shape, np.uint32)
    total = 0
    for z in range(prob.shape[0]):
        labels = thinned_segmentation(fiji_cells(prob[z].astype(np.float32) / np.float32(255.0), threshold))
        out[z] = labels
        out[z][labels > 0] += np.uint32(total)
        total += int(labels.max())
    return out, total


def segment_block(task: Task) -> int:
    """First pass over one block; returns the pixels written."""
    job, block = task.job, task.block
    where = f"{Path(job.prob).parent}: block {block.name}"
    prob = cell_probability(zarr.open_array(job.prob, mode="r"), slices(block.read), job.channel, where)
    labels, n = segment_image(prob, job)
    # number the IDs present in the write region 1..n; IDs only in the halo become 0 (no pixel
    # of the write region equals them, which is all the face test asks of them)
    present = np.zeros(n + 1, bool)
    present[labels[block.inner()]] = True
    present[0] = False
    table = np.cumsum(present, dtype=np.uint32)
    table[~present] = 0
    n = int(present.sum())
    labels = table[labels]
    inner = labels[block.inner()]
    zarr.open_array(job.scratch, mode="r+")[slices(block.write)] = inner
    tmp = Path(job.faces) / f".{block.name}.tmp.npz"
    arrays: dict[str, Any] = {"count": np.int64(n), **face_planes(block, labels)}
    np.savez(tmp, **arrays)
    tmp.replace(Path(job.faces) / f"{block.name}.npz")
    (Path(job.done) / f"frag-{block.name}").touch()
    return int(inner.size)


def relabel_block(task: Task) -> int:
    """Second pass over one block: final IDs from the local ones; returns the pixels written."""
    job, block = task.job, task.block
    assert task.table is not None
    where = slices(block.write)
    local = np.asarray(zarr.open_array(job.scratch, mode="r")[where])
    target = zarr.open_array(job.labels, mode="r+")
    target[where] = task.table.astype(target.dtype)[local]
    (Path(job.done) / f"label-{block.name}").touch()
    return int(local.size)


__all__ = ["Job", "Task", "cell_probability", "relabel_block", "segment_block", "segment_image"]
