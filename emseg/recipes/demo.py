"""``emseg demo``: ingest -> train -> predict -> evaluate -> pictures, on a default that works offline.

With the ISBI 2012 stacks (``--data DIR``, or found in the usual places) it trains on slices 0-26,
validates on 27-29 and predicts the test volume; otherwise it generates a synthetic EM-like stack
with ground truth (``emseg.synthetic``) in the same layout, so it runs anywhere without internet.
On a CPU it trains a small U-Net for a few minutes; on a GPU the full one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emseg.config import (
    ISBI_VOXEL_SIZE_NM,
    DemoConfig,
    EvaluateConfig,
    IngestConfig,
    ModelConfig,
    PredictConfig,
    TrainConfig,
)
from emseg.errors import BadInputError
from emseg.progress import Reporter
from emseg.synthetic.stack import SEED

if TYPE_CHECKING:
    from emseg.evaluation.instances import InstanceScores

log = logging.getLogger(__name__)

ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
VAL_SLICES = (27, 28, 29)
#: The scores the demo reports (of the validation slices).
SCORE_KEYS = (
    "v_rand",
    "v_rand_threshold",
    "v_info",
    "v_info_threshold",
    "pixel_accuracy",
    "pixel_error",
    "iou",
    "dice",
    "n_slices",
)


def find_isbi(data: str | Path | None) -> Path | None:
    """The folder holding the ISBI stacks: ``data`` if given (it must hold them), else the first of
    $EMSEG_DATA, ./data/isbi2012 and ../shared/data/isbi2012 that does; None when none does."""
    if data is not None:
        folder = Path(data)
        missing = [f for f in ISBI_FILES if not (folder / f).is_file()]
        if missing:
            raise BadInputError(f"--data {folder}: missing {', '.join(missing)} (the ISBI 2012 layout)")
        return folder
    candidates = [os.environ.get("EMSEG_DATA"), "data/isbi2012", "../shared/data/isbi2012"]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in ISBI_FILES):
            return Path(c)
    return None


def write_synthetic(folder: Path, shape: tuple[int, int, int] = (30, 512, 512), seed: int = SEED) -> Path:
    """Write a synthetic EM-like stack in the ISBI layout into ``folder``: train volume (Z, Y, X)
    uint8, its labels (255 = cell, 0 = membrane) and a test volume (seed + 1). Returns ``folder``."""
    import tifffile

    from emseg.synthetic import synthetic_stack

    folder.mkdir(parents=True, exist_ok=True)
    raw, labels = synthetic_stack(shape, seed=seed)
    test, _ = synthetic_stack(shape, seed=seed + 1)
    resolution = (1e7 / ISBI_VOXEL_SIZE_NM[2], 1e7 / ISBI_VOXEL_SIZE_NM[1])
    for name, stack in zip(ISBI_FILES, (raw, labels, test), strict=True):
        tifffile.imwrite(
            folder / name, stack, photometric="minisblack", resolution=resolution, resolutionunit="CENTIMETER"
        )
    return folder


@dataclass
class DemoResult:
    """Where everything went, and the scores."""

    data: str
    device: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    #: What training started from, and why (random weights or the built-in model).
    started_from: str = ""
    #: The segmentation settings the run calibrated on its validation slices (segmentation.json).
    segmentation: dict[str, Any] = field(default_factory=dict)
    #: The second part (several classes on the VNC sections): where its data came from, its
    #: scores on the held-out sections ({} when it did not run).
    classes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoPlan:
    """Training settings of the demo for a device (a small, quick network on the CPU)."""

    depth: int
    base_channels: int
    crop: int
    batch_size: int
    steps_per_epoch: int
    minutes: float


#: The model the demo fine-tunes where training from random weights would take too long.
BUILTIN_START = "builtin:membranes"
CPU_PLAN = DemoPlan(depth=3, base_channels=16, crop=256, batch_size=4, steps_per_epoch=40, minutes=3.0)
GPU_PLAN = DemoPlan(depth=4, base_channels=64, crop=384, batch_size=16, steps_per_epoch=200, minutes=4.0)


def whole_slice_tile(shape_yx: tuple[int, ...], divisor: int) -> int:
    """A tile covering a small slice in one pass (512 for slices over 1 kpx)."""
    tile = -(-max(shape_yx) // divisor) * divisor
    return tile if tile <= 1024 else 512


def validation_slices(n: int) -> tuple[int, ...]:
    """ISBI's 27-29 for a 30-slice stack, else the last tenth (at least one slice, never slice 0)."""
    return VAL_SLICES if n == 30 else tuple(range(max(1, n - max(1, n // 10)), n))


def run_demo(
    config: DemoConfig | None = None,
    *,
    data: str | Path | None = None,
    vnc: str | Path | None = None,
    shape: tuple[int, int, int] = (30, 512, 512),
    progress: Reporter | None = None,
) -> DemoResult:
    """The whole flow into ``config.output``, on ``config.device``, training for
    ``config.minutes`` (default: the device's plan); ``shape`` sizes the synthetic stack
    (ignored with ISBI data). Then, with the VNC sections (``vnc``, else found nearby) and
    ``config.classes_minutes`` > 0, a second part: several classes (:func:`classes_part`)."""
    from emseg.device import device_name, resolve_device
    from emseg.evaluation.evaluate import evaluate
    from emseg.inference.predict import predict_store
    from emseg.io.ingest import ingest_stack
    from emseg.io.zarr import open_ome
    from emseg.training.calibrate import train as train_and_calibrate

    config = config or DemoConfig()
    out, device = Path(config.output), config.device
    dev = resolve_device(device)
    plan = GPU_PLAN if dev.type == "cuda" else CPU_PLAN
    budget = plan.minutes if config.minutes is None else config.minutes
    folder = find_isbi(data)
    _demo_folder(out)
    source = "ISBI 2012" if folder is not None else "synthetic EM-like stack"
    if folder is None:
        folder = write_synthetic(out / "synthetic", shape=shape)
    result = DemoResult(data=f"{source} ({folder})", device=device_name(dev))

    ingest_config = IngestConfig(voxel_size=ISBI_VOXEL_SIZE_NM, overwrite=True)
    train = ingest_stack(
        folder / "train-volume.tif",
        out / "train.zarr",
        ingest_config,
        labels=folder / "train-labels.tif",
        progress=progress,
    )
    test = ingest_stack(folder / "test-volume.tif", out / "test.zarr", ingest_config, progress=progress)
    shape_zyx = open_ome(train).shape
    val = validation_slices(shape_zyx[0])
    run = out / "run"
    init, result.started_from = _start(train, dev, plan, budget)
    train_config = TrainConfig(
        init=init,
        model=ModelConfig(depth=plan.depth, base_channels=plan.base_channels),
        crop=plan.crop,
        batch_size=plan.batch_size,
        steps_per_epoch=plan.steps_per_epoch,
        epochs=10_000,
        time_limit=budget * 60,
        val_slices=val,
        device=device,
        overwrite=True,
    )
    summary = train_and_calibrate(train, run, train_config, progress=progress)
    tile = whole_slice_tile(tuple(shape_zyx[1:]), 2**plan.depth)
    pred_val = predict_store(
        run,
        train,
        out / "pred-val.zarr",
        PredictConfig(tile=tile, slices=(val[0], val[-1] + 1), device=device, overwrite=True),
        progress=progress,
    )
    pred_test = predict_store(
        run, test, out / "pred-test.zarr", PredictConfig(tile=tile, device=device, overwrite=True), progress=progress
    )
    scores = evaluate(pred_val, train, EvaluateConfig(overwrite=True), out / "scores.json")
    result.scores = {k: scores[k] for k in SCORE_KEYS}
    result.scores["epochs"] = len(summary["rows"])
    result.scores["steps"] = summary["rows"][-1]["step"] if summary["rows"] else 0
    result.outputs.update(
        train=str(train),
        test=str(test),
        run=str(run),
        curves=str(run / "curves.png"),
        prediction_validation=str(pred_val),
        prediction_test=str(pred_test),
        scores=str(out / "scores.json"),
        pictures_validation=str(_pictures(train, pred_val, val, out / "validation.png", with_truth=True)),
        pictures_test=str(_pictures(test, pred_test, (0, 10, 20), out / "test.png", with_truth=False)),
    )
    outputs, cells = _segmentation(train, pred_val, val, out, progress)
    result.outputs.update(outputs)
    result.scores.update(cells_v_rand=cells.v_rand, cells_objects=cells.n_objects)
    result.segmentation = summary["segmentation"]
    vnc_folder = find_vnc(vnc)
    if vnc_folder is not None and config.classes_minutes > 0:
        outputs, result.classes = classes_part(vnc_folder, out, plan, config.classes_minutes, device, progress)
        result.outputs.update(outputs)
    return result


# --- the second part: several classes ---------------------------------------------------------

VNC_FILES = ("train-volume.tif", "train-labels.tif")
#: The VNC annotation's codes (its README) as emseg classes.
VNC_CLASSES = ("membrane=0,32,64,96,128", "glia=159", "mitochondria=191", "synapse=223", "cell=255")
#: The sections the second part never trains on, and the one validating: the last two, the third last.
VNC_HELD_OUT = 2


def find_vnc(vnc: str | Path | None) -> Path | None:
    """The folder holding the VNC sections (train-volume.tif and train-labels.tif): ``vnc`` if
    given (it must hold them), else the first of $EMSEG_VNC, ./data/vnc and ../shared/data/vnc
    that does; None when none does."""
    if vnc is not None:
        folder = Path(vnc)
        missing = [f for f in VNC_FILES if not (folder / f).is_file()]
        if missing:
            raise BadInputError(f"{folder}: missing {', '.join(missing)} (the VNC sections' layout)")
        return folder
    for c in (os.environ.get("EMSEG_VNC"), "data/vnc", "../shared/data/vnc"):
        if c and all((Path(c) / f).is_file() for f in VNC_FILES):
            return Path(c)
    return None


def classes_part(
    folder: Path, out: Path, plan: DemoPlan, minutes: float, device: str, progress: Reporter | None
) -> tuple[dict[str, str], dict[str, Any]]:
    """Several classes from one annotation: the VNC sections but the last two ingested with their
    five classes, a softmax network fine-tuned from the built-in membrane model for ``minutes``
    (the third-last section validating), the last two predicted and scored per class (IoU, Dice,
    mitochondria objects), its mitochondria segmented (``segment --objects``) and a picture.
    Returns (outputs, scores)."""
    import tifffile

    from emseg.classes import parse_classes
    from emseg.config import SegmentConfig
    from emseg.evaluation.evaluate import evaluate
    from emseg.inference.predict import predict_store
    from emseg.io.ingest import ingest_stack
    from emseg.io.metadata import tiff_voxel_size
    from emseg.segmentation.segment import segment_store
    from emseg.training.calibrate import train as train_and_calibrate

    part = out / "classes"
    part.mkdir(exist_ok=True)
    with tifffile.TiffFile(folder / VNC_FILES[0]) as tif:
        voxel = tiff_voxel_size(tif)
        raw = tif.asarray()
    labels = tifffile.imread(folder / VNC_FILES[1])
    n = len(raw)
    if n < VNC_HELD_OUT + 2:
        raise BadInputError(f"{folder}: {n} sections; the second part needs at least {VNC_HELD_OUT + 2}")
    stores = {}
    for name, sl in (("train", slice(0, n - VNC_HELD_OUT)), ("test", slice(n - VNC_HELD_OUT, n))):
        tifffile.imwrite(part / f"{name}-raw.tif", raw[sl], photometric="minisblack")
        tifffile.imwrite(part / f"{name}-labels.tif", labels[sl], photometric="minisblack")
        stores[name] = ingest_stack(
            part / f"{name}-raw.tif",
            part / f"{name}.zarr",
            IngestConfig(voxel_size=voxel, classes=parse_classes(list(VNC_CLASSES)), overwrite=True),
            labels=part / f"{name}-labels.tif",
            progress=progress,
        )
    run = part / "run"
    train_config = TrainConfig(
        init=BUILTIN_START,
        model=ModelConfig(depth=plan.depth, base_channels=plan.base_channels),
        crop=plan.crop,
        batch_size=plan.batch_size,
        steps_per_epoch=plan.steps_per_epoch,
        epochs=10_000,
        time_limit=minutes * 60,
        val_slices=(n - VNC_HELD_OUT - 1,),
        device=device,
        overwrite=True,
    )
    summary = train_and_calibrate(stores["train"], run, train_config, progress=progress)
    pred = predict_store(
        run, stores["test"], part / "pred.zarr", PredictConfig(device=device, overwrite=True), progress=progress
    )
    scores = evaluate(pred, stores["test"], EvaluateConfig(overwrite=True), part / "scores.json")
    mito = segment_store(
        pred, part / "mitochondria.zarr", SegmentConfig(objects="mitochondria", overwrite=True), progress=progress
    )
    picture = _class_pictures(stores["test"], pred, part / "classes.png", first=n - VNC_HELD_OUT)
    result = {
        "data": str(folder),
        "sections": {"train": list(range(n - VNC_HELD_OUT - 1)), "validation": [n - VNC_HELD_OUT - 1],
                     "held_out": list(range(n - VNC_HELD_OUT, n))},
        "steps": summary["rows"][-1]["step"] if summary["rows"] else 0,
        "classes": {k: {m: v[m] for m in ("iou", "dice") if m in v} for k, v in scores["classes"].items()},
        "mitochondria_objects": scores["classes"].get("mitochondria", {}).get("objects"),
        "v_rand": scores.get("v_rand"),
    }  # fmt: skip
    outputs = {
        "classes_run": str(run),
        "classes_prediction": str(pred),
        "classes_scores": str(part / "scores.json"),
        "classes_mitochondria": str(mito),
        "classes_pictures": str(picture),
    }
    return outputs, result


def _class_pictures(data: Path, pred: Path, output: Path, first: int = 0) -> Path:
    """Rows of EM | true classes | predicted classes, each class in its colour (a legend under
    them), for every section; sections numbered from ``first`` (their place in the source)."""
    from emseg.io.zarr import open_ome, store_classes
    from emseg.viz import panel_rows

    image, prediction = open_ome(data), open_ome(pred, channels=True)
    classes = store_classes(prediction) or []
    palette = np.zeros((len(classes) + 1, 3), np.float32)  # 0, unlabelled: black
    for c in classes:
        palette[c.value] = np.asarray(c.rgb, np.float32) / 255.0
    rows, unlabelled = [], False
    for z in range(image.shape[0]):
        truth = np.asarray(image.labels["classes"].array[z])
        unlabelled = unlabelled or bool((truth == 0).any())
        predicted = np.asarray(prediction.labels["classes"].array[z])
        rows.append(
            {
                f"image (section {first + z})": np.asarray(image.array[z]),
                "true classes": palette[truth],
                "predicted classes": palette[predicted],
            }
        )
    legend = [(c.name, tuple(palette[c.value])) for c in classes]
    if unlabelled:
        legend.append(("unlabelled", (0.0, 0.0, 0.0)))
    return panel_rows(rows, output, legend=legend)


#: Fewer training steps than this in the demo's budget (measured on this machine): random weights
#: would not converge (about 80 steps on a quarter of a core scored V_rand 0.85), so the demo
#: fine-tunes the built-in model instead.
MIN_STEPS_FROM_SCRATCH = 250


def _start(train: Path, device: Any, plan: DemoPlan, minutes: float) -> tuple[str | None, str]:
    """(``--init`` for the demo's training, what it says of it): the built-in membrane model when
    the steps this machine manages in ``minutes`` (three steps timed) are too few to train from
    random weights, else None."""
    from emseg.training.speed import train_bench

    speed = train_bench(
        train, device, ModelConfig(depth=plan.depth, base_channels=plan.base_channels), plan.batch_size,
        plan.crop, steps=2, warmup=1, repeats=1, slices=2,  # two slices: their weight maps cost little
    )["steps_per_s"]  # fmt: skip
    steps = int(minutes * 60 * speed)
    if steps < MIN_STEPS_FROM_SCRATCH:
        return BUILTIN_START, (
            f"{BUILTIN_START}: about {steps} steps fit in {minutes:g} min here, too few from random weights"
        )
    return None, f"random weights: about {steps} steps fit in {minutes:g} min here"


def _demo_folder(out: Path) -> None:
    """Create the demo's folder (or use an existing one), after the checks: a path that is not a
    folder, or one that cannot be created, is one line."""
    from emseg.io.outputs import check_writable, destination_error

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInputError(f"-o {out}: is not a folder; the demo writes its results into a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise destination_error(out, exc, "create the demo's folder") from None
    check_writable(out, out)  # an existing folder emseg may not write into


def _pictures(data: Path, pred: Path, slices: tuple[int, ...], output: Path, with_truth: bool) -> Path:
    """Rows of image | truth | prediction | overlay (truth only for annotated slices)."""
    from emseg.io.zarr import first_slice, open_ome
    from emseg.probability import probability_float
    from emseg.viz import overlay, panel_rows

    image, prediction = open_ome(data), open_ome(pred)
    offset = first_slice(prediction)
    rows = []
    for z in slices:
        if not offset <= z < offset + prediction.shape[0] or z >= image.shape[0]:
            continue
        raw = np.asarray(image.array[z])
        prob = probability_float(np.asarray(prediction.array[z - offset]), str(pred))
        row = {f"image (slice {z})": raw}
        if with_truth and "cells" in image.labels:
            row["truth: cells"] = np.asarray(image.labels["cells"].array[z]).astype(bool)
        row["prob: P(cell)"] = prob
        row["overlay: predicted membranes"] = overlay(raw, prob < 0.5)
        rows.append(row)
    return panel_rows(rows, output)


def _segmentation(
    data: Path, pred: Path, slices: tuple[int, ...], out: Path, progress: Reporter | None
) -> tuple[dict[str, str], InstanceScores]:
    """The last step: instance labels of the validation prediction (``emseg segment``), their
    scores and a picture of them (random colours over the EM): (outputs, scores)."""
    from emseg.config import SegmentConfig
    from emseg.evaluation.instances import boundary_lines, evaluate_instances
    from emseg.io.outputs import write_json_atomic
    from emseg.io.zarr import first_slice, open_ome
    from emseg.segmentation.segment import segment_store
    from emseg.viz import panel_rows

    seg = segment_store(pred, out / "cells-val.zarr", SegmentConfig(overwrite=True), progress=progress)
    cells = evaluate_instances(seg, data)
    write_json_atomic(out / "scores-cells.json", cells.to_dict())
    image, labels = open_ome(data), open_ome(seg)
    offset = first_slice(open_ome(pred))
    rng = np.random.default_rng(0)
    rows = []
    for z in slices:
        raw = np.asarray(image.array[z]).astype(np.float32)
        ids = np.asarray(labels.array[z - offset])
        colours = rng.random((int(ids.max()) + 1, 3)).astype(np.float32)
        grey = (raw - raw.min()) / max(float(raw.max() - raw.min()), 1.0)
        rgb = 0.5 * grey[..., None] + 0.5 * colours[ids]
        rgb[boundary_lines(ids) != ids] = 0.0  # a dark line between segments: neighbours of like colour stay apart
        rows.append({f"image (slice {z})": raw, "cells: one colour per segment": rgb})
    picture = panel_rows(rows, out / "cells.png")
    outputs = {"segmentation": str(seg), "scores_cells": str(out / "scores-cells.json"), "pictures_cells": str(picture)}
    return outputs, cells
