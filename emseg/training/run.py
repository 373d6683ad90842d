"""The run directory: config.json, checkpoints, metrics.csv and curves.png, each written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emseg import __version__
from emseg.config import TrainConfig, from_dict, to_dict
from emseg.errors import BadInputError
from emseg.io.atomic import write_bytes_atomic, write_json_atomic
from emseg.models.checkpoint import load_resume_point, save_checkpoint, save_resume_point

COLUMNS = (
    "epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_iou",
    "v_rand", "v_info", "lr", "seconds",
)
FORMAT = "emseg-checkpoint/1"


class RunDir:
    """Writes and reads the files of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    @property
    def last(self) -> Path:
        return self.path / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.safetensors"

    def meta(self, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
        return {"format": FORMAT, "emseg_version": __version__, "config": to_dict(config), **extra}

    def write_config(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", meta)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], state: dict[str, Any],
             best: bool, row: dict[str, Any]) -> None:
        """Save the resume point (weights, optimizer, loop state and metrics rows in one atomic
        file) first, then last (+ best) weights, metrics.csv and curves.png for people."""
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        save_resume_point(self.optimizer, model, optimizer,
                          {"state": state, "config": meta["config"], "rows": self.rows})
        save_checkpoint(self.last, model, {**meta, "state": state})
        if best:
            save_checkpoint(self.best, model, {**meta, "state": state})
        self.write_metrics()

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig) -> dict[str, Any]:
        """Restore weights, optimizer and loop state from the resume point; refuse an
        incompatible config."""
        if not self.optimizer.is_file():
            raise BadInputError(f"--resume: {self.path} holds no optimizer.safetensors to resume from")
        tensors, extra = load_resume_point(self.optimizer, optimizer)
        saved = from_dict(TrainConfig, extra["config"])
        if saved.model != config.model or saved.val_slices != config.val_slices:
            raise BadInputError(
                f"--resume: {self.path} was trained with model {saved.model} and validation slices "
                f"{saved.val_slices}; the options given differ (model {config.model}, {config.val_slices})"
            )
        getattr(model, "module", model).load_state_dict(tensors)
        self.rows = list(extra.get("rows", []))
        return extra["state"]

    def write_metrics(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
        write_bytes_atomic(self.path / "metrics.csv", buf.getvalue().encode())
        self.plot()

    def plot(self) -> None:
        """curves.png: loss, pixel accuracy and V_rand / V_info per epoch."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]

        def series(key: str) -> tuple[list, list]:
            pts = [(r["epoch"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, keys, title in (
            (axes[0], ("train_loss", "val_loss"), "loss"),
            (axes[1], ("train_accuracy", "val_accuracy"), "pixel accuracy"),
            (axes[2], ("v_rand", "v_info", "val_iou"), "validation scores"),
        ):
            for key in keys:
                x, y = series(key)
                if x:
                    ax.plot(x, y, marker="o" if len(x) < 30 else None, label=key.replace("_", " "))
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
            if epochs:
                ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        write_bytes_atomic(self.path / "curves.png", buf.getvalue())


__all__ = ["RunDir", "COLUMNS", "FORMAT"]
