"""emseg export-model: TorchScript and ONNX match PyTorch; bioimageio.core's own model test passes
on the package; bioimageio.core's prediction equals ``emseg predict`` everywhere, slice edges
included; normalisation, voxel size and test data come from the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import yaml

import emseg

pytestmark = pytest.mark.slow  # end-to-end runs of trained models


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No downloads at test time: any HTTP request bioimageio makes goes to a closed port."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path_factory.getbasetemp() / "bioimageio-cache"))
    # the package's author has a GitHub user name, which bioimageio.spec looks up online unless it
    # is in its own cache of known users: tests have no network, so it goes there
    try:
        from bioimageio.spec._internal import field_validation
    except ImportError:
        return
    from emseg.models.export import GITHUB_USER

    monkeypatch.setattr(field_validation, "KNOWN_GITHUB_USERS", field_validation.KNOWN_GITHUB_USERS | {GITHUB_USER})


@pytest.fixture(scope="module")
def exported(isbi_zarr, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run = base / "run"
    emseg.train(
        isbi_zarr,
        run,
        depth=2,
        base_channels=8,
        crop=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=3,
        device="cpu",
        val_slices="29",
    )
    return run, emseg.export_model(run, base / "exported")


def _reference(run, x: np.ndarray) -> np.ndarray:
    """P(cell) of (B, 1, H, W) ``x`` (H, W multiples of the divisor) mirrored by predict's edge
    context, as emseg's whole-slice pass sees it."""
    from emseg.inference.tiling import mirrored_context

    model = emseg.load_model(run)
    c = mirrored_context(64, model.emseg_meta["divisor"])
    mirrored = np.pad(x, ((0, 0), (0, 0), (c, c), (c, c)), mode="reflect")
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(mirrored))).numpy()[..., c:-c, c:-c]


def _rdf(folder) -> dict:
    return yaml.safe_load((folder / "rdf.yaml").read_text())


def test_torchscript_and_onnx_match_pytorch(exported):
    import onnxruntime as ort

    run, folder = exported
    info = json.loads((folder / "emseg-model.json").read_text())
    assert info["divisor"] == 4 and info["halo"] == 22 and info["context"] == 24
    x = np.random.default_rng(0).normal(size=(2, 1, 96, 128)).astype(np.float32)
    reference = _reference(run, x)
    scripted = torch.jit.load(str(folder / "model.pt"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(x)).numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"raw": x})[0], reference, atol=1e-4)
    # NaN rows and columns are padding outside the image: left out, as emseg treats slice edges
    padded = np.pad(x, ((0, 0), (0, 0), (8, 12), (4, 20)), constant_values=np.nan)
    with torch.no_grad():
        inner = scripted(torch.from_numpy(padded)).numpy()[..., 8:-12, 4:-20]
    np.testing.assert_allclose(inner, reference, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"raw": padded})[0][..., 8:-12, 4:-20], reference, atol=1e-4)


def test_bioimageio_core_model_test_passes_with_onnx(exported):
    core = pytest.importorskip("bioimageio.core")
    _, folder = exported
    summary = core.test_model(folder / "rdf.yaml", weight_format="onnx", devices=["cpu"])
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed


def _core_prediction(folder, raw: np.ndarray, weight_format: str) -> np.ndarray:
    """bioimageio.core's prediction of the whole slice ``raw`` with the package's ``weight_format``."""
    core = pytest.importorskip("bioimageio.core")
    from bioimageio.spec import load_description

    pipeline = core.create_prediction_pipeline(
        load_description(folder / "rdf.yaml"), weight_format=weight_format, devices=["cpu"]
    )
    out = core.predict(model=pipeline, inputs=raw[None, None].astype(np.float32))
    return out.members["probability"].data.values[0, 0]


@pytest.mark.parametrize("weight_format", ["torchscript", "onnx"])
def test_bioimageio_core_prediction_equals_emseg_predict_edges_included(exported, isbi_zarr, tmp_path, weight_format):
    """A slice of the training stack (predicted within its stack, by predict's default per-slice
    normalisation) and a slice of another size: bioimageio.core on the package equals ``emseg
    predict --blend crop`` everywhere, edges included."""
    from emseg.inference.tiling import mirrored_context
    from emseg.io.zarr import open_ome
    from emseg.models.export import edge_context

    run, folder = exported
    divisor = emseg.load_model(run).emseg_meta["divisor"]
    assert edge_context(divisor) == mirrored_context(64, divisor)  # the package mirrors edges as predict does
    stack = open_ome(isbi_zarr)
    z = stack.shape[0] - 3  # ISBI slice 27 (of the whole stack: not normalised by the stack's percentiles)
    other = (np.asarray(stack.array[z - 1, :300, :436]) * 0.6 + 60).astype(np.uint8)  # another size and contrast
    tifffile.imwrite(tmp_path / "other.tif", other[None], photometric="minisblack")
    from emseg.config import IngestConfig
    from emseg.io.ingest import ingest_stack

    other_store = ingest_stack(tmp_path / "other.tif", tmp_path / "other.zarr", IngestConfig(voxel_size=(50, 4, 4)))
    for name, store, index in (("stack", isbi_zarr, z), ("other", other_store, 0)):
        raw = np.asarray(open_ome(store).array[index])
        pred = emseg.predict(
            run, store, tmp_path / f"pred-{name}.zarr", slices=(index, index + 1), blend="crop",
            dtype="float32", precision="fp32", device="cpu",
        )  # fmt: skip
        ours = np.asarray(open_ome(pred).array[0])
        theirs = _core_prediction(folder, raw, weight_format)
        assert theirs.shape == ours.shape == raw.shape
        delta = np.abs(theirs - ours)
        border = np.ones_like(delta, dtype=bool)
        border[20:-20, 20:-20] = False
        assert delta[border].max() < 0.01 and delta.max() < 0.01, (name, delta[border].max(), delta.max())


