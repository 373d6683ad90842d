"""The pictures people look at: colour bars for probabilities, titles that are never cut,
whole epochs on the training curves."""

from __future__ import annotations

import numpy as np
from PIL import Image

from emseg.viz import curves_figure, panel_figure, panel_rows


def test_probability_panels_have_a_colour_bar_and_long_titles_wrap(tmp_path):
    rng = np.random.default_rng(0)
    image, prob = rng.integers(0, 255, (64, 64), dtype=np.uint8), rng.random((64, 64), dtype=np.float32)
    long = "overlay: predicted membranes over the EM of slice 27, threshold 0.5"
    plt, fig = panel_figure([{"image (slice 27)": image, "prob: P(cell)": prob, long: np.zeros((64, 64, 3))}])
    try:
        images = [im for ax in fig.axes for im in ax.get_images()]
        bars = [im.colorbar for im in images if im.colorbar is not None]
        assert len(images) == 3 and len(bars) == 1  # only the probability panel has one
        assert (bars[0].vmin, bars[0].vmax) == (0.0, 1.0) and bars[0].mappable.get_cmap().name == "magma"
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert all(max(len(line) for line in t.splitlines()) <= 38 for t in titles) and len(titles) == 3
        assert "\n" in next(t for t in titles if t.startswith("overlay"))
        # every drawn text lies inside the saved picture (saved cropped to what is drawn)
        renderer = fig.canvas.get_renderer()
        box = fig.get_tightbbox(renderer)
        for ax in fig.axes:
            if ax.get_title():
                assert box.contains(*ax.title.get_window_extent(renderer).min / fig.dpi)
    finally:
        plt.close(fig)
    out = panel_rows([{"image (slice 27)": image, "prob: P(cell)": prob}], tmp_path / "p.png")
    assert Image.open(out).info.get("Software", "").startswith("emseg")


def test_training_curves_count_whole_epochs():
    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "v_rand": 0.9 + e / 100} for e in range(3)]
    plt, fig = curves_figure(rows)
    try:
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
    finally:
        plt.close(fig)
