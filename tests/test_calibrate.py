"""Segmentation settings calibrated on labelled slices (issue 23): the merge tree's cuts are the
agglomeration, the fast scorer is ``emseg evaluate``'s V_rand, calibration reads only the slices
it is given, the fallback to the map's components engages where no setting helps, and a run's
calibration reaches ``emseg segment`` through the prediction's provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi

from emseg.config import SEGMENT_DEFAULTS, SegmentConfig
from emseg.evaluation.instances import boundary_lines, score_instances
from emseg.evaluation.metrics import evaluate_arrays
from emseg.io.zarr import open_ome
from emseg.probability import FOUR, fiji_cells, thinned_segmentation
from emseg.segmentation.agglomerate import cut_tree, merge_hierarchical, merge_tree, region_edges
from emseg.segmentation.blocks import Job, segment_image
from emseg.segmentation.calibrate import _Scorer, _Seeding, calibrate
from emseg.segmentation.segment import segment_store
from emseg.segmentation.watershed import fragments
from emseg.synthetic import synthetic_stack
from tests.test_segment import faint_prob_from_labels, prob_from_labels, write_pred


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> dict:
    """Three synthetic slices with ground truth, a network-like P(cell) of them (uint8) and stores."""
    from emseg.config import IngestConfig
    from emseg.io.ingest import ingest_stack

    d = tmp_path_factory.mktemp("calibrate")
    raw, labels = synthetic_stack((4, 192, 192), seed=5)
    tifffile.imwrite(d / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(d / "lab.tif", labels, photometric="minisblack")
    data = ingest_stack(d / "raw.tif", d / "data.zarr", IngestConfig(voxel_size=(50, 4, 4)), labels=d / "lab.tif")
    prob = prob_from_labels(labels, seed=1)
    pred = write_pred(d / "pred.zarr", prob, (1, 192, 192))
    return {"dir": d, "data": data, "pred": pred, "labels": labels, "prob": np.round(prob * 255).astype(np.uint8)}


def test_every_cut_of_the_merge_tree_is_a_fresh_agglomeration(annotated) -> None:
    frags, heights = fragments(annotated["prob"][0], 0.7, 2, None, "maxima")
    n = int(frags.max()) + 1
    pairs, sums, counts = region_edges(frags, heights)
    _, merges, levels = merge_tree(n, pairs, sums, counts)
    assert len(merges) > 10 and np.all(np.diff(levels) >= 0)  # merge heights never decrease
    for threshold in (0.0, 0.2, 0.45, 0.6, 0.78, 0.9, 1.0):
        fresh = merge_hierarchical(n, pairs, sums, counts, threshold)
        cut = cut_tree(n, merges, levels, threshold)
        assert _same_partition(fresh[frags], cut[frags]), threshold


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_the_fast_scorer_is_evaluates_v_rand(annotated, mode) -> None:
    prob, labels = annotated["prob"][:3], annotated["labels"][:3]
    truth = (labels > 0).astype(np.uint8)
    truths = [ndi.label(t, structure=FOUR)[0] for t in truth]
    seeding = _Seeding(prob, truths, 0.7, 2, mode, "cores", (50.0, 4.0, 4.0))
    cases = ((0.5, 1), (0.78, 200), (0.95, 50))
    grid = seeding.grid([t for t, _ in cases], [size for _, size in cases])  # what calibration searches
    for i, (merge_threshold, min_size) in enumerate(cases):
        job = Job("", "", "", "", "", mode, 0.7, 2, merge_threshold, min_size, (50.0, 4.0, 4.0), "cores")
        segmented, _ = segment_image(prob, job)
        expected = score_instances(segmented, truth).v_rand
        assert seeding.score(merge_threshold, min_size) == pytest.approx(expected, abs=1e-12)
        assert grid[i, i] == pytest.approx(expected, abs=1e-12)


def test_thinned_components_score_as_the_map_they_came_from(annotated) -> None:
    """The fallback's cells score exactly the map's V_rand at that threshold: their own lines are
    the boundary (boundary_lines draws none beside a 0)."""
    prob, truth = annotated["prob"][:3], (annotated["labels"][:3] > 0).astype(np.uint8)
    prob32 = prob.astype(np.float32) / np.float32(255)
    for t in (0.3, 0.5, 0.8):
        job = Job("", "", "", "", "", "2d", 0.7, 2, 0.5, 1, (1.0, 1.0, 1.0), "cores", components=t)
        cells, _ = segment_image(prob, job)
        assert (boundary_lines(cells[0]) == cells[0]).all()
        scores = evaluate_arrays(prob32, truth, thresholds=(t,))
        assert score_instances(cells, truth).v_rand == pytest.approx(scores.v_rand, abs=1e-12)
        ours = _Scorer(cells.astype(np.int64), [ndi.label(x, structure=FOUR)[0] for x in truth], lines=False)
        assert ours.score(np.arange(int(cells.max()) + 1)) == pytest.approx(scores.v_rand, abs=1e-12)
        assert (cells[0] == thinned_segmentation(fiji_cells(prob32[0], t))).all()


def test_calibration_beats_the_defaults_on_a_soft_map_and_says_what_it_scored(annotated) -> None:
    labels = annotated["labels"][:3]
    soft = np.round(faint_prob_from_labels(labels, seed=3) * 255).astype(np.uint8)
    result = calibrate(soft, labels > 0, slices=[0, 1, 2])
    assert result.v_rand >= result.defaults_v_rand and result.v_rand >= result.map_v_rand
    assert result.slices == [0, 1, 2] and result.seconds > 0
    job = Job("", "", "", "", "", "2d", **{k: result.settings[k] for k in SEGMENT_DEFAULTS if k != "components"},
              voxel_size=(1.0, 1.0, 1.0), components=result.settings["components"])  # fmt: skip
    segmented, _ = segment_image(soft, job)
    assert score_instances(segmented, (labels > 0).astype(np.uint8)).v_rand == pytest.approx(result.v_rand, abs=1e-12)


def test_the_fallback_engages_where_no_setting_beats_the_map() -> None:
    """A map that is the truth itself: its components at any threshold in (0, 1) are the true
    cells (V_rand 1), which no watershed can beat; calibration keeps the map's cells."""
    _, labels = synthetic_stack((2, 128, 128), seed=9)
    perfect = np.where(labels > 0, 255, 0).astype(np.uint8)
    result = calibrate(perfect, labels > 0)
    assert result.fallback and result.settings["components"] is not None
    assert result.v_rand == result.map_v_rand == pytest.approx(1.0)


