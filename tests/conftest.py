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


def pytest_configure(config: pytest.Config) -> None:
    """Without a display but with Xvfb installed, start one for the session, so the napari tests
    drive a real viewer (Xvfb and Mesa draw its OpenGL canvas); without Xvfb they fall back to
    offscreen Qt and napari's ViewerModel (tests/test_napari.py)."""
    import atexit
    import shutil

    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") or shutil.which("Xvfb") is None:
        return
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()  # Xvfb writes its display number once it accepts clients
    if not number.isdigit():
        xvfb.kill()
        return
    os.environ["DISPLAY"] = f":{number}"
    atexit.register(xvfb.kill)


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


def run_emseg(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m emseg ARGS`` in a real subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "emseg", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture()
def cli():
    """In-process CLI runner: ``cli("ingest", ...)`` returns a click Result with
    exit_code, stdout and stderr."""
    import logging

    from typer.testing import CliRunner

    from emseg.cli import app

    runner = CliRunner()
    logger = logging.getLogger("emseg")

    def invoke(*args: str):
        # a command's --quiet or --verbose sets emseg's log level for its process; in one test
        # process, each command starts from the level the tests started with
        level, handlers = logger.level, [(h, h.level) for h in logger.handlers]
        try:
            return runner.invoke(app, [str(a) for a in args])
        finally:
            logger.setLevel(level)
            for handler, handler_level in handlers:
                handler.setLevel(handler_level)

    return invoke


def _ingest(raw: Path, labels: Path, out: Path) -> Path:
    """A TIFF stack and its labels ingested as the tests' stores are (50 x 4 x 4 nm voxels)."""
    from emseg.config import IngestConfig
    from emseg.io.ingest import ingest_stack

    return ingest_stack(raw, out, IngestConfig(voxel_size=(50, 4, 4)), labels=labels)


def _ingest_arrays(folder: Path, raw: np.ndarray, labels: np.ndarray, name: str) -> Path:
    """``raw`` and ``labels`` written as TIFFs in ``folder`` and ingested as ``folder/name``."""
    import tifffile

    tifffile.imwrite(folder / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(folder / "lab.tif", labels, photometric="minisblack")
    return _ingest(folder / "raw.tif", folder / "lab.tif", folder / name)


@pytest.fixture(scope="session")
def isbi_zarr(tmp_path_factory) -> Path:
    """The ISBI training stack ingested once per session (synthetic EM-like data when absent)."""
    folder = tmp_path_factory.mktemp("isbi")
    d = isbi_dir()
    if d is not None:
        return _ingest(d / "train-volume.tif", d / "train-labels.tif", folder / "isbi.zarr")
    from emseg.synthetic import synthetic_stack

    return _ingest_arrays(folder, *synthetic_stack((30, 256, 256), seed=0), "isbi.zarr")


@pytest.fixture(scope="session")
def small_zarr(tmp_path_factory) -> Path:
    """Ten 192 x 192 crops of the ISBI training slices (synthetic EM-like data when absent), for
    tests of how training runs (resume, checkpoints, losses) rather than how well: their weight
    maps, validation and segmentation calibration cost a tenth of the whole stack's."""
    folder = tmp_path_factory.mktemp("small")
    d = isbi_dir()
    if d is not None:
        import tifffile

        raw, labels = (tifffile.imread(d / f)[:10, :192, :192] for f in ("train-volume.tif", "train-labels.tif"))
    else:
        from emseg.synthetic import synthetic_stack

        raw, labels = synthetic_stack((10, 192, 192), seed=0)
    return _ingest_arrays(folder, raw, labels, "small.zarr")


#: A training configuration small enough for a 2-core CPU test.
TINY = dict(depth=2, base_channels=8, crop=64, batch_size=4, steps_per_epoch=10, epochs=2, lr=3e-3, device="cpu")
