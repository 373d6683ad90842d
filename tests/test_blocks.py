"""The one block system (emseg/blocks.py) and what predict and segment share with it: blocks of
whole chunks that tile the shape, read regions that contain write regions, run_blocks on threads
and on a dask.distributed cluster, the output lifecycle's complete check, the mode reduction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from emseg.blocks import Block, axis_blocks, grow, plan_blocks, run_blocks, slices
from emseg.config import PredictConfig
from emseg.errors import BadInputError
from emseg.io.outputs import complete_output, provenance
from emseg.io.pyramid import build_levels, reduce2

# --- planning ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 300), st.integers(1, 300)),
    chunks=st.tuples(st.integers(1, 4), st.integers(1, 64), st.integers(1, 64)),
    target=st.tuples(st.integers(1, 6), st.integers(1, 160), st.integers(1, 160)),
    halo=st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 40)),
)
def test_blocks_tile_the_shape_with_whole_chunks_and_read_around_what_they_write(shape, chunks, target, halo):
    count, blocks = plan_blocks(shape, chunks, target, lambda write: grow(write, halo, shape))
    blocks = list(blocks)
    assert len(blocks) == count and len({b.name for b in blocks}) == count
    cover = np.zeros(shape, np.int32)
    for block in blocks:
        cover[slices(block.write)] += 1
        for (w0, w1), (r0, r1), c, n, h in zip(block.write, block.read, chunks, shape, halo, strict=True):
            assert w0 % c == 0 and (w1 % c == 0 or w1 == n)  # whole chunks: no chunk has two writers
            assert (r0, r1) == (max(0, w0 - h), min(n, w1 + h))  # the halo, clipped at the edges
        inner = np.zeros(tuple(b - a for a, b in block.read), bool)
        inner[block.inner()] = True
        assert inner.sum() == np.prod([b - a for a, b in block.write])
    assert (cover == 1).all()


def test_an_axis_at_most_one_and_a_half_targets_is_one_block():
    assert axis_blocks(192, 32, 128) == [(0, 192)]
    assert axis_blocks(193, 32, 128) == [(0, 128), (128, 193)]
    assert axis_blocks(100, 64, 20) == [(0, 64), (64, 100)]  # never less than a chunk


def test_predict_reads_the_tile_plans_domain_around_its_write_region():
    from emseg.inference.blocks import Run, plan_tasks
    from emseg.inference.tiling import plan_block

    config = PredictConfig(block=128, tile=64, overlap=16, blend="crop")
    run = Run("m", "d", "o", "done", config, divisor=16)
    count, tasks = plan_tasks(run, (2, 300, 190), (1, 64, 64))
    tasks = list(tasks)
    assert count == len(tasks) == 2 * 3 * 1 and tasks[0].block.name == "0-0-0"
    for task in tasks:
        (z0, z1), y, x = task.block.write
        assert z1 == z0 + 1 and task.block.read[0] == (z0, z1)
        domain = plan_block(y, x, 64, 16, 16, "crop", (300, 190)).domain
        assert task.block.read[1:] == ((domain[0], domain[1]), (domain[2], domain[3]))
        assert domain[0] <= y[0] and y[1] <= domain[1] and domain[2] <= x[0] and x[1] <= domain[3]


# --- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fill:
    """A picklable task: write ``block.name``'s number into its write region of ``path``."""

    path: str
    block: Block


def fill(task: Fill) -> int:
    value = sum(a * 1000**i for i, (a, _) in enumerate(task.block.write)) + 1
    zarr.open_array(task.path, mode="r+")[slices(task.block.write)] = value
    return int(np.prod([b - a for a, b in task.block.write]))


class Count:
    def __init__(self) -> None:
        self.done, self.fields = 0, []

    def start(self, description, total=None, unit=""):
        pass

    def advance(self, amount=1, **fields):
        self.done += amount
        self.fields.append(fields)

    def finish(self):
        pass


def _fill_all(path: Path, **where) -> tuple[np.ndarray, Count, list[str]]:
    shape = (3, 40, 50)
    zarr.create_array(str(path), shape=shape, chunks=(1, 8, 8), dtype="int64", fill_value=0, zarr_format=2)
    _, blocks = plan_blocks(shape, (1, 8, 8), (1, 16, 16), lambda w: w)
    progress, cleaned = Count(), []
    run_blocks(
        fill,
        (Fill(str(path), b) for b in blocks),
        progress=progress,
        key=lambda t: f"fill-{t.block.name}",
        cleanup=lambda: cleaned.append("done"),
        **where,
    )
    return np.asarray(zarr.open_array(str(path), mode="r")[:]), progress, cleaned


