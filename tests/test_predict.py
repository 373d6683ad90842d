"""emseg predict: tiling properties, seam-free blending, dask cluster, resume, bounded memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import emseg
from emseg.config import PredictConfig
from emseg.errors import BadInputError
from emseg.inference.engine import Engine, dihedral, dihedral_inverse
from emseg.inference.tiling import (
    axis_origins,
    check_tiling,
    mirrored_context,
    plan_block,
    read_reflected,
    reflect_index,
)
from emseg.io.zarr import open_ome

from .conftest import run_emseg

# --- pure tiling: properties ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(1, 900),
    chunk=st.sampled_from([16, 48, 64, 100, 256]),
    tile_units=st.integers(1, 12),
    overlap_frac=st.floats(0, 0.95),
    align=st.sampled_from([1, 4, 16]),
    blend=st.sampled_from(["gaussian", "linear", "crop"]),
    data=st.data(),
)
def test_tiles_cover_every_pixel_and_weights_sum_to_one(length, chunk, tile_units, overlap_frac, align, blend, data):
    tile = tile_units * align * 4
    overlap = min(tile - align, int(overlap_frac * tile))
    b0 = data.draw(st.integers(0, length - 1))
    b1 = data.draw(st.integers(b0 + 1, length))
    width = data.draw(st.integers(1, 300))
    plan = plan_block((b0, b1), (0, width), tile, overlap, align, blend)
    ys = plan.y_origins
    assert all(int(o) % align == 0 for o in ys)
    assert ys[0] <= max(0, b0 - overlap // 2) and ys[-1] + tile >= b1 + overlap // 2
    if len(ys) > 1:
        assert (np.diff(ys) <= tile - overlap).all() and (np.diff(ys) > 0).all()
    y0, y1, x0, x1 = plan.block
    dy0, dy1, dx0, dx1 = plan.domain
    weight = np.zeros((dy1 - dy0, dx1 - dx0))  # every tile's 2D window, summed one by one
    acc = np.zeros_like(weight)
    for iy, ix, y, x in plan.tiles():
        w = np.outer(plan.y_windows[iy], plan.x_windows[ix])
        weight[y - dy0 : y - dy0 + tile, x - dx0 : x - dx0 + tile] += w
        acc[y - dy0 : y - dy0 + tile, x - dx0 : x - dx0 + tile] += 0.25 * w
    raw = weight[y0 - dy0 : y1 - dy0, x0 - dx0 : x1 - dx0]
    sy, sx = plan.weight_sums()
    assert sy.shape == (b1 - b0,) and sx.shape == (width,)
    np.testing.assert_allclose(np.outer(sy, sx), raw, rtol=1e-9)  # what the engine divides by
    assert (raw > 0).all()  # every pixel covered
    out = acc[y0 - dy0 : y1 - dy0, x0 - dx0 : x1 - dx0] / np.outer(sy, sx)
    np.testing.assert_allclose(out, 0.25, rtol=1e-6)  # normalised weights sum to 1 everywhere
    if blend == "crop":
        assert np.array_equal(raw, np.ones_like(raw))  # each pixel owned by exactly one tile


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), lo=st.integers(-200, 50), span=st.integers(1, 250))
def test_reflection_matches_numpy_reflect(n, lo, span):
    plane = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    pad = 600
    padded = np.pad(plane, ((pad, pad), (0, 0)), mode="reflect") if n > 1 else np.repeat(plane, 2 * pad + 1, 0)
    got = read_reflected(lambda r, c: plane[r, c], plane.shape, lo, lo + span, 0, 3)
    np.testing.assert_array_equal(got, padded[lo + pad : lo + span + pad])
    assert reflect_index(np.array([-1, n]), n).tolist() == ([1, n - 2] if n > 1 else [0, 0])


def test_axis_origins_cover_small_and_exact_cases():
    assert axis_origins(0, 100, 512, 64, 16, 32, 100).tolist() == [-32]  # a slice smaller than a tile
    full = axis_origins(0, 8192, 512, 64, 16, 32, 8192)
    # mirrored context of 32 px beyond both edges, and still MONAI's 19 tiles
    assert full[0] == -32 and full[-1] + 512 == 8192 + 32 and len(full) == 19
    assert len(axis_origins(0, 4096, 512, 64, 16, 32, 4096)) == 10
    inner = axis_origins(4096, 8192, 512, 64, 16, 32, 12288)  # a block between two others
    assert inner[0] == 4096 - 32 and inner[-1] + 512 == 8192 + 32
    end = axis_origins(8000, 8192, 512, 64, 16, 32, 8192)  # one tile at the end: real context before it
    assert end.tolist() == [8192 + 32 - 512]


def test_bad_tiling_is_refused():
    for tile, overlap, phrase in (
        (100, 10, "multiple of 16"),
        (512, 512, "smaller than the tile"),
        (512, -1, "at least 0"),
        (512, 500, "at most 496"),
    ):
        with pytest.raises(BadInputError, match=phrase):
            check_tiling(tile, overlap, 16)
    with pytest.raises(BadInputError, match="--blend"):
        check_tiling(512, 64, 16, "median")


# --- a trained model and a store to predict ------------------------------------------------


@pytest.fixture(scope="session")
def model_run(isbi_zarr, tmp_path_factory) -> Path:
    """A small depth-3 U-Net (halo 48) trained briefly on ISBI."""
    run = tmp_path_factory.mktemp("model") / "run"
    emseg.train(
        isbi_zarr,
        run,
        depth=3,
        base_channels=8,
        crop=96,
        batch_size=4,
        steps_per_epoch=15,
        epochs=2,
        lr=3e-3,
        device="cpu",
        val_slices="29",
    )
    return run


def _store(tmp: Path, raw: np.ndarray, chunks=(1, 64, 64), name="data.zarr") -> Path:
    tifffile.imwrite(tmp / f"{name}.tif", raw, photometric="minisblack")
    return emseg.ingest(tmp / f"{name}.tif", tmp / name, voxel_size=(50, 4, 4), chunks=chunks)


def _whole_slice(model_run: Path, plane: np.ndarray, overlap: int) -> np.ndarray:
    """One pass of the model over the whole slice mirrored by the context predict's tiles add at
    the slice's edges (half the overlap, on the model's size grid), cropped back to the slice."""
    model = emseg.load_model(model_run)
    meta = model.emseg_meta
    c = mirrored_context(overlap, meta["divisor"])
    h, w = plane.shape
    hp = -(-(h + c) // meta["divisor"]) * meta["divisor"]
    wp = -(-(w + c) // meta["divisor"]) * meta["divisor"]
    padded = read_reflected(lambda r, col: plane[r, col], plane.shape, -c, hp, -c, wp)
    norm = meta["normalization"]
    x = (torch.from_numpy(padded.astype(np.float32)) - norm["mean"]) / norm["std"]
    with torch.no_grad():
        prob = torch.sigmoid(model(x[None, None]))[0, 0].numpy()
    return prob[c : c + h, c : c + w]


def test_crop_blending_with_enough_overlap_equals_one_whole_slice_pass(model_run, isbi_arrays, tmp_path):
    raw = isbi_arrays[0][28:29, :301, :413]  # odd sizes, several blocks and chunks per slice
    data = _store(tmp_path, raw)
    halo = emseg.load_model(model_run).emseg_meta["halo"]
    out = emseg.predict(
        model_run,
        data,
        tmp_path / "crop.zarr",
        tile=128,
        overlap=2 * halo,
        blend="crop",
        dtype="float32",
        device="cpu",
        batch_size=3,
        precision="fp32",  # the reference is an fp32 pass with the checkpoint's normalisation
        config=PredictConfig(block=128, normalization="checkpoint"),
    )
    tiled = open_ome(out).array[0]
    whole = _whole_slice(model_run, raw[0], 2 * halo)
    assert np.abs(tiled - whole).max() < 1e-4


def test_gaussian_blending_at_overlap_64_is_close_to_the_whole_slice(model_run, isbi_arrays, tmp_path, record_property):
    raw = isbi_arrays[0][27:28]
    data = _store(tmp_path, raw)
    out = emseg.predict(
        model_run,
        data,
        tmp_path / "g.zarr",
        tile=128,
        overlap=64,
        dtype="float32",
        device="cpu",
        precision="fp32",
        config=PredictConfig(block=128, normalization="checkpoint"),
    )
    diff = np.abs(open_ome(out).array[0] - _whole_slice(model_run, raw[0], 64))
    record_property("gaussian_overlap64_max_abs_diff", float(diff.max()))
    record_property("gaussian_overlap64_mean_abs_diff", float(diff.mean()))
    assert diff.max() < 0.2 and diff.mean() < 0.01


def test_output_is_ome_zarr_with_membranes_and_the_input_pyramid(model_run, tmp_path, cli):
    from ome_zarr_models import open_ome_zarr

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (2, 1100, 300), dtype=np.uint8)
    data = _store(tmp_path, raw, chunks=(1, 256, 256))
    assert len(open_ome(data).levels) == 2
    result = cli(
        "predict",
        model_run,
        data,
        "-o",
        tmp_path / "p.zarr",
        "--device",
        "cpu",
        "--tile",
        "256",
        "--threshold",
        "0.4",
        "--slices",
        "1:2",
        "--normalization",
        "checkpoint",  # uniform noise has no EM percentiles to map
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    pred = open_ome(tmp_path / "p.zarr")
    assert pred.shape == (1, 1100, 300) and pred.array.dtype == np.uint8
    assert [a.shape for a in pred.levels] == [(1, 1100, 300), (1, 550, 150)]
    assert pred.voxel_size == (50.0, 4.0, 4.0)
    membranes = pred.labels["membranes"].array[:]
    assert set(np.unique(membranes)) <= {0, 1}
    p = pred.array[:] / 255.0
    clear = np.abs(p - 0.4) > 1 / 255  # uint8 rounding can only blur the threshold by one step
    np.testing.assert_array_equal(membranes[clear], (p[clear] < 0.4).astype(np.uint8))
    assert 0.05 < membranes.mean() < 0.95
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert type(open_ome_zarr(group, version="0.4")).__name__ == "Image"
    assert type(open_ome_zarr(group["labels/membranes"], version="0.4")).__name__ == "ImageLabel"
    assert pred.attrs["emseg"]["slices"] == [1, 2] and pred.attrs["emseg"]["complete"] is True
    # slice 1 of the input sits at z = 1 x 50 nm in viewers, at every level, for image and labels
    assert pred.origin == (50.0, 0.0, 0.0) and pred.labels["membranes"].origin == (50.0, 0.0, 0.0)
    for attrs, kind in ((group.attrs, "mean"), (group["labels/membranes"].attrs, "majority")):
        entry = attrs["multiscales"][0]
        assert entry["type"] == kind and kind in entry["metadata"]["description"]
        shifts = [t["translation"] for d in entry["datasets"] for t in d["coordinateTransformations"][1:]]
        assert shifts == [[50.0, 0.0, 0.0], [50.0, 2.0, 2.0]]  # level 1: half a level-1 pixel in y, x
    assert not any(p.name.startswith(".p.zarr") for p in tmp_path.iterdir())  # no partial or lock left
    shown = cli("show", data, "--slice", "1", "--pred", tmp_path / "p.zarr", "-o", tmp_path / "v.png")
    assert shown.exit_code == 0, shown.stderr


def test_membranes_match_the_threshold_exactly(model_run, isbi_arrays, tmp_path):
    data = _store(tmp_path, isbi_arrays[0][:1, :256, :256])
    out = emseg.predict(model_run, data, tmp_path / "f.zarr", tile=128, dtype="float32", threshold=0.3, device="cpu")
    pred = open_ome(out)
    np.testing.assert_array_equal(pred.labels["membranes"].array[:], (pred.array[:] < 0.3).astype(np.uint8))


def test_tta_averages_the_eight_dihedral_views(model_run):
    model = emseg.load_model(model_run)
    tiles = np.random.default_rng(1).integers(0, 255, (2, 64, 64)).astype(np.uint8)
    norm = model.emseg_meta["normalization"]
    with Engine(
        model, torch.device("cpu"), norm["mean"], norm["std"], PredictConfig(tta=True, batch_size=2, precision="fp32")
    ) as eng:
        got = eng.predict_tiles(tiles)
    x = (torch.from_numpy(tiles.astype(np.float32))[:, None] - norm["mean"]) / norm["std"]
    with torch.no_grad():
        views = [dihedral_inverse(model(dihedral(x, k)), k) for k in range(8)]  # logits, averaged
    np.testing.assert_allclose(got, torch.sigmoid(torch.stack(views).mean(0))[:, 0].numpy(), atol=1e-5)
    for k in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)


@pytest.mark.slow
def test_local_cluster_gives_the_same_output_as_threads(model_run, isbi_arrays, tmp_path):
    data = _store(tmp_path, isbi_arrays[0][:3, :256, :320], chunks=(1, 128, 128))
    cfg = PredictConfig(block=128)
    # Float results depend (at 1e-8) on the number of torch threads: give both runs the same, one
    # per process, as the 2-worker cluster on this 2-core machine does.
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        threads = emseg.predict(model_run, data, tmp_path / "t.zarr", tile=128, device="cpu", config=cfg)
    finally:
        torch.set_num_threads(saved)
    cluster = emseg.predict(model_run, data, tmp_path / "c.zarr", tile=128, device="cpu", workers=2, config=cfg)
    a, b = open_ome(threads), open_ome(cluster)
    np.testing.assert_array_equal(a.array[:], b.array[:])
    np.testing.assert_array_equal(a.labels["membranes"].array[:], b.labels["membranes"].array[:])


@pytest.mark.slow
def test_killed_prediction_resumes_to_the_identical_output(model_run, isbi_arrays, tmp_path):
    data = _store(tmp_path, isbi_arrays[0][:16, :256, :256], chunks=(1, 256, 256))
    out = tmp_path / "killed.zarr"
    args = ["predict", str(model_run), str(data), "-o", str(out), "--tile", "128", "--device", "cpu", "-q"]
    # the reference runs in a fresh process too: float results depend on the process's thread setup
    assert run_emseg(*args[:4], str(tmp_path / "ref.zarr"), *args[5:]).returncode == 0
    reference = tmp_path / "ref.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "emseg", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = tmp_path / ".killed.zarr.partial" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_dir() and len(list(progress.iterdir())) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prediction ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(progress.iterdir()))
    assert 4 <= done < 16 and not out.exists()
    resumed = run_emseg(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = open_ome(reference), open_ome(out)
    np.testing.assert_array_equal(a.array[:], b.array[:])
    np.testing.assert_array_equal(a.labels["membranes"].array[:], b.labels["membranes"].array[:])


_RSS_SCRIPT = """
import sys, threading, time, psutil
samples = []
def sample():
    proc = psutil.Process()
    while True:
        samples.append(proc.memory_info().rss)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from emseg.cli import main
