"""Faults and hostile input: killed processes, full disks, malformed files, pickles, paths.

Each test checks the data afterwards: the source unchanged, no half-written output under its
final name, the earlier output intact, and a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emseg
from emseg.config import ExportConfig, IngestConfig
from emseg.errors import BadInputError
from emseg.io.ingest import ingest_stack
from emseg.io.zarr import open_ome
from emseg.models.checkpoint import read_checkpoint

from .conftest import REPO, run_emseg

EMSEG = [sys.executable, "-m", "emseg"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# --- killed processes -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("chunk_files", [1, 40])
def test_killed_ingest_leaves_no_store_and_the_source_untouched(tmp_path, chunk_files):
    src = tmp_path / "stack.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(
        src, rng.integers(0, 255, (40, 1024, 1024), dtype=np.uint8), photometric="minisblack", compression="zlib"
    )
    before = _sha(src)
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen([*EMSEG, "ingest", str(src), "-o", str(out), "--chunks", "1", "256", "256", "-q"])

    def written() -> bool:  # the partial store holds at least `chunk_files` entries of level 0
        for partial in tmp_path.glob(".out.zarr.partial-*"):
            if (partial / "0").is_dir() and sum(1 for _ in (partial / "0").rglob("*")) >= chunk_files:
                return True
        return False

    _kill_when(proc, written)
    assert not out.exists()
    assert _sha(src) == before
    again = run_emseg("ingest", src, "-o", out, "-q")  # a later run clears the dead run's partial
    assert again.returncode == 0, again.stderr
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert open_ome(out).shape == (40, 1024, 1024)


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """A run killed between moving the previous output aside and renaming its new one into
    place: the next writer of that output puts the previous one back before anything else."""
    rng = np.random.default_rng(5)
    tifffile.imwrite(tmp_path / "a.tif", rng.integers(0, 255, (2, 32, 32), dtype=np.uint8), photometric="minisblack")
    out = ingest_stack(tmp_path / "a.tif", tmp_path / "o.zarr")
    kept = open_ome(out).array[:]
    dead = 2**31 - 1  # above any pid_max: no such process
    out.rename(tmp_path / f".o.zarr.previous-{dead}-0123abcd")
    (tmp_path / f".o.zarr.partial-{dead}-4567cdef").mkdir()  # its unfinished new output
    with pytest.raises(BadInputError, match="already exists"):  # the previous output is back
        ingest_stack(tmp_path / "a.tif", out)
    np.testing.assert_array_equal(open_ome(out).array[:], kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "o.zarr"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(small_zarr, tmp_path):
    args = [
        "train",
        str(small_zarr),
        "--device",
        "cpu",
        "--depth",
        "2",
        "--base-channels",
        "8",
        "--crop",
        "64",
        "--batch-size",
        "4",
        "--steps-per-epoch",
        "8",
        "--epochs",
        "3",
        "--val-slices",
        "9",
        "-q",
    ]
    whole = tmp_path / "whole"
    assert run_emseg(*args, "-o", whole).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*EMSEG, *args, "-o", str(killed)])
    _kill_when(proc, lambda: (killed / "resume.safetensors").exists())
    resumed = run_emseg(*args, "-o", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_checkpoint(whole / "last.safetensors")[0], read_checkpoint(killed / "last.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU with a fixed seed


# --- full disks -----------------------------------------------------------------------------


def _small_filesystem(path: Path, size: str = "3m") -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "small"
    if not _small_filesystem(mount):
        pytest.skip("cannot mount a small tmpfs here (needs root); see the write-budget test")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_the_previous_output_stays(small_disk, tmp_path):
    rng = np.random.default_rng(1)
    small = tmp_path / "small.tif"
    big = tmp_path / "big.tif"
    tifffile.imwrite(small, rng.integers(0, 255, (2, 256, 256), dtype=np.uint8), photometric="minisblack")
    tifffile.imwrite(big, rng.integers(0, 255, (8, 1024, 1024), dtype=np.uint8), photometric="minisblack")
    out = small_disk / "data.zarr"
    assert run_emseg("ingest", small, "-o", out, "-q").returncode == 0
    kept = open_ome(out).array[:]
    failed = run_emseg("ingest", big, "-o", out, "--overwrite", "-q")
    assert failed.returncode == 1, failed.stderr
    assert "No space left" in failed.stderr and failed.stderr.count("\n") == 1
    np.testing.assert_array_equal(open_ome(out).array[:], kept)
    assert sorted(p.name for p in small_disk.iterdir()) == ["data.zarr"]


def test_a_write_budget_is_a_clear_error_and_nothing_is_left(tmp_path):
    """A per-process file-size limit (RLIMIT_FSIZE): writes past it fail with EFBIG."""
    src = tmp_path / "s.tif"
    tifffile.imwrite(
        src, np.random.default_rng(2).integers(0, 255, (2, 512, 512), dtype=np.uint8), photometric="minisblack"
    )

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [*EMSEG, "ingest", str(src), "-o", str(tmp_path / "o.zarr"), "-q"],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "writing failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.zarr").exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_an_export_failing_mid_way_keeps_the_previous_file(tmp_path, monkeypatch):
    """--overwrite replaces the earlier output only once the new one is whole: a failure while
    writing, or while putting the new file in place, leaves the previous file intact."""
    import errno

    from emseg.errors import EmsegRuntimeError
    from emseg.io.export import export_store

    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        tifffile.imwrite(
            tmp_path / f"{name}.tif", rng.integers(0, 255, (4, 64, 64), dtype=np.uint8), photometric="minisblack"
        )
        ingest_stack(tmp_path / f"{name}.tif", tmp_path / f"{name}.zarr")
    out = tmp_path / "out.tif"
    export_store(tmp_path / "a.zarr", out)
    before = _sha(out)

    class Interrupted(Exception):
        pass

    class FailAfterTwoSlices:
        def __init__(self):
            self.done = 0

        def start(self, description, total, unit=""):
            pass

        def advance(self, amount=1, **fields):
            self.done += amount
            if self.done >= 2:
                raise Interrupted

        def finish(self):
            pass

    for fmt in ("tif", "png"):
        with pytest.raises(Interrupted):
            export_store(
                tmp_path / "b.zarr",
                out if fmt == "tif" else tmp_path / "png",
                ExportConfig(file_format=fmt, overwrite=True),
                progress=FailAfterTwoSlices(),
            )
    assert _sha(out) == before  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "a.zarr", "b.tif", "b.zarr", "out.tif"]

    rename = os.rename

    def failing_rename(src, dst):  # the new file is whole, but cannot be put in place
        if ".partial" in os.fspath(src) and os.fspath(dst) == os.fspath(out):
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(EmsegRuntimeError, match="writing failed"):
        export_store(tmp_path / "b.zarr", out, ExportConfig(overwrite=True))
    monkeypatch.undo()
    assert _sha(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "a.zarr", "b.tif", "b.zarr", "out.tif"]
    export_store(tmp_path / "b.zarr", out, ExportConfig(overwrite=True))
    with tifffile.TiffFile(out) as tif:
        np.testing.assert_array_equal(tif.asarray(), tifffile.imread(tmp_path / "b.tif"))


# --- hostile and malformed input ------------------------------------------------------------


def _valid_files(folder: Path) -> dict[str, bytes]:
    from PIL import Image

    rng = np.random.default_rng(3)
    data = rng.integers(0, 255, (3, 64, 48), dtype=np.uint8)
    tifffile.imwrite(folder / "plain.tif", data, photometric="minisblack")
    tifffile.imwrite(folder / "zlib.tif", data, photometric="minisblack", compression="zlib", rowsperstrip=16)
    tifffile.imwrite(folder / "big.tif", data, photometric="minisblack", bigtiff=True, tile=(16, 16))
    tifffile.imwrite(folder / "ij.tif", data, imagej=True, metadata={"spacing": 0.05, "unit": "micron"})
    Image.fromarray(data[0]).save(folder / "slice.png")
    return {name: (folder / name).read_bytes() for name in ("plain.tif", "zlib.tif", "big.tif", "ij.tif", "slice.png")}


_FUZZ_DIR: Path | None = None


def _mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "huge", "splice"]))
    buf = bytearray(data)
    if kind == "truncate" or len(buf) < 2:
        return bytes(buf[: draw(st.integers(0, max(0, len(buf) - 1)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 12))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if kind == "huge":  # header-sized fields set to enormous values
        if len(buf) < 8:
            return bytes(buf) + b"\xff\xff\xff\x7f"
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, min(len(buf), 512) - 4))
            buf[i : i + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x01\x00", b"\xff\xff\xff\xff"]))
        return bytes(buf)
    i = draw(st.integers(0, len(buf) - 1))
    return bytes(buf[:i] + buf[i:][::-1])


# No hypothesis deadline (a loaded CI machine makes timing flaky); each case asserts its own
# generous bound instead, and pytest-timeout catches a real hang.
@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_images_give_only_clean_errors(tmp_path_factory, data):
    import psutil

    folder = tmp_path_factory.mktemp("fuzz")
    valid = _valid_files(folder)
    name = data.draw(st.sampled_from(sorted(valid)))
    path = folder / f"fuzzed{Path(name).suffix}"
    path.write_bytes(_mutate(valid[name], data.draw))
    rss = psutil.Process().memory_info().rss
    try:
        ingest_stack(path, folder / "out.zarr", IngestConfig(chunks=(1, 32, 32)))
    except BadInputError as exc:
        assert "\n" not in str(exc)
    assert psutil.Process().memory_info().rss - rss < 512 * 2**20  # no allocation blow-up


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_zarr_metadata_gives_only_clean_errors(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("zfuzz")
    src = folder / "s.tif"
    tifffile.imwrite(src, np.zeros((2, 40, 30), np.uint8), photometric="minisblack")
    lab = folder / "l.tif"
    tifffile.imwrite(lab, np.ones((2, 40, 30), np.uint8), photometric="minisblack")
    store = ingest_stack(src, folder / "s.zarr", labels=lab)
    # The provenance holds the folder's name and the time: pin it so that every example mutates
    # the same bytes (hypothesis replays a failing example and needs the same draws).
    root = json.loads((store / ".zattrs").read_text())
    root["emseg"] = {"command": "ingest", "version": "0"}
    (store / ".zattrs").write_text(json.dumps(root))
    targets = [p for p in store.rglob("*") if p.name in (".zattrs", ".zarray", ".zgroup")]
    target = data.draw(st.sampled_from(sorted(targets)))
    text = target.read_bytes()
    if data.draw(st.booleans()):
        target.write_bytes(_mutate(text, data.draw))
    else:  # valid JSON with absurd values
        obj = json.loads(text)
        if target.name == ".zarray":
            obj["shape"] = data.draw(st.sampled_from([[2**40, 2**40, 2**40], [0, 40, 30], [-1, 2, 3], [2, 40]]))
        else:
            obj = data.draw(
                st.sampled_from(
                    [
                        {"multiscales": "x"},
                        {"multiscales": [{"datasets": [{"path": 7}]}]},
                        {"labels": [1, 2]},
                        [1, 2, 3],
                        {},
                    ]
                )
            )
        target.write_text(json.dumps(obj))
    try:  # a hang is caught by pytest-timeout, never by a timing assertion
        info = emseg.info(store)
        assert info["shape"][0] >= 1
    except BadInputError as exc:
        assert "\n" not in str(exc)


def test_huge_header_claims_are_refused_before_allocating(tmp_path):
    """A tiny file claiming a 200000 x 200000 slice is refused from its header alone."""
    import struct

    # little-endian TIFF, one IFD: width, length, bits 8, no compression, strip offsets/counts
    entries = [
        (256, 4, 1, 200_000),
        (257, 4, 1, 200_000),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (278, 4, 1, 200_000),
        (279, 4, 1, 16),
    ]
    ifd = (
        struct.pack("<H", len(entries))
        + b"".join(
            struct.pack("<HHII", tag, typ, n, val) if typ == 4 else struct.pack("<HHIHH", tag, typ, n, val, 0)
            for tag, typ, n, val in entries
        )
        + struct.pack("<I", 0)
    )
    (tmp_path / "bomb.tif").write_bytes(b"II*\x00" + struct.pack("<I", 24) + b"\x00" * 16 + ifd)
    with pytest.raises(BadInputError, match="larger than emseg accepts|more than the limit|truncated|not a readable"):
        ingest_stack(tmp_path / "bomb.tif", tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


# --- checkpoints never execute code ---------------------------------------------------------


@pytest.mark.slow
def test_a_pickle_checkpoint_is_refused_without_running_it(isbi_zarr, tmp_path):
    marker = tmp_path / "payload-ran"
    payload = (
        "import pickle, os\n"
        "class P:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"open({str(tmp_path / 'evil.safetensors')!r}, 'wb').write(pickle.dumps(P()))\n"
    )
    subprocess.run([sys.executable, "-c", payload], check=True)
    for args in (
        ["predict", tmp_path / "evil.safetensors", isbi_zarr, "-o", tmp_path / "p.zarr"],
        ["export-model", tmp_path / "evil.safetensors", "-o", tmp_path / "m"],
    ):
        proc = run_emseg(*args)
        assert proc.returncode == 2 and "never loads pickles" in proc.stderr
    (tmp_path / "run").mkdir()
    shutil.copy(tmp_path / "evil.safetensors", tmp_path / "run" / "resume.safetensors")
    proc = run_emseg("train", isbi_zarr, "-o", tmp_path / "run", "--resume", "--device", "cpu")
    assert proc.returncode == 2 and "never loads pickles" in proc.stderr
    assert not marker.exists()


def test_no_code_path_unpickles():
    import re

    for path in (REPO / "emseg").rglob("*.py"):
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "weights_only=False", "allow_pickle=True"):
            assert needle not in text, f"{path}: {needle}"
        for call in re.findall(r"np\.load\(.*", text):  # emseg's own .npz files, never pickles
            assert "allow_pickle=False" in call, f"{path}: {call}"


# --- paths ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_symlinked_outputs_are_refused(isbi_zarr, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    link = tmp_path / "link.zarr"
    link.symlink_to(victim)
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    for args in (
        ["ingest", tmp_path / "s.tif", "-o", link, "--overwrite"],
        ["train", isbi_zarr, "-o", link, "--overwrite", "--device", "cpu"],
    ):
        proc = run_emseg(*args)
        assert proc.returncode == 2 and "symbolic link" in proc.stderr, proc.stderr
    assert (victim / "precious.txt").read_text() == "keep" and link.is_symlink()


@pytest.mark.slow
def test_overwrite_removes_only_what_emseg_wrote(isbi_zarr, tmp_path, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("keep")
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    store = emseg.ingest(tmp_path / "s.tif", tmp_path / "s.zarr")
    (store / "link-out").symlink_to(outside)  # a link planted inside an emseg store
    assert cli("ingest", tmp_path / "s.tif", "-o", store, "--overwrite", "-q").exit_code == 0
    assert (outside / "data.txt").read_text() == "keep"
    run = tmp_path / "run"
    emseg.train(
        isbi_zarr,
        run,
        depth=2,
        base_channels=4,
        crop=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        device="cpu",
        val_slices="29",
    )
    (run / "notes.txt").write_text("mine")
    emseg.train(
        isbi_zarr,
        run,
        depth=2,
        base_channels=4,
        crop=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        device="cpu",
        val_slices="29",
        overwrite=True,
    )
    assert (run / "notes.txt").read_text() == "mine"


def test_dotdot_in_an_output_writes_exactly_there(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    assert cli("ingest", "s.tif", "-o", "sub/../x.zarr", "-q").exit_code == 0
    assert (tmp_path / "x.zarr").is_dir() and sorted(p.name for p in (tmp_path / "sub").iterdir()) == []
