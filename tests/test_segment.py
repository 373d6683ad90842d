"""``emseg segment``: fragments, agglomeration, blockwise without seams, the label image, the
CLI end to end (-o and --into), resume, and ``emseg evaluate`` of an instance segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi

from emseg.config import SegmentConfig
from emseg.errors import BadInputError
from emseg.evaluation.instances import boundary_lines, is_instance_store, score_instances
from emseg.evaluation.metrics import rand_info_scores
from emseg.io.outputs import provenance
from emseg.io.pyramid import reduce2
from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale, open_ome
from emseg.segmentation.agglomerate import agglomerate, merge_hierarchical, region_edges
from emseg.segmentation.flood import flood
from emseg.segmentation.segment import segment_store
from emseg.segmentation.stitch import global_table, label_dtype
from emseg.synthetic import synthetic_stack, tile_isbi_like

FOUR = ndi.generate_binary_structure(2, 1)


def prob_from_labels(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A network-like P(cell) map, (..., Y, X) float32, from 0/255 ground truth: as a trained
    U-Net draws it, every membrane near 0 whatever its width (P(cell) rises with the distance d
    from the membrane as 1 - exp(-d² / 4.5)), slightly blurred and noisy."""
    rng = np.random.default_rng(seed)
    cells = (labels > 0).reshape(-1, *labels.shape[-2:])
    dist = np.stack([ndi.distance_transform_edt(c) for c in cells]).reshape(labels.shape)
    prob = ndi.gaussian_filter(1 - np.exp(-(dist**2) / 4.5), sigma=(0,) * (labels.ndim - 2) + (0.7, 0.7))
    return np.clip(prob + rng.normal(0, 0.08, labels.shape), 0, 1).astype(np.float32)


