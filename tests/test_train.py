"""emseg train: learns, resumes exactly, reloads exactly, refuses bad input, runs under DDP."""

from __future__ import annotations

import csv
import json
import math
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
from emseg.training.schedule import TimeBudget, budget_learning_rate, budget_progress, learning_rate

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


class _Interrupted(Exception):
    pass


def _interrupted_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the next training run die as it draws batch ``steps`` (a kill, without timing: a time
    limit would also change the learning-rate schedule, which follows the budget)."""
    from emseg.training import loop

    draw, calls = loop.draw_batch, [0]

    def dying(*args: object) -> object:
        calls[0] += 1
        if calls[0] > steps:
            raise _Interrupted
        return draw(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "draw_batch", dying)


@pytest.mark.slow
def test_same_seed_same_run_and_resume_continues_exactly(small_zarr, tmp_path, monkeypatch):
    full, again, split = tmp_path / "full", tmp_path / "again", tmp_path / "split"
    emseg.train(small_zarr, full, **TINY)
    emseg.train(small_zarr, again, **TINY)
    with monkeypatch.context() as patch:
        _interrupted_after(patch, 12)  # dies in the second epoch; the first one's end is saved
        with pytest.raises(_Interrupted):
            emseg.train(small_zarr, split, **TINY)
    assert len(_rows(split)) == 1
    emseg.train(small_zarr, split, **TINY, resume=True)
    a, b, c = _weights(full), _weights(again), _weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k
    assert _rows(full)[-1]["train_loss"] == _rows(split)[-1]["train_loss"]


@pytest.mark.slow
def test_time_limit_stops_cleanly_mid_epoch_and_resumes(small_zarr, tmp_path):
    run = tmp_path / "run"
    summary = emseg.train(small_zarr, run, **{**TINY, "epochs": 50}, time_limit=1e-9)
    assert summary["stopped_early"]
    rows = _rows(run)
    assert len(rows) == 1 and int(rows[0]["step"]) == 1 and rows[0]["v_rand"]
    state = read_checkpoint(run / "last.safetensors")[1]["state"]
    assert state == {**state, "step": 1, "epoch": 0, "next_step": 1}


@pytest.mark.slow
def test_checkpoint_reloads_to_identical_outputs(small_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 3})
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
def test_smp_architecture_trains_one_step_offline(small_zarr, tmp_path):
    run = tmp_path / "smp"
    emseg.train(
        small_zarr,
        run,
        arch="smp:resnet18",
        crop=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        device="cpu",
        val_slices="9",
    )
    model = emseg.load_model(run)
    assert type(model).__name__ == "SmpUNet"
    assert read_checkpoint(run / "last.safetensors")[1]["divisor"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "dice", "bce+dice"])
def test_other_losses_train(small_zarr, tmp_path, loss):
    summary = emseg.train(small_zarr, tmp_path / loss, **{**TINY, "epochs": 1, "steps_per_epoch": 2}, loss=loss)
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
def test_existing_run_needs_resume_or_overwrite_and_resume_checks_the_config(small_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2})
    with pytest.raises(BadInputError, match="--resume or --overwrite"):
        emseg.train(small_zarr, run, **TINY)
    with pytest.raises(BadInputError, match="--resume"):
        emseg.train(small_zarr, run, **{**TINY, "base_channels": 16}, resume=True)
    with pytest.raises(BadInputError, match="no resume.safetensors"):
        emseg.train(small_zarr, tmp_path / "fresh", **TINY, resume=True)
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2}, overwrite=True)
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
def test_resume_reads_an_older_runs_optimizer_safetensors(small_zarr, tmp_path, monkeypatch):
    from emseg.config import TrainConfig

    full, old = tmp_path / "full", tmp_path / "old"
    no_average = TrainConfig(ema_decay=None)  # older runs kept no average of the weights
    emseg.train(small_zarr, full, **TINY, config=no_average)
    with monkeypatch.context() as patch:
        _interrupted_after(patch, 12)
        with pytest.raises(_Interrupted):
            emseg.train(small_zarr, old, **TINY, config=no_average)
    _as_older_runs_resume_point(old)
    with pytest.raises(BadInputError, match="optimizer.safetensors"):  # it counts as a run
        emseg.train(small_zarr, old, **TINY, config=no_average)
    emseg.train(small_zarr, old, **TINY, resume=True, config=no_average)
    assert (old / "resume.safetensors").is_file() and not (old / "optimizer.safetensors").exists()
    a, b = _weights(full), _weights(old)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (old / "optimizer.safetensors").write_bytes(b"left by an older emseg")
    emseg.train(small_zarr, old, **{**TINY, "epochs": 1, "steps_per_epoch": 1}, overwrite=True)
    assert not (old / "optimizer.safetensors").exists() and len(_rows(old)) == 1


@pytest.mark.slow
def test_a_second_writer_of_a_run_directory_is_refused(small_zarr, tmp_path):
    from emseg.io.outputs import OutputLock

    run = tmp_path / "run"
    with OutputLock(run, "train"):
        with pytest.raises(BadInputError, match="another emseg train"):
            emseg.train(small_zarr, run, **TINY)
    assert not run.exists()
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 1})  # released: trains


def _flags() -> dict:
    """torch's speed flags: the older ones (None where torch refuses to read them) and, on torch
    >= 2.9, the newer fp32_precision settings."""
    from emseg.device import _readable, fp32_precisions

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
    from emseg.device import backend_flags, fp32_precisions

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
    from emseg.device import backend_flags

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
def test_fit_leaves_torch_flags_as_it_found_them(small_zarr, tmp_path, unusual_flags):
    emseg.train(small_zarr, tmp_path / "run", **{**TINY, "epochs": 1, "steps_per_epoch": 1})
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
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_zarr, tmp_path):
    run = tmp_path / "run"
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2})
    good = _weights(run)
    with pytest.raises(EmsegRuntimeError, match="non-finite"):
        emseg.train(small_zarr, run, **{**TINY, "epochs": 3, "lr": 1e38}, resume=True)
    after = _weights(run)
    assert all(torch.equal(good[k], after[k]) for k in good)
    result = run_emseg(
        "train",
        small_zarr,
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
def test_ddp_with_gloo_keeps_ranks_identical(small_zarr, tmp_path):
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
        str(small_zarr),
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


def test_budget_schedule_warms_up_then_decays_with_the_time_spent():
    from emseg.config import TrainConfig

    config = TrainConfig(lr=1.0, warmup_steps=200, warmup_fraction=0.1, min_lr_ratio=0.01, time_limit=100)
    # 55 steps in the budget: warm-up ends at 10 % of the time, not after 200 steps
    lrs = [budget_learning_rate(s, budget_progress(s, 10**6, s * 100 / 55, 100.0), config) for s in range(56)]
    assert lrs[0] < lrs[3] < 1.0 and max(lrs) == pytest.approx(1.0, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:], strict=False))
    assert lrs[-1] == pytest.approx(0.01)
    # steps count too: the last step of a run that ends before its budget is decayed as well
    assert budget_learning_rate(999, budget_progress(1000, 1000, 1.0, 100.0), config) == pytest.approx(0.01)


class _Clock:
    """Seconds that advance by ``tick`` at every reading: a time budget without timing."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.slow
