"""The napari plugin: the reader on real stores emseg wrote, the npe2 manifest, and the widget
predicting with a real (tiny, untrained) run in its worker. Headless: Qt's offscreen platform and
napari's ViewerModel (the viewer without its OpenGL canvas, which offscreen Qt cannot draw); where
a display is set (``xvfb-run -a pytest tests/test_napari.py``: Xvfb and Mesa draw OpenGL), the
``viewer`` fixture's tests run in a real ``napari.Viewer(show=False)`` with the widget docked."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("DISPLAY"):
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


# --- the widget people can steer: units, cancel and resume, notifications, progress ------------


@pytest.fixture()
def viewer():
    """A real ``napari.Viewer(show=False)`` where Qt can draw OpenGL (a display: Xvfb or a
    desktop), else napari's ViewerModel (offscreen Qt has no OpenGL for the canvas)."""
    from napari.components import ViewerModel

    if os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        from napari._vispy.utils.gl import get_gl_extensions

        real = napari.Viewer(show=False)
        try:
            get_gl_extensions()
        except AttributeError:  # no OpenGL after all
            real.close()
        else:
            yield real
            real.close()
            return
    yield ViewerModel()


@pytest.fixture()
def notes():
    """The napari notifications dispatched during the test."""
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def _dock(viewer, store_or_array, run: Path, **fields):
    """The Predict widget (docked in a real viewer) set to predict the image layer with ``run``."""
    from emseg.napari.widget import RUN_CHOICE, PredictWidget

    if isinstance(store_or_array, Path):
        from napari.plugins import _initialize_plugins

        _initialize_plugins()  # napari finds emseg's reader through its entry point
        viewer.open(str(store_or_array), plugin="emseg")
        layer = viewer.layers[store_or_array.stem]
    else:
        nd = store_or_array.ndim
        layer = viewer.add_image(store_or_array, name="em", scale=(50, 4, 4)[-nd:], units=("nanometer",) * nd)
    widget = PredictWidget(viewer)
    if hasattr(viewer, "window"):
        viewer.window.add_dock_widget(widget, name="Predict")
    widget.image.value = layer
    widget.model.value = RUN_CHOICE
    widget.run.value = run
    widget.device.value = "cpu"
    widget.tile.value = 64
    for name, value in fields.items():
        getattr(widget, name).value = value
    return widget, layer


def _draw(viewer) -> None:
    """Let a real viewer draw (napari checks the layers' units when its canvas draws)."""
    from qtpy.QtWidgets import QApplication

    if hasattr(viewer, "window"):
        viewer.window._qt_viewer.canvas._scene_canvas.render()
    QApplication.processEvents()


def test_the_result_layers_carry_the_image_units_and_scale(world, viewer, notes, tmp_path):
    widget, layer = _dock(viewer, world["data"], world["run"], current=True, output=str(tmp_path / "p.zarr"))
    viewer.dims.set_point(0, 100.0)  # slice 2
    widget.start()
    _wait(widget)
    assert widget.status.value.startswith("done"), widget.status.value
    _draw(viewer)  # a real viewer warns here when the layers disagree about units
    assert not [n for n in notes if "units" in str(n.message)], [n.message for n in notes]
    assert viewer.layers.extent.units is not None  # what that warning checks
    for name in ("P(cell)", "membranes"):
        out = viewer.layers[name]
        assert tuple(str(u) for u in out.units) == tuple(str(u) for u in layer.units) == ("nanometer",) * 3
        assert tuple(out.scale) == tuple(layer.scale) == (50.0, 4.0, 4.0)
        assert tuple(out.translate) == (100.0, 0.0, 0.0)  # over slice 2 of the EM
        assert tuple(out.axis_labels) == tuple(layer.axis_labels)


