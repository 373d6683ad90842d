"""emseg train: learns, resumes exactly, reloads exactly, refuses bad input, runs under DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import emseg
from emseg.errors import BadInputError, EmsegRuntimeError
from emseg.models.checkpoint import read_checkpoint
from emseg.training.loop import learning_rate

from .conftest import TINY, run_emseg


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _weights(run: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return read_checkpoint(run / name)[0]


@pytest.mark.slow
def test_short_training_lowers_the_loss(isbi_zarr, tmp_path):
    run = tmp_path / "run"
    summary = emseg.train(isbi_zarr, run, **{**TINY, "epochs": 4, "steps_per_epoch": 15})
    rows = _rows(run)
    assert len(rows) == 4
    train_loss = [float(r["train_loss"]) for r in rows]
    val_loss = [float(r["val_loss"]) for r in rows]
    assert train_loss[-1] < 0.9 * train_loss[0], train_loss
    assert val_loss[-1] < 0.95 * val_loss[0], val_loss
    assert 0 < summary["v_rand"] <= 1 and 0 < summary["v_info"] <= 1
    for name in (
        "config.json",
        "best.safetensors",
        "last.safetensors",
        "resume.safetensors",
        "metrics.csv",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["val_slices"] == [27, 28, 29] and config["train_slices"] == list(range(27))
    assert config["normalization"]["std"] > 0 and config["halo"] == 22 and config["divisor"] == 4


@pytest.mark.slow
def test_same_seed_same_run_and_resume_continues_exactly(isbi_zarr, tmp_path):
    full, again, split = tmp_path / "full", tmp_path / "again", tmp_path / "split"
    emseg.train(isbi_zarr, full, **TINY)
    emseg.train(isbi_zarr, again, **TINY)
    emseg.train(isbi_zarr, split, **TINY, time_limit=1e-9)  # stops after the first step
    assert len(_rows(split)) == 1
    emseg.train(isbi_zarr, split, **TINY, resume=True)
    a, b, c = _weights(full), _weights(again), _weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k
    assert _rows(full)[-1]["train_loss"] == _rows(split)[-1]["train_loss"]


@pytest.mark.slow
def test_time_limit_stops_cleanly_mid_epoch_and_resumes(isbi_zarr, tmp_path):
    run = tmp_path / "run"
    summary = emseg.train(isbi_zarr, run, **{**TINY, "epochs": 50}, time_limit=1e-9)
    assert summary["stopped_early"]
    rows = _rows(run)
    assert len(rows) == 1 and int(rows[0]["step"]) == 1 and rows[0]["v_rand"]
    state = read_checkpoint(run / "last.safetensors")[1]["state"]
    assert state == {**state, "step": 1, "epoch": 0, "next_step": 1}


@pytest.mark.slow
def test_checkpoint_reloads_to_identical_outputs(isbi_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(isbi_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 3})
    model = emseg.load_model(run)
    assert not model.training
    meta = model.emseg_meta
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    from emseg.config import TrainConfig, from_dict
    from emseg.models.build import build_model

    fresh = build_model(from_dict(TrainConfig, meta["config"]).model)
    fresh.load_state_dict(_weights(run, "best.safetensors"))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    reloaded = emseg.load_model(run / "best.safetensors")
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


@pytest.mark.slow
def test_smp_architecture_trains_one_step_offline(isbi_zarr, tmp_path):
    run = tmp_path / "smp"
    emseg.train(
        isbi_zarr,
        run,
        arch="smp:resnet18",
        crop=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        device="cpu",
        val_slices="29",
    )
    model = emseg.load_model(run)
    assert type(model).__name__ == "SmpUNet"
    assert read_checkpoint(run / "last.safetensors")[1]["divisor"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "dice", "bce+dice"])
def test_other_losses_train(isbi_zarr, tmp_path, loss):
    summary = emseg.train(isbi_zarr, tmp_path / loss, **{**TINY, "epochs": 1, "steps_per_epoch": 2}, loss=loss)
    assert np.isfinite(summary["val_loss"])


def test_learning_rate_warms_up_then_decays():
    from emseg.config import TrainConfig

    config = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.01)
    lrs = [learning_rate(s, 1000, config) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_bad_training_input(isbi_zarr, tmp_path, cli):
    tifffile.imwrite(tmp_path / "raw.tif", np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    nolabels = emseg.ingest(tmp_path / "raw.tif", tmp_path / "nolabels.zarr")
    cases = [
        (dict(data=nolabels), "no labels/cells"),
        (dict(val_slices="40:42"), "--val-slices"),
        (dict(val_slices="0:30"), "no slice to train"),
        (dict(crop=66), "--crop"),
        (dict(device="cuda"), "CUDA"),
        (dict(loss="hinge"), "--loss"),
    ]
    if torch.cuda.is_available():
        cases.pop(4)
    for kwargs, phrase in cases:
        data = kwargs.pop("data", isbi_zarr)
        with pytest.raises(BadInputError, match=phrase.replace("+", r"\+")):
            emseg.train(data, tmp_path / "bad", **{**TINY, **kwargs})
    result = cli("train", isbi_zarr, "-o", tmp_path / "bad", "--val-slices", "40:42", "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.startswith("emseg: error: --val-slices")


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite_and_resume_checks_the_config(isbi_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(isbi_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2})
    with pytest.raises(BadInputError, match="--resume or --overwrite"):
        emseg.train(isbi_zarr, run, **TINY)
    with pytest.raises(BadInputError, match="--resume"):
        emseg.train(isbi_zarr, run, **{**TINY, "base_channels": 16}, resume=True)
    with pytest.raises(BadInputError, match="no resume.safetensors"):
        emseg.train(isbi_zarr, tmp_path / "fresh", **TINY, resume=True)
    emseg.train(isbi_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2}, overwrite=True)
    assert len(_rows(run)) == 1


def _as_older_runs_resume_point(run: Path) -> None:
    """Turn resume.safetensors into optimizer.safetensors with the loop state of older emseg
    (epoch and step in it, no global step)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run / "resume.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["emseg"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    state = meta["extra"]["state"]
    meta["extra"]["state"] = {k: state[k] for k in ("epoch", "next_step", "best", "elapsed")}
    save_file(tensors, str(run / "optimizer.safetensors"), metadata={"emseg": json.dumps(meta)})
    (run / "resume.safetensors").unlink()