def test_a_time_limited_run_ends_with_a_decayed_learning_rate_and_says_what_it_saved(small_zarr, tmp_path):
    from emseg.config import TrainConfig, override_train
    from emseg.training.loop import fit
    from emseg.training.validate import validator

    class Recorder:
        def __init__(self) -> None:
            self.starts: list[tuple[str, float | None]] = []
            self.fields: list[dict] = []

        def start(self, description: str, total: float | None, unit: str = "") -> None:
            self.starts.append((description, total))

        def advance(self, amount: float = 1, **fields) -> None:
            if amount:  # not the resume point's offset (0 steps here)
                self.fields.append(fields)

        def finish(self) -> None:
            pass

    run = tmp_path / "run"
    config = override_train(TrainConfig(), **{**TINY, "epochs": 1000, "steps_per_epoch": 4}, time_limit=30.0)
    seen = Recorder()
    summary = fit(small_zarr, run, config, validate=validator(config), clock=_Clock(1.0), progress=seen)
    assert summary["stopped_early"]
    # the budget ends the run: no total of 4000 steps (and an ETA of hours), the time left instead,
    # and never a "loss nan" before the first loss is known
    assert seen.starts == [("train (for 0m30s)", None)]
    assert all("time_left" in f for f in seen.fields) and seen.fields[-1]["time_left"] == "0m00s"
    assert all(math.isfinite(f["loss"]) for f in seen.fields if "loss" in f) and "loss" in seen.fields[-1]
    rows = _rows(run)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[-1] == pytest.approx(config.lr * config.min_lr_ratio) and lrs[-1] < min(lrs[:-1])
    assert all(r["weights"] == "ema" for r in rows)
    assert rows[0]["saved"].startswith("best+last: mean v_rand of 1 validations")
    assert all(r["saved"].split(":")[0] in ("best+last", "last") for r in rows)
    v = [float(r["v_rand"]) for r in rows]
    smoothed = [sum(v[max(0, i - 2) : i + 1]) / len(v[max(0, i - 2) : i + 1]) for i in range(len(v))]
    best = read_checkpoint(run / "best.safetensors")[1]["state"]["best"]
    assert best == pytest.approx(max(smoothed)) and summary["selection_score"] == pytest.approx(max(smoothed))
    assert summary["best_v_rand"] == pytest.approx(max(v))
    chosen = max(range(len(v)), key=lambda i: (smoothed[i], -i))  # the first epoch with the best mean
    assert rows[chosen]["saved"].startswith("best+last") and all(
        not r["saved"].startswith("best+last") for r in rows[chosen + 1 :]
    )


