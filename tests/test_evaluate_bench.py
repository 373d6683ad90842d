"""emseg evaluate (ISBI 2012 scores of a store or a TIFF) and emseg bench."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
import torch

import emseg
from emseg.errors import BadInputError
from emseg.models.unet import UNet
from emseg.recipes.bench import bf16_gain, count_flops, forward_bench


def test_perfect_tiff_prediction_scores_one(isbi_zarr, isbi_arrays, tmp_path, cli):
    labels = isbi_arrays[1]
    tifffile.imwrite(tmp_path / "perfect.tif", labels, photometric="minisblack")
    out = tmp_path / "scores.json"
    result = cli("evaluate", tmp_path / "perfect.tif", isbi_zarr, "--slices", "27:30", "--json", out)
    assert result.exit_code == 0, result.stderr
    scores = json.loads(out.read_text())
    assert scores["n_slices"] == 3 and scores["pixel_error"] == 0.0
    assert scores["v_rand"] == pytest.approx(1.0) and scores["v_info"] == pytest.approx(1.0)
    assert "V_rand" in result.stdout and "V_info" in result.stdout
    floats = tmp_path / "floats.tif"
    tifffile.imwrite(floats, (labels[:] / 255.0).astype(np.float32), photometric="minisblack")
    assert emseg.evaluate(floats, isbi_zarr, slices="0:2")["v_rand"] == pytest.approx(1.0)


def test_all_cell_prediction_scores_like_the_issue_says(isbi_zarr, tmp_path):
    """Predicting "cell" everywhere: pixel accuracy about 0.80 and a very low V_rand (one segment)."""
    tifffile.imwrite(tmp_path / "all.tif", np.full((30, 512, 512), 255, np.uint8), photometric="minisblack")
    scores = emseg.evaluate(tmp_path / "all.tif", isbi_zarr, slices=(27, 30))
    assert 0.75 < scores["pixel_accuracy"] < 0.85
    assert scores["v_rand"] < 0.2


@pytest.mark.slow
def test_prediction_store_is_aligned_by_its_slices(isbi_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(
        isbi_zarr,
        run,
        depth=2,
        base_channels=8,
        crop=64,
        batch_size=4,
        epochs=1,
        steps_per_epoch=10,
        device="cpu",
        val_slices="29",
    )
    pred = emseg.predict(run, isbi_zarr, tmp_path / "p.zarr", tile=256, device="cpu", slices="27:30")
    scores = emseg.evaluate(pred, isbi_zarr)
    assert scores["n_slices"] == 3
    assert 0 < scores["v_rand"] <= 1 and 0 < scores["pixel_accuracy"] <= 1
    assert emseg.evaluate(pred, isbi_zarr, slices="28:30")["n_slices"] == 2
    with pytest.raises(BadInputError, match="covers"):
        emseg.evaluate(pred, isbi_zarr, slices="0:3")


def test_bad_evaluation_input(isbi_zarr, tmp_path, cli):
    tifffile.imwrite(tmp_path / "short.tif", np.zeros((5, 512, 512), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "range.tif", np.full((30, 512, 512), 2.0, np.float32), photometric="minisblack")
    nolabels = emseg.ingest(tmp_path / "short.tif", tmp_path / "nolabels.zarr")
    for args, phrase in (
        ([tmp_path / "short.tif", isbi_zarr], "differs"),
        ([tmp_path / "range.tif", isbi_zarr], "within [0, 1]"),
        ([tmp_path / "short.tif", nolabels], "no labels/cells"),
        ([tmp_path / "none.tif", isbi_zarr], "no such file"),
    ):
        result = cli("evaluate", *args)
        assert result.exit_code == 2 and phrase in result.stderr, result.stderr


def test_flops_match_the_reference_u_net():
    assert count_flops(UNet(), (1, 1, 512, 512)) / 1e9 == pytest.approx(384.7, abs=0.05)


def test_forward_bench_reports_each_variant():
    rows = forward_bench(UNet(depth=2, base_channels=4), torch.device("cpu"), 64, 2, warmup=1, repeats=2)
    assert [r["variant"] for r in rows] == ["fp32", "fp32 + channels_last", "bf16 + channels_last"]
    for r in rows:
        assert r["mpix_per_s"] > 0 and r["tflop_per_s"] > 0 and r["fraction_of_peak"] is None
    assert bf16_gain(rows) == rows[2]["mpix_per_s"] / rows[1]["mpix_per_s"]


@pytest.mark.slow
def test_bench_quick_runs_end_to_end(tmp_path, cli):
    out = tmp_path / "bench.json"
    result = cli("bench", "--device", "cpu", "--quick", "--json", out)
    assert result.exit_code == 0, result.stderr
    r = json.loads(out.read_text())
    assert r["predict"]["emseg"]["mpix_per_s"] > 0 and r["train"]["steps_per_s"] > 0
    assert "bf16 + channels_last" in [row["variant"] for row in r["forward"]["rows"]] and r["forward"]["bf16_gain"] > 0
    # the share is a ratio of two separately timed medians: under load it can exceed 1, so only
    # its presence and sanity are checked, never its value
    for key in ("augmentation_share", "augmentation_ms", "step_ms", "crops_per_s", "mpix_per_s"):
        assert math.isfinite(r["train"][key]) and r["train"][key] >= 0, key
    if isinstance(r["predict"].get("monai_in_memory"), dict):
        assert r["predict"]["ratio"] > 0
    assert "forward" in result.stdout and "predict" in result.stdout