def _poison_other_slices(store: Path, keep: range) -> None:
    """Overwrite the chunk files of every slice outside ``keep`` (image and labels, every level's
    first) with bytes no codec decodes: reading any of them fails."""
    for array in (store / "0", store / "labels" / "cells" / "0"):
        for z in range(zarr.open_array(str(array), mode="r").shape[0]):
            if z not in keep:  # chunk keys z/y/x (or z.y.x)
                chunks = [f for f in (array / str(z)).rglob("*") if f.is_file()] + list(array.glob(f"{z}.*"))
                assert chunks
                for chunk in chunks:
                    chunk.write_bytes(b"not a chunk")


def test_segment_calibrate_reads_only_the_slices_it_is_given(annotated, tmp_path) -> None:
    import shutil

    data = tmp_path / "data.zarr"
    shutil.copytree(annotated["data"], data)
    _poison_other_slices(data, range(1, 3))
    with pytest.raises(Exception):  # the poison works: a slice outside 1:3 cannot be read
        np.asarray(open_ome(data).labels["cells"].array[0])
    out = segment_store(annotated["pred"], tmp_path / "seg.zarr", SegmentConfig(calibrate=str(data), slices=(1, 3)))
    chosen = open_ome(out).attrs["emseg"]["segmentation"]
    assert chosen["calibration"]["slices"] == [1, 2]
    assert set(chosen["from"].values()) == {f"calibrated on {data} slices [1, 2]"}
    applied = open_ome(out).attrs["emseg"]["settings"]
    assert all(applied[k] == v for k, v in chosen["settings"].items())