def test_the_best_weights_are_chosen_by_a_mean_of_validations_not_one_lucky_score():
    from emseg.training.loop import selection_score

    rows = [{"epoch": 0, "v_rand": 0.90}, {"epoch": 1, "v_rand": 0.99}, {"epoch": 2, "train_loss": 0.3}]
    name, score, window = selection_score(rows, {"epoch": 3, "v_rand": 0.93, "train_loss": 0.2})
    assert name == "v_rand" and window == [0.90, 0.99, 0.93] and score == pytest.approx(0.94)
    # a lone high score after low ones does not beat a steady run of good ones
    steady = selection_score([{"epoch": 0, "v_rand": 0.97}, {"epoch": 1, "v_rand": 0.97}], {"epoch": 2, "v_rand": 0.97})
    lucky = selection_score([{"epoch": 0, "v_rand": 0.90}, {"epoch": 1, "v_rand": 0.92}], {"epoch": 2, "v_rand": 0.99})
    assert steady[1] > lucky[1]
    # a resumed epoch replaces its own row: only earlier epochs count
    assert selection_score([{"epoch": 5, "v_rand": 0.1}], {"epoch": 5, "v_rand": 0.8})[2] == [0.8]
    # without validation the training loss decides, smoothed the same way
    assert selection_score([{"epoch": 0, "train_loss": 0.5}], {"epoch": 1, "train_loss": 0.3})[:2] == (
        "-train_loss",
        pytest.approx(-0.4),
    )


