"""emseg export-model: TorchScript and ONNX match PyTorch; the bioimage.io package validates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import emseg

pytestmark = pytest.mark.slow  # end-to-end runs of trained models


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
    model = emseg.load_model(run)
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x))).numpy()


def test_torchscript_and_onnx_match_pytorch(exported):
    import onnxruntime as ort

    run, folder = exported
    info = json.loads((folder / "emseg-model.json").read_text())
    assert info["divisor"] == 4 and info["halo"] == 22
    norm = info["normalization"]
    raw = np.random.default_rng(0).integers(0, 255, (2, 1, 96, 128)).astype(np.float32)
    x = (raw - norm["mean"]) / norm["std"]
    reference = _reference(run, x)
    scripted = torch.jit.load(str(folder / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(x)).numpy(), reference, atol=1e-5)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"raw": x})[0], reference, atol=1e-4)


def test_bioimageio_package_validates_and_its_test_tensors_reproduce(exported):
    bioimageio = pytest.importorskip("bioimageio.spec")
    run, folder = exported
    description = bioimageio.load_description(folder / "rdf.yaml", perform_io_checks=True)
    assert type(description).__name__ == "ModelDescr", description.validation_summary
    summary = description.validation_summary
    assert summary.status in ("passed", "valid-format")
    assert not [e for d in summary.details for e in d.errors]
    raw = np.load(folder / "test_input.npy")
    info = json.loads((folder / "emseg-model.json").read_text())
    x = ((raw - info["normalization"]["mean"]) / info["normalization"]["std"]).astype(np.float32)
    np.testing.assert_allclose(np.load(folder / "test_output.npy"), _reference(run, x), atol=1e-5)


def test_export_refuses_to_overwrite(exported, cli):
    run, folder = exported
    result = cli("export-model", run, "-o", folder)
    assert result.exit_code == 2 and "already exists" in result.stderr