def test_an_in_memory_layer_keeps_its_own_units(world, viewer, tmp_path):
    import threading

    import tifffile

    from emseg.io.zarr import open_ome
    from emseg.napari.predict import _write_layer

    raw = tifffile.imread(world["raw"])
    layer = viewer.add_image(raw[1], name="slice", scale=(0.004, 0.004), units=("micrometer",) * 2)
    widget, _ = _dock(viewer, raw[2], world["run"])  # another layer; predict the micrometre one
    widget.image.value = layer
    assert widget.job().layer.nm_per_unit == pytest.approx((1000.0, 1000.0))
    _write_layer(widget.job().layer, tmp_path / "in.zarr", threading.Event())  # what predict reads
    assert tuple(open_ome(tmp_path / "in.zarr").voxel_size[1:]) == pytest.approx((4.0, 4.0))  # nanometres
    widget.start()
    _wait(widget)
    assert widget.status.value.startswith("done"), widget.status.value
    p = viewer.layers["P(cell)"]
    assert [str(u) for u in p.units] == ["micrometer", "micrometer"] and tuple(p.scale) == (0.004, 0.004)
    assert p.data.shape == raw[1].shape


@pytest.fixture(scope="module")
def stack8(tmp_path_factory) -> Path:
    """An ingested (8, 64, 64) stack: eight one-slice blocks for predict."""
    import tifffile

    from emseg.config import IngestConfig
    from emseg.io.ingest import ingest_stack
    from emseg.synthetic import synthetic_stack

    base = tmp_path_factory.mktemp("stack8")
    raw, _ = synthetic_stack((8, 64, 64), seed=1)
    tifffile.imwrite(base / "raw.tif", raw, photometric="minisblack")
    return Path(ingest_stack(base / "raw.tif", base / "stack8.zarr", IngestConfig(voxel_size=(50, 4, 4))))


def _gate_after_first_block(monkeypatch, widget) -> tuple[list, dict]:
    """While ``gate["hold"]``, hold every block but the first until Cancel is pressed (so the
    cancel lands mid-run however fast the blocks are); returns (the blocks run, the gate)."""
    import emseg.inference.predict as predict_module

    real, ran, gate = predict_module.run_block, [], {"hold": True}

    def gated(task):
        if ran and gate["hold"]:
            assert widget._stop.wait(60), "cancel was never pressed"
        ran.append(task.block.name)
        return real(task)

    monkeypatch.setattr(predict_module, "run_block", gated)
    return ran, gate


@pytest.mark.parametrize("source", ["store", "in memory"])
def test_cancel_leaves_a_resumable_output_that_resume_completes(
    source, stack8, world, viewer, notes, tmp_path, monkeypatch
):
    import zarr

    from emseg.io.zarr import open_ome

    output = tmp_path / "out.zarr"
    image = stack8 if source == "store" else np.asarray(open_ome(stack8).array)
    widget, _ = _dock(viewer, image, world["run"], output=str(output))
    ran, gate = _gate_after_first_block(monkeypatch, widget)
    worker = widget.start()
    assert widget.cancel.enabled

    def press_cancel(event) -> None:
        if event[1] >= 1 and widget.cancel.enabled:  # a block is done: press the real button
            widget.cancel.native.click()

    worker.yielded.connect(press_cancel)
    _wait(widget)
    assert widget.status.value == "cancelled" and not widget.cancel.enabled and widget.button.enabled
    partial = tmp_path / ".out.zarr.partial"
    done = {p.name for p in (partial / "done").iterdir()}
    assert not output.exists() and 1 <= len(done) < 8, done  # partial: stopped between blocks
    assert "P(cell)" not in viewer.layers
    (note,) = [n for n in notes if "cancelled" in str(n.message)]
    assert '"if output exists: resume"' in note.message and "--" not in note.message

    gate["hold"], ran[:] = False, []
    widget.existing.value = "resume"
    statuses: list[str] = []
    widget.start().yielded.connect(lambda event: statuses.append(widget.status.value))
    _wait(widget)
    assert any(re.fullmatch(r"\d/8 blocks, ETA \d+m\d\ds", line) for line in statuses), statuses
    assert widget.status.value.startswith("done"), widget.status.value
    assert len(ran) == 8 - len(done)  # only the blocks the cancelled run had not done
    assert zarr.open_group(str(output), mode="r").attrs["emseg"]["complete"] is True
    assert not partial.exists() and not list(tmp_path.glob(".out.zarr.input-*"))  # nothing left beside it
    assert viewer.layers["P(cell)"].data.shape == (8, 64, 64)


