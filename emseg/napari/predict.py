"""An image layer's pixels through ``emseg predict`` (the same engine, tiling and blending), without Qt.

A layer the reader opened from an emseg store is predicted from that store itself; any other 2D
or 3D grayscale layer is first written to an OME-Zarr store: a temporary one, or, when the
prediction is kept, one beside the output named by the pixels' digest
(``.NAME.input-DIGEST.zarr``), so that a cancelled run of the same pixels resumes (its resume
record names its input) and other pixels are told apart; it is removed once the output is
complete. The prediction goes into ``output`` when one is given (a store that stays, opened
lazily; ``existing`` says what to do when it exists, as ``--overwrite`` and ``--resume`` do),
else into a temporary store that is read into memory and removed.

The result layers are placed exactly as the input layer: its scale, translate, units and axis
labels (napari draws nothing in world units when layers disagree about them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import PredictConfig
from emseg.errors import BadInputError, Cancelled
from emseg.inference.predict import predict_store
from emseg.io.outputs import PARTIAL_TAG, complete_output, destination_error, is_emseg_store
from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale, open_ome
from emseg.models.checkpoint import check_trained, refuse_classes
from emseg.napari.reader import LayerData, labels_layer, probability_layer
from emseg.progress import Cancellable, Eta, Reporter, reporter_or_null

#: A progress event: (phase, units done, total units or None, seconds left or None, unit).
Progress = tuple[str, float, float | None, float | None, str]
#: What to do when the output exists: refuse (the default), resume an interrupted run (as
#: ``--resume``: a complete one with the same settings is "nothing to do"), or overwrite it.
EXISTING = ("refuse", "resume", "overwrite")
#: The provenance command of an input store written beside a kept output.
INPUT_COMMAND = "napari-input"


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """What is predicted: the layer's level-0 pixels (Y, X) or (Z, Y, X), where the layer sits
    (scale and translate, one per axis, in ``units``), and the emseg store it came from, if any."""

    data: Any
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    store: str | None = None
    #: napari's units per axis ("nanometer", "pixel", ...); None: napari's default.
    units: tuple[str, ...] | None = None
    axis_labels: tuple[str, ...] | None = None
    #: Nanometres per unit of each axis; None when the units are no lengths (pixels: the scale is
    #: taken as nanometres, as it always was).
    nm_per_unit: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PredictJob:
    """One prediction the widget asks for."""

    layer: LayerInput
    run: Path
    device: str = PredictConfig.device
    tile: int = PredictConfig.tile
    tta: bool = PredictConfig.tta
    #: Slices [start, stop) of a 3D layer; None: all.
    slices: tuple[int, int] | None = None
    output: Path | None = None
    #: An existing ``output``: one of :data:`EXISTING`.
    existing: str = "refuse"


def layer_input(layer: Any) -> LayerInput:
    """The :class:`LayerInput` of a napari Image layer (level 0 of a pyramid); BadInputError for
    an RGB layer or one that is neither 2D nor 3D."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if getattr(layer, "rgb", False) or data.ndim not in (2, 3):
        raise BadInputError(f"{layer.name}: emseg predicts 2D or 3D grayscale images, not shape {data.shape}")
    meta = layer.metadata.get("emseg") if isinstance(layer.metadata, dict) else None
    store = meta.get("store") if isinstance(meta, dict) and meta.get("kind") == "em" else None
    units = getattr(layer, "units", None)
    labels = getattr(layer, "axis_labels", None)
    return LayerInput(
        data,
        tuple(float(s) for s in layer.scale),
        tuple(float(t) for t in layer.translate),
        store,
        units=tuple(str(u) for u in units) if units is not None else None,
        axis_labels=tuple(str(a) for a in labels) if labels is not None else None,
        nm_per_unit=_nm_per_unit(units),
    )


def _nm_per_unit(units: Any) -> tuple[float, ...] | None:
    """Nanometres in one of each (pint) unit, or None when one of them is no length (a pixel)."""
    if units is None:
        return None
    try:
        return tuple(float((1 * u).to("nanometer").magnitude) for u in units)
    except (TypeError, ValueError, AttributeError):  # pint's DimensionalityError, UndefinedUnitError
        return None


