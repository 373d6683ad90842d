"""emseg export writes TIFF stacks that keep the store's voxel size: an ImageJ hyperstack (what
Fiji's File > Open reads as a calibrated stack) or an OME-TIFF with physical sizes, and emseg
ingest reads either back to the same voxel size."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

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
    root = ET.fromstring(tif.ome_metadata)
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
    out = export_store(store, tmp_path / "raw.tif", fmt=fmt)
    with caplog.at_level(logging.WARNING, logger="emseg"):
        back = open_ome(ingest_stack(out, tmp_path / "back.zarr"))
    assert back.voxel_size == VOXEL  # exactly: no 50.00000000000001
    assert "voxel size" not in caplog.text and "z spacing" not in caplog.text
    np.testing.assert_array_equal(back.array[:], data)


def test_uint32_labels_export_to_imagej_when_lossless_else_ome_tiff(tmp_path, caplog):
    data = np.zeros((3, 40, 48), np.uint8)
    cells = np.arange(3 * 40 * 48, dtype=np.uint32).reshape(3, 40, 48)  # ids up to 5759
    store = _store(tmp_path / "seg.zarr", data, cells)
    out = export_store(store, tmp_path / "cells.tif", label="cells")
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and tif.series[0].dtype == np.uint16  # ImageJ has no uint32
        assert tif.imagej_metadata["spacing"] == 50.0
        np.testing.assert_array_equal(tif.asarray(), cells)

    big = cells + np.uint32(100_000)  # past uint16: float32 holds these integers exactly
    export_store(_store(tmp_path / "big.zarr", data, big), tmp_path / "big.tif", label="cells")
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_imagej and tif.series[0].dtype == np.float32
        np.testing.assert_array_equal(tif.asarray().astype(np.uint32), big)

    huge = cells + np.uint32(2**24)  # float32 would round these: OME-TIFF, uint32 kept
    with caplog.at_level(logging.WARNING, logger="emseg"):
        export_store(_store(tmp_path / "huge.zarr", data, huge), tmp_path / "huge.tif", label="cells")
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
