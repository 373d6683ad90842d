"""benchmarks/gpu_check.sh, rehearsed on the CPU, and the wheel set it carries to a lent GPU
machine, checked offline against the device's package list (benchmarks/device-packages.txt)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _manifest_module():
    spec = importlib.util.spec_from_file_location("wheel_manifest", BENCH / "wheel_manifest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_carried_wheel_requirement_is_met_on_the_device():
    """Each Requires-Dist of each carried wheel (Python 3.12 markers, no extras) is met by another
    carried wheel (version included) or by the device's own packages; nothing is carried twice,
    and nothing the device already has that would shadow it (typer, rich, shellingham)."""
    wm = _manifest_module()
    folder = REPO / ".whl"
    wheels = wm.load(folder if folder.is_dir() else None)  # the wheels if fetched, else the manifest
    device = wm.device_packages()
    assert {"torch", "numpy", "typer", "rich", "timm"} <= device
    assert wm.unmet(wheels, device) == []
    names = {wm.canonicalize_name(n) for n, _, _ in wheels}
    assert {"zarr", "numcodecs", "google-crc32c", "dask", "distributed", "segmentation-models-pytorch"} <= names
    assert not names & {"typer", "rich", "shellingham", "torch", "numpy"}


def test_the_wheel_check_finds_what_is_missing():
    wm = _manifest_module()
    wheels = [("zarr", "3.1.6", ["google-crc32c>=1.5", "numpy>=1.26", 'pytest; extra == "test"']), ("numpy", "2.0", [])]
    assert wm.unmet(wheels, set()) == ["zarr: needs google-crc32c>=1.5, which is neither carried nor on the device"]
    assert wm.unmet([*wheels, ("google-crc32c", "1.0", [])], set())[0].startswith(
        "zarr: needs google-crc32c>=1.5, carries"
    )
    assert wm.unmet([*wheels, ("google-crc32c", "1.9.0", [])], set()) == []
    old = [("dask", "1", ['importlib_metadata>=4.13.0; python_version < "3.12"'])]
    assert wm.unmet(old, set()) == []  # a marker false on Python 3.12


def test_the_manifest_matches_the_fetched_wheels():
    wm = _manifest_module()
    if not any((REPO / ".whl").glob("*.whl")):
        pytest.skip("no .whl/ (run benchmarks/fetch_wheels.sh)")
    committed = wm.read_manifest((BENCH / "wheels.txt").read_text())
    assert committed == wm.wheel_metadata(REPO / ".whl")


def test_the_gpu_check_fits_a_lease():
    """The device's steps, as bash itself computes their limits (``--plan`` runs the script's
    own control flow and prints each step instead of running it): the wheel install, the smoke
    test, the tests, the bench and the quality run, adding up to at most 6 minutes; every step
    runs under ``timeout -k``; at most 8 files come back."""
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--plan"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    plan = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("plan ")]
    names, limits = [n for n, _ in plan], [int(limit) for _, limit in plan]
    assert names == ["wheels", "smoke", "tests", "bench", "quality"], names
    assert all(limit > 0 for limit in limits) and sum(limits) <= 360, plan
    script = (BENCH / "gpu_check.sh").read_text()
    assert 'timeout -k 5 "$limit" "$@"' in script and "trap summary EXIT" in script
    outputs = set(re.findall(r"\$OUT/([\w.-]+)", script))
    assert len(outputs) <= 8, outputs


@pytest.mark.slow
def test_the_gpu_check_rehearsal_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--rehearse"],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=REPO,
    )
    out = tmp_path / "out"
    status = (out / "status").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("smoke", "tests", "bench", "quality"):
        assert f"{name} rc=0" in status, status
    assert "== summary" in done.stdout and "forward bf16 + channels_last" in done.stdout
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