@pytest.mark.slow
def test_resume_reads_an_older_runs_optimizer_safetensors(isbi_zarr, tmp_path):
    full, old = tmp_path / "full", tmp_path / "old"
    emseg.train(isbi_zarr, full, **TINY)
    emseg.train(isbi_zarr, old, **TINY, time_limit=1e-9)
    _as_older_runs_resume_point(old)
    with pytest.raises(BadInputError, match="optimizer.safetensors"):  # it counts as a run
        emseg.train(isbi_zarr, old, **TINY)
    emseg.train(isbi_zarr, old, **TINY, resume=True)
    assert (old / "resume.safetensors").is_file() and not (old / "optimizer.safetensors").exists()
    a, b = _weights(full), _weights(old)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (old / "optimizer.safetensors").write_bytes(b"left by an older emseg")
    emseg.train(isbi_zarr, old, **{**TINY, "epochs": 1, "steps_per_epoch": 1}, overwrite=True)
    assert not (old / "optimizer.safetensors").exists() and len(_rows(old)) == 1


@pytest.mark.slow
def test_a_second_writer_of_a_run_directory_is_refused(isbi_zarr, tmp_path):
    from emseg.io.outputs import OutputLock

    run = tmp_path / "run"
    with OutputLock(run, "train"):
        with pytest.raises(BadInputError, match="another emseg train"):
            emseg.train(isbi_zarr, run, **TINY)
    assert not run.exists()
    emseg.train(isbi_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 1})  # released: trains


def _flags() -> dict:
    """torch's speed flags: the older ones (None where torch refuses to read them) and, on torch
    >= 2.9, the newer fp32_precision settings."""
    from emseg.training.loop import _readable, fp32_precisions

    return {
        "benchmark": torch.backends.cudnn.benchmark,
        "matmul": _readable(torch.get_float32_matmul_precision),
        "cudnn": _readable(lambda: torch.backends.cudnn.allow_tf32),
        **{f"fp32_precision {i}": value for i, (_, value) in enumerate(fp32_precisions())},
    }


