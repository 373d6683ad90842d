"""One block of ``emseg predict``: what it reads, what it writes, and running it.

A :class:`Task` is plain data (no model, no arrays), so it travels to any dask worker: the
:class:`Run` every block shares and one :class:`~emseg.blocks.Block`. The block writes one output
slice over rows and columns of whole output chunks (so no two blocks write the same chunk) and
reads the input slice over its read region, the write region grown by the tile plan's margin:
real neighbouring pixels across chunk and block borders, the slice's mirror image beyond its
true edges. :func:`run_block` runs it through the process's
:class:`~emseg.inference.engine.Engine` (built once per process from the checkpoint path), writes
the probabilities and the membrane mask, and leaves a done-marker for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from emseg.blocks import Block, Region, plan_blocks, slices
from emseg.config import PredictConfig
from emseg.inference.tiling import plan_block, read_reflected, tile_origins


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
    #: The input slice of output slice 0 (``--slices A:B`` starts at A).
    first_slice: int = 0
    #: The model runs at this many times the input's size (its training pixel size; 1: as it is).
    zoom: float = 1.0
    #: The label image written beside the probabilities: ``membranes`` (P(cell) < threshold), or
    #: ``classes`` (the most probable class) for a network of several classes.
    label: str = "membranes"


@dataclass(frozen=True)
class Task:
    """One block of one prediction: the run it belongs to and its regions. The block writes
    output slice ``z`` (``block.write[0] == (z, z + 1)``) and reads input slice
    ``run.first_slice + z``."""

    run: Run
    block: Block
    #: (mean, std) of the block's slice (``--normalization slice``); None: the run's.
    norm: tuple[float, float] | None = None


def plan_tasks(
    run: Run,
    shape: tuple[int, int, int],
    chunks: tuple[int, int, int],
    slice_norms: Sequence[tuple[float, float]] | None = None,
) -> tuple[int, Iterator[Task]]:
    """(how many, every task) over the output's (Z, Y, X) ``shape`` stored in ``chunks``: one slice
    and about ``config.block`` pixels of whole chunks per block (:func:`emseg.blocks.plan_blocks`),
    read over the tile plan's domain, each with its output slice's ``slice_norms`` entry. The
    tasks come from a generator."""
    c = run.config

    def read(write: Region) -> Region:
        ys, xs = tile_origins(write[1], write[2], c.tile, c.overlap, run.divisor, shape[1:])
        return write[0], (int(ys[0]), int(ys[-1]) + c.tile), (int(xs[0]), int(xs[-1]) + c.tile)

    count, blocks = plan_blocks(shape, chunks, (1, c.block, c.block), read)

    def norm(block: Block) -> tuple[float, float] | None:
        return None if slice_norms is None else tuple(slice_norms[block.write[0][0]])  # type: ignore[return-value]

    return count, (Task(run, block, norm(block)) for block in blocks)


def with_torch_threads(task: Task, threads: int) -> Task:
    """``task`` for a local cluster's worker process that may use ``threads`` CPUs."""
    return dataclasses.replace(task, run=dataclasses.replace(task.run, torch_threads=threads))


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
    from emseg.inference.engine import Engine
    from emseg.models.checkpoint import load_trained

    c = run.config
    device = process_device(c.device)
    key: tuple = (run.model, os.path.getmtime(run.model), device, c, run.normalization, run.torch_threads, run.zoom)
    with _LOCK:
        if key not in _ENGINES:
            model, meta = load_trained(run.model, device, compiled=c.torch_compile, threads=run.torch_threads)
            if run.zoom != 1.0:
                from emseg.models.rescale import Rescaled

                model = Rescaled(model, run.zoom)
            norm = meta["normalization"]
            for old in _ENGINES.values():
                old.close()
            _ENGINES.clear()
            mean, std = run.normalization or (norm["mean"], norm["std"])
            _ENGINES[key] = Engine(model, next(model.parameters()).device, mean, std, c)
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


def run_block(task: Task) -> int:
    """Predict one block, write it and mark it done; returns the pixels written."""
    run, block = task.run, task.block
    c = run.config
    engine = _engine(run)
    source = _array(str(Path(run.data) / "0"), "r", run.run_id)
    (z, _), (y0, y1), (x0, x1) = block.read
    plan = plan_block(block.write[1], block.write[2], c.tile, c.overlap, run.divisor, c.blend, source.shape[1:])
    region = read_reflected(lambda r, s: source[run.first_slice + z, r, s], source.shape[1:], y0, y1, x0, x1)
    prob, membranes = engine.run_block(region, plan, task.norm)
    where = (z, *slices(block.write[1:]))
    channels = (slice(None),) if prob.ndim == 3 else ()  # (C, h, w) class probabilities
    _array(str(Path(run.output) / "0"), "r+", run.run_id)[channels + where] = prob
    _array(str(Path(run.output) / "labels" / run.label / "0"), "r+", run.run_id)[where] = membranes
    (Path(run.done) / block.name).touch()
    return int(prob.size)


__all__ = [
    "Run",
    "Task",
    "drop_caches",
    "plan_tasks",
    "process_device",
    "run_block",
    "with_torch_threads",
    "worker_index",
]
