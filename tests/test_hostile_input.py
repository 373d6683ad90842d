"""Hostile input, round two (issues 25 and 30): one test per finding.

Each case builds the hostile file or path for real (TIFF files whose metadata lies, FIFOs,
symbolic links, stores and prediction maps), runs the command a user would, and checks that the
result is either correct (a whole stack) or one ``emseg: error:`` line with exit code 2, with
nothing written and every pre-existing byte unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tests.test_safety import tree_digest

RAW_SHAPE = (10, 64, 64)


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    from emseg.synthetic import synthetic_stack

    return synthetic_stack(RAW_SHAPE, seed=3)[0]


def one_line_refusal(result, *says: str) -> str:
    """The stderr of a refused command, after checking it is one line, exit 2, no traceback."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("emseg: error:") and "\n" not in message, message
    assert "Traceback" not in result.output
    for word in says:
        assert word in message, message
    return message


def ingested(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path / "0"), mode="r"))


# --- never a shorter stack than the file holds ------------------------------------------------


def _page_per_series(path: Path, raw: np.ndarray, **kw) -> None:
    with tifffile.TiffWriter(path, bigtiff=kw.pop("bigtiff", False)) as tw:
        for z, plane in enumerate(raw):
            extra = kw(z) if callable(kw.get("each")) else kw
            tw.write(plane, photometric="minisblack", **{k: v for k, v in extra.items() if k != "each"})


def _writers(raw: np.ndarray):
    def shaped(path):  # tifffile's default: each page its own "shaped" series
        with tifffile.TiffWriter(path) as tw:
            for plane in raw:
                tw.write(plane, photometric="minisblack")

    def bigtiff_tiled(path):
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for plane in raw:
                tw.write(plane, photometric="minisblack", tile=(32, 32), compression="zlib")

    def mixed_storage(path):  # pages stored differently: read page by page
        with tifffile.TiffWriter(path) as tw:
            for z, plane in enumerate(raw):
                tw.write(plane, photometric="minisblack", compression="zlib" if z % 2 else None)

    def ome_two_images(path):
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(raw[:4], metadata={"axes": "ZYX"})
            tw.write(raw[4:], metadata={"axes": "ZYX"})

    def imagej_frames(path):  # an ImageJ hyperstack with time: every frame's slices, frame by frame
        tifffile.imwrite(path, raw.reshape(2, 5, *raw.shape[1:]), imagej=True, metadata={"axes": "TZYX"})

    return {
        "shaped": shaped,
        "bigtiff-tiled": bigtiff_tiled,
        "mixed-storage": mixed_storage,
        "ome-two-images": ome_two_images,
        "imagej-frames": imagej_frames,
    }


@pytest.mark.parametrize("kind", ["shaped", "bigtiff-tiled", "mixed-storage", "ome-two-images", "imagej-frames"])
def test_a_tiff_whose_pages_form_one_stack_ingests_whole(tmp_path, cli, raw, kind):
    source = tmp_path / ("s.ome.tif" if kind.startswith("ome") else "s.tif")
    _writers(raw)[kind](source)
    result = cli("ingest", source, "-o", tmp_path / "s.zarr", "-q")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(ingested(tmp_path / "s.zarr"), raw)


def test_series_that_differ_are_an_error_naming_them_and_series_picks_one(tmp_path, cli, raw):
    source = tmp_path / "two.tif"
    with tifffile.TiffWriter(source) as tw:
        tw.write(raw[:5], photometric="minisblack")
        tw.write(raw[0, :32, :32], photometric="minisblack")
    one_line_refusal(cli("ingest", source, "-o", tmp_path / "a.zarr"), "2 series", "(5, 64, 64)", "--series")
    assert not (tmp_path / "a.zarr").exists()
    assert cli("ingest", source, "-o", tmp_path / "b.zarr", "--series", "1", "-q").exit_code == 0
    np.testing.assert_array_equal(ingested(tmp_path / "b.zarr"), raw[:1, :32, :32])
    one_line_refusal(cli("ingest", source, "-o", tmp_path / "c.zarr", "--series", "2"), "--series 2")