def faint_prob_from_labels(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A soft P(cell) map: the ground truth blurred (sigma 1.5) and noisy, so one-pixel membranes
    only dip to P(cell) ~0.5, as from a weak model."""
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter((labels > 0).astype(np.float32), sigma=(0,) * (labels.ndim - 2) + (1.5, 1.5))
    return np.clip(smooth + rng.normal(0, 0.08, labels.shape), 0, 1).astype(np.float32)


def write_pred(path: Path, prob: np.ndarray, chunks: tuple[int, int, int]) -> Path:
    """A prediction-like store: (Z, Y, X) uint8 P(cell) with emseg provenance and a labels group."""
    root = create_image_store(path, "0.4", attrs={"emseg": provenance("predict", complete=True)})
    spec = LevelSpec(shape=prob.shape, dtype="uint8", chunks=chunks, pyramid_min_size=max(prob.shape[1:]) // 2)
    arrays = create_multiscale(root, spec, (50.0, 4.0, 4.0), "0.4", "probabilities")
    arrays[0][:] = np.round(prob * 255).astype(np.uint8)
    root.require_group("labels").attrs.update({"labels": []})
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A small annotated synthetic stack (data store with labels/cells) and its P(cell) store."""
    from emseg.config import IngestConfig
    from emseg.io.ingest import ingest_stack

    d = tmp_path_factory.mktemp("segment")
    raw, labels = synthetic_stack((3, 256, 256), seed=2)
    tifffile.imwrite(d / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(d / "lab.tif", labels, photometric="minisblack")
    data = ingest_stack(d / "raw.tif", d / "data.zarr", IngestConfig(voxel_size=(50, 4, 4)), labels=d / "lab.tif")
    pred = write_pred(d / "pred.zarr", prob_from_labels(labels), (1, 128, 128))
    return {"dir": d, "data": data, "pred": pred, "labels": labels}


# --- units ------------------------------------------------------------------------------------


def test_label_dtype_promotes_to_uint64_past_uint32() -> None:
    assert label_dtype(0) == label_dtype(2**32 - 1) == "uint32"
    assert label_dtype(2**32) == label_dtype(2**40) == "uint64"


def test_global_table_joins_and_numbers_consecutively() -> None:
    # block 0 has 3 objects, block 1 has 2; block 0's 2 continues as block 1's 1
    offsets, table = global_table([3, 2], [(0, 1, np.array([[2, 1]]))])
    assert offsets.tolist() == [0, 3]
    final = [table[offsets[b] + local] for b, local in ((0, 1), (0, 2), (0, 3), (1, 1), (1, 2))]
    assert final == [1, 2, 3, 2, 4] and table[0] == 0


def test_mode2_takes_the_most_frequent_id() -> None:
    band = np.array([[[5, 7, 1, 2], [7, 7, 3, 4]]], dtype=np.uint32)
    assert reduce2(band, "mode").tolist() == [[[7, 1]]]
    assert reduce2(np.array([[[9, 9], [3, 3]]], dtype=np.uint64), "mode").tolist() == [[[9]]]


def test_flood_matches_scikit_image_on_a_smooth_map() -> None:
    from skimage.segmentation import watershed

    rng = np.random.default_rng(0)
    heights = np.round(ndi.gaussian_filter(rng.random((96, 96)), 3) * 2550 % 256).astype(np.uint8)
    markers = np.zeros(heights.shape, np.int32)
    markers[rng.integers(0, 96, 12), rng.integers(0, 96, 12)] = np.arange(1, 13)
    ours = flood(heights, markers)
    assert (ours > 0).all() and (ours[markers > 0] == markers[markers > 0]).all()
    assert (ours == watershed(heights, markers, connectivity=1)).mean() > 0.97


def reference_flood(heights: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """The flooding order the bucket queue promises, by a heap: seeds in raster order at their
    height, then the lowest (priority, push order) first; a neighbour (face connectivity, axes in
    order, lower side first) is labelled when pushed, at priority max(its height, the level)."""
    import heapq

    labels = markers.astype(np.int32).copy()
    heap, count = [], 0
    for index in zip(*np.nonzero(labels > 0), strict=True):
        heap.append((int(heights[index]), count, index))
        count += 1
    heapq.heapify(heap)
    while heap:
        level, _, index = heapq.heappop(heap)
        for axis in range(heights.ndim):
            for step in (-1, 1):
                j = list(index)
                j[axis] += step
                if 0 <= j[axis] < heights.shape[axis] and labels[tuple(j)] == 0:
                    labels[tuple(j)] = labels[index]
                    heapq.heappush(heap, (max(int(heights[tuple(j)]), level), count, tuple(j)))
                    count += 1
    return labels


@pytest.mark.parametrize("shape", [(40, 37), (6, 17, 15)])
def test_flood_is_exactly_the_priority_flood(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    heights = rng.integers(0, 256, shape).astype(np.uint8)
    heights[heights < 120] //= 8  # many ties, the case where the order matters
    markers = np.zeros(shape, np.int32)
    flat = rng.choice(heights.size, 9, replace=False)
    markers.reshape(-1)[flat] = np.arange(1, 10)
    assert np.array_equal(flood(heights, markers), reference_flood(heights, markers))


def test_region_edges_are_every_differing_neighbour_pair() -> None:
    rng = np.random.default_rng(3)
    for shape in [(30, 41), (5, 12, 9)]:
        labels = ndi.zoom(rng.integers(1, 8, tuple(-(-s // 4) for s in shape)), 4, order=0)
        labels = labels[tuple(slice(0, s) for s in shape)].astype(np.int32)
        heights = rng.integers(0, 256, shape).astype(np.uint8)
        expected: dict[tuple[int, int], list[float]] = {}
        for axis in range(labels.ndim):
            a = np.moveaxis(labels, axis, 0)
            h = np.moveaxis(heights, axis, 0)
            for i in range(a.shape[0] - 1):
                for la, lb, ha, hb in zip(a[i].ravel(), a[i + 1].ravel(), h[i].ravel(), h[i + 1].ravel(), strict=True):
                    if la != lb:
                        key = (min(la, lb), max(la, lb))
                        entry = expected.setdefault(key, [0.0, 0])
                        entry[0] += float(ha) + float(hb)
                        entry[1] += 1
        pairs, sums, counts = region_edges(labels, heights)
        assert [tuple(p) for p in pairs.tolist()] == sorted(expected)
        assert sums.tolist() == [expected[k][0] for k in sorted(expected)]
        assert counts.tolist() == [expected[k][1] for k in sorted(expected)]


def test_agglomerate_merges_weak_borders_and_small_fragments() -> None:
    labels = np.ones((20, 30), np.int32)
    labels[:, 10:20], labels[:, 20:] = 2, 3
    labels[0:2, 0:2] = 4  # a 4-pixel fragment inside 1
    heights = np.zeros(labels.shape, np.uint8)
    heights[:, 19:21] = 250  # a strong membrane between 2 and 3; none between 1 and 2
    out, n = agglomerate(labels, heights, merge_threshold=0.5, min_size=10)
    assert n == 2
    assert len(np.unique(out[:, :20])) == 1 and out[0, 0] == out[5, 5] != out[0, 25]


def test_evaluate_instances_of_the_truth_is_perfect() -> None:
    _, labels = synthetic_stack((2, 128, 128), seed=3)
    truth = (labels > 0).astype(np.uint8)
    perfect = np.stack([flood(np.zeros(t.shape, np.uint8), ndi.label(t, FOUR)[0]) for t in truth])
    s = score_instances(perfect, truth)
    assert s.v_rand > 0.999 and s.adapted_rand_error < 1e-3 and s.voi < 1e-3
    merged = np.ones_like(perfect)
    worse = score_instances(merged, truth)
    assert worse.v_rand_merge < 0.2 and worse.voi_merge > 1.0 and worse.voi_split < 1e-6


# --- blockwise equals whole ---------------------------------------------------------------------


def _split_rates(truth: np.ndarray, seg: np.ndarray, lines: list[int]) -> tuple[int, int]:
    """Ground-truth cells (4-connected cell pixels of one (Y, X) slice) crossing one of the
    vertical or horizontal ``lines`` (pixel coordinates of block borders) that ``seg`` splits
    (its largest ID covers under 90 % of the cell): (split, crossing)."""
    cells, n = ndi.label(truth > 0, FOUR)
    split = crossing = 0
    for index, where in enumerate(ndi.find_objects(cells), start=1):
        ys, xs = where
        if not any(ys.start < c < ys.stop or xs.start < c < xs.stop for c in lines):
            continue
        inside = cells[where] == index
        crossing += 1
        ids = np.unique(seg[where][inside], return_counts=True)[1]
        split += int(ids.max() < 0.9 * inside.sum())
    return split, crossing


def _blockwise_vs_whole(tmp_path: Path, side: int, block: int) -> None:
    """Segment a ``side``² slice whole and in ``block``² blocks: the two agree (V_rand >= 0.999),
    the blocks split no ground-truth cell that the whole keeps, and cells crossing block borders
    are split no more often than cells crossing lines halfway between them. The slice is mirrored
    tiles of a synthetic one, shifted so that no mirror line is a block border or a halfway line."""
    tile, shift = side // 4, side // 16 * 3
    _, lab = synthetic_stack((1, tile, tile), seed=4)
    truth = tile_isbi_like(lab[0], (side + shift, side + shift))[shift:, shift:]
    prob = prob_from_labels(truth, seed=1)[None]
    pred = write_pred(tmp_path / "pred.zarr", prob, (1, block // 2, block // 2))
    whole = np.asarray(open_ome(segment_store(pred, tmp_path / "whole.zarr", SegmentConfig(block=side))).array[0])
    blocked = np.asarray(open_ome(segment_store(pred, tmp_path / "blocks.zarr", SegmentConfig(block=block))).array[0])
    v_rand = rand_info_scores(whole.astype(np.int64), blocked.astype(np.int64), boundary_as_singletons=False)["v_rand"]
    assert v_rand >= 0.999, v_rand
    borders = list(range(block, side, block))
    between = [b + block // 2 for b in range(0, side - block, block)]  # as many lines, away from borders
    (split_at, n_at), (split_whole, _) = _split_rates(truth, blocked, borders), _split_rates(truth, whole, borders)
    split_away, n_away = _split_rates(truth, blocked, between)
    assert n_at > 10 and n_away > 10
    assert split_at <= split_whole  # stitching split nothing
    if side >= 2048:  # enough cells for the rates to mean something
        assert split_at / n_at <= split_away / n_away + 1 / n_at, (split_at, n_at, split_away, n_away)


@pytest.mark.slow
def test_blockwise_equals_whole_2048_in_512_blocks(tmp_path: Path) -> None:
    _blockwise_vs_whole(tmp_path, 2048, 512)


@pytest.mark.slow
def test_blockwise_equals_whole_4096_in_1024_blocks(tmp_path: Path) -> None:
    _blockwise_vs_whole(tmp_path, 4096, 1024)


@pytest.mark.slow
def test_blockwise_equals_whole_small(tmp_path: Path) -> None:
    _blockwise_vs_whole(tmp_path, 1024, 256)


# --- the command ---------------------------------------------------------------------------------


def test_cli_segment_evaluate_export(small: dict[str, Path], cli, tmp_path: Path) -> None:
    seg = tmp_path / "seg.zarr"
    r = cli("segment", small["pred"], "-o", seg, "--block", "128", "--halo", "32", "--quiet")
    assert r.exit_code == 0, r.output
    image = open_ome(seg)
    assert image.array.dtype == np.uint32 and image.shape == (3, 256, 256) and len(image.levels) == 2
    attrs = dict(image.attrs)
    assert "image-label" in attrs and attrs["multiscales"][0]["type"] == "mode" and attrs["emseg"]["complete"]
    ids = np.unique(image.array[:])
    assert ids[0] >= 1 and ids[-1] == len(ids)  # consecutive IDs 1..K
    assert is_instance_store(seg) and not is_instance_store(small["pred"])
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v04.image_label import ImageLabel

    assert isinstance(open_ome_zarr(zarr.open_group(str(seg), mode="r")), ImageLabel)  # what napari reads
    r = cli("evaluate", seg, small["data"], "--json", tmp_path / "scores.json")
    assert r.exit_code == 0, r.output
    assert "adapted Rand error" in r.output
    r = cli("segment", small["pred"], "-o", seg, "--quiet")
    assert r.exit_code == 2 and "already exists" in r.output
    r = cli("export", seg, "-o", tmp_path / "seg.tif")
    assert r.exit_code == 0, r.output
    assert (tifffile.imread(tmp_path / "seg.tif") == image.array[:]).all()


def test_segmentation_scores_near_the_truth(small: dict[str, Path], tmp_path: Path) -> None:
    from emseg.evaluation.evaluate import evaluate

    seg = segment_store(small["pred"], tmp_path / "seg.zarr", SegmentConfig(block=128, halo=32))
    r = evaluate(seg, small["data"])
    assert r["kind"] == "instances" and r["n_slices"] == 3
    assert r["v_rand"] > 0.9 and r["adapted_rand_error"] < 0.1


def test_faint_membranes_hold_with_a_lower_merge_threshold(small: dict[str, Path], tmp_path: Path) -> None:
    """The defaults suit trained networks' maps (membranes near 0); a soft map whose thin
    membranes only dip to P(cell) ~0.5 keeps its cells apart with --merge-threshold 0.6."""
    from emseg.evaluation.evaluate import evaluate

    pred = write_pred(tmp_path / "faint.zarr", faint_prob_from_labels(small["labels"]), (1, 128, 128))
    seg = segment_store(pred, tmp_path / "seg.zarr", SegmentConfig(block=128, halo=32, merge_threshold=0.6))
    r = evaluate(seg, small["data"])
    assert r["v_rand"] > 0.99 and r["adapted_rand_error"] < 0.02


def test_into_adds_labels_cells_to_the_prediction(small: dict[str, Path], cli, tmp_path: Path) -> None:
    import shutil

    pred = tmp_path / "pred.zarr"
    shutil.copytree(small["pred"], pred)
    r = cli("segment", pred, "--into", pred, "--quiet")
    assert r.exit_code == 0, r.output
    image = open_ome(pred)
    assert "cells" in image.labels and image.labels["cells"].array.dtype == np.uint32
    assert dict(image.labels["cells"].attrs)["image-label"]["source"] == {"image": "../../"}
    r = cli("export", pred, "-o", tmp_path / "cells.tif", "--labels", "cells")
    assert r.exit_code == 0, r.output
    assert (tifffile.imread(tmp_path / "cells.tif") == image.labels["cells"].array[:]).all()
    with pytest.raises(BadInputError):
        segment_store(pred, tmp_path / "other.zarr", SegmentConfig(into=True))


def test_resume_after_a_failure_matches_a_fresh_run(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emseg.segmentation.segment as seg_mod

    cfg = SegmentConfig(block=128, halo=32, threads=1)
    fresh = np.asarray(open_ome(segment_store(small["pred"], tmp_path / "fresh.zarr", cfg)).array[:])
    calls = []

    def fail_after_one(task):  # the second pass dies after writing one block
        if calls:
            raise RuntimeError("killed")
        calls.append(task)
        return seg_mod.relabel_block.__wrapped__(task) if hasattr(seg_mod.relabel_block, "__wrapped__") else real(task)

    real = seg_mod.relabel_block
    monkeypatch.setattr(seg_mod, "relabel_block", fail_after_one)
    with pytest.raises(RuntimeError):
        segment_store(small["pred"], tmp_path / "seg.zarr", cfg)
    assert not (tmp_path / "seg.zarr").exists() and (tmp_path / ".seg.zarr.partial").is_dir()
    monkeypatch.setattr(seg_mod, "relabel_block", real)
    out = segment_store(small["pred"], tmp_path / "seg.zarr", SegmentConfig(block=128, halo=32, resume=True))
    assert (np.asarray(open_ome(out).array[:]) == fresh).all()


def test_3d_mode_links_slices(small: dict[str, Path], tmp_path: Path) -> None:
    seg = segment_store(small["pred"], tmp_path / "seg3d.zarr", SegmentConfig(mode="3d", block=128, halo=32))
    labels = np.asarray(open_ome(seg).array[:])
    shared = np.intersect1d(np.unique(labels[0]), np.unique(labels[1]))
    assert len(shared) > 10  # objects continue from slice to slice
    flat = np.asarray(open_ome(segment_store(small["pred"], tmp_path / "seg2d.zarr", SegmentConfig())).array[:])
    assert len(np.intersect1d(np.unique(flat[0]), np.unique(flat[1]))) == 0


def test_bad_settings_are_one_line_errors(small: dict[str, Path], cli, tmp_path: Path) -> None:
    r = cli("segment", small["pred"], "-o", tmp_path / "x.zarr", "--mode", "4d")
    assert r.exit_code == 2
    r = cli("segment", small["pred"], "--quiet")
    assert r.exit_code == 2 and "--into" in r.output
    r = cli("segment", small["data"], "-o", tmp_path / "y.zarr", "--merge-threshold", "2")
    assert r.exit_code == 2


def test_cli_defaults_are_segment_config_defaults() -> None:
    import inspect

    from emseg.cli import app

    info = next(i for i in app.registered_commands if i.name == "segment")
    defaults = {n: getattr(p.default, "default", None) for n, p in inspect.signature(info.callback).parameters.items()}
    cfg = SegmentConfig()
    checked = [n for n in defaults if hasattr(cfg, n) and n not in ("overwrite", "resume", "into")]
    assert len(checked) >= 6
    assert all(defaults[n] == getattr(cfg, n) for n in checked)


def test_boundary_lines_are_one_pixel() -> None:
    labels = np.ones((6, 6), np.int32)
    labels[:, 3:] = 2
    lines = boundary_lines(labels)
    assert (lines[:, 2] == 0).all() and (lines[:, [0, 1, 3, 4, 5]] > 0).all()


def test_write_is_through_zarr_chunks(small: dict[str, Path], tmp_path: Path) -> None:
    seg = segment_store(small["pred"], tmp_path / "s.zarr", SegmentConfig(block=128, halo=32))
    arr = zarr.open_array(str(seg / "0"), mode="r")
    assert arr.chunks == (1, 128, 128)


def test_merging_measures_the_whole_border_of_merged_segments():
    """A cell cut in three by an organelle: fragments 1-2 share a low border, 1-3 and 2-3 borders
    that are high in part (the organelle) and low in part. One threshold cut leaves 3 apart; the
    border of {1, 2} with 3, measured whole, is low, so 3 joins. 4 is another cell: its border
    stays high and it stays apart."""
    pairs = np.array([[1, 2], [1, 3], [2, 3], [3, 4]])
    counts = np.array([10, 10, 10, 20])
    mean = np.array([0.1, 0.55, 0.35, 0.9])  # 1-3 alone is above 0.5; with 2-3 the mean is 0.45
    sums = mean * 2 * 255 * counts
    lut = merge_hierarchical(5, pairs, sums, counts, 0.5)
    assert lut[1] == lut[2] == lut[3] and lut[4] != lut[1] and lut[0] not in (lut[1], lut[4])
    single = merge_hierarchical(5, pairs[:1], sums[:1], counts[:1], 0.5)  # only the one low edge
    assert single[1] == single[2] and single[3] != single[1]
    # every border left between two segments has a mean of at least the threshold
    low = merge_hierarchical(5, pairs, sums, counts, 0.3)
    assert low[1] == low[2] and low[3] != low[1]


def test_a_speck_on_a_faint_membrane_does_not_bridge_two_cells():
    """Cells 1 and 3 share a long faint membrane (mean 0.7); a two-pixel fragment 2 on it has
    low borders to both. Merging every low border at once would join 1-2-3; merging the lowest
    first joins 2 to 3, and the border of {2, 3} with 1, measured whole, is high."""
    pairs = np.array([[1, 2], [2, 3], [1, 3]])
    counts = np.array([2, 2, 60])
    mean = np.array([0.45, 0.4, 0.7])
    lut = merge_hierarchical(4, pairs, mean * 2 * 255 * counts, counts, 0.6)
    assert lut[2] == lut[3] and lut[1] != lut[3]


def reference_merge(n, pairs, sums, counts, threshold):
    """Mean agglomeration spelled out: merge the lowest border, measure the borders again, repeat."""
    edges = {
        frozenset((int(a), int(b))): [float(s), float(c)] for (a, b), s, c in zip(pairs, sums, counts, strict=True)
    }
    part = list(range(n))
    while edges:
        key, (s, c) = min(edges.items(), key=lambda kv: kv[1][0] / kv[1][1])
        if s / (2 * 255 * c) >= threshold:
            break
        u, v = sorted(key)
        part = [u if p == v else p for p in part]
        merged: dict = {}
        for k, (s2, c2) in edges.items():
            k2 = frozenset(u if x == v else x for x in k)
            if len(k2) == 2:
                acc = merged.setdefault(k2, [0.0, 0.0])
                acc[0] += s2
                acc[1] += c2
        edges = merged
    return np.array(part)


def test_mean_agglomeration_matches_a_plain_reference():
    rng = np.random.default_rng(5)
    for trial in range(12):
        seeds = ndi.label(rng.random((24, 24)) > 0.8)[0].astype(np.int32)
        labels = flood(rng.integers(0, 255, seeds.shape).astype(np.uint8), seeds)
        heights = rng.integers(0, 256, labels.shape).astype(np.uint8)
        n = int(labels.max()) + 1
        pairs, sums, counts = region_edges(labels, heights)
        sums = sums + rng.random(len(sums))  # no ties
        got = merge_hierarchical(n, pairs, sums, counts, 0.46 + 0.01 * trial)
        want = reference_merge(n, pairs, sums, counts, 0.46 + 0.01 * trial)
        # the same partition: each segment of one is one segment of the other
        assert (
            len(set(zip(got.tolist(), want.tolist(), strict=True))) == len(set(got.tolist())) == len(set(want.tolist()))
        )
        assert 1 < len(set(got.tolist())) < n  # something merged, not everything


def test_a_segmentation_sits_where_its_prediction_sits(small: dict[str, Path], tmp_path: Path) -> None:
    """A prediction of slices A:B starts at z = A x voxel z; its segmentation (own store or
    --into) carries the same translation at every level, so viewers overlay the two."""
    labels = small["labels"]
    pred = tmp_path / "pred.zarr"
    root = create_image_store(pred, "0.4", attrs={"emseg": provenance("predict", complete=True)})
    spec = LevelSpec(shape=labels.shape, dtype="uint8", chunks=(1, 128, 128), pyramid_min_size=128)
    arrays = create_multiscale(root, spec, (50.0, 4.0, 4.0), "0.4", "probabilities", origin=(1350.0, 0.0, 0.0))
    arrays[0][:] = np.round(prob_from_labels(labels) * 255).astype(np.uint8)
    root.require_group("labels").attrs.update({"labels": []})
    assert open_ome(pred).origin == (1350.0, 0.0, 0.0)
    seg = open_ome(segment_store(pred, tmp_path / "seg.zarr", SegmentConfig(block=128)))
    assert seg.origin == (1350.0, 0.0, 0.0)
    entry = dict(seg.attrs)["multiscales"][0]
    shifts = [t["translation"] for d in entry["datasets"] for t in d["coordinateTransformations"][1:]]
    assert shifts == [[1350.0, 0.0, 0.0], [1350.0, 2.0, 2.0]] and entry["type"] == "mode"
