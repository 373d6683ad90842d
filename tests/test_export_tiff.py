"""emseg export writes TIFF stacks that keep the store's voxel size: an ImageJ hyperstack (what
Fiji's File > Open reads as a calibrated stack) or an OME-TIFF with physical sizes, and emseg
ingest reads either back to the same voxel size."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from emseg.config import ExportConfig
from emseg.io.export import ValueRange, default_format, export_store, imagej_plan
from emseg.io.ingest import ingest_stack
from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale, ngff_for, open_ome
from emseg.segmentation.labels import create_label_image

VOXEL = (50.0, 4.0, 5.0)  # y != x, so a swapped axis shows


def _store(path: Path, data: np.ndarray, cells: np.ndarray | None = None, voxel=VOXEL) -> Path:
    """A real OME-Zarr image (NGFF 0.4) of ``data``, with uint32 ``labels/cells`` when given."""
    root = create_image_store(path, "0.4")
    spec = LevelSpec(shape=data.shape, dtype=str(data.dtype), chunks=(1, 32, 32))
    create_multiscale(root, spec, voxel, "0.4", "raw")[0][:] = data
    if cells is not None:
        labels = root.require_group("labels")
        labels.attrs.update(ngff_for("0.4").wrap({"labels": ["cells"]}))
        group = labels.create_group("cells")
        cell_spec = LevelSpec(shape=cells.shape, dtype=str(cells.dtype), chunks=(1, 32, 32))
        create_label_image(group, cell_spec, voxel, "0.4", {}, in_image=True)[0][:] = cells
    return path


def _ome_pixels(tif: tifffile.TiffFile) -> dict[str, str]:
    root = ET.fromstring(tif.ome_metadata or "")
    return dict(next(el for el in root.iter() if el.tag.endswith("Pixels")).attrib)


@pytest.fixture()
def raw(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 255, (4, 40, 48), dtype=np.uint8)
    return _store(tmp_path / "raw.zarr", data), data


def test_tif_is_a_classic_imagej_hyperstack_with_spacing_and_unit(raw, tmp_path, cli):
    store, data = raw
    result = cli("export", store, "-o", tmp_path / "raw.tif", "-q")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(tmp_path / "raw.tif") as tif:
        assert tif.is_imagej and not tif.is_bigtiff and not tif.is_ome
        meta = tif.imagej_metadata
        assert meta["spacing"] == 50.0 and meta["unit"] == "nm"
        assert meta["images"] == 4 and meta["slices"] == 4
        page = tif.pages[0]
        # pixels per nm, as ImageJ reads them with unit=nm: x 5 nm, y 4 nm
        assert page.tags["XResolution"].value == (1, 5) and page.tags["YResolution"].value == (1, 4)
        assert page.compression == 1  # ImageJ hyperstacks are uncompressed
        assert page.software.startswith("emseg")
        assert tif.series[0].axes == "ZYX" and len(tif.pages) == 4
        np.testing.assert_array_equal(tif.asarray(), data)


def test_ome_tiff_carries_physical_sizes(raw, tmp_path, cli):
    store, data = raw
    result = cli("export", store, "-o", tmp_path / "raw.tif", "--format", "ome-tiff", "-q")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(tmp_path / "raw.tif") as tif:
        assert tif.is_ome and tif.is_bigtiff and not tif.is_imagej
        assert tif.pages[0].compression == 8  # zlib
        pixels = _ome_pixels(tif)
        sizes = {axis: float(pixels[f"PhysicalSize{axis}"]) for axis in "ZYX"}
        assert sizes == {"Z": 50.0, "Y": 4.0, "X": 5.0}
        assert {pixels[f"PhysicalSize{axis}Unit"] for axis in "ZYX"} == {"nm"}
        assert pixels["SizeZ"] == "4"
        np.testing.assert_array_equal(tif.asarray(), data)
    # an .ome.tif name picks OME-TIFF by itself
    assert default_format(Path("a.ome.tif")) == "ome-tiff" and default_format(Path("a.TIFF")) == "tif"
    export_store(store, tmp_path / "b.ome.tif")
    with tifffile.TiffFile(tmp_path / "b.ome.tif") as tif:
        assert tif.is_ome


@pytest.mark.parametrize("fmt", ["tif", "ome-tiff"])
def test_export_then_ingest_keeps_the_voxel_size(raw, tmp_path, fmt, caplog):
    store, data = raw
    out = export_store(store, tmp_path / "raw.tif", ExportConfig(file_format=fmt))
    with caplog.at_level(logging.WARNING, logger="emseg"):
        back = open_ome(ingest_stack(out, tmp_path / "back.zarr"))
    assert back.voxel_size == VOXEL  # exactly: no 50.00000000000001
    assert "voxel size" not in caplog.text and "z spacing" not in caplog.text
    np.testing.assert_array_equal(back.array[:], data)


def test_uint32_labels_export_to_imagej_when_lossless_else_ome_tiff(tmp_path, caplog):
    data = np.zeros((3, 40, 48), np.uint8)
    cells = np.arange(3 * 40 * 48, dtype=np.uint32).reshape(3, 40, 48)  # ids up to 5759
    store = _store(tmp_path / "seg.zarr", data, cells)
    out = export_store(store, tmp_path / "cells.tif", ExportConfig(labels="cells"))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and tif.series[0].dtype == np.uint16  # ImageJ has no uint32
        assert tif.imagej_metadata["spacing"] == 50.0
        np.testing.assert_array_equal(tif.asarray(), cells)

    big = cells + np.uint32(100_000)  # past uint16: float32 holds these integers exactly
    export_store(_store(tmp_path / "big.zarr", data, big), tmp_path / "big.tif", ExportConfig(labels="cells"))
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_imagej and tif.series[0].dtype == np.float32
        np.testing.assert_array_equal(tif.asarray().astype(np.uint32), big)

    huge = cells + np.uint32(2**24)  # float32 would round these: OME-TIFF, uint32 kept
    with caplog.at_level(logging.WARNING, logger="emseg"):
        export_store(_store(tmp_path / "huge.zarr", data, huge), tmp_path / "huge.tif", ExportConfig(labels="cells"))
    assert "OME-TIFF instead" in caplog.text and "Bio-Formats" in caplog.text
    with tifffile.TiffFile(tmp_path / "huge.tif") as tif:
        assert tif.is_ome and not tif.is_imagej and tif.series[0].dtype == np.uint32
        assert float(_ome_pixels(tif)["PhysicalSizeZ"]) == 50.0
        np.testing.assert_array_equal(tif.asarray(), huge)
    back = open_ome(ingest_stack(tmp_path / "huge.tif", tmp_path / "huge_back.zarr"))
    assert back.voxel_size == VOXEL


def test_imagej_plan_converts_only_without_loss_and_respects_the_4_gib_limit():
    def never() -> ValueRange:
        raise AssertionError("no scan for a type ImageJ has")

    assert imagej_plan((4, 8, 8), np.dtype(np.float32), never) == (np.dtype(np.float32), "")
    assert imagej_plan((4, 8, 8), np.dtype(np.float16), never)[0] == np.float32
    assert imagej_plan((4, 8, 8), np.dtype(np.int16), lambda: ValueRange(-5, 7))[0] == np.float32
    assert imagej_plan((4, 8, 8), np.dtype(np.int8), lambda: ValueRange(0, 7))[0] == np.uint8
    assert imagej_plan((4, 8, 8), np.dtype(np.uint64), lambda: ValueRange(0, 2**24 + 1))[0] is None
    assert imagej_plan((4, 8, 8), np.dtype(np.float64), lambda: ValueRange(0, 1, float32_exact=True))[0] == np.float32
    dtype, why = imagej_plan((4, 8, 8), np.dtype(np.float64), lambda: ValueRange(0, 1, float32_exact=False))
    assert dtype is None and "float32" in why
    # 2100 x 1024 x 1024 uint16 is 4.1 GiB of pixels: too much for a classic TIFF (nothing is written)
    dtype, why = imagej_plan((2100, 1024, 1024), np.dtype(np.uint16), never)
    assert dtype is None and "4 GiB" in why
    assert imagej_plan((2100, 1024, 1024), np.dtype(np.uint8), never)[0] == np.uint8


IJ_JAR = Path(os.environ.get("EMSEG_IJ_JAR", "/usr/share/java/ij.jar"))  # Debian's imagej package
OPEN_IN_IMAGEJ = """
import ij.ImagePlus;
import ij.io.Opener;
import ij.measure.Calibration;
public class OpenInImageJ {
    public static void main(String[] args) {
        ImagePlus imp = new Opener().openImage(args[0]);
        if (imp == null) { System.out.println("not opened"); return; }
        Calibration c = imp.getCalibration();
        System.out.println(imp.getBitDepth() + " " + imp.getNSlices() + " " + c.pixelWidth + " " + c.pixelHeight
            + " " + c.pixelDepth + " " + c.getUnit() + " " + imp.getStack().getProcessor(2).getPixelValue(3, 1));
    }
}
"""


@pytest.mark.skipif(shutil.which("java") is None or not IJ_JAR.is_file(), reason="needs java and ImageJ's ij.jar")
def test_imagej_itself_opens_the_export_as_a_calibrated_stack(raw, tmp_path):
    store, data = raw
    out = export_store(store, tmp_path / "raw.tif")
    source = tmp_path / "OpenInImageJ.java"
    source.write_text(OPEN_IN_IMAGEJ)
    run = subprocess.run(
        ["java", "-Djava.awt.headless=true", "-cp", str(IJ_JAR), str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    bits, slices, w, h, d, unit, value = run.stdout.split()
    assert (int(bits), int(slices), unit) == (8, 4, "nm")
    assert (float(w), float(h), float(d)) == (5.0, 4.0, 50.0)  # x, y, z
    assert float(value) == data[1, 1, 3]


# --- stores whose pixel type or extent TIFF/PNG cannot take as they are --------------------------
# each is converted with no value changed (the narrowest type of the format that holds every
# value) or refused in one line before anything is written

SHAPE = (3, 64, 64)


def _ids(dtype, first: int) -> np.ndarray:
    """(3, 64, 64) distinct IDs first, first + 1, ... of ``dtype`` (12288 of them)."""
    return (np.arange(math.prod(SHAPE), dtype=np.int64).reshape(SHAPE) + first).astype(dtype)


def _small(dtype) -> np.ndarray:
    """IDs 0..200 of ``dtype``."""
    return (np.arange(math.prod(SHAPE)).reshape(SHAPE) % 201).astype(dtype)


def _export(cli, tmp_path: Path, image: np.ndarray, cells: np.ndarray | None, out: str, *args: str):
    store = _store(tmp_path / "s.zarr", image, cells)
    labels = ("--labels", "cells") if cells is not None else ()
    return cli("export", store, *labels, "-o", tmp_path / out, "-q", *args)


def _read_back(path: Path) -> tuple[str, np.ndarray]:
    """("imagej", "ome" or "png", the pixels as written)."""
    if path.is_dir():
        from PIL import Image

        slices = sorted(path.glob("slice_*.png"))
        return "png", np.stack([np.asarray(Image.open(p)) for p in slices])
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej != tif.is_ome
        return ("imagej" if tif.is_imagej else "ome"), tif.asarray()


def _assert_one_line_refusal(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emseg: error:"), result.stderr
    assert "Traceback" not in result.output
    assert all(w in lines[0] for w in words), lines[0]


ZEROS = np.zeros(SHAPE, np.uint8)
CONVERSIONS = {
    # name: (image, labels or None, output, extra args, what is written, its pixel type)
    "int64-negative-ome": (ZEROS, _ids(np.int64, -100), "c.ome.tif", (), "ome", np.int16),
    "int64-negative-tif": (ZEROS, _ids(np.int64, -100), "c.tif", (), "imagej", np.float32),
    "int64-negative-wide-tif": (ZEROS, _ids(np.int64, -(2**30)), "c.tif", (), "ome", np.int32),
    "int64-ome": (ZEROS, _ids(np.int64, 0), "c.ome.tif", (), "ome", np.uint16),
    "int64-ome-format": (ZEROS, _ids(np.int64, 0), "c.tif", ("--format", "ome-tiff"), "ome", np.uint16),
    "int64-tif": (ZEROS, _ids(np.int64, 0), "c.tif", (), "imagej", np.uint16),
    "int64-small-ome": (ZEROS, _small(np.int64), "c.ome.tif", (), "ome", np.uint8),
    "int64-small-png": (ZEROS, _small(np.int64), "png", ("--format", "png"), "png", np.uint8),
    "int64-png": (ZEROS, _ids(np.int64, 0), "png", ("--format", "png"), "png", np.uint16),
    "uint64-small-ome": (ZEROS, _small(np.uint64), "c.ome.tif", (), "ome", np.uint8),
    "uint64-small-tif": (ZEROS, _small(np.uint64), "c.tif", (), "imagej", np.uint16),
    "uint64-small-png": (ZEROS, _small(np.uint64), "png", ("--format", "png"), "png", np.uint8),
    "uint64-32-bit-tif": (ZEROS, _ids(np.uint64, 2**32 - 2**14), "c.tif", (), "ome", np.uint32),
    "uint32-small-png": (ZEROS, _small(np.uint32), "png", ("--format", "png"), "png", np.uint8),
    "float16-image-ome": (_small(np.float16) / 8, None, "c.ome.tif", (), "ome", np.float32),
    "float16-image-tif": (_small(np.float16) / 8, None, "c.tif", (), "imagej", np.float32),
    "float16-labels-ome": (ZEROS, _small(np.float16), "c.ome.tif", (), "ome", np.float32),
    "float16-labels-tif": (ZEROS, _small(np.float16), "c.tif", (), "imagej", np.float32),
}


@pytest.mark.parametrize("case", CONVERSIONS)
def test_types_the_format_lacks_are_written_as_the_narrowest_type_that_holds_every_value(case, tmp_path, cli):
    image, cells, out, args, kind, dtype = CONVERSIONS[case]
    result = _export(cli, tmp_path, image, cells, out, *args)
    assert result.exit_code == 0, result.output
    written, back = _read_back(tmp_path / out)
    assert (written, back.dtype) == (kind, np.dtype(dtype))
    expected = image if cells is None else cells
    assert back.shape == expected.shape and np.array_equal(back, expected)  # every value, exactly
    if written == "ome":
        with tifffile.TiffFile(tmp_path / out) as tif:
            assert _ome_pixels(tif)["Type"] == {np.float32: "float"}.get(dtype, np.dtype(dtype).name)
            assert tif.pages[0].predictor == (2 if np.issubdtype(dtype, np.integer) else 1)


def test_the_tif_fallback_reads_the_store_once_and_logs_each_conversion(tmp_path, caplog):
    cells = _ids(np.uint64, 2**32 - 2**14)  # neither uint16 nor float32 holds these: OME-TIFF uint32
    store = _store(tmp_path / "s.zarr", ZEROS, cells)
    started: list[str] = []

    class Recorder:
        def start(self, description, total, unit=""):
            started.append(description)

        def advance(self, amount=1, **fields):
            pass

        def finish(self):
            pass

    with caplog.at_level(logging.INFO, logger="emseg"):
        export_store(store, tmp_path / "c.tif", ExportConfig(labels="cells"), progress=Recorder())
    assert [s.split()[0] for s in started] == ["check", "export"]  # one pass to check, one to write
    assert "OME-TIFF instead" in caplog.text and "uint64 written as uint32 for OME-TIFF" in caplog.text


REFUSALS = {
    # name: (image, labels or None, output, extra args, words the one line has)
    "uint64-64-bit-ome": (ZEROS, _ids(np.uint64, 2**40), "c.ome.tif", (), ("uint64", "64-bit", "OME-Zarr")),
    "uint64-64-bit-tif": (ZEROS, _ids(np.uint64, 2**40), "c.tif", (), ("uint64", "1099511627776", "ImageJ")),
    "uint64-64-bit-png": (ZEROS, _ids(np.uint64, 2**40), "png", ("--format", "png"), ("uint64", "PNG")),
    "int64-below-int32-tif": (ZEROS, _ids(np.int64, -(2**31) - 1), "c.tif", (), ("int64", "-2147483649")),
    "int64-negative-png": (ZEROS, _ids(np.int64, -100), "png", ("--format", "png"), ("int64", "-100", "PNG")),
    "float16-image-png": (_small(np.float16), None, "png", ("--format", "png"), ("float16", "PNG")),
    "float16-labels-png": (ZEROS, _small(np.float16), "png", ("--format", "png"), ("labels/cells", "float16")),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_values_no_type_of_the_format_holds_are_refused_in_one_line_before_writing(case, tmp_path, cli):
    image, cells, out, args, words = REFUSALS[case]
    result = _export(cli, tmp_path, image, cells, out, *args)
    _assert_one_line_refusal(result, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # nothing written, nothing partial


@pytest.mark.parametrize("where", ["image", "level 1", "labels"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_store_with_an_empty_axis_is_refused_in_one_line(where, axis, tmp_path, cli):
    root = create_image_store(tmp_path / "s.zarr", "0.4")
    spec = LevelSpec(shape=SHAPE, dtype="uint8", chunks=(1, 32, 32), pyramid_min_size=32)
    assert len(create_multiscale(root, spec, VOXEL, "0.4", "raw")) == 2
    labels = root.require_group("labels")
    labels.attrs.update(ngff_for("0.4").wrap({"labels": ["cells"]}))
    cell_spec = LevelSpec(shape=SHAPE, dtype="uint32", chunks=(1, 32, 32))
    create_label_image(labels.create_group("cells"), cell_spec, VOXEL, "0.4", {}, in_image=True)
    group, name = {"image": (root, "0"), "level 1": (root, "1"), "labels": (labels["cells"], "0")}[where]
    empty = list(group[name].shape)
    empty[axis] = 0
    group.create_array(name, shape=tuple(empty), chunks=(1, 32, 32), dtype=group[name].dtype, overwrite=True)
    for args in ((), ("--labels", "cells"), ("--format", "ome-tiff")):
        result = cli("export", tmp_path / "s.zarr", *args, "-o", tmp_path / "c.tif", "-q")
        _assert_one_line_refusal(result, "empty")
    assert not (tmp_path / "c.tif").exists()


def test_a_narrowing_cast_checks_every_value():
    from emseg.errors import EmsegRuntimeError
    from emseg.io.export import cast_exactly

    plane = np.array([[0, 70_000]], np.int64)
    assert cast_exactly(plane, np.dtype(np.uint32), "x").dtype == np.uint32
    with pytest.raises(EmsegRuntimeError, match="changed while exporting"):
        cast_exactly(plane, np.dtype(np.uint16), "x")  # the data changed since it was scanned
    assert cast_exactly(np.array([[0.1]], np.float16), np.dtype(np.float32), "x").dtype == np.float32
