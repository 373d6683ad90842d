"""One block of ``emseg predict``: what it reads, what it writes, and running it.

A :class:`Block` is plain data (no model, no arrays), so it travels to any dask worker. It
writes the output region (slice ``z_out``, rows ``y``, columns ``x``: whole output chunks, so no
two blocks write the same chunk) and reads input slice ``z_in`` over that region grown by the
tile plan's margin: real neighbouring pixels across chunk and block borders, the slice's mirror
image beyond its true edges. :func:`run_block` runs it through the process's
:class:`~emseg.inference.engine.Engine` (built once per process from the checkpoint path), writes
the probabilities and the membrane mask, and leaves a done-marker for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from emseg.config import PredictConfig
from emseg.inference.tiling import TilePlan, plan_block, read_reflected


@dataclass(frozen=True)
class Run:
    """What every block of one prediction shares, as plain data."""

    #: The checkpoint file.
    model: str
    #: The input image group (level 0 is ``data/0``, (Z, Y, X)).
    data: str
    #: The output store being written (probabilities at ``0``, the mask at ``labels/membranes/0``).
    output: str
    #: The folder of done-markers.
    done: str
    config: PredictConfig
    #: The network's size divisor (tiles are multiples of it).
    divisor: int
    #: Unique per run: workers that outlive a run never reuse its open arrays.
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    #: torch CPU threads of a worker process (a local cluster shares the cores among workers).
    torch_threads: int | None = None
    #: (mean, std) for this input stack (emseg.models.normalization.stack_normalization); None
    #: uses the checkpoint's.
    normalization: tuple[float, float] | None = None


@dataclass(frozen=True)
class Block:
    """One block task: its run, the input slice it reads and the output region it writes."""

    run: Run
    z_in: int
    z_out: int
    y: tuple[int, int]
    x: tuple[int, int]

    @property
    def name(self) -> str:
        """The block's done-marker name: ``Z-Y0-X0`` of its output region."""
        return f"{self.z_out}-{self.y[0]}-{self.x[0]}"

    @property
    def write_region(self) -> tuple[int, slice, slice]:
        """Where the block writes: (z, rows, columns) of the output's level 0."""
        return self.z_out, slice(*self.y), slice(*self.x)

    def plan(self, shape: tuple[int, int]) -> TilePlan:
        """The tiles of this block over an input slice of (Y, X) ``shape``; ``plan.domain`` is the
        read region (y0, y1, x0, x1), which may reach beyond the slice (reflected there)."""
        c = self.run.config
        return plan_block(self.y, self.x, c.tile, c.overlap, self.run.divisor, c.blend, shape)


def axis_blocks(length: int, chunk: int, target: int) -> list[tuple[int, int]]:
    """Split [0, length) into blocks of whole chunks close to ``target`` pixels; an axis at most
    1.5 times the target is one block."""
    if length <= 1.5 * target:
        return [(0, length)]
    step = max(1, round(target / chunk)) * chunk
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def plan_blocks(
    run: Run, z_range: tuple[int, int], shape: tuple[int, int, int], chunks: tuple[int, int, int]
) -> tuple[int, Iterator[Block]]:
    """(how many, every block) of input slices ``z_range`` of a (Z, Y, X) ``shape`` stored in
    ``chunks`` (output slice 0 is input slice ``z_range[0]``). The blocks come from a generator,
    so a stack of millions of blocks never holds them all in memory."""
    ys = axis_blocks(shape[1], chunks[1], run.config.block)
    xs = axis_blocks(shape[2], chunks[2], run.config.block)
    count = (z_range[1] - z_range[0]) * len(ys) * len(xs)
    return count, (Block(run, z, z - z_range[0], y, x) for z in range(*z_range) for y in ys for x in xs)


# --- per-process caches (safe to drop) ------------------------------------------------------

_ENGINES: dict[tuple, Any] = {}
_ARRAYS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def worker_index() -> int | None:
    """This process's dask worker number (a local cluster names its workers 0, 1, ...; a name
    ending in digits counts too); None outside a dask.distributed worker."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not in a worker
        return None
    if isinstance(name, int):
        return name
    digits = str(name)[len(str(name).rstrip("0123456789")) :]
    return int(digits) if digits else 0


def process_device(spec: str) -> str:
    """The device this process runs ``--device spec`` on: in dask worker k of a cluster, its own
    GPU (k modulo the GPUs visible; :func:`emseg.device.worker_device`), else ``spec``."""
    index = worker_index()
    if index is None:
        return spec
    import torch

    from emseg.device import worker_device

    return worker_device(spec, index, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _engine(run: Run) -> Any:
    """The process's engine for this checkpoint and settings, built on first use."""
    from emseg.inference.engine import Engine, EngineSettings
    from emseg.models.checkpoint import load_trained

    c = run.config
    device = process_device(c.device)
    key: tuple = (run.model, os.path.getmtime(run.model), device, c.batch_size, c.tta, c.dtype, c.threshold)
    key += (c.compile, c.precision, run.normalization)
    with _LOCK:
        if key not in _ENGINES:
            model, meta = load_trained(run.model, device, compiled=c.compile, threads=run.torch_threads)
            norm = meta["normalization"]
            settings = EngineSettings(
                batch_size=c.batch_size,
                tta=c.tta,
                output_dtype=c.dtype,
                threshold=c.threshold,
                precision=c.precision,
            )
            for old in _ENGINES.values():
                old.close()
            _ENGINES.clear()
            mean, std = run.normalization or (norm["mean"], norm["std"])
            _ENGINES[key] = Engine(model, next(model.parameters()).device, mean, std, settings)
        return _ENGINES[key]


def _array(path: str, mode: str, run_id: str) -> Any:
    key = (path, mode, run_id)
    with _LOCK:
        if key not in _ARRAYS:
            _ARRAYS[key] = zarr.open_array(path, mode=mode)
        return _ARRAYS[key]


def drop_caches() -> None:
    """Close engines and forget open arrays (the next block rebuilds what it needs)."""
    with _LOCK:
        for engine in _ENGINES.values():
            engine.close()
        _ENGINES.clear()
        _ARRAYS.clear()


# --- running one block ----------------------------------------------------------------------


def run_block(block: Block) -> tuple[str, int]:
    """Predict one block, write it and mark it done; returns (block name, pixels written)."""
    run = block.run
    engine = _engine(run)
    source = _array(str(Path(run.data) / "0"), "r", run.run_id)
    plan = block.plan(source.shape[1:])
    y0, y1, x0, x1 = plan.domain
    region = read_reflected(lambda r, s: source[block.z_in, r, s], source.shape[1:], y0, y1, x0, x1)
    prob, membranes = engine.run_block(region, plan)
    where = block.write_region
    _array(str(Path(run.output) / "0"), "r+", run.run_id)[where] = prob
    _array(str(Path(run.output) / "labels" / "membranes" / "0"), "r+", run.run_id)[where] = membranes
    (Path(run.done) / block.name).touch()
    return block.name, prob.size


__all__ = ["Block", "Run", "axis_blocks", "drop_caches", "plan_blocks", "process_device", "run_block", "worker_index"]
