"""The built-in membrane model (issue 29): it ships inside the package and loads offline like any
checkpoint, its header says what it is, a tampered file is refused, predict rescales to its pixel
size, and training can start from it (or from any run)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import emseg
from emseg.errors import BadInputError
from emseg.io.zarr import open_ome
from emseg.models import builtin
from emseg.models.checkpoint import load_trained, read_checkpoint
from emseg.models.rescale import Rescaled, rescale_factor


def test_the_builtin_model_loads_offline_with_its_metadata() -> None:
    path = builtin.builtin_path("builtin:membranes")
    assert path.stat().st_size < 10 * 2**20
    model, meta = load_trained("builtin:membranes", "cpu")
    info = meta["builtin"]
    assert info["pixel_size_nm"] > 0 and info["licence"] and info["training_data"]
    assert "ISBI 2012 training slices 0-26" in info["training_data"]  # never 27-29: its scores stay honest
    assert set(info["scores"]) and all(0 < v <= 1 for v in info["scores"].values() if isinstance(v, float))
    x = torch.zeros(1, 1, 64, 64)
    assert model(x).shape == (1, 1, 64, 64)
    (listed,) = emseg.builtin_models()
    assert listed["name"] == "builtin:membranes" and listed["size_bytes"] == path.stat().st_size


def test_a_tampered_or_unknown_builtin_is_refused(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "weights"
    shutil.copytree(builtin.WEIGHTS, copy)
    data = bytearray((copy / "membranes.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (copy / "membranes.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(builtin, "WEIGHTS", copy)
    with pytest.raises(BadInputError, match="altered"):
        read_checkpoint("builtin:membranes")
    with pytest.raises(BadInputError, match="no such built-in model"):
        read_checkpoint("builtin:nothing")


def test_predict_with_the_builtin_model_and_refuse_a_tampered_one(tmp_path, cli, monkeypatch) -> None:
    from emseg.config import IngestConfig
    from emseg.io.ingest import ingest_stack
    from emseg.synthetic import synthetic_stack

    raw, _ = synthetic_stack((1, 128, 128), seed=3)
    import tifffile

    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    data = ingest_stack(tmp_path / "raw.tif", tmp_path / "d.zarr", IngestConfig(voxel_size=(50, 4, 4)))
    result = cli("predict", "builtin:membranes", data, "-o", tmp_path / "p.zarr", "--tile", "128", "--device", "cpu")
    assert result.exit_code == 0, result.output
    prob = np.asarray(open_ome(tmp_path / "p.zarr").array[:])
    assert prob.shape == (1, 128, 128) and prob.std() > 0
    copy = tmp_path / "weights"
    shutil.copytree(builtin.WEIGHTS, copy)
    (copy / "membranes.safetensors").write_bytes((copy / "membranes.safetensors").read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(builtin, "WEIGHTS", copy)
    bad = cli("predict", "builtin:membranes", data, "-o", tmp_path / "q.zarr", "--device", "cpu")
    assert bad.exit_code == 2 and "altered" in bad.stderr and not (tmp_path / "q.zarr").exists()


def test_rescaling_runs_the_network_at_its_pixel_size() -> None:
    assert rescale_factor(4.0, 4.3) == 1.0 and rescale_factor(None, 8.0) == 1.0
    assert rescale_factor(4.0, 4.6) == pytest.approx(1.15) and rescale_factor(4.0, 2.0) == 0.5

    class Probe(torch.nn.Module):
        divisor, halo = 8, 10

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, ...]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(tuple(x.shape[-2:]))
            return x * 2

    probe = Probe()
    wrapped = Rescaled(probe, 1.5)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 48), indexing="ij")
    x = torch.stack([yy + xx, yy - xx])[:, None]
    out = wrapped(x)
    assert out.shape == x.shape and probe.seen == [(96, 72)]  # 1.5 x, multiples of 8
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(out[inner], 2 * x[inner], atol=0.02)  # a smooth image survives the round trip
    assert wrapped.halo == 7


def test_training_starts_from_a_run_with_its_network_and_a_short_warm_up(tmp_path, isbi_zarr) -> None:
    first = tmp_path / "a"
    options = dict(crop=64, batch_size=2, steps_per_epoch=2, epochs=1, device="cpu", val_slices="0")
    emseg.train(isbi_zarr, first, depth=2, base_channels=8, **options)
    second = tmp_path / "b"
    emseg.train(isbi_zarr, second, init=str(first), lr=1e-12, **options)  # the defaults' network is not trained
    meta_a, meta_b = read_checkpoint(first)[1], read_checkpoint(second)[1]
    assert meta_b["config"]["model"] == meta_a["config"]["model"]
    assert meta_b["config"]["warmup_steps"] <= 20 and meta_b["config"]["init"].endswith("best.safetensors")
    a, b = read_checkpoint(first)[0], read_checkpoint(second)[0]
    learned = [k for k in a if "running" not in k and "num_batches" not in k]  # normalisation statistics move
    assert max(float((a[k] - b[k]).abs().max()) for k in learned) < 1e-3  # lr 1e-12: the weights it started from


def test_fine_tuning_takes_a_tenth_of_the_learning_rate_unless_the_output_layer_is_new(isbi_zarr) -> None:
    from dataclasses import replace

    from emseg.config import INIT_LR, LR, TrainConfig
    from emseg.training.calibrate import with_init
    from emseg.training.data import open_training_store
    from emseg.training.loop import with_classes

    image = open_training_store(str(isbi_zarr))  # a store of cells: one output
    assert with_classes(TrainConfig(), image).lr == LR  # random weights
    tuned = with_init(TrainConfig(init="builtin:membranes"))
    assert with_classes(tuned, image).lr == INIT_LR == LR / 10  # the network taken whole
    assert with_classes(replace(tuned, lr=5e-4), image).lr == 5e-4  # --lr wins
    five = replace(tuned, model=replace(tuned.model, out_channels=5))  # as from a five-class run: a new head
    assert with_classes(five, image).lr == LR
    assert with_classes(five, image).model.out_channels == 1


def test_init_refuses_what_is_no_model(tmp_path, isbi_zarr, cli) -> None:
    result = cli("train", isbi_zarr, "-o", tmp_path / "r", "--init", tmp_path / "nothing", "--device", "cpu")
    assert result.exit_code == 2 and "no such model" in result.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_export_model_takes_the_builtin_model(tmp_path, cli) -> None:
    result = cli("export-model", "builtin:membranes", "-o", tmp_path / "m", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.pt").is_file() and (tmp_path / "m" / "rdf.yaml").is_file()
