"""Where the block tasks of ``emseg segment`` run: threads in this process, a local
dask.distributed cluster of processes (``workers``), or an existing scheduler (``scheduler``).

The same three choices as ``emseg predict``, through the same bounded submission window
(:mod:`emseg.cluster`): a task is any picklable function of one picklable item returning the
pixels it did, and progress advances by one task at a time with the pixel rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from emseg.cluster import connect, run_windowed, run_windowed_threads
from emseg.progress import Reporter
from emseg.system import available_cpus


def run_tasks(
    fn: Callable[[Any], int],
    items: Sequence[Any],
    names: Sequence[str],
    progress: Reporter,
    *,
    threads: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> None:
    """Run ``fn(item)`` for every item (task keys ``names``); returns when all are done, raises
    the first task's error. ``threads`` (default: the CPUs this process may use) run at once
    in this process unless ``workers`` or ``scheduler`` picks a dask.distributed cluster."""
    if not items:
        return
    t0, pixels = time.perf_counter(), 0

    def tick(npix: int) -> None:
        nonlocal pixels
        pixels += npix
        progress.advance(1, mpix_per_s=pixels / 1e6 / max(time.perf_counter() - t0, 1e-9))

    if workers is None and scheduler is None:
        run_windowed_threads(fn, items, threads or available_cpus(), tick)
        return
    key_of = {id(item): name for item, name in zip(items, names, strict=True)}
    with connect(scheduler, workers, threads or 1) as (client, _):
        run_windowed(client, fn, items, lambda item: key_of[id(item)], tick)


__all__ = ["run_tasks"]
