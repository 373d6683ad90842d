"""CLI habits: progress lines when stderr is not a terminal, silence with --quiet."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emseg.cli import PlainReporter, _duration

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