def test_package_takes_normalisation_voxel_size_and_data_from_the_run(exported, isbi_zarr, tmp_path):
    from emseg.io.zarr import open_ome
    from emseg.models.checkpoint import read_checkpoint, resolve_checkpoint, save_checkpoint
    from emseg.models.export import scale_linear

    run, folder = exported
    _, meta = read_checkpoint(run)
    norm = meta["normalization"]
    steps = [s for s in _rdf(folder)["inputs"][0]["preprocessing"] if s["id"] != "ensure_dtype"]  # the spec adds casts
    assert [s["id"] for s in steps] == ["scale_range", "scale_linear"]
    assert [steps[0]["kwargs"]["min_percentile"], steps[0]["kwargs"]["max_percentile"]] == norm["percentiles"]
    gain, offset = scale_linear(norm)
    assert steps[1]["kwargs"] == pytest.approx({"gain": gain, "offset": offset})
    # the training stack's low and high percentiles land where the checkpoint's mean and std put them
    assert offset == pytest.approx((norm["low"] - norm["mean"]) / norm["std"])
    assert offset + gain == pytest.approx((norm["high"] - norm["mean"]) / norm["std"])
    # test tensors and cover: a crop of a training slice, not synthetic data
    test_input = np.load(folder / "test_input.npy")[0, 0]
    image = open_ome(isbi_zarr)
    z = meta["train_slices"][len(meta["train_slices"]) // 2]
    h, w = image.shape[1:]
    s = test_input.shape[0]
    y0, x0 = (h - s) // 2, (w - s) // 2
    np.testing.assert_array_equal(test_input, np.asarray(image.array[z, y0 : y0 + s, x0 : x0 + s], dtype=np.float32))
    assert tifffile.imread(folder / "sample_input.tif").shape == test_input.shape
    assert (folder / "cover.png").stat().st_size > 1000

    # another run's normalisation and pixel size: the package follows the checkpoint
    meta = {
        **meta,
        "normalization": {**norm, "low": 10.0, "high": 90.0, "mean": 50.0, "std": 80 / 4.6527},
        "data": {**meta["data"], "voxel_size_nm": [40.0, 7.5, 7.5]},
    }
    model = emseg.load_model(run)
    changed = save_checkpoint(tmp_path / "changed.safetensors", model, meta)
    assert resolve_checkpoint(changed) == changed
    rdf = _rdf(emseg.export_model(changed, tmp_path / "exported"))
    kwargs = next(s for s in rdf["inputs"][0]["preprocessing"] if s["id"] == "scale_linear")["kwargs"]
    assert kwargs == pytest.approx({"gain": 4.6527, "offset": -4.6527 / 2})
    assert [a.get("scale") for a in rdf["inputs"][0]["axes"][2:]] == [7.5, 7.5]
    assert [a.get("scale") for a in rdf["outputs"][0]["axes"][2:]] == [7.5, 7.5]


def test_bioimageio_spec_validates_the_package(exported):
    spec = pytest.importorskip("bioimageio.spec")
    _, folder = exported
    description = spec.load_description(folder / "rdf.yaml", perform_io_checks=True)
    assert type(description).__name__ == "ModelDescr", description.validation_summary
    assert not [e for d in description.validation_summary.details for e in d.errors]


def test_export_refuses_to_overwrite(exported, cli):
    run, folder = exported
    result = cli("export-model", run, "-o", folder)
    assert result.exit_code == 2 and "already exists" in result.stderr


#: Run in a child process: block every module no distribution of emseg's base install provides
#: (as if only ``pip install emseg`` had run: optional imports fail as they would there), then
#: run the command in sys.argv[1:].
BASE_ONLY = """
import sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

base, todo = set(), ["emseg"]
while todo:
    name = canonicalize_name(todo.pop())
    if name in base:
        continue
    base.add(name)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        continue
    todo += [r.name for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
owners = metadata.packages_distributions()
blocked = {m for m, dists in owners.items() if not {canonicalize_name(d) for d in dists} & base}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in emseg's base install)")
        return None

sys.meta_path.insert(0, Blocker())
from emseg.cli import main
sys.argv = ["emseg", *sys.argv[1:]]
main()
"""


def test_export_model_needs_only_the_base_install(exported, tmp_path):
    """``emseg export-model`` runs with only the modules of emseg's base install importable
    (no extras, no dev tools): the README's install runs it."""
    import subprocess
    import sys

    run, _ = exported
    out = subprocess.run(
        [sys.executable, "-c", BASE_ONLY, "export-model", str(run), "-o", str(tmp_path / "base"), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "base" / "model.onnx").stat().st_size > 0
    assert "&id" not in (tmp_path / "base" / "rdf.yaml").read_text()  # written by bioimageio.spec: no YAML anchors
