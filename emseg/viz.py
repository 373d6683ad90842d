"""Pictures for the first visual checks: a slice beside its mask, prediction and overlay, and a
training run's curves.

matplotlib with the Agg backend (no screen needed); plain numpy in, PNG out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emseg._version import __version__


def _figure(n_rows: int, n_cols: int, size: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return plt, fig, axes


def display_range(image: np.ndarray) -> tuple[float, float]:
    """0.5 and 99.5 percentiles: a robust grey-level window for any dtype."""
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1)


def overlay(
    image: np.ndarray, mask: np.ndarray, color: Sequence[float] = (0.0, 0.63, 1.0), alpha: float = 0.5
) -> np.ndarray:
    """(Y, X) image and (Y, X) bool mask -> (Y, X, 3) float RGB with the mask tinted."""
    lo, hi = display_range(image)
    grey = np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    tint = np.asarray(color, dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * tint
    return rgb


def panel_rows(
    rows: Sequence[dict[str, np.ndarray]],
    output: Path,
    titles: Sequence[str] | None = None,
    legend: Sequence[tuple[str, Sequence[float]]] = (),
) -> Path:
    """Save a grid: one row per dict, one column per (title -> (Y, X) or (Y, X, 3) array), with
    ``legend`` (name, RGB in 0-1) as coloured patches under it.

    Keys starting with "image" are shown in grey with a robust window; "prob" keys with a 0-1
    colour map and a colour bar; "mask"/"truth" keys as binary; arrays with three channels as RGB.
    Titles wrap to the panel's width and the picture is cropped to what is drawn, so no title is
    ever cut.
    """
    plt, fig = panel_figure(rows, titles)
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=(rgb[0], rgb[1], rgb[2]), edgecolor="0.3", label=name) for name, rgb in legend]
        columns = min(len(handles), 6)
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, frameon=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    # the format is given: the output may be a hidden partial whose name does not end in .png;
    # the Software text marks the file as emseg's, so --overwrite may replace it
    software = {"Software": f"emseg {__version__}"}
    fig.savefig(output, dpi=100, format="png", bbox_inches="tight", pad_inches=0.1, metadata=software)
    plt.close(fig)
    return output


def panel_figure(rows: Sequence[dict[str, np.ndarray]], titles: Sequence[str] | None = None):
    """(pyplot, figure) of :func:`panel_rows`, not yet saved."""
    import textwrap

    n_cols = max(len(r) for r in rows)
    plt, fig, axes = _figure(len(rows), n_cols)
    for i, row in enumerate(rows):
        for j, (title, arr) in enumerate(row.items()):
            ax = axes[i][j]
            if arr.ndim == 3:
                ax.imshow(arr, interpolation="nearest")
            elif title.startswith("prob") or "P(" in title:
                shown = ax.imshow(arr, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
                # in an inset beside the panel: the panel keeps the size of its neighbours
                bar = fig.colorbar(shown, cax=ax.inset_axes((1.02, 0.0, 0.04, 1.0)))
                bar.ax.tick_params(labelsize=8)
            elif arr.dtype == np.bool_ or title.startswith(("mask", "truth", "label", "membrane")):
                ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                lo, hi = display_range(arr)
                ax.imshow(arr, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(textwrap.fill(title, 38), fontsize=10)
        if titles is not None and i < len(titles):
            axes[i][0].text(-0.05, 0.5, titles[i], transform=axes[i][0].transAxes, rotation=90, ha="right", va="center")
    for ax in axes.flat:
        if not ax.images:
            ax.set_visible(False)  # a shorter row leaves no empty frame
    fig.tight_layout()
    return plt, fig


def curves_figure(rows: list[dict[str, Any]]):
    """(pyplot, figure) of the training curves of ``rows`` (metrics.csv's rows), whole epochs on x."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> tuple[list, list]:
        pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.tight_layout()
    return plt, fig


def curves_png(rows: list[dict[str, Any]]) -> bytes:
    """PNG bytes of :func:`curves_figure` (a run directory's curves.png)."""
    import io

    plt, fig = curves_figure(rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
