"""Reads sized by metadata: ``emseg show`` and the napari reader never read a whole huge plane,
and ``emseg info`` gives a fraction for masks and a number of objects for instance labels.

The huge stores are single-level 1 x 60000 x 60000 uint8 images with no chunk written (zarr's fill
value): tiny on disk, cheap to read strided, and 3.4 GiB per slice if anything read one whole. They
run in a child process whose address space is capped at a margin above its baseline, smaller than
one slice (checked in the child itself), so a whole-slice read fails with MemoryError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from emseg.config import ShowConfig
from emseg.io.info import MAX_PREVIEW_PIXELS, count_objects, describe_store, preview_step, strided_plane
from emseg.io.outputs import provenance
from emseg.io.pyramid import build_levels
from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale, ngff_for
from emseg.napari.reader import CONTRAST_WINDOW
from emseg.segmentation.labels import create_label_image

HUGE = 60000
#: Address space the child may use above its baseline: less than one huge slice (3.35 GiB).
MARGIN = 2 * 2**30
VOXEL = (50.0, 4.0, 4.0)

#: The child: import everything, cap the address space at baseline + MARGIN, check that a whole
#: slice no longer fits, then run the code under test (argv[1]) with ``args`` (argv[2:]).
CHILD = f"""
import resource, sys
import dask.array, matplotlib, numpy as np, zarr
import emseg.cli, emseg.napari.reader

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

limit = vm_bytes() + {MARGIN}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    np.ones({HUGE} * {HUGE}, np.uint8)
except MemoryError:
    pass
else:
    sys.exit("the address-space cap does not stop a whole-slice read")
code, args = sys.argv[1], sys.argv[2:]
exec(code)
"""


def _run_capped(code: str, *args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONUNBUFFERED": "1"}  # arenas count as address space
    return subprocess.run(
        [sys.executable, "-c", CHILD, code, *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )


def _huge_store(path: Path, centre: np.ndarray | None = None) -> Path:
    """A single-level 1 x HUGE x HUGE uint8 store, chunks 4096: nothing written but ``centre``
    (a square placed in the middle of the slice)."""
    root = create_image_store(path, "0.4", attrs={})
    spec = LevelSpec(shape=(1, HUGE, HUGE), dtype="uint8", chunks=(1, 4096, 4096), pyramid_min_size=HUGE)
    (level,) = create_multiscale(root, spec, VOXEL, "0.4", "raw")
    if centre is not None:
        y0 = (HUGE - centre.shape[0]) // 2
        level[0, y0 : y0 + centre.shape[0], y0 : y0 + centre.shape[1]] = centre
    return path


def _image_store(path: Path, data: np.ndarray, chunks: tuple[int, int, int] = (1, 32, 32), min_size: int = 16) -> Path:
    """An image store of ``data``: levels down to ``min_size`` pixels (levels 1.. left at 0)."""
    root = create_image_store(path, "0.4", attrs={})
    spec = LevelSpec(shape=data.shape, dtype=str(data.dtype), chunks=chunks, pyramid_min_size=min_size)
    arrays = create_multiscale(root, spec, VOXEL, "0.4", "raw")
    arrays[0][:] = data
    return path


def _add_instances(store: Path, cells: np.ndarray, min_size: int = 16) -> None:
    """``labels/cells``: an instance label image of ``cells`` with its pyramid (2x2 mode)."""
    import zarr

    root = zarr.open_group(str(store), mode="r+")
    labels = root.require_group("labels")
    labels.attrs.update(ngff_for("0.4").wrap({"labels": ["cells"]}))
    spec = LevelSpec(shape=cells.shape, dtype=str(cells.dtype), chunks=(1, 32, 32), pyramid_min_size=min_size)
    create_label_image(labels.create_group("cells"), spec, VOXEL, "0.4", {}, in_image=True)[0][:] = cells
    build_levels(store / "labels" / "cells", "mode")


def _blobs(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(Z, Y, X) uint32 cell IDs: connected blobs of a smoothed random field, numbered 1..N."""
    field = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma=(0, 4, 4))
    ids, _ = ndi.label(field > field.mean(), structure=np.ones((3, 3, 3)))
    return ids.astype(np.uint32)


# --- the bounded plane reads -------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 7, 40, 64])
def test_strided_plane_reads_every_step_th_pixel_chunk_by_chunk(tmp_path: Path, step: int) -> None:
    data = np.random.default_rng(0).integers(0, 255, (2, 150, 210), dtype=np.uint8)
    store = _image_store(tmp_path / "s.zarr", data, chunks=(1, 32, 48))
    from emseg.io.zarr import open_ome

    got = strided_plane(open_ome(store).array, 1, step)
    assert got.dtype == np.uint8 and np.array_equal(got, data[1, ::step, ::step])


