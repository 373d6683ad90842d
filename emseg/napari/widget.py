"""The dock widget: predict an image layer with a trained run, in a background worker.

It runs :func:`emseg.napari.predict.predict_in_steps` (``emseg predict``'s engine) in napari's
``thread_worker``, shows the blocks done in a progress bar, and adds the "P(cell)" and
"membranes" layers over the image when the prediction is done. Errors a user can fix (no run
there, an RGB layer) are one line in the widget.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from magicgui.types import FileDialogMode
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, ProgressBar, PushButton, SpinBox

from emseg.config import PredictConfig
from emseg.errors import EmsegError
from emseg.napari.predict import LayerData, PredictJob, Progress, layer_input, predict_in_steps

log = logging.getLogger(__name__)
#: The model choice that predicts with the run directory below it (the others are built-in models).
RUN_CHOICE = "the run directory below"


class PredictWidget(Container):
    """Image layer, model (a built-in one, the default, or a run directory), device, tile, TTA, the
    shown slice only, where to save; a Predict button, a progress bar and a status line."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        from emseg.models.builtin import MODELS, PREFIX

        self.model = ComboBox(label="model", choices=[*(PREFIX + m for m in MODELS), RUN_CHOICE])
        self.run = FileEdit(label="run directory", mode=FileDialogMode.EXISTING_DIRECTORY)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value=PredictConfig.device)
        self.tile = SpinBox(label="tile", value=PredictConfig.tile, min=16, max=4096, step=16)
        self.tta = CheckBox(text="test-time augmentation (8x the time)", value=PredictConfig.tta)
        self.current = CheckBox(text="only the slice shown", value=False)
        self.output = LineEdit(label="save to", value="")
        self.output.tooltip = "an OME-Zarr path to keep the prediction (empty: kept in memory only)"
        self.button = PushButton(text="Predict")
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(value="")
        self.extend(
            [self.image, self.model, self.run, self.device, self.tile, self.tta, self.current, self.output]
            + [self.button, self.progress, self.status]
        )
        self.button.changed.connect(self.start)
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh)
        self.worker: Any = None

    # --- the job ----------------------------------------------------------------------------

    def job(self) -> PredictJob:
        """The prediction the widget's fields describe (BadInputError when they cannot)."""
        from emseg.errors import BadInputError

        layer = self.image.value
        if layer is None:
            raise BadInputError("choose an image layer")
        inp = layer_input(layer)
        slices = None
        if self.current.value and inp.data.ndim == 3:
            z = int(round(float(layer.world_to_data(self.viewer.dims.point)[0])))
            z = min(max(z, 0), int(inp.data.shape[0]) - 1)
            slices = (z, z + 1)
        output = Path(self.output.value).expanduser() if str(self.output.value).strip() else None
        return PredictJob(
            layer=inp,
            run=Path(str(self.run.value if self.model.value == RUN_CHOICE else self.model.value)),
            device=str(self.device.value),
            tile=int(self.tile.value),
            tta=bool(self.tta.value),
            slices=slices,
            output=output,
        )

    def start(self) -> Any:
        """Start the prediction in a worker thread; returns the worker (None when refused)."""
        from napari.qt.threading import create_worker

        try:
            job = self.job()
        except EmsegError as exc:
            self.status.value = str(exc)
            return None
        self.button.enabled = False
        self.progress.max, self.progress.value = 0, 0  # busy until the first count arrives
        self.status.value = "loading the model..."
        connect = {
            "yielded": self._on_progress,
            "returned": self._on_done,
            "errored": self._on_error,  # so the error is not raised again in the GUI thread
            "finished": self._on_finished,
        }
        worker = create_worker(predict_in_steps, job, _connect=connect, _start_thread=False)
        self.worker = worker
        worker.start()
        return worker

    # --- worker callbacks (in the GUI thread) -------------------------------------------------

    def _on_progress(self, event: Progress) -> None:
        phase, done, total = event
        if total:
            self.progress.max, self.progress.value = int(total), int(done)
            self.status.value = f"{phase}: {int(done)}/{int(total)} blocks"

    def _on_done(self, layers: list[LayerData]) -> None:
        for data, kwargs, kind in layers:
            self.viewer.add_layer(_layer(data, kwargs, kind))
        self.status.value = "done: P(cell) and membranes added"

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, EmsegError):
            self.status.value = str(exc)
        else:
            log.error("prediction failed", exc_info=exc)
            self.status.value = f"prediction failed: {type(exc).__name__}: {exc}"

    def _on_finished(self) -> None:
        self.button.enabled = True
        self.worker = None

    def _refresh(self, event: Any = None) -> None:
        self.image.reset_choices()

    def _image_layers(self, widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]


def _layer(data: Any, kwargs: dict[str, Any], kind: str) -> Any:
    from napari.layers import Layer

    return Layer.create(data, kwargs, kind)


__all__ = ["PredictWidget"]