def test_channels_are_refused_and_channel_picks_one(tmp_path, cli, raw):
    source = tmp_path / "zc.tif"
    tifffile.imwrite(source, np.stack([raw, 255 - raw], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    one_line_refusal(cli("ingest", source, "-o", tmp_path / "a.zarr"), "2 channels", "--channel")
    assert cli("ingest", source, "-o", tmp_path / "b.zarr", "--channel", "1", "-q").exit_code == 0
    np.testing.assert_array_equal(ingested(tmp_path / "b.zarr"), 255 - raw)


def test_a_slice_folder_file_holding_several_pages_is_refused(tmp_path, cli, raw):
    folder = tmp_path / "slices"
    folder.mkdir()
    tifffile.imwrite(folder / "0.tif", raw[0], photometric="minisblack")
    _writers(raw[:3])["shaped"](folder / "1.tif")  # three pages, each its own series
    one_line_refusal(cli("ingest", folder, "-o", tmp_path / "a.zarr"), "1.tif", "3 pages")
    assert not (tmp_path / "a.zarr").exists()


def _ome(size_z: int, tiffdata: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" SizeX="64" SizeY="64" '
        f'SizeZ="{size_z}" SizeC="1" SizeT="1" PhysicalSizeX="4" PhysicalSizeY="4" PhysicalSizeZ="50">'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="1"/>{tiffdata}</Pixels></Image></OME>'
    )


def _imagej(images: int) -> str:
    return f"ImageJ=1.53t\nimages={images}\nslices={images}\nunit=nm\nspacing=50\nloop=false\n"


def _three_pages(path: Path, raw: np.ndarray, description: str) -> None:
    with tifffile.TiffWriter(path) as tw:
        for z in range(3):
            tw.write(raw[z], description=description if z == 0 else None, metadata=None, photometric="minisblack")


LYING_HEADERS = {
    "OME SizeZ=9 over 3 pages": ("x.ome.tif", _ome(9, '<TiffData IFD="0" PlaneCount="9"/>'), "9 planes"),
    "OME SizeZ=9, no TiffData": ("x.ome.tif", _ome(9, ""), "9 planes"),
    "OME SizeZ=2**31-1": ("x.ome.tif", _ome(2**31 - 1, "<TiffData/>"), "2147483647"),
    "ImageJ images=9 over 3 pages": ("x.tif", _imagej(9), "9 images"),
    "ImageJ images=2 over 3 pages": ("x.tif", _imagej(2), "2 images"),
    "ImageJ images=2**31-1": ("x.tif", _imagej(2**31 - 1), "2147483647"),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_the_file_not_its_header_says_how_big_the_stack_is(tmp_path, raw, case):
    """Run in a subprocess under an address-space limit: a header that made emseg allocate by it
    (2**31 planes) fails with MemoryError instead of taking the machine down."""
    name, description, says = LYING_HEADERS[case]
    source = tmp_path / name
    _three_pages(source, raw, description)
    code = (
        "import resource, sys; from emseg.cli import main; "
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
        f"sys.argv = ['emseg', 'ingest', {str(source)!r}, '-o', {str(tmp_path / 'o.zarr')!r}]; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip()
    assert message.startswith("emseg: error:") and "\n" not in message and says in message, message
    assert [p.name for p in tmp_path.iterdir()] == [name]


# --- never block on what cannot end -------------------------------------------------------------


@pytest.fixture()
def deadline():
    """Fail instead of hanging: an alarm interrupts a blocking open() after 20 s."""

    def expired(signum, frame):
        raise TimeoutError("the command blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _world(tmp_path: Path, raw: np.ndarray) -> dict[str, Path]:
    from emseg.config import IngestConfig, PredictConfig
    from emseg.inference.predict import predict_store
    from emseg.io.ingest import ingest_stack
    from tests.test_safety import _tiny_run

    tifffile.imwrite(tmp_path / "raw.tif", raw[:3], photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", (raw[:3] > 100).astype(np.uint8), photometric="minisblack")
    data = ingest_stack(tmp_path / "raw.tif", tmp_path / "data.zarr", IngestConfig(voxel_size=(50, 4, 4)),
                        labels=tmp_path / "lab.tif")  # fmt: skip
    run = _tiny_run(tmp_path / "run", raw[:3])
    pred = predict_store(run, data, tmp_path / "pred.zarr", PredictConfig(tile=32, overlap=8, device="cpu"))
    return {"raw": tmp_path / "raw.tif", "labels": tmp_path / "lab.tif", "data": data, "run": run, "pred": pred}


@pytest.fixture(scope="module")
def world(tmp_path_factory, raw) -> dict[str, Path]:
    return _world(tmp_path_factory.mktemp("hostile"), raw)


FIFO_CASES = {
    "ingest source": lambda w, f: ["ingest", f, "-o", "{out}"],
    "ingest labels": lambda w, f: ["ingest", w["raw"], "--labels", f, "-o", "{out}"],
    "predict checkpoint": lambda w, f: ["predict", f, w["data"], "-o", "{out}"],
    "evaluate prediction": lambda w, f: ["evaluate", f, w["data"]],
    "export-model checkpoint": lambda w, f: ["export-model", f, "-o", "{out}"],
}


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_a_fifo_given_as_an_input_is_refused_before_it_is_opened(world, tmp_path, cli, deadline, case):
    fifo = tmp_path / ("in.safetensors" if "checkpoint" in case else "in.tif")
    os.mkfifo(fifo)
    argv = [str(a).replace("{out}", str(tmp_path / "out")) for a in FIFO_CASES[case](world, fifo)]
    one_line_refusal(cli(*argv), "FIFO")
    assert not (tmp_path / "out").exists()


def test_fifos_inside_a_run_directory_or_a_store_are_refused(world, tmp_path, cli, deadline):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "best.safetensors")
    one_line_refusal(cli("predict", run, world["data"], "-o", tmp_path / "p.zarr"), "FIFO")
    store = tmp_path / "s.zarr"
    shutil.copytree(world["data"], store)
    (store / ".zattrs").unlink()
    os.mkfifo(store / ".zattrs")
    one_line_refusal(cli("info", store), "FIFO")
    (store / ".zattrs").unlink()
    shutil.copy(world["data"] / ".zattrs", store / ".zattrs")
    (store / "0" / ".zarray").unlink()
    os.mkfifo(store / "0" / ".zarray")
    one_line_refusal(cli("info", store), "FIFO")


# --- segment: its map checked as evaluate checks it, --into only into a prediction ------------


def test_segment_into_a_store_that_is_not_a_prediction_is_refused_untouched(world, tmp_path, cli):
    store = tmp_path / "raw.zarr"
    assert cli("ingest", world["raw"], "-o", store, "-q").exit_code == 0  # no labels: the finding's store
    before = tree_digest(tmp_path)
    one_line_refusal(cli("segment", store, "--into", store), "emseg ingest", "-o")
    assert tree_digest(tmp_path) == before


def test_segment_into_a_prediction_without_labels_lists_its_cells(world, tmp_path, cli):
    pred = tmp_path / "pred.zarr"
    shutil.copytree(world["pred"], pred)
    shutil.rmtree(pred / "labels")
    assert cli("segment", pred, "--into", pred, "-q").exit_code == 0
    listed = json.loads((pred / "labels" / ".zattrs").read_text())["labels"]
    assert listed == ["cells"]
    from emseg.io.zarr import open_ome

    assert "cells" in open_ome(pred).labels


def _float_map(path: Path, values: np.ndarray) -> Path:
    from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale

    root = create_image_store(path, "0.4", attrs={"emseg": {"command": "predict"}})
    spec = LevelSpec(shape=values.shape, dtype=str(values.dtype), chunks=(1, 32, 32))
    create_multiscale(root, spec, (50, 4, 4), "0.4", "probabilities")[0][:] = values
    return path


@pytest.mark.parametrize("poison", ["nan", "inf", "0-255", "negative"])
def test_segment_refuses_a_map_evaluate_refuses(world, tmp_path, cli, poison):
    values = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    if poison == "nan":
        values[2, 50, 50] = np.nan  # not in the first slice: the check covers more than a corner
    elif poison == "inf":
        values[1, 3, 3] = np.inf
    elif poison == "0-255":
        values *= 255
    else:
        values[0, 10, 10] = -0.5
    store = _float_map(tmp_path / "m.zarr", values)
    one_line_refusal(cli("segment", store, "-o", tmp_path / "s.zarr"), "P(cell)")
    evaluated = cli("evaluate", store, world["data"])
    assert evaluated.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]  # nothing left behind


def test_segment_checks_every_block_not_only_a_sample(tmp_path):
    """A NaN the up-front sample cannot see (only in level 0: the coarse level was written
    clean) is refused when its block is read."""
    from emseg.config import SegmentConfig
    from emseg.errors import BadInputError
    from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale
    from emseg.segmentation.segment import segment_store

    values = np.random.default_rng(0).random((2, 2048, 2048)).astype(np.float32)
    root = create_image_store(tmp_path / "m.zarr", "0.4", attrs={"emseg": {"command": "predict"}})
    spec = LevelSpec(shape=values.shape, dtype="float32", chunks=(1, 1024, 1024), pyramid_min_size=1024)
    levels = create_multiscale(root, spec, (50, 4, 4), "0.4", "probabilities")
    levels[1][:] = values[:, ::2, ::2]
    values[1, 2000, 2000] = np.nan
    levels[0][:] = values
    with pytest.raises(BadInputError, match="NaN"):
        segment_store(tmp_path / "m.zarr", tmp_path / "s.zarr", SegmentConfig(block=1024, threads=1))


def test_segment_resume_on_a_complete_output_made_otherwise_is_an_error(world, tmp_path, cli):
    out = tmp_path / "s.zarr"
    assert cli("segment", world["pred"], "-o", out, "-q").exit_code == 0
    assert cli("segment", world["pred"], "-o", out, "--resume", "-q").exit_code == 0  # same: nothing to do
    message = one_line_refusal(cli("segment", world["pred"], "-o", out, "--resume", "--merge-threshold", "0.3"))
    assert "other settings" in message


def test_a_damaged_resume_record_is_refused_not_trusted_to_size_arrays(world, tmp_path, monkeypatch):
    """An interrupted segmentation whose faces file was altered (an object count of 10**12)
    must not size the stitching's arrays by it."""
    import emseg.segmentation.segment as seg
    from emseg.config import SegmentConfig
    from emseg.errors import BadInputError

    out = tmp_path / "s.zarr"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived after the first pass: the partial is kept

    monkeypatch.setattr(seg, "_stitch", interrupted)
    config = SegmentConfig(block=32, threads=1)
    with pytest.raises(KeyboardInterrupt):
        seg.segment_store(world["pred"], out, config)
    monkeypatch.undo()
    faces = sorted((tmp_path / ".s.zarr.partial" / "faces").glob("*.npz"))
    assert faces
    with np.load(faces[0]) as data:
        arrays = dict(data)
    arrays["count"] = np.int64(10**12)
    np.savez(faces[0], **arrays)
    with pytest.raises(BadInputError, match="run again without --resume"):
        seg.segment_store(world["pred"], out, SegmentConfig(block=32, threads=1, resume=True))


# --- unwritable destinations are one line ---------------------------------------------------


PROC_COMMANDS = {
    "ingest": lambda w, o: ["ingest", w["raw"], "-o", o],
    "predict": lambda w, o: ["predict", w["run"], w["data"], "-o", o, "--tile", "32", "--overlap", "8"],
    "segment": lambda w, o: ["segment", w["pred"], "-o", o],
    "export": lambda w, o: ["export", w["pred"], "-o", o],
    "train": lambda w, o: ["train", w["data"], "-o", o, "--epochs", "1", "--steps-per-epoch", "1"],
    "show": lambda w, o: ["show", w["data"], "-o", o],
    "evaluate --json": lambda w, o: ["evaluate", w["pred"], w["data"], "--json", o],
    "export-model": lambda w, o: ["export-model", w["run"], "-o", o],
    "augment-preview": lambda w, o: ["augment-preview", w["data"], "-o", o, "--crop", "32", "-n", "1"],
}


PROC_COMMANDS["demo"] = lambda w, o: ["demo", "-o", o, "--device", "cpu", "--minutes", "0.01"]
PROC_COMMANDS["bench --json"] = lambda w, o: ["bench", "--quick", "--no-monai", "--json", o]
_NAMES = {"export": "x.tif", "show": "x.png", "evaluate --json": "x.json", "augment-preview": "x.png",
          "bench --json": "x.json", "export-model": "model", "train": "run", "demo": "demo"}  # fmt: skip


@pytest.mark.parametrize("command", sorted(PROC_COMMANDS))
def test_an_output_under_proc_is_one_line(world, cli, command):
    target = Path("/proc") / _NAMES.get(command, "x.zarr")
    one_line_refusal(cli(*PROC_COMMANDS[command](world, target), "-q"))


def _refusing(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Make ``folder`` refuse new files and folders with OSError ``code`` (EROFS: a read-only
    mount; EACCES: no permission), whoever runs the test (root passes every permission check)."""
    import errno

    for name in ("open", "mkdir"):
        real = getattr(os, name)

        def refusing(path, *args, _real=real, **kwargs):
            if str(folder) in os.path.abspath(os.fsdecode(path)):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refusing)
    assert code in (errno.EROFS, errno.EACCES)


#: Destinations no command can write, each as (the parent of the output, what makes it so).
UNWRITABLE = ["missing parent under /proc", "under /sys", "parent is a file", "read-only mount", "permission denied"]


@pytest.mark.parametrize("kind", UNWRITABLE)
@pytest.mark.parametrize("command", sorted(PROC_COMMANDS))
def test_an_unwritable_destination_is_one_line_before_any_work(
    world, tmp_path, cli, monkeypatch, deadline, command, kind
):
    """Every command that writes refuses a destination it cannot write, of every kind, in one line
    (exit 2, no traceback), before its work (the up-front check creates and removes one file)."""
    import errno

    parent = {
        "missing parent under /proc": Path("/proc") / "emseg-missing" / "sub",
        "under /sys": Path("/sys"),
        "parent is a file": tmp_path / "file",
        "read-only mount": tmp_path / "ro" / "sub",
        "permission denied": tmp_path / "denied",
    }[kind]
    if kind == "under /sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    if kind == "parent is a file":
        parent.write_text("a file\n")
    if kind in ("read-only mount", "permission denied"):
        parent.parent.mkdir(exist_ok=True)
        if kind == "permission denied":
            parent.mkdir()
        code = errno.EROFS if kind == "read-only mount" else errno.EACCES
        _refusing(monkeypatch, parent.parent if kind == "read-only mount" else parent, code)
    target = parent / _NAMES.get(command, "x.zarr")
    message = one_line_refusal(cli(*PROC_COMMANDS[command](world, target), "-q"))
    assert "emseg-probe" not in message and not target.exists()


# --- scheduler addresses are checked before anything is written -----------------------------


@pytest.mark.parametrize("address", ["garbage", "file:///etc/passwd", "tcp://localhost", "tcp://127.0.0.1:1"])
@pytest.mark.parametrize("command", ["predict", "segment"])
def test_a_bad_scheduler_is_one_line_before_any_partial(world, tmp_path, cli, command, address):
    out = tmp_path / "o.zarr"
    argv = PROC_COMMANDS[command](world, out) + ["--scheduler", address]
    one_line_refusal(cli(*argv), "--scheduler")
    assert list(tmp_path.iterdir()) == []


# --- a store's shape passes the same bound as a TIFF's pages -----------------------------------


@pytest.mark.parametrize("shape", [(1, 70000, 70000), (2**24 + 1, 64, 64)], ids=["huge slice", "too many slices"])
@pytest.mark.parametrize("command", ["info", "show", "segment", "evaluate", "export"])
def test_a_store_whose_shape_exceeds_the_bound_is_refused_from_its_metadata(world, tmp_path, cli, shape, command):
    """Metadata alone (no chunk written): every command refuses it in one line when it opens it,
    before a slice sized by it is allocated."""
    from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale

    store = tmp_path / "big.zarr"
    root = create_image_store(store, "0.4", attrs={"emseg": {"command": "predict"}})
    spec = LevelSpec(shape=shape, dtype="uint8", chunks=(1, 4096, 4096), pyramid_min_size=max(shape[1:]))
    create_multiscale(root, spec, (50, 4, 4), "0.4", "probabilities")
    argv = {
        "info": ["info", store],
        "show": ["show", store, "-o", tmp_path / "v.png"],
        "segment": ["segment", store, "-o", tmp_path / "s.zarr"],
        "evaluate": ["evaluate", store, world["data"]],
        "export": ["export", store, "-o", tmp_path / "x.tif"],
    }[command]
    one_line_refusal(cli(*argv), "big.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zarr"]