@pytest.fixture(params=["older", "newer"])
def unusual_flags(request):
    """torch's speed flags set to values neither torch nor emseg would choose (with the older
    calls, or with the newer fp32_precision settings); put back afterwards."""
    from emseg.training.loop import backend_flags, fp32_precisions

    with backend_flags():
        torch.backends.cudnn.benchmark = True
        if request.param == "older":
            torch.set_float32_matmul_precision("medium")
            torch.backends.cudnn.allow_tf32 = False
        else:
            if not fp32_precisions():
                pytest.skip("torch < 2.9 has no fp32_precision settings")
            for setting, _ in fp32_precisions():
                setting.fp32_precision = "ieee"
        flags = _flags()
        yield flags if request.param == "older" else {k: v for k, v in flags.items() if k not in ("matmul", "cudnn")}


def _same_flags(expected: dict) -> bool:
    return {k: v for k, v in _flags().items() if k in expected} == expected


def test_backend_flags_put_back_what_was_there(unusual_flags):
    from emseg.training.loop import backend_flags

    for tf32 in (True, False):
        with pytest.raises(KeyError), backend_flags(cudnn_benchmark=False, tf32=tf32):
            assert torch.backends.cudnn.benchmark is False
            assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
            assert torch.backends.cudnn.allow_tf32 is tf32
            raise KeyError("a failure inside the block")
        assert _same_flags(unusual_flags)
    with backend_flags():
        assert _same_flags(unusual_flags)
    assert _same_flags(unusual_flags)


@pytest.mark.slow
def test_fit_leaves_torch_flags_as_it_found_them(isbi_zarr, tmp_path, unusual_flags):
    emseg.train(isbi_zarr, tmp_path / "run", **{**TINY, "epochs": 1, "steps_per_epoch": 1})
    assert _same_flags(unusual_flags)


def test_crops_of_a_slice_smaller_than_their_context_are_mirrored():
    from emseg.training.data import Annotated, CropSampler

    raw = np.arange(7 * 5, dtype=np.uint8).reshape(1, 7, 5)
    data = Annotated(raw=raw, labels=raw % 2, weights=raw.astype(np.float32) / 10, indices=[0])
    size = 24  # a crop of 8 is larger than the slice: every patch is centred on it
    image, label, weight = CropSampler(data, 0.0, 1.0, torch.device("cpu")).sample(2, size, 8, torch.Generator())
    y0, x0 = size + 7 // 2 - size // 2, size + 5 // 2 - size // 2
    for got, plane in ((image, raw[0]), (label, data.labels[0]), (weight, data.weights[0])):
        want = np.pad(plane, size, mode="reflect")[y0 : y0 + size, x0 : x0 + size]
        assert np.array_equal(got[1, 0].numpy(), want.astype(np.float32))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(isbi_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(isbi_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2})
    good = _weights(run)
    with pytest.raises(EmsegRuntimeError, match="non-finite"):
        emseg.train(isbi_zarr, run, **{**TINY, "epochs": 3, "lr": 1e38}, resume=True)
    after = _weights(run)
    assert all(torch.equal(good[k], after[k]) for k in good)
    result = run_emseg(
        "train",
        isbi_zarr,
        "-o",
        run,
        "--resume",
        "--device",
        "cpu",
        "--depth",
        "2",
        "--base-channels",
        "8",
        "--crop",
        "64",
        "--batch-size",
        "2",
        "--steps-per-epoch",
        "10",
        "--epochs",
        "2",
        "--lr",
        "1e38",
        "-q",
    )
    assert result.returncode == 1 and "non-finite" in result.stderr and "Traceback" not in result.stderr


def test_augment_preview_draws_pairs(isbi_zarr, tmp_path, cli):
    out = tmp_path / "aug.png"
    result = cli("augment-preview", isbi_zarr, "-o", out, "--samples", "2", "--crop", "96")
    assert result.exit_code == 0, result.stderr
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[1] > im.size[0] * 0.6  # three rows of four panels


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_ddp_with_gloo_keeps_ranks_identical(isbi_zarr, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "emseg",
        "train",
        str(isbi_zarr),
        "-o",
        str(run),
        "--device",
        "cpu",
        "--depth",
        "2",
        "--base-channels",
        "8",
        "--crop",
        "64",
        "--batch-size",
        "2",
        "--steps-per-epoch",
        "4",
        "--epochs",
        "1",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = json.loads((run / "ddp.json").read_text())
    assert ddp["world_size"] == 2
    assert ddp["weights_sha256"][0] == ddp["weights_sha256"][1]
    assert len(_rows(run)) == 1