@pytest.mark.slow
def test_resume_gives_the_optimizer_state_its_parameters_memory_format(small_zarr, tmp_path):
    from emseg.config import TrainConfig, override_train
    from emseg.models.build import build_model
    from emseg.training.ema import WeightAverage
    from emseg.training.run_dir import RunDir

    run = tmp_path / "run"
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 2})
    config = override_train(TrainConfig(), **TINY)
    model = build_model(config.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters())
    average = WeightAverage(model, 0.99)
    state = RunDir(run).resume(model, optimizer, config, average)
    assert state["ema_updates"] == 2 and average.updates == 2
    conv = [p for p in model.parameters() if p.ndim == 4]
    assert conv and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    for p in conv:
        for key in ("exp_avg", "exp_avg_sq"):
            assert optimizer.state[p][key].stride() == p.stride(), key
    saved = _weights(run)  # the checkpoints hold the average's weights
    assert all(torch.equal(saved[k], v) for k, v in average.state_dict().items())


def test_grad_scaler_and_clipping_in_an_optimizer_step():
    from emseg.training.loop import autocast_context, optimizer_step
    from emseg.training.losses import make_loss

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    before = net.weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    image = torch.randn(2, 1, 8, 8)
    batch = (image * 100, (image > 0).float(), torch.ones_like(image))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss, _ = optimizer_step(
        net, optimizer, make_loss("weighted-bce"), batch, autocast_context(torch.device("cpu"), None), scaler, 0.5
    )
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0**10
    # clipped: the step is the learning rate times a gradient of norm at most 0.5, unscaled
    moved = (net.weight.detach() - before).norm()
    assert 0 < float(moved) <= 0.5 + 1e-4


def test_each_rank_finds_its_gpu_whether_it_sees_one_or_all():
    from emseg.training.distributed import rank_device

    assert rank_device(3, 8) == torch.device("cuda", 3)
    assert rank_device(3, 1) == torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES gave it one GPU


def test_the_duration_estimate_suggests_the_small_configuration_on_a_cpu(monkeypatch):
    from emseg.training import loop

    said: list[tuple[str, str]] = []
    for level in ("info", "warning"):
        monkeypatch.setattr(loop.log, level, lambda msg, *a, level=level: said.append((level, msg % a)))
    estimate = loop.DurationEstimate(torch.device("cpu"), _Clock(50.0))  # read twice, 5 steps apart: 10 s a step
    for _ in range(loop.ESTIMATE_STEPS + 1):
        estimate.step_done(TimeBudget(None), 5000, 0.0)
    assert said[-1][0] == "warning" and "13h53m" in said[-1][1] and "--depth 3 --base-channels 16" in said[-1][1]
    estimate = loop.DurationEstimate(torch.device("cpu"), _Clock(50.0))
    for _ in range(loop.ESTIMATE_STEPS + 1):
        estimate.step_done(TimeBudget(300), 5000, 0.0)
    assert said[-1][0] == "info" and "5m00s" in said[-1][1] and "about 30 of them" in said[-1][1]


def test_normalisation_maps_a_new_stacks_percentiles_onto_the_training_ones():
    from emseg.models.normalization import for_stack, robust_normalization, stack_normalization

    rng = np.random.default_rng(0)
    train = rng.normal(120, 30, (2, 64, 64)).clip(1, 254).astype(np.uint8)
    norm = robust_normalization(train)
    assert norm["percentiles"] == [1.0, 99.0] and norm["low"] < norm["mean"] < norm["high"]
    other = (train.astype(np.float64) * 0.5 + 40).astype(np.uint8)  # another session: less contrast
    mean, std = stack_normalization(norm, lambda z, rows, cols: other[z, rows, cols], other.shape)
    a = (train.astype(np.float64) - norm["mean"]) / norm["std"]
    b = (other.astype(np.float64) - mean) / std
    assert abs(np.percentile(a, 1) - np.percentile(b, 1)) < 0.1
    assert abs(np.percentile(a, 99) - np.percentile(b, 99)) < 0.1
    # an older checkpoint (mean and std only) keeps its values; the identity maps onto itself
    old = {"mean": 100.0, "std": 20.0}
    assert stack_normalization(old, lambda z, rows, cols: other[z, rows, cols], other.shape) == (100.0, 20.0)
    assert for_stack(norm, norm["low"], norm["high"]) == pytest.approx((norm["mean"], norm["std"]))


