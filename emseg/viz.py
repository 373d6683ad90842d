"""Pictures for the first visual checks: a slice beside its mask, prediction and overlay.

matplotlib with the Agg backend (no screen needed); plain numpy in, PNG out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emseg._version import __version__


def _figure(n_rows: int, n_cols: int, size: float = 4.0):  # type: ignore[no-untyped-def]
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


def panel_rows(rows: Sequence[dict[str, np.ndarray]], output: Path, titles: Sequence[str] | None = None) -> Path:
    """Save a grid: one row per dict, one column per (title -> (Y, X) or (Y, X, 3) array).

    Keys starting with "image" are shown in grey with a robust window; "prob" keys with a 0-1
    colour map; "mask"/"truth" keys as binary; arrays with three channels as RGB.
    """
    n_cols = max(len(r) for r in rows)
    plt, fig, axes = _figure(len(rows), n_cols)
    for i, row in enumerate(rows):
        for j, (title, arr) in enumerate(row.items()):
            ax = axes[i][j]
            if arr.ndim == 3:
                ax.imshow(arr, interpolation="nearest")
            elif title.startswith("prob") or "P(" in title:
                ax.imshow(arr, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            elif arr.dtype == np.bool_ or title.startswith(("mask", "truth", "label", "membrane")):
                ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                lo, hi = display_range(arr)
                ax.imshow(arr, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            label = title if titles is None or i else f"{title}"
            ax.set_title(label, fontsize=10)
        if titles is not None and i < len(titles):
            axes[i][0].text(-0.05, 0.5, titles[i], transform=axes[i][0].transAxes, rotation=90, ha="right", va="center")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    # the format is given: the output may be a hidden partial whose name does not end in .png;
    # the Software text marks the file as emseg's, so --overwrite may replace it
    fig.savefig(output, dpi=100, format="png", metadata={"Software": f"emseg {__version__}"})
    plt.close(fig)
    return output