def test_progress_says_blocks_done_and_the_time_left(world, viewer):
    from emseg.progress import Eta

    widget, _ = _dock(viewer, world["data"], world["run"])
    widget._on_progress(("predict", 12, 40, 35.0, "blocks"))
    assert widget.status.value == "12/40 blocks, ETA 0m35s"
    assert (widget.progress.value, widget.progress.max) == (12, 40)
    eta = Eta()
    assert eta.update(10, 40, now=0.0) is None  # the first advance (here a resume's jump) sets the clock
    assert eta.update(12, 40, now=10.0) == pytest.approx(28 * 10 / 2)  # 2 blocks in 10 s, 28 left
    eta.start()
    assert eta.update(1, 40, now=50.0) is None


def test_widget_words_replace_the_cli_flags():
    from emseg.napari.widget import in_widget_words

    said = in_widget_words("x.zarr: already exists (use --overwrite to replace it, or --resume)")
    assert (
        said
        == 'x.zarr: already exists (use "if output exists: overwrite" to replace it, or "if output exists: resume")'
    )
    assert (
        in_widget_words("--tile 17: the model needs a multiple of 16") == '"tile" 17: the model needs a multiple of 16'
    )
    assert in_widget_words("--tiles --overwrite-all") == "--tiles --overwrite-all"  # whole flags only


def test_errors_are_notifications_in_the_widgets_words(world, viewer, notes, tmp_path, capfd, caplog, monkeypatch):
    import tifffile
    from napari.utils.notifications import ErrorNotification

    from emseg.napari.widget import PredictWidget

    def errors() -> list[str]:
        return [str(n.message) for n in notes if str(n.severity) == "error"]

    assert PredictWidget(viewer).start() is None and errors() == ["choose an image layer"]
    raw = tifffile.imread(world["raw"])[2]
    widget, _ = _dock(viewer, raw, world["run"], output=str(tmp_path / "kept.zarr"))
    widget.start()
    _wait(widget)
    assert widget.status.value.startswith("done") and len(errors()) == 1

    widget.start()  # the output exists now, and the widget refuses to replace it
    _wait(widget)
    assert len(errors()) == 2 and "already exists" in errors()[-1]
    assert '"if output exists: overwrite"' in errors()[-1] and "--" not in errors()[-1]
    widget.existing.value = "overwrite"
    widget.start()
    _wait(widget)
    assert widget.status.value.startswith("done") and len(errors()) == 2

    widget.run.value = tmp_path / "no-run"
    widget.start()
    _wait(widget)
    assert "no-run" in errors()[-1] and "no such model" in errors()[-1]

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nand a second line")

    monkeypatch.setattr("emseg.napari.predict.predict_store", broken)
    widget.run.value = world["run"]
    with caplog.at_level("DEBUG", logger="emseg.napari.widget"):
        widget.start()
        _wait(widget)
    assert errors()[-1] == "prediction failed: RuntimeError: boom"  # one line
    assert isinstance(notes[-1], ErrorNotification)  # napari's traceback button has the details
    assert any(r.exc_info and r.levelname == "DEBUG" for r in caplog.records)  # and so has the log
    # never a traceback where napari's own logging (basicConfig, WARNING) would print it on stderr
    assert not [r for r in caplog.records if r.exc_info and r.levelname != "DEBUG"]
    assert widget.button.enabled and not widget.cancel.enabled
    assert "Traceback" not in capfd.readouterr().err


def test_cancel_at_once_stops_before_any_block(world, viewer, notes):
    import tifffile

    widget, _ = _dock(viewer, tifffile.imread(world["raw"])[:2], world["run"])
    widget.start()
    widget.cancel.native.click()
    assert widget.status.value.startswith("cancelling") and not widget.cancel.enabled
    _wait(widget)
    assert widget.status.value == "cancelled" and "P(cell)" not in viewer.layers
    assert str(notes[-1].message) == "prediction cancelled"  # nothing kept: no output was asked for
