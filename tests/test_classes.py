"""Several classes from one annotation (issue 24): class mapping at ingest, the class weight map,
the loss that ignores unlabelled pixels, per-class and object scores, a multi-class training run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

import emseg
from emseg.classes import label_classes, map_codes, parse_classes
from emseg.config import IngestConfig
from emseg.errors import BadInputError
from emseg.evaluation.metrics import class_scores
from emseg.evaluation.objects import match_objects, true_objects
from emseg.io.ingest import ingest_stack
from emseg.io.zarr import open_ome, store_classes
from emseg.probability import OBJECT_MIN_DISTANCE, blob_objects
from emseg.training.losses import make_loss
from emseg.training.weights import REST_POWER, class_weight_map, unet_weight_map
from tests.test_segment import write_pred

VNC_CLASSES = ("membrane=0,32,64,96,128", "glia=159", "mitochondria=191", "synapse=223", "cell=255")


def _annotation(shape=(3, 96, 96), seed=0):
    """A raw stack and a label image in VNC-like codes: cells (255) split by membranes (0 and 64),
    round mitochondria (191) inside them, and a few pixels of an unknown code (17)."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    lab = np.full(shape, 255, np.uint8)
    lab[:, :, w // 2 - 2 : w // 2 + 2] = 0
    lab[:, h // 2 - 2 : h // 2 + 2, :] = 64
    yy, xx = np.mgrid[:h, :w]
    for cy, cx in ((h // 4, w // 4), (3 * h // 4, 3 * w // 4)):
        lab[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 191
    lab[:, :3, :3] = 17
    raw = np.where(lab == 255, 180, np.where(lab == 191, 90, 40)).astype(np.uint8)
    raw = np.clip(raw + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)
    return raw, lab


def _write(tmp_path, raw, lab):
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", lab, photometric="minisblack")
    return tmp_path / "raw.tif", tmp_path / "lab.tif"


# --- declarations ---------------------------------------------------------------------------------


def test_parse_classes_keeps_the_order_and_refuses_ambiguity():
    declared = parse_classes(list(VNC_CLASSES))
    assert [name for name, _ in declared] == ["membrane", "glia", "mitochondria", "synapse", "cell"]
    assert declared[0][1] == (0, 32, 64, 96, 128)
    assert parse_classes({"mito": [191], "cell": 255}) == (("mito", (191,)), ("cell", (255,)))
    with pytest.raises(BadInputError, match="code 32 is given to both 'membrane' and 'mito'"):
        parse_classes(["membrane=0,32", "mito=32"])
    with pytest.raises(BadInputError, match="given twice"):
        parse_classes(["cell=1", "Cell=2"])
    with pytest.raises(BadInputError, match="NAME=CODE"):
        parse_classes(["membrane"])
    with pytest.raises(BadInputError, match="not a label code"):
        parse_classes(["membrane=-1"])
    with pytest.raises(BadInputError, match="class name"):
        parse_classes(["9lives=3"])


def test_map_codes_is_the_same_for_every_label_dtype():
    classes = label_classes(parse_classes(["membrane=0,64", "mito=191", "big=70000"]))
    codes = np.array([[0, 64, 191], [255, 17, 64]])
    expected = np.array([[1, 1, 2], [0, 0, 1]], np.uint8)
    for dtype in (np.uint8, np.uint16, np.int32, np.float32):
        np.testing.assert_array_equal(map_codes(codes.astype(dtype), classes), expected)
    np.testing.assert_array_equal(map_codes(np.array([70000], np.uint32), classes), [3])


# --- ingest ---------------------------------------------------------------------------------------


def test_ingest_maps_codes_to_class_numbers_with_metadata(tmp_path, caplog):
    from ome_zarr_models import open_ome_zarr

    raw, lab = _annotation()
    source, labels = _write(tmp_path, raw, lab)
    config = IngestConfig(classes=[*VNC_CLASSES], voxel_size=(50, 4.6, 4.6))
    with caplog.at_level(logging.WARNING, logger="emseg"):
        out = ingest_stack(source, tmp_path / "c.zarr", config, labels=labels)
    image = open_ome(out)
    assert "cells" not in image.labels
    stored = np.asarray(image.labels["classes"].array[:])
    expected = np.select([lab == 255, lab == 191, np.isin(lab, (0, 64))], [5, 3, 1], 0)
    np.testing.assert_array_equal(stored, expected)
    assert stored[:, :3, :3].max() == 0  # the unknown code 17 is unlabelled, not shifted into a class
    text = caplog.text
    assert "codes 17" in text and "belong to no --class" in text
    assert "class glia (159) never occurs; it keeps number 2" in text
    assert "class synapse (223) never occurs; it keeps number 4" in text
    classes = store_classes(image)
    assert [(c.value, c.name) for c in classes] == [
        (1, "membrane"),
        (2, "glia"),
        (3, "mitochondria"),
        (4, "synapse"),
        (5, "cell"),
    ]
    group = zarr.open_group(str(out), mode="r")
    label_model = open_ome_zarr(group["labels/classes"], version="0.4")
    assert type(label_model).__name__ == "ImageLabel"
    meta = dict(group["labels/classes"].attrs)["image-label"]
    assert [p["name"] for p in meta["properties"]] == ["membrane", "glia", "mitochondria", "synapse", "cell"]
    assert [c["label-value"] for c in meta["colors"]] == [1, 2, 3, 4, 5]
    assert dict(group.attrs)["emseg"]["classes"][2] == {
        "value": 3,
        "name": "mitochondria",
        "codes": [191],
        "rgb": [255, 120, 0],
    }


def test_ingest_classes_on_the_cli_and_its_refusals(tmp_path, cli):
    raw, lab = _annotation()
    source, labels = _write(tmp_path, raw, lab)
    args = [f"--class={c}" for c in VNC_CLASSES]
    r = cli("ingest", source, "--labels", labels, "-o", tmp_path / "c.zarr", *args, "-q")
    assert r.exit_code == 0, r.output
    r = cli("info", tmp_path / "c.zarr")
    assert "5 classes" in r.stdout and "mitochondria" in r.stdout
    r = cli("ingest", source, "--labels", labels, "-o", tmp_path / "d.zarr", "--class", "a=1", "--class", "b=1")
    assert r.exit_code == 2 and "code 1 is given to both 'a' and 'b'" in r.output
    assert not (tmp_path / "d.zarr").exists()
    r = cli("ingest", source, "-o", tmp_path / "e.zarr", "--class", "a=1")
    assert r.exit_code == 2 and "--labels" in r.output


def test_binary_ingest_is_unchanged(tmp_path):
    raw, lab = _annotation()
    source, labels = _write(tmp_path, raw, lab)
    image = open_ome(ingest_stack(source, tmp_path / "b.zarr", IngestConfig(), labels=labels))
    assert set(image.labels) == {"cells"} and store_classes(image) is None
    np.testing.assert_array_equal(image.labels["cells"].array[:], (lab > 0).astype(np.uint8))


# --- weights and loss ------------------------------------------------------------------------------


def test_class_weight_map_balances_labelled_pixels_and_borders_membranes():
    lab = np.full((64, 64), 3, np.uint8)  # cell
    lab[:, 30:33] = 1  # a membrane between two cells
    lab[10:16, 10:16] = 2  # a mitochondrion
    lab[:4, :] = 0  # unlabelled
    labelled = lab > 0
    plain = class_weight_map(lab, 3, membrane=None)
    assert (plain[:4] == 0).all()
    assert plain[labelled].mean() == pytest.approx(1.0, rel=1e-5)
    for k in (1, 2, 3):  # without a membrane class every class weighs the same in total
        assert plain[lab == k].sum() == pytest.approx(labelled.sum() / 3, rel=1e-4)
    flat = class_weight_map(lab, 3, membrane=1, w0=0)
    assert (flat[:4] == 0).all()
    assert flat[labelled].mean() == pytest.approx(1.0, rel=1e-5)
    # membrane against the rest: half each, as the binary map weighs membrane against cell
    assert flat[lab == 1].sum() == pytest.approx(labelled.sum() / 2, rel=1e-4)
    # the rest's half shared by a power of each class's pixels: rare classes gain, not all
    n2, n3 = (lab == 2).sum(), (lab == 3).sum()
    share = flat[lab == 2].sum() / flat[lab == 3].sum()
    assert share == pytest.approx((n2 / n3) ** (1 - REST_POWER), rel=1e-4) and n2 / n3 <= share <= 1
    w = class_weight_map(lab, 3, membrane=1, w0=10, sigma=5)
    extra = w - flat
    assert (extra[lab != 1] == 0).all()  # the border term is on the membrane only
    assert extra[20:, 30:33].min() > 5  # between two cells, close to both


def test_class_weight_map_of_membrane_and_cell_only_is_the_binary_map():
    lab = np.full((48, 64), 2, np.uint8)
    lab[:, 20:23] = 1
    lab[30:32, :] = 1
    np.testing.assert_allclose(
        class_weight_map(lab, 2, membrane=1, w0=10, sigma=5), unet_weight_map(lab == 2, w0=10, sigma=5), atol=1e-5
    )


def test_the_loss_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (2, 1, 16, 16), generator=g).float()
    weight = torch.rand(2, 1, 16, 16, generator=g) + 0.5
    unlabelled = target[:, 0] == 0
    assert unlabelled.any()
    for name in ("weighted-bce", "bce", "dice", "bce+dice"):
        loss_fn = make_loss(name, n_classes=4)
        loss = loss_fn(logits, target, weight)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss)
        assert grad.permute(1, 0, 2, 3)[:, unlabelled].abs().max() == 0, name
        changed = logits.detach().clone()
        changed.permute(1, 0, 2, 3)[:, unlabelled] = 50.0
        assert loss_fn(changed, target, weight).item() == pytest.approx(loss.item(), rel=1e-5), name
    # a perfect prediction has (near) zero cross-entropy
    perfect = torch.nn.functional.one_hot((target[:, 0].long() - 1).clamp(min=0), 4).permute(0, 3, 1, 2) * 40.0
    assert make_loss("bce", n_classes=4)(perfect.float(), target, weight).item() < 1e-6


# --- scores -----------------------------------------------------------------------------------------


def test_class_scores_count_labelled_pixels_only():
    truth = np.array([[1, 1, 2, 2], [0, 0, 3, 3]], np.uint8)
    pred = np.array([[1, 2, 2, 2], [3, 3, 3, 1]], np.uint8)
    s = class_scores(pred, truth, 3)
    assert s[1]["iou"] == pytest.approx(1 / 3)  # 1 shared; pred 1 at (0,0),(1,3); truth (0,0),(0,1)
    assert s[2]["iou"] == pytest.approx(2 / 3)
    assert s[3]["iou"] == pytest.approx(1 / 2)  # the predicted 3s on unlabelled pixels do not count
    assert s[2]["dice"] == pytest.approx(2 * 2 / (2 + 3))


def test_blob_objects_split_touching_blobs_and_match_at_half_iou():
    truth = np.zeros((80, 80), np.uint32)
    yy, xx = np.mgrid[:80, :80]
    truth[(yy - 20) ** 2 + (xx - 20) ** 2 < 100] = 1
    truth[(yy - 20) ** 2 + (xx - 37) ** 2 < 100] = 2  # touches blob 1
    truth[(yy - 60) ** 2 + (xx - 60) ** 2 < 64] = 3
    truth[5, 70] = 4  # a speck under the minimum size
    prob = (truth > 0).astype(np.float32)
    pred = blob_objects(prob)
    assert pred.max() == 3  # two touching blobs split, the speck dropped
    s = match_objects(pred, truth)
    assert s["true_positives"] == 3 and s["predicted"] == 3 and s["true"] == 4
    assert s["precision"] == 1.0 and s["recall"] == 0.75
    assert true_objects(truth > 0).max() == 3  # 1 and 2 touch: one component


# --- a multi-class run ---------------------------------------------------------------------------------


def test_a_multi_class_run_learns_classes_and_records_them(tmp_path, cli):
    raw, lab = _annotation(shape=(4, 96, 96))
    source, labels = _write(tmp_path, raw, lab)
    store = emseg.ingest(source, tmp_path / "c.zarr", labels=labels, classes=["membrane=0,64", "mito=191", "cell=255"])
    run = tmp_path / "run"
    summary = emseg.train(
        store, run, depth=2, base_channels=4, crop=64, batch_size=2, epochs=2, steps_per_epoch=3, device="cpu"
    )
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"]["out_channels"] == 3
    assert [c["name"] for c in config["classes"]] == ["membrane", "mito", "cell"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"mean_iou", "iou_membrane", "iou_mito", "iou_cell", "dice_mito", "v_rand"} <= set(header)
    assert "segmentation" not in summary  # cells are calibrated for membrane networks only
    # the class decisions and object settings learned on the validation slice, folded into best
    bias = json.loads((run / "class_bias.json").read_text())
    assert summary["class_bias"] == bias and set(bias["offsets"]) == {"membrane", "mito", "cell"}
    assert bias["mean_iou_after"] >= bias["mean_iou_before"] and bias["slices"]
    from emseg.models.checkpoint import read_checkpoint

    assert read_checkpoint(run / "best.safetensors")[1]["class_bias"] == bias

    # prediction: (c, z, y, x) probabilities with omero channels, labels/classes the most probable
    from ome_zarr_models import open_ome_zarr

    pred = emseg.predict(run, store, tmp_path / "p.zarr", tile=64, overlap=16, device="cpu")
    group = zarr.open_group(str(pred), mode="r")
    assert group["0"].shape == (3, 4, 96, 96)
    assert [a["name"] for a in dict(group.attrs)["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert [c["label"] for c in dict(group.attrs)["omero"]["channels"]] == ["membrane", "mito", "cell"]
    assert type(open_ome_zarr(group, version="0.4")).__name__ == "Image"
    assert type(open_ome_zarr(group["labels/classes"], version="0.4")).__name__ == "ImageLabel"
    prob = np.asarray(group["0"][:]).astype(np.int64)
    assert np.abs(prob.sum(axis=0) - 255).max() <= 2  # softmax probabilities, each rounded
    classes = np.asarray(group["labels/classes/0"][:])
    np.testing.assert_array_equal(classes, prob.argmax(0) + 1)  # up to ties of rounded values
    image = open_ome(pred, channels=True)
    assert image.channels == 3 and image.shape == (4, 96, 96)
    assert image.attrs["emseg"]["objects"] == bias["objects"]  # segment --objects and evaluate use them
    with pytest.raises(BadInputError, match="3 channels"):
        open_ome(pred)  # a (z, y, x) reader is told what it got

    # evaluation: per-class scores equal class_scores on the same arrays, objects for "mito"
    truth = np.asarray(open_ome(store).labels["classes"].array[:])
    r = emseg.evaluate(pred, store)
    assert r["kind"] == "classes"
    expected = class_scores(classes, truth, 3)
    for name, value in (("membrane", 1), ("mito", 2), ("cell", 3)):
        assert r["classes"][name]["iou"] == pytest.approx(expected[value]["iou"])
    assert "objects" in r["classes"]["mito"] and "objects" not in r["classes"]["cell"]
    assert 0.0 <= r["v_rand"] <= 1.0
    out = cli("evaluate", pred, store)
    assert out.exit_code == 0 and "mito" in out.stdout and "membrane against the rest" in out.stdout
    out = cli("info", pred)
    assert "shape (c, z, y, x)" in out.stdout and "membrane, mito, cell" in out.stdout
    # cells of a prediction with a membrane class: those of P(cell) = 255 - P(membrane), exactly
    out = cli("segment", pred, "-o", tmp_path / "s.zarr", "--merge-threshold", "0.5", "-q")
    assert out.exit_code == 0, out.output
    p_cell = (255 - np.asarray(group["0"][0])) / 255.0
    write_pred(tmp_path / "pcell.zarr", p_cell, chunks=(1, 96, 96))
    emseg.segment(tmp_path / "pcell.zarr", tmp_path / "s2.zarr", merge_threshold=0.5)
    cells, direct = (np.asarray(open_ome(tmp_path / name).array[:]) for name in ("s.zarr", "s2.zarr"))
    assert cells.max() > 1
    np.testing.assert_array_equal(cells, direct)
    # calibrated on the class annotation's labelled non-membrane pixels
    out = cli("segment", pred, "-o", tmp_path / "cal.zarr", "--calibrate", store, "--slices", "0:2", "-q")
    assert out.exit_code == 0, out.output
    chosen = open_ome(tmp_path / "cal.zarr").attrs["emseg"]["segmentation"]
    assert chosen["calibration"]["slices"] == [0, 1]

    # objects of a blob-like class: the blob objects of each slice, IDs running on across slices
    out = cli("segment", pred, "-o", tmp_path / "mito.zarr", "--objects", "mito", "--min-size", "5", "-q")
    assert out.exit_code == 0, out.output
    objects = open_ome(tmp_path / "mito.zarr")
    expected_count = 0
    for z in range(4):
        p_mito = np.asarray(group["0"][1, z]) / 255.0
        learned = bias["objects"].get("mito", {}).get("min_distance", OBJECT_MIN_DISTANCE)
        mine = blob_objects(p_mito, classes[z] == 2, min_distance=learned, min_size=5)
        got = np.asarray(objects.array[z])
        assert ((got > 0) == (mine > 0)).all()
        assert len(np.unique(got[got > 0])) == mine.max()
        expected_count += int(mine.max())
    assert objects.attrs["emseg"]["objects"] == expected_count
    out = cli("segment", pred, "-o", tmp_path / "x.zarr", "--objects", "nucleus")
    assert out.exit_code == 2 and "has the classes membrane, mito, cell" in out.output
    # export-model: a package whose networks give one probability per class, as predict does
    out = cli("export-model", run, "-o", tmp_path / "package", "-q")
    assert out.exit_code == 0, out.output
    rdf = yaml.safe_load((tmp_path / "package" / "rdf.yaml").read_text())
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["membrane", "mito", "cell"]
    scripted = torch.jit.load(str(tmp_path / "package" / "model.pt"))
    x = torch.from_numpy(np.load(tmp_path / "package" / "test_input.npy"))
    from emseg.models.export import normalize

    meta_norm = json.loads((tmp_path / "package" / "emseg-model.json").read_text())["normalization"]
    with torch.no_grad():
        probs = scripted(torch.from_numpy(normalize(x.numpy(), meta_norm))).numpy()
    assert probs.shape[1] == 3 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probs, np.load(tmp_path / "package" / "test_output.npy"), atol=1e-5)

    # export keeps class numbers (not a 0/255 mask)
    emseg.export(pred, tmp_path / "classes.tif", labels="classes")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "classes.tif"), classes)

    # napari: the EM, one layer per class named and coloured, the class image with class names
    napari = pytest.importorskip("napari")
    from napari.components import ViewerModel

    from emseg.napari.reader import get_reader

    layers = get_reader(str(pred))(str(pred))
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["c", "P(membrane)", "P(mito)", "P(cell)", "classes"]  # "c": the EM store c.zarr
    mito = layers[2][1]
    assert mito["visible"] and not layers[1][1]["visible"]
    assert mito["colormap"]["colors"][1][:3] == pytest.approx([200 / 255] * 3)  # "mito": the 2nd fallback colour
    assert mito["units"] == ("nanometer",) * 3 and layers[2][0].shape == (4, 96, 96)
    viewer = ViewerModel()
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert [layer.name for layer in viewer.layers] == names
    assert list(viewer.layers["classes"].features["class"]) == ["unlabelled", "membrane", "mito", "cell"]
    assert napari is not None


def test_channel_pyramids_reduce_each_channel(tmp_path):
    from emseg.io.pyramid import build_levels, reduce2
    from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale

    root = create_image_store(tmp_path / "c.zarr", "0.4")
    spec = LevelSpec(shape=(2, 3, 40, 36), dtype="uint8", chunks=(1, 1, 16, 16), pyramid_min_size=10)
    arrays = create_multiscale(root, spec, (50, 4, 4), "0.4", "p")
    assert [a.shape for a in arrays] == [(2, 3, 40, 36), (2, 3, 20, 18), (2, 3, 10, 9)]
    data = np.random.default_rng(0).integers(0, 255, (2, 3, 40, 36), dtype=np.uint8)
    arrays[0][:] = data
    build_levels(tmp_path / "c.zarr", "mean")
    for c in range(2):
        level1 = reduce2(data[c], "mean")
        np.testing.assert_array_equal(arrays[1][c], level1)
        np.testing.assert_array_equal(arrays[2][c], reduce2(level1, "mean"))
    scale = dict(root.attrs)["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, 50.0, 8.0, 8.0]


def test_class_offsets_undo_the_balance_and_object_settings_are_learned():
    """A rare class over-predicted (as a class-balanced loss makes it): the offsets learned on the
    slices move its decision back and raise the mean IoU; blobs drawn whole are best kept unsplit."""
    from emseg.training.class_bias import fit_class_bias, with_offsets
    from emseg.training.validate import fit_object_settings, mean_iou

    rng = np.random.default_rng(0)
    truth = np.full((2, 96, 96), 2, np.uint8)  # class 2 everywhere, class 1 in elongated blobs
    for i in range(2):
        for y, x in rng.integers(10, 86, size=(6, 2)):
            truth[i, y - 4 : y + 4, max(0, x - 12) : x + 12] = 1
    p1 = np.where(truth == 1, 0.8, 0.45) + rng.normal(0, 0.05, truth.shape)  # rare class 1 bleeding out
    prob = np.stack([p1, 1 - p1], axis=1).clip(0.01, 0.99).astype(np.float32)
    bias, before, after = fit_class_bias(prob, truth)
    assert after > before + 0.1 and bias[0] < bias[1]
    fixed = with_offsets(prob, bias)
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0, atol=1e-5)
    assert mean_iou((fixed.argmax(1) + 1).astype(np.uint8), truth, 2) == pytest.approx(after, abs=1e-6)
    chosen = fit_object_settings(fixed, truth, 1)
    assert chosen["f1"] >= chosen["f1_default"] and chosen["f1"] > 0.5
