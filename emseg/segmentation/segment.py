"""``emseg segment``: instance labels from a P(cell) map, blockwise on dask, without seams.

The steps of :func:`segment_store`: check the input and settings; plan blocks of whole chunks
with halos (:func:`~emseg.blocks.plan_blocks`); open the output (:class:`~emseg.io.outputs.Output`:
locked, written into a hidden partial, resumable; :func:`~emseg.io.outputs.complete_output` first
says whether ``--resume`` has nothing left to do); first pass: fragments and agglomeration per
block into a scratch array of local IDs, with each block's face planes; join the blocks across
their faces into one table of consecutive IDs; create the label image (uint32, or uint64 when
needed); second pass: write the final IDs block by block; build the pyramid (2x2 mode); mark it
complete and commit it. Both passes run through :func:`~emseg.blocks.run_blocks`. With ``into``
the output is the prediction store's ``labels/cells``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg.blocks import Block, grow, plan_blocks, run_blocks
from emseg.classes import membrane_value, not_membrane
from emseg.cluster import check_local_workers, check_scheduler_address
from emseg.config import CALIBRATED, SEGMENT_DEFAULTS, SegmentConfig, runtime_fields, to_dict
from emseg.errors import BadInputError
from emseg.io.outputs import Output, complete_output, is_emseg_store, provenance
from emseg.io.pyramid import build_levels
from emseg.io.untrusted import untrusted
from emseg.io.zarr import (
    LevelSpec,
    OmeImage,
    create_image_store,
    emseg_attrs,
    first_slice,
    open_ome,
    store_classes,
)
from emseg.probability import check_probability
from emseg.progress import Reporter, reporter_or_null
from emseg.segmentation.blocks import Job, Task, cell_probability, relabel_block, segment_block
from emseg.segmentation.calibrate import Calibration, calibrate
from emseg.segmentation.labels import create_label_image, list_label
from emseg.segmentation.stitch import face_joins, global_table, label_dtype, neighbours

log = logging.getLogger(__name__)

#: Settings that may differ between an interrupted run and its ``--resume``.
RUNTIME_ONLY = runtime_fields(SegmentConfig)


def segment_store(
    pred: str | Path, output: str | Path | None, config: SegmentConfig, progress: Reporter | None = None
) -> Path:
    """Segment the P(cell) of ``pred`` (an ``emseg predict`` store, or any OME-Zarr image of
    (Z, Y, X) uint8 0-255 or float 0-1 P(cell)) into instance labels: the OME-Zarr label image
    ``output``, or ``pred``/labels/cells with ``config.into``. Returns the label image's path."""
    if config.objects is not None:  # a blob-like class of a multi-class prediction, not cells
        from emseg.segmentation.objects import segment_objects

        return segment_objects(pred, output, config, progress)
    progress = reporter_or_null(progress)
    image, channel = _checked_input(pred)
    final = _final_path(image, output, config)
    if config.scheduler is not None:
        check_scheduler_address(config.scheduler)
    elif config.workers is not None:
        check_local_workers(config.workers)
    config, chosen = resolve_settings(image, config, channel)
    settings = {k: v for k, v in to_dict(config).items() if k not in RUNTIME_ONLY}
    chunks = tuple(int(c) for c in image.array.chunks[-3:])
    target, halo = _block_and_halo(config, image.voxel_size, chunks)  # type: ignore[arg-type]
    blocks = list(plan_blocks(image.shape, chunks, target, lambda write: grow(write, halo, image.shape))[1])
    # the first block's extent pins the plan: a resume never mixes blocks of two plans
    extent = [b - a for a, b in blocks[0].write]
    record = {"prediction": str(image.path.resolve()), "shape": list(image.shape), "config": settings, "block": extent}
    if complete_output(final, record, overwrite=config.overwrite, resume=config.resume):
        log.info("%s is complete; nothing to resume", final)
        return final
    prov = provenance(
        "segment", resume_record=record, prediction=str(image.path.resolve()), settings=settings, segmentation=chosen
    )

    def create(path: Path) -> None:
        create_image_store(path, image.version, attrs={"emseg": {**prov, "complete": False}})

    with Output(
        final, overwrite=config.overwrite, kind="store", command="segment", create=create,
        resume_record=record, resume=config.resume,
        inputs=[] if config.into else [image.path],  # --into writes inside its input on purpose
    ) as out:  # fmt: skip
        job = _job(image, out, config, channel)
        out.expect(2 * len(blocks), "block passes")  # fragments, then labels, of each block
        _first_pass(job, blocks, out.done_names(), config, progress)
        offsets, table = _stitch(job, blocks)
        _create_labels(out.path, image, chunks, int(table.max()), prov, config.into)
        job = _with_labels(job, out.path)
        todo = [
            Task(job, b, np.concatenate([[0], table[offsets[i] + 1 : offsets[i] + _count(job, b) + 1]]))
            for i, b in enumerate(blocks)
            if f"label-{b.name}" not in out.done_names()
        ]
        progress.start("segment: write labels", total=len(blocks), unit="blocks")
        progress.advance(len(blocks) - len(todo))
        _run(relabel_block, todo, "label", config, progress)
        progress.finish()
        build_levels(out.path, "mode")
        root = zarr.open_group(str(out.path), mode="r+")
        root.attrs["emseg"] = {**prov, "complete": True, "objects": int(table.max())}
    if config.into:
        list_label(image.path, "cells", image.version)
    return final


