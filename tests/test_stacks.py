"""Stack reading (TIFF, OME pyramids, slice folders), TIFF metadata, and the NGFF version objects."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from emseg.errors import BadInputError
from emseg.io import stacks
from emseg.io import zarr as ome
from emseg.io.metadata import TiffMetadata, tiff_voxel_size, voxel_size_from
from emseg.io.stacks import open_stack
from emseg.io.zarr import (
    NGFF_04,
    NGFF_05,
    LevelSpec,
    create_image_store,
    create_label,
    create_multiscale,
    detect_version,
    first_slice,
    ngff_for,
    open_ome,
)


def test_pyramidal_ome_tiff_reads_its_full_resolution(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 128, 96), dtype=np.uint8)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        meta = {"axes": "ZYX", "PhysicalSizeX": 0.005, "PhysicalSizeY": 0.004, "PhysicalSizeZ": 0.05}
        tw.write(data, subifds=1, tile=(32, 32), compression="zlib", metadata=meta)
        tw.write(data[:, ::2, ::2], subfiletype=1, tile=(32, 32), compression="zlib")
    with open_stack(path) as stack:
        assert stack.shape == (3, 128, 96)
        assert stack.voxel_size == pytest.approx((50, 4, 5))
        np.testing.assert_array_equal(stack.read(0, 3), data)
        np.testing.assert_array_equal(stack.read(1, 2, 40, 72), data[1:2, 40:72])


def test_multi_axis_tiff_flattens_leading_axes_into_z(tmp_path):
    data = np.arange(2 * 3 * 16 * 8, dtype=np.uint16).reshape(2, 3, 16, 8)
    tifffile.imwrite(tmp_path / "tz.tif", data, imagej=True, metadata={"axes": "TZYX"}, compression="zlib")
    with open_stack(tmp_path / "tz.tif") as stack:
        assert stack.shape == (6, 16, 8)
        np.testing.assert_array_equal(stack.read(2, 5, 4, 12), data.reshape(6, 16, 8)[2:5, 4:12])


def test_corrupt_pixels_are_bad_input_and_our_bugs_keep_their_traceback(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib", rowsperstrip=64)
    with tifffile.TiffFile(path) as tif:
        start, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[start : start + count] = bytes(count)  # zero the first compressed strip
    path.write_bytes(bytes(raw))
    with open_stack(path) as stack, pytest.raises(BadInputError, match="truncated or corrupt"):
        stack.read(0, 2)

    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")

    def broken(*args: object) -> np.ndarray:
        raise ZeroDivisionError("a bug in emseg")

    monkeypatch.setattr(stacks, "to_grayscale", broken)
    with open_stack(rgb) as stack, pytest.raises(ZeroDivisionError):
        stack.read(0, 1)


def test_slice_folder_mixing_gray_and_rgb_is_bad_input(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "0.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "1.png")
    with open_stack(tmp_path) as stack, pytest.raises(BadInputError, match="differs from the header"):
        stack.read(0, 2)


def test_voxel_size_metadata_is_parsed_and_nonsense_ignored(tmp_path):
    cm = TiffMetadata(
        ome_xml=None, imagej=None, x_resolution=(10_000_000, 5), y_resolution=(10_000_000, 4), resolution_unit=3
    )
    assert voxel_size_from(cm) == (1.0, 4.0, 5.0)
    inch = TiffMetadata(ome_xml=None, imagej=None, x_resolution=(72, 1), y_resolution=(72, 1), resolution_unit=2)
    assert voxel_size_from(inch) is None
    ij = TiffMetadata(
        ome_xml=None,
        imagej={"unit": "micron", "spacing": 0.05},
        x_resolution=(250, 1),
        y_resolution=(250, 1),
        resolution_unit=None,
    )
    assert voxel_size_from(ij) == pytest.approx((50, 4, 4))

    def fake(imagej: dict, xres: object) -> SimpleNamespace:
        tags = {"XResolution": SimpleNamespace(value=xres), "YResolution": SimpleNamespace(value=(250, 1))}
        return SimpleNamespace(is_ome=False, is_imagej=True, imagej_metadata=imagej, pages=[SimpleNamespace(tags=tags)])

    assert tiff_voxel_size(fake({"unit": "micron", "spacing": "abc"}, (250, 1))) is None
    assert tiff_voxel_size(fake({"unit": "micron"}, "not a rational")) is None
    assert tiff_voxel_size(fake({"unit": "micron"}, (250, 1))) == pytest.approx((1, 4, 4))
    bad_xml = TiffMetadata(
        ome_xml="<OME><Pixels", imagej=None, x_resolution=None, y_resolution=None, resolution_unit=None
    )
    assert (
        tiff_voxel_size(
            SimpleNamespace(
                is_ome=True, ome_metadata=bad_xml.ome_xml, is_imagej=False, pages=[SimpleNamespace(tags={})]
            )
        )
        is None
    )


@pytest.mark.parametrize("ngff", [NGFF_04, NGFF_05])
def test_one_object_per_ngff_version_writes_what_it_detects(tmp_path, ngff):
    assert ngff_for(ngff.version) is ngff
    root = create_image_store(tmp_path / "s.zarr", ngff.version, attrs={"emseg": {"slices": [3, 5]}})
    spec = LevelSpec(
        shape=(2, 40, 30), dtype="uint8", chunks=(1, 16, 16), shards=(2, 32, 32) if ngff.sharding else None
    )
    create_multiscale(root, spec, (50, 4, 4), ngff.version, "raw")
    create_label(root, "cells", spec, (50, 4, 4), ngff.version)
    assert root.metadata.zarr_format == ngff.zarr_format
    assert detect_version(dict(root.attrs)) == ngff.version
    image = open_ome(tmp_path / "s.zarr")
    assert image.version == ngff.version and image.ngff is ngff
    assert list(image.labels) == ["cells"] and image.labels["cells"].version == ngff.version
    assert image.voxel_size == (50.0, 4.0, 4.0) and first_slice(image) == 3
    top = dict(root.attrs)
    assert ("ome" in top) == (ngff is NGFF_05) and ("multiscales" in top) == (ngff is NGFF_04)
    if ngff.sharding:
        assert image.array.shards == (2, 32, 16)  # clipped to x = 30, rounded down to whole chunks


def test_unknown_versions_and_malformed_stores_are_bad_input(tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="supported versions are 0.4, 0.5"):
        ngff_for("0.3")
    root = create_image_store(tmp_path / "s.zarr", "0.4", attrs={"emseg": {"slices": "x"}})
    create_multiscale(root, LevelSpec(shape=(1, 8, 8), dtype="uint8"), (1, 1, 1), "0.4", "raw")
    with pytest.raises(BadInputError, match="malformed emseg metadata"):
        first_slice(open_ome(tmp_path / "s.zarr"))
    root.attrs["multiscales"] = [{"datasets": [{"path": 7}]}]
    with pytest.raises(BadInputError, match="malformed multiscales metadata"):
        open_ome(tmp_path / "s.zarr")
    root.attrs["ome"] = [1]
    with pytest.raises(BadInputError, match="malformed OME-Zarr metadata"):
        open_ome(tmp_path / "s.zarr")

    def broken(attrs: object) -> str:
        raise ZeroDivisionError("a bug in emseg")

    del root.attrs["ome"]
    root.attrs["multiscales"] = [ome.multiscales("raw", 1, (1, 1, 1), "0.4")]
    monkeypatch.setattr(ome, "detect_version", broken)
    with pytest.raises(ZeroDivisionError):
        open_ome(tmp_path / "s.zarr")


def test_missing_z_spacing_is_said_not_silently_one_nm(tmp_path, caplog):
    data = np.zeros((3, 16, 16), np.uint8)
    # ImageJ calibration in µm (ImageJ writes µ as an escape) without spacing
    tifffile.imwrite(
        tmp_path / "ij.tif", data, imagej=True, resolution=(250, 250), metadata={"unit": "\\u00B5m", "axes": "ZYX"}
    )
    ome = {"axes": "ZYX", "PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4.0}
    tifffile.imwrite(tmp_path / "ome.ome.tif", data, ome=True, metadata=ome)  # Y in the default unit, µm
    tifffile.imwrite(tmp_path / "cm.tif", data, resolution=(2.5e6, 2.5e6), resolutionunit="CENTIMETER")
    expected = {"ij.tif": (1, 4, 4), "ome.ome.tif": (1, 4000, 4), "cm.tif": (1, 4, 4)}
    for name, voxel in expected.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="emseg"), open_stack(tmp_path / name) as stack:
            assert stack.voxel_size == pytest.approx(voxel)
            assert stack.voxel_size_note is not None and "no z spacing" in stack.voxel_size_note
            assert "--voxel-size" in stack.voxel_size_note  # ingest warns with it when it uses the metadata
    # one slice has no z to miss
    tifffile.imwrite(tmp_path / "one.tif", data[:1], resolution=(2.5e6, 2.5e6), resolutionunit="CENTIMETER")
    caplog.clear()
    with caplog.at_level("WARNING", logger="emseg"), open_stack(tmp_path / "one.tif") as stack:
        assert stack.voxel_size == pytest.approx((1, 4, 4)) and stack.voxel_size_note is None
    assert caplog.text == ""
    # a folder of slices never has z: said the same way
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(2):
        tifffile.imwrite(folder / f"{z}.tif", data[z], resolution=(2.5e6, 2.5e6), resolutionunit="CENTIMETER")
    with open_stack(folder) as stack:
        assert stack.voxel_size == pytest.approx((1, 4, 4)) and "no z spacing" in (stack.voxel_size_note or "")


def test_imagej_spacing_is_in_the_calibration_unit_and_nonsense_is_ignored():
    def ij(imagej: dict | None, unit: int | None = None, res: tuple = (1, 4)) -> TiffMetadata:
        return TiffMetadata(ome_xml=None, imagej=imagej, x_resolution=res, y_resolution=res, resolution_unit=unit)

    assert voxel_size_from(ij({"unit": "nm", "spacing": 50.0})) == (50.0, 4.0, 4.0)
    assert voxel_size_from(ij({"unit": "micron", "spacing": 0.05}, res=(250, 1))) == (50.0, 4.0, 4.0)  # exact
    assert voxel_size_from(ij({"unit": "\\u00B5m", "spacing": 0.03}, res=(200, 1))) == (30.0, 5.0, 5.0)
    # no ImageJ unit: ImageJ calibrates in the ResolutionUnit (cm), spacing included
    assert voxel_size_from(ij({"spacing": 5e-6}, unit=3, res=(25_000_000, 1))) == (50.0, 0.4, 0.4)
    assert voxel_size_from(ij({"unit": "pixel", "spacing": 1.0})) is None  # not calibrated
    for spacing in (0.0, -1.0, float("nan"), float("inf")):
        assert tiff_voxel_size_of(ij({"unit": "nm", "spacing": spacing})) is None


def tiff_voxel_size_of(meta: TiffMetadata) -> object:
    """:func:`tiff_voxel_size` on a file whose first page carries ``meta``."""
    tags = {
        "XResolution": SimpleNamespace(value=meta.x_resolution),
        "YResolution": SimpleNamespace(value=meta.y_resolution),
    }
    return tiff_voxel_size(
        SimpleNamespace(is_ome=False, is_imagej=True, imagej_metadata=meta.imagej, pages=[SimpleNamespace(tags=tags)])
    )