def test_preview_step_brings_a_plane_within_the_bound_and_side() -> None:
    assert preview_step((1, 4096, 4096)) == 1
    assert preview_step((1, 4097, 4096)) == 2
    for shape in [(1, HUGE, HUGE), (1, 100000, 100000), (1, 3, 10**9), (5, 12345, 67891)]:
        step = preview_step(shape)
        assert -(-shape[1] // step) * -(-shape[2] // step) <= MAX_PREVIEW_PIXELS
        assert step == 1 or -(-shape[1] // (step - 1)) * -(-shape[2] // (step - 1)) > MAX_PREVIEW_PIXELS
    assert preview_step((1, HUGE, HUGE), max_side=2048) == 30  # 2000 x 2000
    assert CONTRAST_WINDOW**2 <= MAX_PREVIEW_PIXELS


def test_show_reads_a_huge_single_level_slice_downsampled_within_the_cap(tmp_path: Path, cli) -> None:
    store = _huge_store(tmp_path / "huge.zarr")
    png = tmp_path / "view.png"
    code = "sys.argv = ['emseg', '-v', 'show', args[0], '-o', args[1]]; emseg.cli.main()"
    r = _run_capped(code, store, png)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "downsampled 30x" in r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    refused = cli("show", store, "--level", "0", "-o", tmp_path / "level0.png")
    assert refused.exit_code == 2
    line = refused.stderr.strip()
    assert "\n" not in line and "Traceback" not in refused.output
    assert f"{HUGE} x {HUGE}" in line and str(MAX_PREVIEW_PIXELS) in line and f"levels 0: {HUGE} x {HUGE}" in line
    assert not (tmp_path / "level0.png").exists()


def test_show_reads_labels_and_prediction_the_same_bounded_way(tmp_path: Path, monkeypatch) -> None:
    """A single level above a (lowered) bound: image, cells and P(cell) are all read downsampled,
    to the same shape; with a pyramid the default is the finest level within the bound, and an
    explicit level above it is refused."""
    import emseg.recipes.show as show
    from emseg.errors import BadInputError

    drawn: list[dict[str, np.ndarray]] = []
    monkeypatch.setattr(show, "panel_rows", lambda rows, path: drawn.extend(rows) or path.write_bytes(b"png"))
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (2, 300, 300), dtype=np.uint8)
    store = _image_store(tmp_path / "d.zarr", data, min_size=300)
    _add_instances(store, _blobs((2, 300, 300)), min_size=300)
    prob = rng.integers(0, 255, (2, 300, 300), dtype=np.uint8)
    pred = _image_store(tmp_path / "p.zarr", prob, min_size=300)
    show.show_slice(store, tmp_path / "v.png", ShowConfig(z=1), pred=pred, max_pixels=100 * 100)
    (row,) = drawn
    assert list(row)[0] == "image (slice 1, level 0, downsampled 3x)"
    assert {v.shape[:2] for v in row.values()} == {(100, 100)}
    assert np.array_equal(row["image (slice 1, level 0, downsampled 3x)"], data[1, ::3, ::3])
    assert np.allclose(row["prob: P(cell)"], prob[1, ::3, ::3] / 255)

    pyramid = _image_store(tmp_path / "pyr.zarr", data, min_size=16)  # 300, 150, 75, 38, 19
    drawn.clear()
    show.show_slice(pyramid, tmp_path / "w.png", ShowConfig(), max_pixels=100 * 100)
    assert list(drawn[0]) == ["image (slice 0, level 2)"]
    drawn.clear()  # a single-level prediction beside level 2: read every 4th pixel, the same shape
    show.show_slice(pyramid, tmp_path / "p.png", ShowConfig(level=2), pred=pred, max_pixels=100 * 100)
    assert {v.shape[:2] for v in drawn[0].values()} == {(75, 75)}
    assert np.allclose(drawn[0]["prob: P(cell)"], prob[0, ::4, ::4] / 255)
    with pytest.raises(BadInputError, match="levels 0: 300 x 300, 1: 150 x 150, 2: 75 x 75"):
        show.show_slice(pyramid, tmp_path / "x.png", ShowConfig(level=1), max_pixels=100 * 100)


def test_the_napari_reader_reads_a_bounded_window_of_a_huge_single_level_store(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(10, 210, dtype=np.uint8), (200, 1))
    store = _huge_store(tmp_path / "huge.zarr", centre=ramp)
    code = (
        "layers = emseg.napari.reader.read_store(args[0]); "
        "assert not any(m == 'napari' or m.startswith('napari.') for m in sys.modules); "
        "print(json.dumps([layers[0][1]['contrast_limits'], type(layers[0][0]).__module__, layers[0][0].shape]))"
    )
    r = _run_capped("import json; " + code, store)
    assert r.returncode == 0, r.stderr[-3000:]
    limits, module, shape = json.loads(r.stdout.strip().splitlines()[-1])
    assert module.startswith("dask") and shape == [1, HUGE, HUGE]  # the layer stays lazy
    window = np.r_[np.zeros(CONTRAST_WINDOW**2 - ramp.size), ramp.ravel()]  # the ramp in a blank window
    assert limits == [0.0, pytest.approx(float(np.percentile(window, 99.5)))]


# --- emseg info: masks and instance labels -----------------------------------------------------


def test_info_gives_a_fraction_for_a_binary_mask(cli, tmp_path: Path) -> None:
    raw = np.random.default_rng(2).integers(0, 255, (3, 64, 80), dtype=np.uint8)
    lab = np.zeros((3, 64, 80), np.uint8)
    lab[:, :16] = 255
    tifffile.imwrite(tmp_path / "r.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", lab, photometric="minisblack")
    out = tmp_path / "d.zarr"
    assert cli("ingest", tmp_path / "r.tif", "-l", tmp_path / "l.tif", "-o", out, "-q").exit_code == 0
    info = json.loads(cli("info", out, "--json").stdout)
    cells = info["labels"]["cells"]
    assert cells["kind"] == "mask" and cells["foreground_fraction"] == pytest.approx(0.25)
    assert cells["fraction_level"] == 0 and "objects" not in cells
    assert info["objects"] is None and info["image_label"] is None
    assert "foreground fraction 0.2500" in cli("info", out).stdout


def _pred_store(path: Path, ids: np.ndarray) -> Path:
    """A prediction-like store: P(cell) uint8 near 0 on the borders between ``ids`` and on 0."""
    membrane = (ids == 0) | np.stack([ndi.morphological_gradient(s, size=(3, 3)) > 0 for s in ids])
    prob = np.where(membrane, 5, 250).astype(np.uint8)
    root = create_image_store(path, "0.4", attrs={"emseg": provenance("predict", complete=True)})
    spec = LevelSpec(shape=prob.shape, dtype="uint8", chunks=(1, 64, 64), pyramid_min_size=64)
    create_multiscale(root, spec, VOXEL, "0.4", "probabilities")[0][:] = prob
    root.require_group("labels").attrs.update({"labels": []})
    return path


def test_info_counts_the_objects_of_segment_into_and_of_segment_o(cli, tmp_path: Path) -> None:
    import zarr

    pred = _pred_store(tmp_path / "pred.zarr", _blobs((2, 128, 128), seed=3))
    assert cli("segment", pred, "--into", pred, "--quiet").exit_code == 0
    distinct = np.unique(zarr.open_array(str(pred / "labels" / "cells" / "0"), mode="r")[:])
    expected = int(np.count_nonzero(distinct))
    assert expected > 5
    info = json.loads(cli("info", pred, "--json").stdout)
    cells = info["labels"]["cells"]
    assert cells["kind"] == "instances" and cells["objects"] == expected and cells["objects_level"] == 0
    assert cells["objects_source"] == "provenance" and cells["foreground_fraction"] is None
    assert f"{expected} objects" in cli("info", pred).stdout

    seg = tmp_path / "seg.zarr"
    assert cli("segment", pred, "-o", seg, "--quiet").exit_code == 0
    info = json.loads(cli("info", seg, "--json").stdout)
    assert info["objects"] == expected and info["image_label"]["kind"] == "instances" and info["labels"] == {}
    table = cli("info", seg).stdout
    assert "label image" in table and f"{expected} objects" in table


def test_info_counts_instance_labels_without_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uint32 IDs are counted chunk by chunk; uint8 with values above 1 are instances too; on a
    coarser level (level 0 above MAX_COUNTED) the count is a lower bound from that level."""
    ids = _blobs((2, 96, 96), seed=4)
    store = _image_store(tmp_path / "d.zarr", np.zeros(ids.shape, np.uint8))
    _add_instances(store, ids)
    cells = describe_store(store)["labels"]["cells"]
    assert cells == {
        "kind": "instances",
        "objects": int(ids.max()),
        "objects_level": 0,
        "objects_source": "counted",
        "foreground_fraction": None,
        "fraction_level": None,
    }
    small = _image_store(tmp_path / "u8.zarr", np.zeros(ids.shape, np.uint8))
    assert 2 < ids.max() < 256
    _add_instances(small, ids.astype(np.uint8))
    assert describe_store(small)["labels"]["cells"]["objects"] == ids.max()

    import zarr

    import emseg.io.info as info_module

    monkeypatch.setattr(info_module, "MAX_COUNTED", 2 * 48 * 48)
    coarse = describe_store(store)["labels"]["cells"]
    level1 = zarr.open_array(str(store / "labels" / "cells" / "1"), mode="r")[:]
    assert coarse["objects_level"] == 1 and coarse["objects"] == np.count_nonzero(np.unique(level1)) > 0


def test_count_objects_merges_ids_across_chunks(tmp_path: Path) -> None:
    ids = _blobs((3, 200, 200), seed=5) * 1000  # large, sparse IDs spanning many chunks
    store = _image_store(tmp_path / "d.zarr", np.zeros(ids.shape, np.uint8))
    _add_instances(store, ids)
    import zarr

    level = zarr.open_array(str(store / "labels" / "cells" / "0"), mode="r")
    assert count_objects(level) == int(np.count_nonzero(np.unique(ids)))