# --- steps ------------------------------------------------------------------------------------


#: Labelled pixels calibration reads at most (its tables hold several integers per pixel).
CALIBRATION_MAX_PIXELS = 2**26


def resolve_settings(
    image: OmeImage, config: SegmentConfig, channel: int | None = None
) -> tuple[SegmentConfig, dict[str, Any]]:
    """``config`` with every setting of :data:`~emseg.config.CALIBRATED` it leaves at None chosen:
    by calibration on ``config.calibrate``'s labelled slices, else by the calibration of the run
    that made the prediction (its provenance), else :data:`~emseg.config.SEGMENT_DEFAULTS`; and
    where each came from (the ``segmentation`` block of the output's provenance)."""
    explicit = {k: getattr(config, k) for k in CALIBRATED if getattr(config, k) is not None}
    calibration: dict[str, Any] | None = None
    if config.calibrate is not None:
        calibration = calibrate_on(image, config, channel).to_dict()
        base, source = calibration["settings"], f"calibrated on {config.calibrate} slices {calibration['slices']}"
    else:
        run = emseg_attrs(image).get("segmentation")
        if isinstance(run, dict) and isinstance(run.get("settings"), dict):
            base = {k: run["settings"].get(k) for k in CALIBRATED}
            source = f"the calibration of run {run.get('run', '?')} on its slices {run.get('slices', '?')}"
            calibration = run
        else:
            base, source = dict(SEGMENT_DEFAULTS), "emseg's defaults"
    if set(explicit) - {"components"}:  # a watershed setting given: watershed, not the fallback
        base = {**base, "components": None}
    values = {**SEGMENT_DEFAULTS, **{k: v for k, v in base.items() if k in CALIBRATED}, **explicit}
    resolved = replace(config, **values)
    origin = {k: "option" if k in explicit else source for k in CALIBRATED}
    if resolved.components is not None:
        log.info(
            "segment: the cells are the components of P(cell) > %.2f (%s)", resolved.components, origin["components"]
        )
    return resolved, {"settings": {k: values[k] for k in CALIBRATED}, "from": origin, "calibration": calibration}


def calibrate_on(image: OmeImage, config: SegmentConfig, channel: int | None = None) -> Calibration:
    """:func:`~emseg.segmentation.calibrate.calibrate` on the labelled slices of ``config.calibrate``
    that the prediction covers (``config.slices``, default all of them): its ``labels/cells``, or
    the labelled pixels that are not membrane of its ``labels/classes``."""
    data = open_ome(str(config.calibrate))
    classes = store_classes(data) if "cells" not in data.labels else None
    membrane = None if classes is None else membrane_value(classes)
    if "cells" not in data.labels and membrane is None:
        raise BadInputError(
            f"--calibrate {config.calibrate}: has no labels/cells nor a membrane class (ingest it with --labels)"
        )
    if data.shape[1:] != image.shape[1:]:
        raise BadInputError(
            f"--calibrate {config.calibrate}: slices are {data.shape[1:]}, the prediction's are {image.shape[1:]}"
        )
    offset = first_slice(image)
    covered = (max(offset, 0), min(offset + image.shape[0], data.shape[0]))
    lo, hi = config.slices if config.slices is not None else covered
    if not (covered[0] <= lo < hi <= covered[1]):
        raise BadInputError(
            f"--slices {lo}:{hi}: the prediction covers slices {covered[0]}-{covered[1] - 1} of {config.calibrate}"
        )
    if (hi - lo) * math.prod(image.shape[1:]) > CALIBRATION_MAX_PIXELS:
        raise BadInputError(
            f"--slices {lo}:{hi}: more than {CALIBRATION_MAX_PIXELS} labelled pixels to calibrate on; choose fewer"
        )
    region = (slice(lo - offset, hi - offset), slice(None), slice(None))
    prob = cell_probability(image.array, region, channel, str(image.path))
    if membrane is None:
        truth = np.asarray(data.labels["cells"].array[lo:hi])
    else:
        truth = not_membrane(np.asarray(data.labels["classes"].array[lo:hi]), membrane)
    return calibrate(
        prob, truth, mode=config.mode, seeds=config.seeds, voxel_size=image.voxel_size, slices=range(lo, hi)
    )