sys.argv = ['emseg', 'predict', sys.argv[1], sys.argv[2], '-o', sys.argv[3], '--device', 'cpu', '--tile', '256', '-q']
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
half = sorted(samples[len(samples) // 2:])
print(half[int(0.9 * (len(half) - 1))], max(samples))
"""


def _rss_of_predict(model_run: Path, data: Path, out: Path) -> tuple[int, int]:
    """(90th percentile of the resident memory over the run's second half, peak), in bytes."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(model_run), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    p90, peak = proc.stdout.split()[-2:]
    return int(p90), int(peak)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_as_the_stack_grows(small_zarr, tmp_path):
    """Memory for a 16-slice stack is that of a 4-slice one (both keep all block threads busy)."""
    from emseg.synthetic import synthetic_stack

    run = tmp_path / "cheap"  # an untrained, cheap network: memory, not quality, is measured
    emseg.train(
        small_zarr,
        run,
        depth=2,
        base_channels=4,
        crop=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        device="cpu",
        val_slices="9",
    )
    raw, _ = synthetic_stack((1, 1024, 1024), seed=3)
    small = _store(tmp_path, np.concatenate([raw] * 4), chunks=(1, 512, 512), name="small.zarr")
    big = _store(tmp_path, np.concatenate([raw] * 16), chunks=(1, 512, 512), name="big.zarr")
    small_p90, small_peak = _rss_of_predict(run, small, tmp_path / "ps.zarr")
    big_p90, big_peak = _rss_of_predict(run, big, tmp_path / "pb.zarr")
    # 12 MPix more: an in-memory blend (float32 sums and weights, as MONAI's sliding window keeps)
    # would hold 96 MiB more. The allocator makes the resident size swing by some 30 MiB from moment
    # to moment, so the steady level is compared with a 48 MiB margin, the peaks with 64 MiB.
    assert big_p90 - small_p90 < 48 * 2**20, (small_p90, big_p90)
    assert big_peak - small_peak < 64 * 2**20, (small_peak, big_peak)


def test_bad_prediction_input(model_run, isbi_zarr, tmp_path, cli):
    plain = tmp_path / "plain.zarr"
    zarr.create_group(str(plain))
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_bytes(b"\x80\x04\x95 pickle, not safetensors")
    (tmp_path / "exists.zarr").mkdir()
    cases = [
        ([tmp_path / "nope", isbi_zarr, "-o", tmp_path / "o.zarr"], "no such model"),
        ([not_a_model, isbi_zarr, "-o", tmp_path / "o.zarr"], "not a safetensors"),
        ([model_run, plain, "-o", tmp_path / "o.zarr"], "not an OME-Zarr image"),
        ([model_run, isbi_zarr, "-o", tmp_path / "o.zarr", "--tile", "100"], "multiple of 8"),
        ([model_run, isbi_zarr, "-o", tmp_path / "o.zarr", "--overlap", "512"], "smaller than the tile"),
        ([model_run, isbi_zarr, "-o", tmp_path / "exists.zarr"], "already exists"),
        ([model_run, isbi_zarr, "-o", tmp_path / "o.zarr", "--slices", "10:99"], "--slices"),
        ([model_run, isbi_zarr, "-o", tmp_path / "o.zarr", "--dtype", "int8"], "--dtype"),
    ]
    if not torch.cuda.is_available():
        cases.append(([model_run, isbi_zarr, "-o", tmp_path / "o.zarr", "--device", "cuda"], "CUDA"))
    for args, phrase in cases:
        result = cli("predict", *args, "-q")
        assert result.exit_code == 2, (args, result.stderr)
        assert phrase in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.slow
def test_a_second_prediction_into_the_same_output_is_refused(model_run, isbi_arrays, tmp_path):
    from emseg.io.outputs import OutputLock

    data = _store(tmp_path, np.concatenate([isbi_arrays[0][:30, :256, :256]] * 3), chunks=(1, 256, 256))
    out = tmp_path / "p.zarr"
    args = ["predict", str(model_run), str(data), "-o", str(out), "--tile", "128", "--device", "cpu", "-q"]
    held = OutputLock(out, "predict")  # a writer holding the lock, deterministically
    held.acquire()
    refused = run_emseg(*args)
    held.release()
    assert refused.returncode == 2 and "another emseg predict" in refused.stderr and not out.exists()
    first = subprocess.Popen([sys.executable, "-m", "emseg", *args], stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".p.zarr.lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.02)
    second = run_emseg(*args)
    first_rc = first.wait(timeout=300)
    assert first_rc == 0, first.stderr.read()
    assert second.returncode == 2 and "another emseg predict" in second.stderr
    assert open_ome(out).shape == (90, 256, 256)


def test_export_to_imagej_tiff_and_png(model_run, isbi_arrays, tmp_path, cli):
    data = _store(tmp_path, isbi_arrays[0][:3, :128, :160])
    pred = emseg.predict(model_run, data, tmp_path / "p.zarr", tile=128, device="cpu")
    stored = open_ome(pred).array[:]
    result = cli("export", pred, "-o", tmp_path / "p.tif", "-q")
    assert result.exit_code == 0, result.stderr
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        # an ImageJ hyperstack (classic TIFF, uncompressed) calibrated with the store's voxel size
        assert tif.is_imagej and not tif.is_bigtiff
        assert tif.imagej_metadata["spacing"] == open_ome(pred).voxel_size[0]
        assert tif.imagej_metadata["unit"] == "nm"
        np.testing.assert_array_equal(tif.asarray(), stored)
    result = cli("export", pred, "-o", tmp_path / "png", "--format", "png", "--labels", "membranes", "-q")
    assert result.exit_code == 0, result.stderr
    from PIL import Image

    files = sorted((tmp_path / "png").iterdir())
    assert [f.name for f in files] == ["slice_0000.png", "slice_0001.png", "slice_0002.png"]
    mask = np.asarray(Image.open(files[1]))
    np.testing.assert_array_equal(mask, open_ome(pred).labels["membranes"].array[1] * 255)
    again = cli("export", pred, "-o", tmp_path / "p.tif", "-q")
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_a_failing_model_fails_every_waiting_block_instead_of_hanging():
    from concurrent.futures import TimeoutError as FutureTimeout

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise RuntimeError("device fell over")

    plan = plan_block((0, 64), (0, 64), 32, 0, 4, shape=(64, 64))  # 4 tiles, all in one batch
    region = np.zeros((64, 64), np.uint8)
    with Engine(Broken(), torch.device("cpu"), 0.0, 1.0, PredictConfig(batch_size=8)) as engine:
        futures = []
        for _ in range(3):
            try:
                futures.append(engine.submit(region, plan))
            except RuntimeError as exc:  # the model already failed (a loaded machine): said at once, not hung
                assert "device fell over" in str(exc)
        assert futures  # the first block is always accepted
        for future in futures:
            try:
                future.result(timeout=30)
            except FutureTimeout:
                pytest.fail("a block waited forever after the model failed")
            except RuntimeError as exc:
                assert "device fell over" in str(exc)
            else:
                pytest.fail("a failed block returned a result")


def test_bf16_prediction_is_close_to_fp32(model_run, isbi_arrays, tmp_path):
    data = _store(tmp_path, isbi_arrays[0][:1, :256, :256])
    got = {}
    for precision in ("fp32", "bf16"):
        out = emseg.predict(
            model_run,
            data,
            tmp_path / f"{precision}.zarr",
            tile=128,
            dtype="float32",
            device="cpu",
            precision=precision,
        )
        got[precision] = open_ome(out).array[0]
    diff = np.abs(got["bf16"] - got["fp32"])
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.01  # bf16 really ran, and agrees


def test_unknown_precision_is_refused(model_run, isbi_zarr, tmp_path, cli):
    result = cli("predict", model_run, isbi_zarr, "-o", tmp_path / "p.zarr", "--precision", "fp8", "-q")
    assert result.exit_code == 2 and "--precision" in result.stderr
