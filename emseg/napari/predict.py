"""An image layer's pixels through ``emseg predict`` (the same engine, tiling and blending), without Qt.

A layer the reader opened from an emseg store is predicted from that store itself; any other 2D
or 3D grayscale layer is first written to a temporary OME-Zarr store. The prediction goes into
``output`` when one is given (a store that stays, opened lazily), else into a temporary store
that is read into memory and removed.
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
import tempfile
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from emseg.config import PredictConfig
from emseg.errors import BadInputError
from emseg.inference.predict import predict_store
from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale, open_ome
from emseg.models.checkpoint import check_trained, refuse_classes
from emseg.napari.reader import LayerData, labels_layer, probability_layer

#: A progress event: (phase, units done, total units or None).
Progress = tuple[str, float, float | None]


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """What is predicted: the layer's level-0 pixels (Y, X) or (Z, Y, X), where the layer sits
    (scale and translate, one per axis), and the emseg store it came from, if any."""

    data: Any
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    store: str | None = None


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


def layer_input(layer: Any) -> LayerInput:
    """The :class:`LayerInput` of a napari Image layer (level 0 of a pyramid); BadInputError for
    an RGB layer or one that is neither 2D nor 3D."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if getattr(layer, "rgb", False) or data.ndim not in (2, 3):
        raise BadInputError(f"{layer.name}: emseg predicts 2D or 3D grayscale images, not shape {data.shape}")
    meta = layer.metadata.get("emseg") if isinstance(layer.metadata, dict) else None
    store = meta.get("store") if isinstance(meta, dict) and meta.get("kind") == "em" else None
    return LayerInput(data, tuple(float(s) for s in layer.scale), tuple(float(t) for t in layer.translate), store)


def predict_layer(job: PredictJob, progress: Any = None) -> list[LayerData]:
    """Predict ``job`` with emseg's engine; returns the "P(cell)" and "membranes" layers, placed
    over the input layer. ``progress`` is an :class:`emseg.progress.Reporter`."""
    _, meta = check_trained(job.run)
    refuse_classes(meta, job.run, "the napari widget")
    divisor = int(meta.get("divisor") or 1)
    work = Path(tempfile.mkdtemp(prefix="emseg-napari-"))
    try:
        data, is_2d = _input_store(job.layer, work)
        shape = open_ome(data).shape
        tile = min(job.tile, -(-max(shape[1:]) // divisor) * divisor)  # never larger than the image needs
        overlap = min(PredictConfig().overlap, tile - divisor)
        config = PredictConfig(tile=tile, overlap=overlap, tta=job.tta, device=job.device, slices=job.slices)
        output = job.output if job.output is not None else work / "prediction.zarr"
        predict_store(job.run, data, output, config, progress)
        return _result_layers(output, job, is_2d, keep=job.output is not None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def predict_in_steps(job: PredictJob) -> Generator[Progress, None, list[LayerData]]:
    """:func:`predict_layer` as a generator for napari's ``thread_worker``: it yields the progress
    events while the prediction runs (in a thread of its own) and returns the layers."""
    events: queue.Queue[Progress | None] = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["layers"] = predict_layer(job, _QueueReporter(events))
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
    """A :class:`~emseg.progress.Reporter` that puts (phase, done, total) on a queue."""

    def __init__(self, events: queue.Queue[Progress | None]) -> None:
        self.events = events
        self.phase, self.done = "", 0.0
        self.total: float | None = None

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        self.phase, self.done, self.total = description, 0.0, total
        self.events.put((self.phase, self.done, self.total))

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self.done += amount
        self.events.put((self.phase, self.done, self.total))

    def finish(self) -> None:
        pass


def _input_store(layer: LayerInput, work: Path) -> tuple[Path, bool]:
    """(the OME-Zarr store to predict, whether the layer is 2D): the layer's own store when it
    came from one and still matches, else its pixels written to ``work``/input.zarr."""
    if layer.store is not None and Path(layer.store).is_dir():
        try:
            if open_ome(layer.store).shape == tuple(layer.data.shape):
                return Path(layer.store), False
        except BadInputError:
            pass  # written out below
    is_2d = layer.data.ndim == 2
    data = layer.data[None] if is_2d else layer.data
    scale = (1.0, *layer.scale) if is_2d else layer.scale
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 4:
        dtype = np.dtype(np.float32)
    spec = LevelSpec(
        shape=tuple(int(s) for s in data.shape),
        dtype=dtype.name,
        pyramid_min_size=max(data.shape[1:]),  # one level: only level 0 is predicted
    )
    path = work / "input.zarr"
    root = create_image_store(path, "0.4")
    (array,) = create_multiscale(root, spec, [abs(s) or 1.0 for s in scale], "0.4", "image")
    for z in range(data.shape[0]):  # a slice at a time: a lazy (dask) layer is never loaded whole
        array[z] = np.asarray(data[z]).astype(dtype, copy=False)
    return path, is_2d


def _result_layers(output: Path, job: PredictJob, is_2d: bool, keep: bool) -> list[LayerData]:
    """The P(cell) and membranes layers of the prediction store ``output``, placed where the input
    layer sits: lazy when the store stays (``keep``), else in memory."""
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
        placed.append((data, kwargs, kind))
    return placed


__all__ = ["LayerInput", "PredictJob", "layer_input", "predict_layer", "predict_in_steps"]