def predict_layer(
    job: PredictJob, progress: Reporter | None = None, stop: threading.Event | None = None
) -> list[LayerData]:
    """Predict ``job`` with emseg's engine; returns the "P(cell)" and "membranes" layers, placed
    over the input layer. ``progress`` is an :class:`emseg.progress.Reporter`; setting ``stop``
    cancels the run between slices of the input and between blocks
    (:class:`~emseg.errors.Cancelled`; a kept output stays resumable)."""
    if job.existing not in EXISTING:
        raise BadInputError(f"if the output exists: {job.existing!r}, expected one of {', '.join(EXISTING)}")
    _, meta = check_trained(job.run)
    refuse_classes(meta, job.run, "the napari widget")
    if job.output is not None and job.existing == "refuse":  # refused before the layer is written out
        complete_output(job.output, {}, overwrite=False, resume=False)
    divisor = int(meta.get("divisor") or 1)
    stop = stop or threading.Event()
    work = Path(tempfile.mkdtemp(prefix="emseg-napari-"))
    output = job.output.absolute() if job.output is not None else work / "prediction.zarr"
    data: Path | None = None
    try:
        data, is_2d = _input_store(job.layer, work if job.output is None else None, output, stop)
        shape = open_ome(data).shape
        tile = min(job.tile, -(-max(shape[1:]) // divisor) * divisor)  # never larger than the image needs
        overlap = min(PredictConfig().overlap, tile - divisor)
        config = PredictConfig(
            tile=tile,
            overlap=overlap,
            tta=job.tta,
            device=job.device,
            slices=job.slices,
            overwrite=job.existing == "overwrite",
            resume=job.existing == "resume",
        )
        predict_store(job.run, data, output, config, Cancellable(reporter_or_null(progress), stop))
        layers = _result_layers(output, job, is_2d, keep=job.output is not None)
    except BaseException:
        if data is not None and _is_input_beside(data, output) and not _partial(output).is_dir():
            shutil.rmtree(data, ignore_errors=True)  # nothing to resume from it
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if job.output is not None:
        _drop_inputs_beside(output)  # the output is complete: no resume needs them
    return layers


def predict_in_steps(
    job: PredictJob, stop: threading.Event | None = None
) -> Generator[Progress, None, list[LayerData]]:
    """:func:`predict_layer` as a generator for napari's ``thread_worker``: it yields the progress
    events while the prediction runs (in a thread of its own) and returns the layers; setting
    ``stop`` cancels the prediction (the generator then raises :class:`~emseg.errors.Cancelled`
    once the blocks in flight are done)."""
    events: queue.Queue[Progress | None] = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["layers"] = predict_layer(job, _QueueReporter(events), stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=target, name="emseg-napari-predict", daemon=True)
    thread.start()
    while (event := events.get()) is not None:
        yield event
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["layers"]


class _QueueReporter:
    """A :class:`~emseg.progress.Reporter` that puts :data:`Progress` events on a queue, with the
    time left (:class:`~emseg.progress.Eta`, measured here, where the work is done)."""

    def __init__(self, events: queue.Queue[Progress | None]) -> None:
        self.events = events
        self.phase, self.unit, self.done = "", "", 0.0
        self.total: float | None = None
        self.eta = Eta()

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        self.phase, self.unit, self.done, self.total = description, unit, 0.0, total
        self.eta.start()
        self.events.put((self.phase, self.done, self.total, None, self.unit))

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self.done += amount
        left = self.eta.update(self.done, self.total)
        self.events.put((self.phase, self.done, self.total, left, self.unit))

    def finish(self) -> None:
        pass


def _input_store(layer: LayerInput, work: Path | None, output: Path, stop: threading.Event) -> tuple[Path, bool]:
    """(the OME-Zarr store to predict, whether the layer is 2D): the layer's own store when it
    came from one and still matches, else its pixels written to ``work``/input.zarr, or (no
    ``work``: the prediction is kept) beside ``output`` under their digest."""
    if layer.store is not None and Path(layer.store).is_dir():
        try:
            if open_ome(layer.store).shape == tuple(layer.data.shape):
                return Path(layer.store), False
        except BadInputError:
            pass  # written out below
    is_2d = layer.data.ndim == 2
    if work is not None:
        _write_layer(layer, work / "input.zarr", stop)
        return work / "input.zarr", is_2d
    path = output.parent / f".{output.name}.input-{_tag()}.tmp"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        digest = _write_layer(layer, path, stop)
        named = output.parent / f".{output.name}.input-{digest[:16]}.zarr"
        if named.is_dir():  # the same pixels, written for an earlier (interrupted) run
            shutil.rmtree(path)
        else:
            os.rename(path, named)
        return named, is_2d
    except OSError as exc:
        raise destination_error(path, exc, "write the layer's pixels") from None
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _write_layer(layer: LayerInput, path: Path, stop: threading.Event) -> str:
    """Write the layer's pixels as the one-level OME-Zarr image ``path`` (a 2D layer as one
    slice; its scale converted to nanometres where its units are lengths, else taken as
    nanometres), a slice at a time (a lazy layer is never loaded whole); returns the SHA-256 of
    its shape, dtype, voxel size and pixels."""
    data = layer.data[None] if layer.data.ndim == 2 else layer.data
    scale = (1.0,) * (data.ndim - len(layer.scale)) + layer.scale
    nm = layer.nm_per_unit
    nm = (1.0,) * (data.ndim - len(nm)) + nm if nm else None
    voxel = [abs(s) * (nm[i] if nm else 1.0) or 1.0 for i, s in enumerate(scale)]
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 4:
        dtype = np.dtype(np.float32)
    spec = LevelSpec(
        shape=tuple(int(s) for s in data.shape),
        dtype=dtype.name,
        pyramid_min_size=max(data.shape[1:]),  # one level: only level 0 is predicted
    )
    root = create_image_store(path, "0.4", attrs={"emseg": {"command": INPUT_COMMAND}})
    (array,) = create_multiscale(root, spec, voxel, "0.4", "image")
    digest = hashlib.sha256(repr((spec.shape, spec.dtype, voxel)).encode())
    for z in range(data.shape[0]):
        if stop.is_set():
            raise Cancelled("cancelled")
        plane = np.ascontiguousarray(np.asarray(data[z]).astype(dtype, copy=False))
        digest.update(plane.tobytes())
        array[z] = plane
    return digest.hexdigest()


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _partial(output: Path) -> Path:
    """The resumable partial of ``output`` (emseg.io.outputs.Output)."""
    return output.parent / f".{output.name}{PARTIAL_TAG}"


def has_partial(output: Path) -> bool:
    """Whether an interrupted prediction into ``output`` left work that a resume continues."""
    return _partial(Path(output).absolute()).is_dir()


def _is_input_beside(path: Path, output: Path) -> bool:
    return path.parent == output.parent and path.name.startswith(f".{output.name}.input-")


def _drop_inputs_beside(output: Path) -> None:
    """Remove the input stores written beside ``output`` (only those emseg wrote)."""
    if not output.parent.is_dir():
        return
    for entry in output.parent.iterdir():
        if _is_input_beside(entry, output) and not entry.is_symlink() and is_emseg_store(entry):
            shutil.rmtree(entry, ignore_errors=True)


def _result_layers(output: Path, job: PredictJob, is_2d: bool, keep: bool) -> list[LayerData]:
    """The P(cell) and membranes layers of the prediction store ``output``, placed where the input
    layer sits (its scale, translate, units and axis labels): lazy when the store stays
    (``keep``), else in memory."""
    image = open_ome(output)
    layers = [probability_layer(image), labels_layer(image.labels["membranes"], "membranes")]
    z0 = job.slices[0] if job.slices else 0
    placed = []
    for data, kwargs, kind in layers:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("axis_labels", "units")}
        if not keep:
            level0 = data[0] if kwargs["multiscale"] else data
            data, kwargs["multiscale"] = np.asarray(level0), False
            kwargs["metadata"] = {}
        if is_2d:
            data = data[0] if not kwargs["multiscale"] else [d[0] for d in data]
            kwargs["scale"], kwargs["translate"] = list(job.layer.scale), list(job.layer.translate)
        else:
            kwargs["scale"] = list(job.layer.scale)
            ty = list(job.layer.translate)
            kwargs["translate"] = [ty[0] + z0 * job.layer.scale[0], *ty[1:]]
        if job.layer.units is not None:
            kwargs["units"] = job.layer.units
        if job.layer.axis_labels is not None:
            kwargs["axis_labels"] = job.layer.axis_labels
        placed.append((data, kwargs, kind))
    return placed


__all__ = [
    "EXISTING",
    "LayerInput",
    "PredictJob",
    "Progress",
    "has_partial",
    "layer_input",
    "predict_in_steps",
    "predict_layer",
]