def test_run_blocks_on_threads_and_on_a_cluster_give_the_same_result(tmp_path):
    from distributed import LocalCluster

    threads, progress, cleaned = _fill_all(tmp_path / "t.zarr", threads=2, workers=None, scheduler=None)
    n = 3 * 3 * 4  # z: 3 slices; y: 40 in 16s; x: 50 in 16s
    assert progress.done == n and cleaned == ["done"] and progress.fields[-1]["mpix_per_s"] > 0
    assert len(np.unique(threads)) == n and threads.min() > 0  # every block wrote its region
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        where = {"threads": None, "workers": None, "scheduler": lc.scheduler_address}
        on_cluster, progress, cleaned = _fill_all(tmp_path / "c.zarr", **where)
    assert progress.done == n and cleaned == ["done"]
    np.testing.assert_array_equal(threads, on_cluster)


def test_run_blocks_without_items_starts_nothing():
    def never(item):
        raise AssertionError("no item")

    # an address nobody listens on: connecting would fail, so nothing tried to
    where = {"threads": None, "workers": None, "scheduler": "tcp://127.0.0.1:9"}
    run_blocks(never, iter([]), progress=Count(), key=str, **where)


# --- the output lifecycle's complete check ----------------------------------------------------


def _store(path: Path, emseg: dict | None) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    if emseg is not None:
        root.attrs["emseg"] = emseg
    return path


def test_complete_output_compares_the_stored_resume_record(tmp_path):
    record = {"data": "/x.zarr", "config": {"tile": 256, "slices": (0, 3)}}  # a tuple stores as a list
    done = _store(tmp_path / "done.zarr", provenance("predict", resume_record=record, complete=True))
    assert complete_output(done, record, overwrite=False, resume=True) is True
    assert complete_output(done, record, overwrite=True, resume=True) is False  # replaced
    assert complete_output(tmp_path / "none.zarr", record, overwrite=False, resume=True) is False
    with pytest.raises(BadInputError, match="already exists") as exc:
        complete_output(done, record, overwrite=False, resume=False)
    other = {**record, "config": {"tile": 128, "slices": (0, 3)}}
    with pytest.raises(BadInputError, match="complete but was made with other settings") as exc:
        complete_output(done, other, overwrite=False, resume=True)
    assert "\n" not in str(exc.value)
    old = _store(tmp_path / "old.zarr", provenance("segment", prediction="/p.zarr", settings={}))
    with pytest.raises(BadInputError, match="made with an emseg that kept no resume record"):
        complete_output(old, record, overwrite=False, resume=True)
    foreign = _store(tmp_path / "foreign.zarr", None)
    for overwrite, resume in ((False, True), (True, False)):
        with pytest.raises(BadInputError, match="not written by emseg"):
            complete_output(foreign, record, overwrite=overwrite, resume=resume)


# --- the mode reduction -------------------------------------------------------------------------


def _brute_mode(band: np.ndarray) -> np.ndarray:
    """The most frequent of each 2x2 block's (a, b, c, d) = (top-left, top-right, bottom-left,
    bottom-right), the first in that order on a tie; edges replicated for odd sizes."""
    z, y, x = band.shape
    band = np.pad(band, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    out = np.zeros((z, band.shape[1] // 2, band.shape[2] // 2), band.dtype)
    for k in range(z):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                four = [band[k, 2 * i, 2 * j], band[k, 2 * i, 2 * j + 1], band[k, 2 * i + 1, 2 * j]]
                four.append(band[k, 2 * i + 1, 2 * j + 1])
                out[k, i, j] = max(four, key=lambda v: (four.count(v), -four.index(v)))
    return out


@pytest.mark.parametrize("dtype, values", [("uint32", 3), ("uint64", 5)])
def test_mode_reduction_is_the_most_frequent_id(dtype, values):
    rng = np.random.default_rng(7)
    base = np.uint64(2**40) if dtype == "uint64" else 0
    band = (rng.integers(0, values, (2, 17, 23)) + base).astype(dtype)  # few IDs: many ties
    np.testing.assert_array_equal(reduce2(band, "mode"), _brute_mode(band))
    assert reduce2(band, "mode").dtype == band.dtype


def test_build_levels_mode_builds_a_label_pyramid(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(1, 4, (2, 37, 29)).astype(np.uint32)
    group = zarr.open_group(str(tmp_path / "l.zarr"), mode="w", zarr_format=2)
    shapes = [(2, 37, 29), (2, 19, 15), (2, 10, 8)]
    for level, shape in enumerate(shapes):
        group.create_array(str(level), shape=shape, chunks=(1, 4, 8), dtype="uint32", fill_value=0)
    group["0"][:] = labels
    build_levels(tmp_path / "l.zarr", "mode")
    expected = labels
    for level in (1, 2):
        expected = _brute_mode(expected)
        np.testing.assert_array_equal(group[str(level)][:], expected)