def test_explicit_options_beat_the_calibration_and_defaults_fill_the_rest(annotated, tmp_path) -> None:
    out = segment_store(annotated["pred"], tmp_path / "seg.zarr", SegmentConfig(merge_threshold=0.55))
    chosen = open_ome(out).attrs["emseg"]["segmentation"]
    assert chosen["settings"] == {**SEGMENT_DEFAULTS, "merge_threshold": 0.55}
    assert chosen["from"]["merge_threshold"] == "option" and chosen["from"]["min_size"] == "emseg's defaults"


def test_a_run_calibrates_itself_and_its_predictions_segment_with_it(annotated, tmp_path) -> None:
    import shutil

    import emseg
    from emseg.config import TrainConfig
    from emseg.models.checkpoint import read_checkpoint
    from emseg.training.calibrate import SEGMENTATION_FILE, calibrate_run

    run = tmp_path / "run"
    options = dict(depth=2, base_channels=8, crop=64, batch_size=2, steps_per_epoch=3, epochs=1, val_slices="2:4")
    summary = emseg.train(annotated["data"], run, device="cpu", **options)
    record = summary["segmentation"]
    assert record["slices"] == [2, 3] and record["slices_role"] == "validation slices"
    assert record["v_rand"] >= record["map_v_rand"]  # never below the map on the slices that chose
    assert (run / SEGMENTATION_FILE).is_file()
    for name in ("best.safetensors", "last.safetensors"):
        assert read_checkpoint(run / name)[1]["segmentation"]["settings"] == record["settings"]
    # calibration reads the validation slices only: every other slice poisoned, it runs the same
    data = tmp_path / "data.zarr"
    shutil.copytree(annotated["data"], data)
    _poison_other_slices(data, range(2, 4))
    again = calibrate_run(
        data, run, TrainConfig(**{k: v for k, v in options.items() if k not in ("depth", "base_channels")})
    )
    assert again["settings"] == record["settings"] and again["v_rand"] == record["v_rand"]
    # the prediction carries it, segment uses it unless an option says otherwise
    pred = emseg.predict(run, annotated["data"], tmp_path / "pred.zarr", device="cpu", tile=64, overlap=8)
    assert open_ome(pred).attrs["emseg"]["segmentation"]["settings"] == record["settings"]
    seg = emseg.segment(pred, tmp_path / "seg.zarr", min_size=7)
    chosen = open_ome(seg).attrs["emseg"]["segmentation"]
    assert chosen["from"]["min_size"] == "option" and chosen["settings"]["min_size"] == 7
    assert chosen["from"]["merge_threshold"].startswith(f"the calibration of run {run.resolve()}")
    if record["settings"]["components"] is None:
        assert chosen["settings"]["merge_threshold"] == record["settings"]["merge_threshold"]


def test_the_cli_calibrates_says_where_settings_came_from_and_refuses_bad_slices(annotated, tmp_path, cli) -> None:
    out = tmp_path / "seg.zarr"
    result = cli("segment", annotated["pred"], "-o", out, "--calibrate", annotated["data"], "--slices", "0:2", "-q")
    assert result.exit_code == 0, result.output
    info = cli("info", out)
    assert info.exit_code == 0 and "segmentation" in info.stdout and "calibrated on" in info.stdout
    for slices, words in (("2:9", "covers slices 0-3"), ("3:3", "expected 0 <= A < B")):
        bad = cli("segment", annotated["pred"], "-o", tmp_path / "x.zarr", "--calibrate", annotated["data"],
                  "--slices", slices)  # fmt: skip
        assert bad.exit_code == 2 and words in bad.stderr and not (tmp_path / "x.zarr").exists()
    unlabelled = cli("segment", annotated["pred"], "-o", tmp_path / "y.zarr", "--calibrate", annotated["pred"])
    assert unlabelled.exit_code == 2 and "has no labels/cells" in unlabelled.stderr
