"""The napari plugin: the reader on real stores emseg wrote, the npe2 manifest, and the widget
predicting with a real (tiny, untrained) run in its worker. Headless: Qt's offscreen platform and
napari's ViewerModel (the viewer without its OpenGL canvas, which offscreen Qt cannot draw)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before anything imports Qt

napari = pytest.importorskip("napari")

from emseg.napari.reader import get_reader, read_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tiny_run(run: Path, raw: np.ndarray) -> Path:
    """A run directory with an untrained tiny U-Net, written the way training writes it."""
    from emseg.config import ModelConfig, TrainConfig
    from emseg.models.build import build_model
    from emseg.models.checkpoint import save_checkpoint
    from emseg.training.run_dir import RunDir

    config = TrainConfig(model=ModelConfig(depth=2, base_channels=4), crop=32, batch_size=2, device="cpu")
    model = build_model(config.model)
    meta = RunDir(run).meta(
        config,
        {
            "normalization": {"mean": float(raw.mean()), "std": float(raw.std())},
            "halo": int(model.halo),
            "divisor": int(model.divisor),
        },
    )
    run.mkdir()
    save_checkpoint(run / "best.safetensors", model, meta)
    (run / "config.json").write_text(json.dumps(meta))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Stores emseg wrote: an ingested stack with labels, a prediction of slices 1:3 (segmented
    into it), a stand-alone segmentation, and the run that predicted them."""
    import tifffile

    from emseg.config import IngestConfig, PredictConfig, SegmentConfig
    from emseg.inference.predict import predict_store
    from emseg.io.ingest import ingest_stack
    from emseg.segmentation.segment import segment_store
    from emseg.synthetic import synthetic_stack

    base = tmp_path_factory.mktemp("napari")
    raw, labels = synthetic_stack((4, 96, 96), seed=0)
    tifffile.imwrite(base / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(base / "lab.tif", labels, photometric="minisblack")
    data = ingest_stack(
        base / "raw.tif", base / "data.zarr", IngestConfig(voxel_size=(50, 4, 4)), labels=base / "lab.tif"
    )
    run = _tiny_run(base / "run", raw)
    pred = predict_store(run, data, base / "pred.zarr", PredictConfig(tile=64, overlap=16, device="cpu", slices=(1, 3)))
    cells = segment_store(pred, base / "cells.zarr", SegmentConfig())
    segment_store(pred, None, SegmentConfig(into=True))
    return {"data": Path(data), "pred": Path(pred), "cells": Path(cells), "run": run, "raw": base / "raw.tif"}


def _by_name(layers):
    return {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in layers}


# --- the reader --------------------------------------------------------------------------------


def test_an_image_store_opens_as_the_em_with_its_labels_visible(world):
    layers = read_store(str(world["data"]))
    assert [(k["name"], kind) for _, k, kind in layers] == [("data", "image"), ("cells", "labels")]
    (em, em_kw, _), (cells, cells_kw, _) = layers
    assert em_kw["colormap"] == "gray" and em_kw["scale"] == [50.0, 4.0, 4.0]
    assert em_kw["units"] == ("nanometer",) * 3 and em_kw["axis_labels"] == ("z", "y", "x")
    assert em.shape == (4, 96, 96) and cells.shape == (4, 96, 96)  # lazy dask arrays of the store
    assert em_kw["contrast_limits"][0] < em_kw["contrast_limits"][1]
    assert cells_kw["visible"] is True and cells_kw["opacity"] > 0
    assert cells_kw["colormap"][1][3] > 0 and cells_kw["colormap"][0] == "transparent"  # image-label colours


def test_a_prediction_store_shows_p_cell_translucent_above_its_em(world):
    layers = read_store(str(world["pred"]))
    assert [(k["name"], kind) for _, k, kind in layers] == [
        ("data", "image"),  # the EM the prediction was made from, found through its provenance
        ("P(cell)", "image"),
        ("membranes", "labels"),
        ("cells", "labels"),  # segment --into
    ]
    by = _by_name(layers)
    p_data, p_kw, _ = by["P(cell)"]
    assert p_kw["visible"] and 0.3 <= p_kw["opacity"] <= 0.6 and p_kw["blending"] in ("translucent", "additive")
    assert p_kw["colormap"] != "gray" and p_kw["contrast_limits"] == [0.0, 255.0]
    assert p_data.shape == (2, 96, 96)
    # slices 1:3 sit over slices 1 and 2 of the EM: one voxel (50 nm) down in z
    assert by["data"][1]["translate"] == [0.0, 0.0, 0.0]
    assert p_kw["translate"] == [50.0, 0.0, 0.0] and by["membranes"][1]["translate"] == [50.0, 0.0, 0.0]
    assert all(by[n][1]["visible"] for n in ("membranes", "cells"))
    assert by["cells"][0].dtype in (np.uint32, np.uint64)


def test_a_segmentation_store_shows_its_cells_over_the_em(world):
    layers = read_store(str(world["cells"]))
    assert [(k["name"], kind) for _, k, kind in layers] == [
        ("data", "image"),
        ("P(cell)", "image"),
        ("cells", "labels"),
    ]
    by = _by_name(layers)
    assert by["P(cell)"][1]["visible"] is False and by["cells"][1]["visible"] is True
    assert by["cells"][1]["scale"] == [50.0, 4.0, 4.0]


def test_a_moved_source_leaves_the_prediction_on_its_own(world, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(world["pred"], copy)
    attrs_file = copy / ".zattrs"
    attrs = json.loads(attrs_file.read_text())
    attrs["emseg"]["data"] = str(tmp_path / "gone.zarr")
    attrs_file.write_text(json.dumps(attrs))
    assert [k["name"] for _, k, _ in read_store(str(copy))] == ["P(cell)", "membranes", "cells"]


def test_the_reader_declines_what_it_cannot_open(world, tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("a", shape=(4,), dtype="uint8")
    assert get_reader(str(world["data"])) is read_store
    assert get_reader([str(world["pred"])]) is read_store
    assert get_reader(str(tmp_path / "plain.zarr")) is None  # a zarr group without multiscales
    assert get_reader(str(world["raw"])) is None
    assert get_reader([str(world["data"]), str(world["pred"])]) is None


# --- the manifest and napari's plugin manager --------------------------------------------------


def test_the_manifest_is_valid_and_napari_finds_the_reader(world):
    from napari.components import ViewerModel
    from napari.plugins import _initialize_plugins, _npe2
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(REPO / "emseg" / "napari.yaml")  # validates
    assert manifest.name == "emseg" and manifest.contributions.readers[0].filename_patterns == ["*.zarr"]
    assert [w.display_name for w in manifest.contributions.widgets] == ["Predict"]
    _initialize_plugins()
    assert "emseg" in _npe2.get_readers(str(world["pred"]))  # the installed entry point
    viewer = ViewerModel()
    viewer.open(str(world["pred"]), plugin="emseg")
    assert [layer.name for layer in viewer.layers] == ["data", "P(cell)", "membranes", "cells"]
    p = viewer.layers["P(cell)"]
    assert p.visible and p.opacity < 1 and tuple(p.scale) == (50.0, 4.0, 4.0)
    assert all(viewer.layers[n].visible for n in ("membranes", "cells"))
    assert str(viewer.layers["data"].units[0]) == "nanometer"


# --- the widget ---------------------------------------------------------------------------------


def _wait(widget, timeout: float = 120) -> None:
    """Process Qt events until the widget's worker has finished (its signals arrive queued)."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while widget.worker is not None:
        QApplication.processEvents()
        assert time.monotonic() < deadline, "the prediction worker did not finish"
        time.sleep(0.02)
    QApplication.processEvents()


def test_the_widget_predicts_an_image_layer_in_a_worker(world):
    import tifffile
    from napari.components import ViewerModel

    from emseg.napari.widget import RUN_CHOICE, PredictWidget

    viewer = ViewerModel()
    raw = tifffile.imread(world["raw"])
    layer = viewer.add_image(raw[2], name="slice", scale=(4, 4), translate=(8, 0))
    widget = PredictWidget(viewer)
    widget.image.value = layer
    widget.model.value = RUN_CHOICE
    widget.run.value = world["run"]
    widget.device.value = "cpu"
    widget.tile.value = 64
    worker = widget.start()
    assert worker is not None and not widget.button.enabled
    _wait(widget)
    assert widget.status.value.startswith("done"), widget.status.value
    assert widget.button.enabled and widget.progress.value == widget.progress.max > 0
    p, membranes = viewer.layers["P(cell)"], viewer.layers["membranes"]
    assert p.data.shape == membranes.data.shape == raw[2].shape
    assert p.data.dtype == np.uint8 and set(np.unique(membranes.data)) <= {0, 1}
    assert tuple(p.scale) == (4.0, 4.0) and tuple(p.translate) == (8.0, 0.0)
    assert np.array_equal(membranes.data, (p.data < 128).astype(np.uint8))  # threshold 0.5
    assert p.opacity < 1 and membranes.visible


def test_the_widget_predicts_the_shown_slice_of_a_store_layer(world, tmp_path):
    from napari.components import ViewerModel

    from emseg.napari.widget import RUN_CHOICE, PredictWidget

    viewer = ViewerModel()
    viewer.open(str(world["data"]), plugin="emseg")
    viewer.dims.set_point(0, 150.0)  # slice 3
    widget = PredictWidget(viewer)
    assert [name for name, _ in widget._image_layers()] == ["data"]
    widget.image.value = viewer.layers["data"]
    widget.model.value = RUN_CHOICE
    widget.run.value = world["run"]
    widget.device.value = "cpu"
    widget.tile.value = 64
    widget.current.value = True
    widget.output.value = str(tmp_path / "kept.zarr")
    assert widget.job().slices == (3, 4)
    widget.start()
    _wait(widget)
    assert widget.status.value.startswith("done"), widget.status.value
    p = viewer.layers["P(cell)"]
    assert p.data.shape == (1, 96, 96) and tuple(p.translate) == (150.0, 0.0, 0.0)
    assert (tmp_path / "kept.zarr" / "labels" / "membranes").is_dir()  # the store stays


def test_the_widget_says_what_is_wrong_in_one_line(world, tmp_path):
    from napari.components import ViewerModel

    from emseg.napari.widget import RUN_CHOICE, PredictWidget

    viewer = ViewerModel()
    widget = PredictWidget(viewer)
    assert widget.start() is None and widget.status.value == "choose an image layer"
    viewer.add_image(np.zeros((32, 32), np.uint8))
    widget.image.value = viewer.layers[0]
    widget.model.value = RUN_CHOICE
    widget.run.value = tmp_path / "no-run"
    assert widget.start() is not None
    _wait(widget)
    assert "no-run" in widget.status.value and "Traceback" not in widget.status.value
    assert widget.button.enabled and "P(cell)" not in viewer.layers
