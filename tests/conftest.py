"""Shared fixtures: the real ISBI 2012 stacks (skipped when absent) and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    Path(os.environ["EMSEG_ISBI_DIR"]) if os.environ.get("EMSEG_ISBI_DIR") else None,
    REPO.parent / "shared" / "data" / "isbi2012",
    Path("/work/shared/data/isbi2012"),
]


def isbi_dir() -> Path | None:
    for c in _CANDIDATES:
        if c is not None and (c / "train-volume.tif").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def isbi() -> Path:
    """The folder holding the ISBI 2012 stacks (never copied into the repository)."""
    d = isbi_dir()
    if d is None:
        pytest.skip("ISBI 2012 data not found (set EMSEG_ISBI_DIR)")
    return d


@pytest.fixture(scope="session")
def isbi_arrays(isbi: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    return tifffile.imread(isbi / "train-volume.tif"), tifffile.imread(isbi / "train-labels.tif")


def run_emseg(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m emseg ARGS`` in a real subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "emseg", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


@pytest.fixture()
def cli():
    """In-process CLI runner: ``cli("ingest", ...)`` returns a click Result with
    exit_code, stdout and stderr."""
    from typer.testing import CliRunner

    from emseg.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