@pytest.mark.slow
def test_predict_and_export_take_the_normalisation_from_the_checkpoint(small_zarr, tmp_path):
    from emseg.config import PredictConfig
    from emseg.models.checkpoint import save_checkpoint
    from emseg.models.export import export_model

    run = tmp_path / "run"
    emseg.train(small_zarr, run, **{**TINY, "epochs": 1, "steps_per_epoch": 3})
    model = emseg.load_model(run)
    meta = model.emseg_meta
    assert {"mean", "std", "percentiles", "low", "high"} <= set(meta["normalization"])
    edited = tmp_path / "edited.safetensors"
    norm = {**meta["normalization"], "mean": meta["normalization"]["mean"] + 40.0}
    save_checkpoint(edited, model, {**meta, "normalization": norm})
    old = tmp_path / "old.safetensors"  # an older emseg's block: mean and std only
    save_checkpoint(old, model, {**meta, "normalization": {k: norm[k] for k in ("mean", "std")}})

    def predicted(ckpt: Path, name: str, **kw: object) -> np.ndarray:
        out = emseg.predict(ckpt, small_zarr, tmp_path / name, slices="9:10", dtype="float32", **kw)
        import zarr

        return np.asarray(zarr.open_group(str(out), mode="r")["0"][0])

    base = predicted(run / "best.safetensors", "a.zarr")
    shifted = predicted(edited, "b.zarr")
    assert not np.allclose(base, shifted, atol=1e-3)  # read from the checkpoint, not recomputed
    # with the checkpoint's own values the old block predicts as the percentile block does
    assert np.allclose(
        predicted(old, "c.zarr"),
        predicted(edited, "d.zarr", config=PredictConfig(normalization="checkpoint")),
        atol=1e-5,
    )
    exported = [export_model(c, tmp_path / f"export-{c.stem}") for c in (run / "best.safetensors", edited)]
    outputs = [np.load(e / "test_output.npy") for e in exported]
    infos = [json.loads((e / "emseg-model.json").read_text())["normalization"] for e in exported]
    assert infos[1]["mean"] == pytest.approx(norm["mean"]) and not np.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_validation_computes_in_the_precision_training_was_given(small_zarr, tmp_path, precision, dtype):
    """Validation predicts as ``emseg predict`` would with the run's ``--precision``: it used the
    engine's default ("auto"), so fp32 validated in bf16 on a CPU with native bf16 and bf16 in
    fp32 on one without; one of the two fails on any CPU."""
    seen: list[torch.dtype] = []

    def record(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d) and torch.is_inference_mode_enabled():  # validation only
            seen.append(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        emseg.train(small_zarr, tmp_path / "run", **{**TINY, "epochs": 1, "steps_per_epoch": 1}, precision=precision)
    finally:
        hook.remove()
    assert seen and set(seen) == {dtype}


def test_curves_are_drawn_at_most_every_half_minute_and_at_the_end(tmp_path):
    from emseg.training.run_dir import PLOT_EVERY_S, RunDir

    assert PLOT_EVERY_S >= 10
    run = RunDir(tmp_path)
    run.rows = [{"epoch": 0, "step": 10, "train_loss": 0.7, "lr": 1e-3}]
    run.write_metrics()
    curves = tmp_path / "curves.png"
    assert curves.read_bytes().startswith(b"\x89PNG")  # the first epoch draws at once
    curves.unlink()
    run.rows.append({"epoch": 1, "step": 20, "train_loss": 0.5, "lr": 1e-3})
    run.write_metrics()  # a second epoch within the interval: metrics.csv now, the picture later
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3 and not curves.exists()
    run.finish()
    assert curves.read_bytes().startswith(b"\x89PNG")
    curves.unlink()
    run.finish()  # nothing new since: not drawn again
    assert not curves.exists()
