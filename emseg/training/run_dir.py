"""The run directory of one training run: config.json, checkpoints, the resume point, metrics.csv
and curves.png, each written atomically."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emseg._version import __version__
from emseg.config import TrainConfig, from_dict, to_dict
from emseg.errors import BadInputError, EmsegRuntimeError, Interrupted
from emseg.io.outputs import (
    OutputLock,
    check_output,
    destination_error,
    is_emseg_output,
    write_bytes_atomic,
    write_json_atomic,
)
from emseg.models.checkpoint import load_resume_point, save_checkpoint, save_resume_point
from emseg.training.ema import WeightAverage, WithAverage, split_average
from emseg.viz import curves_png

COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_iou",
    "v_rand",
    "v_info",
    "lr",
    "seconds",
    "weights",
    "saved",
)
FORMAT = "emseg-checkpoint/1"
#: curves.png is drawn again at most this often while training (seconds; drawing costs 1-2 s on a
#: busy CPU, more than a short epoch), and once at the end.
PLOT_EVERY_S = 30.0
RESUME_POINT = "resume.safetensors"
#: The resume point's name in runs written before it was renamed; ``--resume`` still reads it.
LEGACY_RESUME_POINT = "optimizer.safetensors"
#: Every file emseg writes into a run directory (``--overwrite`` removes these and only these).
RUN_FILES = (
    "config.json",
    "best.safetensors",
    "last.safetensors",
    RESUME_POINT,
    LEGACY_RESUME_POINT,
    "metrics.csv",
    "curves.png",
    "ddp.json",
)


class RunDir:
    """Writes and reads the files of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._plotted_at = -math.inf  # time.monotonic() of the last curves.png
        self._plot_due = False  # rows written since

    @property
    def last(self) -> Path:
        return self.path / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def resume_point(self) -> Path:
        """Weights, optimizer state, loop state and metrics rows in one file, for ``--resume``."""
        return self.path / RESUME_POINT

    @contextlib.contextmanager
    def claim(self, resume: bool, overwrite: bool) -> Iterator[None]:
        """Hold the run directory while the block writes it: a second emseg writing it is refused
        (a lock beside it); an existing run needs ``resume`` or ``overwrite`` (which removes only
        the files emseg writes there). Ctrl-C in the block becomes :class:`Interrupted` (what the
        run directory keeps), an OSError writing into it one line."""
        if self.path.is_symlink():
            raise BadInputError(f"{self.path}: is a symbolic link; give the real path of the run directory")
        if self.path.exists() and not self.path.is_dir():
            raise BadInputError(f"{self.path}: is a file, not a run directory (give a folder path)")
        if not self.path.exists():
            check_output(self.path, overwrite=False, kind="run")
        lock = OutputLock(self.path, "train")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError as exc:  # an unwritable parent: the lock lives beside the run directory
            raise BadInputError(
                f"{self.path}: cannot lock it for writing in {self.path.parent} ({exc.strerror or exc})"
            ) from None
        try:
            self._prepare(resume, overwrite)
            with self._reported():
                yield
        finally:
            lock.release()

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse a folder emseg did not write, and an existing run without ``resume`` or
        ``overwrite``; remove the run files ``overwrite`` replaces; create the folder."""
        existing = [f for f in RUN_FILES if (self.path / f).exists() or (self.path / f).is_symlink()]
        foreign = self.path.is_dir() and any(self.path.iterdir()) and not is_emseg_output(self.path, "run")
        if foreign and not (resume and existing):  # --resume reads (and checks) the run files there
            # a user's folder (or one whose run files are not emseg's): never written into
            raise BadInputError(
                f"{self.path}: is a folder emseg did not write (no emseg config.json); give a new or empty folder"
            )
        if existing and not resume and not overwrite:
            raise BadInputError(
                f"{self.path}: already holds a run ({', '.join(existing)}); use --resume or --overwrite"
            )
        if overwrite and not resume:
            for f in existing:
                (self.path / f).unlink()
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            raise destination_error(self.path, exc, "create the run directory") from None

    @contextlib.contextmanager
    def _reported(self) -> Iterator[None]:
        """Ctrl-C as :class:`Interrupted` (what the run keeps); an OSError writing a file of the
        run directory (a full disk) as one line."""
        try:
            yield
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            raise self._interrupted() from exc
        except OSError as exc:
            written = (
                exc.filename is not None and self.path.absolute() in Path(os.fsdecode(exc.filename)).absolute().parents
            )
            if not written:
                raise  # not a write into the run directory
            raise EmsegRuntimeError(
                f"{self.path}: writing the run failed ({exc.strerror or exc}); its last checkpoint stays "
                "(rerun with --resume once the cause is fixed)"
            ) from exc

    def _interrupted(self) -> Interrupted:
        """What Ctrl-C kept of the run: its finished epochs and resume point, or nothing to resume."""
        if self.resume_point.is_file() or (self.path / LEGACY_RESUME_POINT).is_file():
            epochs = len(self.rows)
            kept = f"{epochs} finished epoch{'s' if epochs != 1 else ''} in the run directory {self.path}"
            return Interrupted(f"{kept} (its resume point: {RESUME_POINT})", resumable=True)
        return Interrupted(
            f"nothing: the run directory {self.path} holds no checkpoint yet (its first epoch had not ended)",
            resumable=False,
        )

    def meta(self, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
        return {"format": FORMAT, "emseg_version": __version__, "config": to_dict(config), **extra}

    def write_config(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", meta)

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        state: dict[str, Any],
        best: bool,
        row: dict[str, Any],
        average: WeightAverage | None = None,
    ) -> None:
        """Save the resume point (weights, their average, optimizer, loop state and metrics rows
        in one atomic file) first, then last (+ best) weights, metrics.csv and curves.png for
        people. The checkpoints hold the average's weights when there is one."""
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        save_resume_point(
            self.resume_point,
            WithAverage(model, average),
            optimizer,
            {"state": state, "config": meta["config"], "rows": self.rows},
        )
        (self.path / LEGACY_RESUME_POINT).unlink(missing_ok=True)  # superseded by the file just written
        saved = average.model if average is not None else model
        save_checkpoint(self.last, saved, {**meta, "state": state})
        if best:
            save_checkpoint(self.best, saved, {**meta, "state": state})
        self.write_metrics()

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        average: WeightAverage | None = None,
    ) -> dict[str, Any]:
        """Restore weights, their average, optimizer and metrics rows from the resume point (an
        older run's optimizer.safetensors when there is no resume.safetensors); refuse an
        incompatible config. The optimizer's state takes its parameters' memory format
        (channels_last) again: the file holds contiguous copies.

        Returns the loop state: ``step`` (the next global step, counted with ``config``'s steps per
        epoch), ``best`` (score) and ``elapsed`` (seconds).
        """
        path = self.resume_point
        if not path.is_file() and (self.path / LEGACY_RESUME_POINT).is_file():
            path = self.path / LEGACY_RESUME_POINT
        if not path.is_file():
            raise BadInputError(f"--resume: {self.path} holds no {RESUME_POINT} to resume from")
        tensors, extra = load_resume_point(path, optimizer)
        saved = from_dict(TrainConfig, extra["config"])
        if saved.model != config.model or saved.val_slices != config.val_slices:
            raise BadInputError(
                f"--resume: {self.path} was trained with model {saved.model} and validation slices "
                f"{saved.val_slices}; the options given differ (model {config.model}, {config.val_slices})"
            )
        weights, averaged = split_average(tensors)
        getattr(model, "module", model).load_state_dict(weights)
        restore_memory_format(optimizer)
        state = extra["state"]
        if average is not None:
            average.load_state_dict(averaged or weights, int(state.get("ema_updates", 0)) if averaged else 0)
        self.rows = list(extra.get("rows", []))
        if "step" in state:
            epoch, in_epoch = divmod(int(state["step"]), saved.steps_per_epoch)
        else:  # written by an emseg that counted (epoch, step in it)
            epoch, in_epoch = int(state["epoch"]), int(state["next_step"])
        # finished epochs stay finished when --steps-per-epoch changes on resume
        step = epoch * config.steps_per_epoch + min(in_epoch, config.steps_per_epoch)
        return {
            "step": step,
            "best": float(state["best"]),
            "elapsed": float(state["elapsed"]),
            "ema_updates": int(state.get("ema_updates", 0)),
        }

    def write_metrics(self) -> None:
        buf = io.StringIO()
        # a network of several classes adds its mean IoU and each class's IoU and Dice
        extra = dict.fromkeys(k for r in self.rows for k in r if k == "mean_iou" or k.startswith(("iou_", "dice_")))
        columns = (*COLUMNS, *extra)
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        write_bytes_atomic(self.path / "metrics.csv", buf.getvalue().encode())
        self._plot_due = True
        if time.monotonic() - self._plotted_at >= PLOT_EVERY_S:
            self.plot()

    def plot(self) -> None:
        """curves.png: loss, pixel accuracy and V_rand / V_info per epoch."""
        write_bytes_atomic(self.path / "curves.png", curves_png(self.rows))
        self._plotted_at, self._plot_due = time.monotonic(), False

    def finish(self) -> None:
        """The last curves.png, when rows came after the one drawn (epochs end faster than
        :data:`PLOT_EVERY_S`)."""
        if self._plot_due:
            self.plot()


def restore_memory_format(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor shaped like its parameter the parameter's strides
    (a channels_last parameter with contiguous moments costs a layout conversion every step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


__all__ = ["RunDir", "restore_memory_format", "COLUMNS", "FORMAT", "RESUME_POINT", "LEGACY_RESUME_POINT", "RUN_FILES"]
