"""CLI habits: progress lines when stderr is not a terminal, silence with --quiet."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emseg.cli import PlainReporter
from emseg.progress import format_duration as _duration

from .conftest import run_emseg


def test_plain_progress_lines_say_what_how_far_how_fast_and_eta(capsys) -> None:
    reporter = PlainReporter(interval=0)
    reporter.start("predict", total=4, unit="blocks")
    reporter.advance(1, mpix_per_s=2.5)
    reporter.advance(3)
    reporter.finish()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "emseg: predict: started (4 blocks)"
    assert (
        lines[1].startswith("emseg: predict: 1/4 blocks (25%), ") and "ETA" in lines[1] and "mpix per s 2.5" in lines[1]
    )
    assert lines[-1].startswith("emseg: predict: 4/4 blocks (100%)") and lines[-1].endswith(", done")


def test_plain_progress_is_throttled(capsys) -> None:
    reporter = PlainReporter(interval=3600)
    reporter.start("train", total=1000, unit="steps")
    for _ in range(1000):
        reporter.advance(1)
    reporter.finish()
    assert len(capsys.readouterr().err.splitlines()) == 2  # the start and the end, nothing between


def test_durations_read_like_a_clock() -> None:
    assert (_duration(75.4), _duration(3 * 3600 + 300), _duration(float("inf"))) == ("1m15s", "3h05m", "unknown")


@pytest.mark.slow
def test_a_logged_run_prints_progress_lines_and_quiet_silences_it(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    env = {"EMSEG_PROGRESS_INTERVAL": "0"}
    loud = run_emseg("ingest", tmp_path / "s.tif", "-o", tmp_path / "a.zarr", "--voxel-size", "1", "1", "1", env=env)
    assert loud.returncode == 0, loud.stderr
    assert "emseg: ingest s.tif: started (3 slices)" in loud.stderr and "3/3 slices (100%)" in loud.stderr
    quiet = run_emseg(
        "ingest", tmp_path / "s.tif", "-o", tmp_path / "b.zarr", "--voxel-size", "1", "1", "1", "-q", env=env
    )
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.slow
def test_quiet_silences_every_command(tmp_path) -> None:
    """Every command with --quiet writes nothing on stderr (its result may still go to stdout)."""
    import typer.main

    from emseg.cli import app
    from emseg.synthetic import synthetic_stack

    raw, labels = synthetic_stack((4, 64, 64), seed=2)
    tifffile.imwrite(tmp_path / "s.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    t = tmp_path
    tiny = ["--depth", "2", "--base-channels", "4", "--crop", "32", "--batch-size", "2", "--epochs", "1"]
    runs = {
        "ingest": ["ingest", t / "s.tif", "--labels", t / "l.tif", "-o", t / "a.zarr"],  # no voxel size: a warning
        "info": ["info", t / "a.zarr"],
        "models": ["models"],
        "show": ["show", t / "a.zarr", "-o", t / "v.png"],
        "augment-preview": ["augment-preview", t / "a.zarr", "-o", t / "aug.png", "--crop", "32", "--samples", "1"],
        "train": ["train", t / "a.zarr", "-o", t / "run", *tiny, "--steps-per-epoch", "2", "--val-slices", "3"],
        "predict": ["predict", t / "run", t / "a.zarr", "-o", t / "p.zarr", "--tile", "64", "--overlap", "16"],
        "evaluate": ["evaluate", t / "p.zarr", t / "a.zarr", "--json", t / "scores.json"],
        "export": ["export", t / "p.zarr", "-o", t / "p.tif"],
        "export-model": ["export-model", t / "run", "-o", t / "model"],
        "segment": ["segment", t / "p.zarr", "-o", t / "seg.zarr"],
        "bench": ["bench", "--quick", "--no-monai", "--json", t / "bench.json"],
    }
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert commands - set(runs) <= {"demo"}, "a new command needs a --quiet case here"
    env = {"EMSEG_PROGRESS_INTERVAL": "0"}  # a logged run would print progress lines
    for name, args in runs.items():
        if name not in commands:
            continue
        extra = ["--device", "cpu"] if name in ("train", "predict", "bench") else []
        proc = run_emseg(*args, *extra, "--quiet", cwd=tmp_path, env=env)
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stderr == "", (name, proc.stderr)
