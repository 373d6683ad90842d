"""emseg ingest: TIFF stacks and slice folders into OME-Zarr, bit-exact, validated, atomic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from emseg.config import IngestConfig
from emseg.io.ingest import ingest_stack
from emseg.io.pyramid import pyramid_shapes, reduce2
from emseg.io.zarr import open_ome

from .conftest import run_emseg


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".partial-" in p.name]


def test_isbi_ingests_bit_exactly(cli, isbi, isbi_arrays, tmp_path):
    raw, labels = isbi_arrays
    out = tmp_path / "isbi.zarr"
    result = cli(
        "ingest",
        isbi / "train-volume.tif",
        "--labels",
        isbi / "train-labels.tif",
        "-o",
        out,
        "--voxel-size",
        "50",
        "4",
        "4",
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    image = open_ome(out)
    assert image.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array[:], raw)
    cells = image.labels["cells"].array[:]
    assert set(np.unique(cells).tolist()) == {0, 1}
    np.testing.assert_array_equal(cells, (labels > 0).astype(np.uint8))
    assert image.voxel_size == (50.0, 4.0, 4.0)
    assert image.array.chunks == (1, 512, 512)  # (1, 1024, 1024) clipped to the image
    prov = image.attrs["emseg"]
    assert prov["source"]["name"] == "train-volume.tif"
    assert prov["source"]["bytes"] == (isbi / "train-volume.tif").stat().st_size
    assert prov["command"] == "ingest" and prov["version"]


def test_png_folder_ingests_to_the_same_arrays(isbi_arrays, tmp_path):
    from PIL import Image

    raw, labels = isbi_arrays
    raw, labels = raw[:12], labels[:12]
    for name, stack in (("raw", raw), ("lab", labels)):
        folder = tmp_path / name
        folder.mkdir()
        for z, plane in enumerate(stack):  # s2.png must sort before s10.png
            Image.fromarray(plane).save(folder / f"s{z}.png")
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    a = ingest_stack(tmp_path / "raw", tmp_path / "png.zarr", labels=tmp_path / "lab")
    b = ingest_stack(tmp_path / "raw.tif", tmp_path / "tif.zarr")
    png, tif = open_ome(a), open_ome(b)
    np.testing.assert_array_equal(png.array[:], raw)
    np.testing.assert_array_equal(png.array[:], tif.array[:])
    np.testing.assert_array_equal(png.labels["cells"].array[:], (labels > 0).astype(np.uint8))


@pytest.mark.parametrize("ngff,shards", [("0.4", None), ("0.5", None), ("0.5", (4, 512, 512))])
def test_metadata_validates_against_ngff_and_reads_with_dask(tmp_path, ngff, shards):
    import dask.array as da
    from ome_zarr_models import open_ome_zarr

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (6, 1300, 700), dtype=np.uint8)
    labels = (rng.random((6, 1300, 700)) > 0.3).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    config = IngestConfig(ngff=ngff, chunks=(2, 256, 256), shards=shards, voxel_size=(50, 4, 4))
    out = ingest_stack(tmp_path / "raw.tif", tmp_path / "x.zarr", config, labels=tmp_path / "lab.tif")

    group = zarr.open_group(str(out), mode="r")
    model = open_ome_zarr(group, version=ngff)
    assert type(model).__name__ == "Image"
    label_model = open_ome_zarr(group["labels/cells"], version=ngff)
    assert type(label_model).__name__ == "ImageLabel"
    labels_group = open_ome_zarr(group["labels"], version=ngff)
    assert type(labels_group).__name__ == "Labels"

    image = open_ome(out)
    assert image.version == ngff
    assert len(image.levels) == 2  # 1300 -> 650 <= 1024
    np.testing.assert_array_equal(da.from_zarr(image.levels[0]).compute(), raw)
    if shards:
        assert image.array.shards == shards and image.array.chunks == (2, 256, 256)


def test_pyramid_levels_are_block_means(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 60000, (3, 2301, 2049), dtype=np.uint16)  # odd sizes on purpose
    labels = (rng.random(raw.shape) > 0.5).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    out = ingest_stack(
        tmp_path / "raw.tif", tmp_path / "p.zarr", IngestConfig(chunks=(1, 384, 512)), labels=tmp_path / "lab.tif"
    )
    image = open_ome(out)
    assert (
        [tuple(a.shape) for a in image.levels]
        == pyramid_shapes(raw.shape)
        == [(3, 2301, 2049), (3, 1151, 1025), (3, 576, 513)]
    )
    expected = raw
    expected_lab = labels
    for level in image.levels[1:]:
        padded = np.pad(expected, ((0, 0), (0, expected.shape[1] % 2), (0, expected.shape[2] % 2)), mode="edge")
        direct = (
            padded[:, 0::2, 0::2].astype(np.int64)
            + padded[:, 1::2, 0::2]
            + padded[:, 0::2, 1::2]
            + padded[:, 1::2, 1::2]
            + 2
        ) // 4
        np.testing.assert_array_equal(level[:], direct.astype(np.uint16))
        expected = direct.astype(np.uint16)
    for level in image.labels["cells"].levels[1:]:
        expected_lab = reduce2(expected_lab, "majority")
        np.testing.assert_array_equal(level[:], expected_lab)
    ms = image.attrs["multiscales"][0]["datasets"]
    assert ms[2]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 4.0]
    assert ms[2]["coordinateTransformations"][1]["translation"] == [0.0, 1.5, 1.5]


def test_voxel_size_from_imagej_and_ome_metadata_else_one_with_warning(tmp_path, caplog):
    data = np.zeros((4, 64, 64), np.uint8)
    data = np.zeros((5, 64, 64), np.uint8)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        data,
        imagej=True,
        resolution=(1 / 0.004, 1 / 0.004),
        metadata={"spacing": 0.05, "unit": "micron", "axes": "ZYX"},
    )
    tifffile.imwrite(
        tmp_path / "ome.ome.tif",
        data,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 5.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 6.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.03,
            "PhysicalSizeZUnit": "µm",
        },
    )
    tifffile.imwrite(tmp_path / "plain.tif", data)
    assert open_ome(ingest_stack(tmp_path / "ij.tif", tmp_path / "ij.zarr")).voxel_size == pytest.approx((50, 4, 4))
    assert open_ome(ingest_stack(tmp_path / "ome.ome.tif", tmp_path / "ome.zarr")).voxel_size == pytest.approx(
        (30, 6, 5)
    )
    with caplog.at_level("WARNING", logger="emseg"):
        plain = open_ome(ingest_stack(tmp_path / "plain.tif", tmp_path / "plain.zarr"))
    assert plain.voxel_size == (1.0, 1.0, 1.0)
    assert "no voxel size" in caplog.text
    given = ingest_stack(tmp_path / "ij.tif", tmp_path / "given.zarr", IngestConfig(voxel_size=(40, 3, 3)))
    assert open_ome(given).voxel_size == (40, 3, 3)


def test_single_2d_images_and_other_dtypes(tmp_path):
    from PIL import Image

    img = (np.arange(300 * 200) % 251).astype(np.uint8).reshape(300, 200)
    Image.fromarray(img).save(tmp_path / "one.png")
    f32 = np.linspace(-1, 1, 2 * 50 * 40, dtype=np.float32).reshape(2, 50, 40)
    tifffile.imwrite(tmp_path / "f.tif", f32)
    tifffile.imwrite(tmp_path / "one.tif", img.astype(np.uint16) * 200)
    png = open_ome(ingest_stack(tmp_path / "one.png", tmp_path / "png.zarr"))
    assert png.shape == (1, 300, 200)
    np.testing.assert_array_equal(png.array[0], img)
    floats = open_ome(ingest_stack(tmp_path / "f.tif", tmp_path / "f.zarr"))
    assert floats.array.dtype == np.float32
    np.testing.assert_array_equal(floats.array[:], f32)
    u16 = open_ome(ingest_stack(tmp_path / "one.tif", tmp_path / "u16.zarr"))
    assert u16.array.dtype == np.uint16 and u16.shape == (1, 300, 200)


def test_rgb_stack_becomes_grayscale_with_a_warning(cli, tmp_path):
    rgb = np.zeros((2, 40, 30, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    result = cli("ingest", tmp_path / "rgb.tif", "-o", tmp_path / "rgb.zarr", "-q")
    assert result.exit_code == 0, result.stderr
    image = open_ome(tmp_path / "rgb.zarr")
    assert image.shape == (2, 40, 30)
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert int(image.array[0, 0, 0]) == expected


def test_labels_with_many_values_are_binarised_with_a_warning(tmp_path, caplog):
    raw = np.zeros((2, 32, 32), np.uint8)
    lab = np.zeros((2, 32, 32), np.uint16)
    lab[:, 5:10, 5:10], lab[:, 20:25, 20:25] = 3, 7
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    with caplog.at_level("WARNING", logger="emseg"):
        out = ingest_stack(tmp_path / "raw.tif", tmp_path / "o.zarr", labels=tmp_path / "lab.tif")
    assert "more than two values" in caplog.text
    cells = open_ome(out).labels["cells"].array[:]
    assert cells.dtype == np.uint8
    np.testing.assert_array_equal(cells, (lab > 0).astype(np.uint8))


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (ingest arguments, a phrase the error must contain)."""
    good = tmp / "good.tif"
    tifffile.imwrite(good, np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    (tmp / "notimage.tif").write_text("this is not a TIFF file\n" * 10)
    stack = np.random.default_rng(0).integers(0, 255, (6, 256, 256), dtype=np.uint8)
    tifffile.imwrite(tmp / "full.tif", stack)
    data = (tmp / "full.tif").read_bytes()
    (tmp / "truncated.tif").write_bytes(data[: len(data) // 2])
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no images here")
    mixed = tmp / "mixed"
    mixed.mkdir()
    tifffile.imwrite(mixed / "0.tif", np.zeros((64, 64), np.uint8))
    tifffile.imwrite(mixed / "1.tif", np.zeros((64, 80), np.uint8))
    tifffile.imwrite(tmp / "lab_shape.tif", np.zeros((3, 64, 65), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp / "lab_count.tif", np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    nan = np.zeros((2, 32, 32), np.float32)
    nan[1, 3, 3] = np.nan
    tifffile.imwrite(tmp / "nan.tif", nan)
    (tmp / "exists.zarr").mkdir()
    (tmp / "afile").write_text("x")
    out = str(tmp / "out.zarr")
    return {
        "missing": ([str(tmp / "nope.tif"), "-o", out], "no such file"),
        "not an image": ([str(tmp / "notimage.tif"), "-o", out], "not a readable TIFF"),
        "truncated": ([str(tmp / "truncated.tif"), "-o", out], "truncated"),
        "empty folder": ([str(tmp / "empty"), "-o", out], "no .tif"),
        "different sizes": ([str(mixed), "-o", out], "different sizes"),
        "label shape": ([str(good), "--labels", str(tmp / "lab_shape.tif"), "-o", out], "must match"),
        "label count": ([str(good), "--labels", str(tmp / "lab_count.tif"), "-o", out], "must match"),
        "non-finite": ([str(tmp / "nan.tif"), "-o", out], "non-finite"),
        "exists": ([str(good), "-o", str(tmp / "exists.zarr")], "already exists"),
        "unwritable": ([str(good), "-o", str(tmp / "afile" / "out.zarr")], "not a directory"),
        "bad ngff": ([str(good), "-o", out, "--ngff", "0.3"], "--ngff"),
        "shards on 0.4": ([str(good), "-o", out, "--shards", "1", "64", "64"], "--shards"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not an image",
        "truncated",
        "empty folder",
        "different sizes",
        "label shape",
        "label count",
        "non-finite",
        "exists",
        "unwritable",
        "bad ngff",
        "shards on 0.4",
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, case):
    args, phrase = _bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("ingest", *args, "-q")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emseg: error:"), result.stderr
    assert phrase in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, no partial sibling
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.slow
def test_real_process_exit_codes(tmp_path):
    missing = run_emseg("ingest", tmp_path / "none.tif", "-o", tmp_path / "o.zarr")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    usage = run_emseg("ingest")  # missing argument: a usage error
    assert usage.returncode == 2
    assert run_emseg("--help").returncode == 0


def test_overwrite_replaces_only_emseg_outputs(cli, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.full((2, 16, 16), 7, np.uint8))
    tifffile.imwrite(tmp_path / "b.tif", np.full((2, 16, 16), 9, np.uint8))
    out = tmp_path / "o.zarr"
    assert cli("ingest", tmp_path / "a.tif", "-o", out, "-q").exit_code == 0
    refused = cli("ingest", tmp_path / "b.tif", "-o", out, "-q")
    assert refused.exit_code == 2 and int(open_ome(out).array[0, 0, 0]) == 7
    assert cli("ingest", tmp_path / "b.tif", "-o", out, "--overwrite", "-q").exit_code == 0
    assert int(open_ome(out).array[0, 0, 0]) == 9
    assert not _partials(tmp_path)
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    result = cli("ingest", tmp_path / "a.tif", "-o", foreign, "--overwrite", "-q")
    assert result.exit_code == 2 and "not written by emseg" in result.stderr
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_a_held_lock_refuses_a_second_ingest(tmp_path):
    """Ingest takes the output's lock like every writing command: a second writer is refused."""
    from emseg.errors import BadInputError
    from emseg.io.outputs import OutputLock

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    out = tmp_path / "o.zarr"
    with OutputLock(out, "ingest"):  # another writer holds the output
        with pytest.raises(BadInputError, match="another emseg ingest"):
            ingest_stack(tmp_path / "s.tif", out)
        assert not out.exists() and not _partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]  # the lock file goes with its holder
    assert ingest_stack(tmp_path / "s.tif", out) == out


def test_failure_mid_stream_leaves_nothing(tmp_path):
    """A stack whose last slice is corrupt fails after writing earlier bands: no output remains."""
    from emseg.errors import BadInputError

    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(5):
        tifffile.imwrite(folder / f"{z}.tif", np.full((64, 64), z, np.uint8), compression="zlib")
    data = (folder / "4.tif").read_bytes()
    (folder / "4.tif").write_bytes(data[:-40] + b"\0" * 40)  # header intact, pixels corrupt
    with pytest.raises(BadInputError):
        ingest_stack(folder, tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists() and not _partials(tmp_path)


def test_progress_reports_every_slice(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((5, 300, 40), np.uint8))

    class Recorder:
        def __init__(self):
            self.total, self.done, self.fields = None, 0.0, {}

        def start(self, description, total, unit=""):
            self.total, self.unit = total, unit

        def advance(self, amount=1, **fields):
            self.done += amount
            self.fields = fields

        def finish(self):
            self.finished = True

    rec = Recorder()
    ingest_stack(tmp_path / "s.tif", tmp_path / "o.zarr", IngestConfig(chunks=(1, 128, 128)), progress=rec)
    assert rec.total == 5 and rec.unit == "slices" and rec.done == pytest.approx(5)
    assert rec.fields["mb_per_s"] > 0 and rec.finished


def test_info_and_show(cli, tmp_path):
    rng = np.random.default_rng(2)
    tifffile.imwrite(tmp_path / "r.tif", rng.integers(0, 255, (3, 100, 120), dtype=np.uint8), photometric="minisblack")
    lab = np.zeros((3, 100, 120), np.uint8)
    lab[:, :50] = 255
    tifffile.imwrite(tmp_path / "l.tif", lab, photometric="minisblack")
    out = tmp_path / "d.zarr"
    assert cli("ingest", tmp_path / "r.tif", "-l", tmp_path / "l.tif", "-o", out, "-q").exit_code == 0
    result = cli("info", out, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["shape"] == [3, 100, 120] and info["dtype"] == "uint8" and info["chunks"] == [1, 100, 120]
    assert info["labels"]["cells"]["foreground_fraction"] == pytest.approx(0.5)
    table = cli("info", out)
    assert "labels/cells" in table.stdout and "0.5000" in table.stdout
    png = tmp_path / "view.png"
    shown = cli("show", out, "--slice", "2", "-o", png)
    assert shown.exit_code == 0, shown.stderr
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] >= 2 * im.size[1]  # image and mask side by side
    assert cli("show", out, "--slice", "9", "-o", png).exit_code == 2
    assert cli("info", tmp_path / "r.tif").exit_code == 2


def _peak_rss_of_ingest(source: Path, output: Path) -> int:
    """Peak resident memory (bytes) of a fresh process ingesting ``source``."""
    import subprocess

    # VmHWM (peak resident set) starts afresh at exec; ru_maxrss would count the forked parent.
    script = (
        "import sys; from emseg.io.ingest import ingest_stack; "
        "ingest_stack(sys.argv[1], sys.argv[2]); "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(source), str(output)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1]) * 1024


def _write_big(path: Path, n_slices: int, plane: np.ndarray) -> int:
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for z in range(n_slices):
            tw.write(np.roll(plane, z, axis=1), contiguous=True)
    return path.stat().st_size


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_large_bigtiff_streams_with_flat_bounded_memory(tmp_path):
    """A ~400 MB BigTIFF ingests with peak RSS far below its size, and no higher than for a
    stack a quarter of its size: memory is bounded by bands, not by the stack."""
    rng = np.random.default_rng(3)
    plane = np.tile(rng.integers(0, 255, (512, 512), dtype=np.uint8), (8, 8))  # 4096 x 4096
    small = _write_big(tmp_path / "small.tif", 6, plane)
    big = _write_big(tmp_path / "big.tif", 24, plane)
    assert big > 400e6
    peak_small = _peak_rss_of_ingest(tmp_path / "small.tif", tmp_path / "small.zarr")
    peak_big = _peak_rss_of_ingest(tmp_path / "big.tif", tmp_path / "big.zarr")
    assert peak_big < big / 3, f"peak RSS {peak_big / 1e6:.0f} MB for a {big / 1e6:.0f} MB stack"
    assert peak_big - peak_small < 30e6, f"peak grew from {peak_small / 1e6:.0f} to {peak_big / 1e6:.0f} MB"
    image = open_ome(tmp_path / "big.zarr")
    np.testing.assert_array_equal(image.array[23, :, :1000], np.roll(plane, 23, axis=1)[:, :1000])
    assert len(image.levels) == 3 and image.shape == (24, 4096, 4096)
    assert small < big / 3


def test_tiff_without_z_spacing_ingests_with_a_warning_not_silently(tmp_path, caplog):
    tifffile.imwrite(
        tmp_path / "noz.tif",
        np.zeros((3, 32, 32), np.uint8),
        imagej=True,
        resolution=(1 / 4, 1 / 4),
        metadata={"unit": "nm", "axes": "ZYX"},
    )
    with caplog.at_level("WARNING", logger="emseg"):
        image = open_ome(ingest_stack(tmp_path / "noz.tif", tmp_path / "noz.zarr"))
    assert image.voxel_size == (1.0, 4.0, 4.0)
    assert "noz.tif: no z spacing in its metadata" in caplog.text and "--voxel-size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="emseg"):
        given = ingest_stack(tmp_path / "noz.tif", tmp_path / "given.zarr", IngestConfig(voxel_size=(50, 4, 4)))
    assert open_ome(given).voxel_size == (50.0, 4.0, 4.0)
    assert "no z spacing" not in caplog.text  # a voxel size that was given needs no warning about the metadata
