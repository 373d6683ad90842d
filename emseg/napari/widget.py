"""The dock widget: predict an image layer with a trained run, in a background worker.

It runs :func:`emseg.napari.predict.predict_in_steps` (``emseg predict``'s engine) in napari's
``thread_worker``, shows the blocks done and the time left in a progress bar, and adds the
"P(cell)" and "membranes" layers over the image, in its scale and units, when the prediction is
done. Cancel stops the run between blocks (a kept output stays resumable). What goes wrong is a
napari notification: emseg's own errors as their one line, with the options named as the
widget's controls rather than CLI flags (:func:`in_widget_words`); anything else as one line
with its traceback in the log (debug) and behind the notification's traceback button, never on
stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from magicgui.types import FileDialogMode
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, ProgressBar, PushButton, SpinBox

from emseg.config import PredictConfig, flag_of, options
from emseg.errors import Cancelled, EmsegError
from emseg.napari.predict import (
    EXISTING,
    LayerData,
    PredictJob,
    Progress,
    has_partial,
    layer_input,
    predict_in_steps,
)
from emseg.progress import format_duration

log = logging.getLogger(__name__)
#: The model choice that predicts with the run directory below it (the others are built-in models).
RUN_CHOICE = "the run directory below"
#: The label of the choice for an existing output (its values: emseg.napari.predict.EXISTING).
EXISTING_LABEL = "if output exists"
#: emseg's messages name options by their CLI flag; here, the control that sets each instead.
CONTROLS = {
    "overwrite": f'"{EXISTING_LABEL}: overwrite"',
    "resume": f'"{EXISTING_LABEL}: resume"',
    "tile": '"tile"',
    "device": '"device"',
    "tta": '"test-time augmentation"',
}


def in_widget_words(message: str) -> str:
    """``message`` with the CLI flags of the options the widget has (``--overwrite``,
    ``--resume``, ``--tile``, ...) replaced by the controls that set them."""
    fields = options(PredictConfig)
    for name, control in CONTROLS.items():
        flag = re.escape(flag_of(fields[name]))
        message = re.sub(rf"(?<![\w-]){flag}(?![\w-])", control, message)
    return message


class PredictWidget(Container):
    """Image layer, model (a built-in one, the default, or a run directory), device, tile, TTA, the
    shown slice only, where to save and what to do when it exists; Predict and Cancel buttons, a
    progress bar and a status line."""

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
        self.existing = ComboBox(label=EXISTING_LABEL, choices=list(EXISTING), value="refuse")
        self.existing.tooltip = (
            "refuse: stop with a message; resume: finish a cancelled or interrupted run with the same "
            "settings; overwrite: replace the output emseg wrote there"
        )
        self.button = PushButton(text="Predict")
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.cancel.tooltip = "stop after the blocks in progress; the saved output can be resumed"
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(value="")
        self.extend(
            [self.image, self.model, self.run, self.device, self.tile, self.tta, self.current, self.output]
            + [self.existing, self.button, self.cancel, self.progress, self.status]
        )
        self.button.changed.connect(self.start)
        self.cancel.changed.connect(self.stop)
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh)
        self.worker: Any = None
        self._stop = threading.Event()
        self._output: Path | None = None

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
            existing=str(self.existing.value),
        )

    def start(self) -> Any:
        """Start the prediction in a worker thread; returns the worker (None when refused)."""
        from napari.qt.threading import create_worker

        try:
            job = self.job()
        except EmsegError as exc:
            self._failed(exc)
            return None
        self.button.enabled, self.cancel.enabled = False, True
        self.progress.max, self.progress.value = 0, 0  # busy until the first count arrives
        self.status.value = "loading the model..."
        self._stop = threading.Event()
        self._output = job.output
        connect = {
            "yielded": self._on_progress,
            "returned": self._on_returned,
            "errored": self._failed,  # not raised again in the GUI thread (_guarded returns errors)
            "finished": self._on_finished,
        }
        worker = create_worker(_guarded, job, self._stop, _connect=connect, _start_thread=False)
        self.worker = worker
        worker.start()
        return worker

    def stop(self) -> None:
        """Cancel the running prediction: it stops after the blocks in progress."""
        if self.worker is not None and not self._stop.is_set():
            self._stop.set()
            self.cancel.enabled = False
            self.status.value = "cancelling after the blocks in progress..."

    # --- worker callbacks (in the GUI thread) -------------------------------------------------

    def _on_progress(self, event: Progress) -> None:
        phase, done, total, left, unit = event
        if not total:
            return
        self.progress.max, self.progress.value = int(total), int(done)
        if self._stop.is_set():
            return  # the status says it is cancelling
        line = f"{int(done)}/{int(total)} {unit or phase}"
        self.status.value = line + (f", ETA {format_duration(left)}" if left is not None else "")

    def _on_returned(self, result: list[LayerData] | _Failure) -> None:
        if isinstance(result, _Failure) and isinstance(result.error, Cancelled):
            self._cancelled()
        elif isinstance(result, _Failure):
            self._failed(result.error)
        else:
            for data, kwargs, kind in result:
                self.viewer.add_layer(_layer(data, kwargs, kind))
            self.status.value = "done: P(cell) and membranes added"

    def _cancelled(self) -> None:
        from napari.utils.notifications import show_info

        if self._output is None or not has_partial(self._output):
            message = "prediction cancelled"
        else:
            message = (
                f"prediction cancelled: the blocks done are kept for {self._output}; "
                f'predict again with "{EXISTING_LABEL}: resume" to finish it'
            )
        self.status.value = "cancelled"
        show_info(message)

    def _failed(self, exc: BaseException) -> None:
        """An error as a napari notification: emseg's own as its line (in the widget's words),
        anything else as one line, its traceback in the log (debug) and the notification."""
        from napari.utils.notifications import ErrorNotification, notification_manager, show_error

        if isinstance(exc, EmsegError):
            message = in_widget_words(str(exc))
            self.status.value = message
            show_error(message)
            return
        log.debug("prediction failed", exc_info=exc)
        first = str(exc).strip().splitlines()
        message = f"prediction failed: {type(exc).__name__}" + (f": {first[0]}" if first else "")
        self.status.value = message
        notification = ErrorNotification(exc)  # napari shows its traceback on request
        notification.message = message
        notification_manager.dispatch(notification)

    def _on_finished(self) -> None:
        self.button.enabled, self.cancel.enabled = True, False
        self.worker = None

    def _refresh(self, event: Any = None) -> None:
        self.image.reset_choices()

    def _image_layers(self, widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]


@dataclasses.dataclass(frozen=True)
class _Failure:
    """What a prediction that raised returns to the widget."""

    error: Exception


def _guarded(job: PredictJob, stop: threading.Event) -> Generator[Progress, None, list[LayerData] | _Failure]:
    """:func:`predict_in_steps`, its error returned rather than raised: napari relays an error
    raised in a worker as a notification of its own (the whole message with its CLI flags, a
    traceback on stderr where napari does not catch errors); the widget says it once, its way."""
    try:
        return (yield from predict_in_steps(job, stop))
    except Exception as exc:  # noqa: BLE001 - not swallowed: the widget notifies it (_on_returned)
        return _Failure(exc)


def _layer(data: Any, kwargs: dict[str, Any], kind: str) -> Any:
    from napari.layers import Layer

    return Layer.create(data, kwargs, kind)


__all__ = ["EXISTING_LABEL", "PredictWidget", "in_widget_words"]
