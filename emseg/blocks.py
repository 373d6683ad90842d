"""Blocks: how the blockwise commands (predict, segment) cut a (Z, Y, X) stack, and where the
pieces run.

A :class:`Block` (daisy's shape) writes its *write region* and reads its *read region*, both
``(start, stop)`` per axis (z, y, x) in the output's coordinates. :func:`plan_blocks` tiles the
shape exactly with write regions of whole chunks, so no two blocks write the same chunk; the
command says how a write region grows into its read region: segment's is grown by a halo and
clipped to the shape (:func:`grow`), predict's is its tile plan's domain, which may reach past
the true edges (read as the mirror image there). :func:`run_blocks` runs a picklable function
over blocks, or over tasks that carry them, on threads in this process, a local
dask.distributed cluster or an existing scheduler, through :mod:`emseg.cluster`'s bounded window.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from emseg.cluster import connect, run_windowed, run_windowed_threads
from emseg.progress import Reporter
from emseg.system import available_cpus

#: ``(start, stop)`` per axis (z, y, x).
Region = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Block:
    """One block: the region it writes and the region it reads (which contains it)."""

    write: Region
    read: Region

    @property
    def name(self) -> str:
        """``Z-Y-X``: the write region's start (done-markers and task keys)."""
        return "-".join(str(a) for a, _ in self.write)

    def inner(self) -> tuple[slice, ...]:
        """The write region as slices of an array holding the read region."""
        return tuple(slice(w0 - r0, w1 - r0) for (w0, w1), (r0, _) in zip(self.write, self.read, strict=True))


def slices(region: Region) -> tuple[slice, ...]:
    """A region as the slices that index it."""
    return tuple(slice(a, b) for a, b in region)


def axis_blocks(length: int, chunk: int, target: int) -> list[tuple[int, int]]:
    """Split [0, length) into blocks of whole chunks close to ``target`` pixels (at least one
    chunk); an axis at most 1.5 times the target is one block, so no block is a thin leftover
    that costs a whole block's halo and overhead for a sliver of output."""
    if length <= 1.5 * target:
        return [(0, length)]
    step = max(1, round(target / chunk)) * chunk
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def grow(write: Region, halo: Iterable[int], shape: Iterable[int]) -> Region:
    """``write`` grown by ``halo`` (z, y, x) on every side, clipped to ``shape``."""
    return tuple((max(0, a - h), min(s, b + h)) for (a, b), h, s in zip(write, halo, shape, strict=True))


def plan_blocks(
    shape: tuple[int, ...], chunks: tuple[int, ...], target: tuple[int, ...], read: Callable[[Region], Region]
) -> tuple[int, Iterator[Block]]:
    """(how many, every block) over ``shape``: write regions of whole ``chunks`` about ``target``
    pixels per axis (:func:`axis_blocks`), in z, y, x order; ``read(write)`` is each block's read
    region. The blocks come from a generator, so millions of them are never all in memory."""
    axes = [axis_blocks(s, c, t) for s, c, t in zip(shape, chunks, target, strict=True)]
    return math.prod(len(a) for a in axes), (Block(w, read(w)) for w in itertools.product(*axes))


def run_blocks(  # noqa: PLR0913 - where to run (threads, workers, scheduler) and its hooks are independent keywords
    fn: Callable[[Any], int],
    items: Iterable[Any],
    *,
    threads: int | None,
    workers: int | None,
    scheduler: str | None,
    progress: Reporter,
    key: Callable[[Any], str],
    for_worker: Callable[[Any, int], Any] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> None:
    """Run ``fn(item)`` (picklable, returning the pixels it wrote) for every item; returns when
    all are done, raises the first error. ``items`` may be a generator: a few per thread or
    worker are in flight at once, whatever their number; progress advances one item at a time
    with the pixel rate.

    Where: ``threads`` at once in this process (None: the CPUs it may use), or a dask.distributed
    cluster (task keys ``key(item)``): the one at ``scheduler``, or ``workers`` local processes of
    ``threads`` each (None: one) sharing this process's CPUs; there every item becomes
    ``for_worker(item, cpus_per_worker)``. ``cleanup()`` runs in this process when the run ends."""
    pending = iter(items)
    first = next(pending, _END)
    if first is _END:
        return
    pending = itertools.chain([first], pending)
    t0, pixels = time.perf_counter(), 0

    def tick(npix: int) -> None:
        nonlocal pixels
        pixels += npix
        progress.advance(1, mpix_per_s=pixels / 1e6 / max(time.perf_counter() - t0, 1e-9))

    try:
        if workers is None and scheduler is None:
            run_windowed_threads(fn, pending, threads or available_cpus(), tick)
            return
        with connect(scheduler, workers, threads or 1) as (client, cpus_per_worker):
            if for_worker is not None and cpus_per_worker is not None:
                pending = (for_worker(item, cpus_per_worker) for item in pending)
            run_windowed(client, fn, pending, key, tick)
    finally:
        if cleanup is not None:
            cleanup()


_END = object()

__all__ = ["Block", "Region", "axis_blocks", "grow", "plan_blocks", "run_blocks", "slices"]