#: Pixels of the sample of P(cell) checked before anything is written (every block is checked
#: again as it is read).
SAMPLE_PIXELS = 2**24


def _checked_input(pred: str | Path) -> tuple[OmeImage, int | None]:
    """The P(cell) image and, for a (C, Z, Y, X) prediction of several classes, its membrane
    channel (P(cell) = 255 - P(membrane)); its dtype checked and a sample of its values checked as
    every block will be (uint8, or finite floats within [0, 1]): evenly spaced slices of its
    coarsest level, at most :data:`SAMPLE_PIXELS` in all (a NaN survives the pyramid's means), or
    one chunk of level 0 when even one coarse slice is larger."""
    image = open_ome(pred, channels=True)
    channel = _membrane_channel(image, pred)
    lead: tuple[int | slice, ...] = () if channel is None else (channel,)
    dtype = np.dtype(image.array.dtype)
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise BadInputError(f"{pred}: expected P(cell) as uint8 (0-255) or float (0-1), not {dtype}")
    coarse = image.levels[-1]
    per_slice = math.prod(coarse.shape[-2:])
    if per_slice <= SAMPLE_PIXELS:
        depth = coarse.shape[-3]
        count = min(depth, SAMPLE_PIXELS // per_slice)
        for z in np.linspace(0, depth - 1, count).round().astype(int):
            check_probability(np.asarray(coarse[lead + (int(z),)]), str(pred))
    else:
        cy, cx = (int(c) for c in image.array.chunks[-2:])
        check_probability(np.asarray(image.array[lead + (0, slice(0, cy), slice(0, cx))]), str(pred))
    return image, channel


def _membrane_channel(image: OmeImage, pred: str | Path) -> int | None:
    """None for a (Z, Y, X) P(cell); the membrane's channel of a prediction of several classes."""
    if not image.channels:
        return None
    classes = store_classes(image)
    membrane = None if classes is None else membrane_value(classes)
    if classes is None or membrane is None:
        names = "" if classes is None else f" ({', '.join(c.name for c in classes)}); "
        raise BadInputError(
            f"{pred}: a prediction of several classes without a membrane class{names}"
            "segment one of them with --objects NAME"
        )
    return membrane - 1


def _final_path(image: OmeImage, output: str | Path | None, config: SegmentConfig) -> Path:
    if config.into:
        if output is not None and Path(output).resolve() != image.path.resolve():
            raise BadInputError(f"--into {output}: must be the prediction store {image.path} itself")
        if not is_emseg_store(image.path):
            raise BadInputError(f"--into: {image.path} was not written by emseg; write a new store with -o")
        command = emseg_attrs(image).get("command")
        if command != "predict":
            raise BadInputError(
                f"--into: {image.path} was written by emseg {command}, not emseg predict; --into adds "
                "labels/cells to a prediction store only (write a new store with -o)"
            )
        return (image.path / "labels" / "cells").absolute()
    if output is None:
        raise BadInputError("give an output store (-o SEG.zarr) or --into PRED.zarr")
    final = Path(output).absolute()
    if final.resolve() == image.path.resolve():
        raise BadInputError(f"-o {output}: is the input; use --into to add labels/cells to it")
    return final


def _block_and_halo(
    config: SegmentConfig, voxel: tuple[float, float, float], chunks: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Block (z, y, x) and halo (z, y, x): per chunk of slices in 2D mode; in 3D mode blocks and
    halos as deep in nanometres as they are wide."""
    if config.mode == "2d":
        return (chunks[0], config.block, config.block), (0, config.halo, config.halo)
    ratio = voxel[1] / voxel[0]
    return (
        (max(1, round(config.block * ratio)), config.block, config.block),
        (math.ceil(config.halo * ratio), config.halo, config.halo),
    )


def _job(image: OmeImage, out: Output, config: SegmentConfig, channel: int | None) -> Job:
    """The shared block settings; creates the scratch array and faces folder unless resuming."""
    partial = out.done_dir.parent
    scratch, faces = partial / "scratch.zarr", partial / "faces"
    if not (out.resumed and scratch.exists()):
        chunks = tuple(int(c) for c in image.array.chunks[-3:])
        import numcodecs

        zarr.create_array(
            str(scratch), shape=image.shape, chunks=chunks, dtype="uint32", fill_value=0, zarr_format=2,
            compressors=numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE),
        )  # fmt: skip
        faces.mkdir(exist_ok=True)
    return Job(
        prob=str(image.path / _level0(image)),
        scratch=str(scratch),
        labels="",
        faces=str(faces),
        done=str(out.done_dir),
        mode=config.mode,
        seed_threshold=float(config.seed_threshold),  # type: ignore[arg-type]
        min_distance=int(config.min_distance),  # type: ignore[arg-type]
        merge_threshold=float(config.merge_threshold),  # type: ignore[arg-type]
        min_size=int(config.min_size),  # type: ignore[arg-type]
        voxel_size=image.voxel_size,
        seeds=config.seeds,
        components=config.components,
        channel=channel,
    )


def _level0(image: OmeImage) -> str:
    return str(image.array.path) if image.array.path else "0"


def _with_labels(job: Job, store: Path) -> Job:
    return replace(job, labels=str(store / "0"))


def _first_pass(job: Job, blocks: list[Block], done: set[str], config: SegmentConfig, progress: Reporter) -> None:
    todo = [Task(job, b) for b in blocks if f"frag-{b.name}" not in done]
    if len(todo) < len(blocks):
        log.info("resuming: %d of %d blocks already segmented", len(blocks) - len(todo), len(blocks))
    progress.start("segment: fragments", total=len(blocks), unit="blocks")
    progress.advance(len(blocks) - len(todo))
    _run(segment_block, todo, "frag", config, progress)
    progress.finish()


def _run(fn: Any, tasks: list[Task], kind: str, config: SegmentConfig, progress: Reporter) -> None:
    run_blocks(
        fn,
        tasks,
        threads=config.threads,
        workers=config.workers,
        scheduler=config.scheduler,
        progress=progress,
        key=lambda t: f"emseg-{kind}-{t.block.name}",
    )


def _count(job: Job, block: Block) -> int:
    """The number of objects a finished block found, as its faces file records it: at most one
    per pixel of the block (a damaged or altered file of an interrupted run is refused, not
    trusted to size the stitching's arrays)."""
    path = Path(job.faces) / f"{block.name}.npz"
    with untrusted(f"{path}: damaged record of an interrupted run; run again without --resume"):
        with np.load(path, allow_pickle=False) as data:
            count = int(data["count"])
    if not 0 <= count <= math.prod(b - a for a, b in block.write):
        raise BadInputError(
            f"{path}: records {count} objects in a block of {block.write}; the interrupted run's record is "
            "damaged: run again without --resume"
        )
    return count


def _stitch(job: Job, blocks: list[Block]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, table) of :func:`~emseg.segmentation.stitch.global_table` from the saved faces."""
    counts = [_count(job, b) for b in blocks]
    joins = []
    for lower, upper, axis in neighbours(blocks):
        if job.mode == "2d" and axis == 0:
            continue  # slices are segmented on their own
        low = _face(job, blocks[lower], f"hi{axis}", counts[lower])
        high = _face(job, blocks[upper], f"lo{axis}", counts[upper])
        if low.shape != high.shape:
            raise BadInputError(
                f"{job.faces}: the faces of blocks {blocks[lower].name} and {blocks[upper].name} differ in "
                "shape; the interrupted run's record is damaged: run again without --resume"
            )
        joins.append((lower, upper, face_joins(low, high)))
    return global_table(counts, joins)


def _face(job: Job, block: Block, key: str, count: int) -> np.ndarray:
    """One face of a finished block, checked: local IDs within the block's count."""
    path = Path(job.faces) / f"{block.name}.npz"
    damaged = f"{path}: damaged record of an interrupted run; run again without --resume"
    with untrusted(damaged), np.load(path, allow_pickle=False) as data:
        face = np.asarray(data[key])
    if face.ndim != 3 or face.shape[0] != 2 or not np.issubdtype(face.dtype, np.integer):
        raise BadInputError(damaged)
    if face.size and (int(face.min()) < 0 or int(face.max()) > count):
        raise BadInputError(damaged)
    return face


def _create_labels(
    store: Path, image: OmeImage, chunks: tuple[int, ...], count: int, prov: dict[str, Any], into: bool
) -> None:
    """The label image's arrays in ``store`` (kept when a resumed run already made them)."""
    root = zarr.open_group(str(store), mode="r+")
    if "0" in root:
        return
    levels = image.levels
    min_size = max(levels[-1].shape[1:]) if len(levels) > 1 else max(image.shape[1:])
    # IDs compress well at a low level, and a high one costs more time than the watershed
    spec = LevelSpec(shape=image.shape, dtype=label_dtype(count), chunks=chunks, pyramid_min_size=min_size, clevel=1)
    attrs = {"emseg": {**prov, "complete": False}}
    create_label_image(root, spec, image.voxel_size, image.version, attrs, into, image.origin)


__all__ = ["segment_store"]
