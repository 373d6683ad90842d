"""Where the blocks of ``emseg predict`` run: threads in this process, a local
dask.distributed cluster of processes (``workers``), or an existing scheduler (``scheduler``).

Each block is one task named ``emseg-block-Z-Y-X``; progress advances by one block per finished
task, with the pixel rate. A local cluster shares the CPUs this process may use
(:func:`emseg.system.available_cpus`: affinity mask and cgroup quota, as under SLURM) among its
workers, so it never runs more threads than it was given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from emseg.cluster import connect, run_windowed, run_windowed_threads
from emseg.config import PredictConfig
from emseg.inference.blocks import Block, drop_caches, run_block
from emseg.progress import Reporter


def execute(blocks: Iterable[Block], config: PredictConfig, progress: Reporter) -> None:
    """Run every block (``config.threads`` at once per process); returns when all are written,
    raises the first block's error. ``blocks`` may be a generator: at most a few blocks per
    thread or worker are in flight, whatever their number."""
    t0, pixels = time.perf_counter(), 0

    def tick(result: tuple[str, int]) -> None:
        nonlocal pixels
        pixels += result[1]
        progress.advance(1, mpix_per_s=pixels / 1e6 / max(time.perf_counter() - t0, 1e-9))

    if config.workers is None and config.scheduler is None:
        try:
            run_windowed_threads(run_block, blocks, config.threads, tick)
        finally:
            drop_caches()
    else:
        _run_distributed(blocks, config, tick)


def _key(block: Block) -> str:
    return f"emseg-block-{block.name}"


def _run_distributed(blocks: Iterable[Block], config: PredictConfig, tick: Any) -> None:
    """A dask.distributed cluster: the one at ``config.scheduler``, or ``config.workers`` local
    processes sharing this process's CPUs; blocks go through a bounded window
    (:func:`emseg.cluster.run_windowed`), so the scheduler holds a few tasks per worker."""
    with connect(config.scheduler, config.workers, config.threads) as (client, cpus_per_worker):
        if cpus_per_worker is not None:
            n = cpus_per_worker
            blocks = (dataclasses.replace(b, run=dataclasses.replace(b.run, torch_threads=n)) for b in blocks)
        run_windowed(client, run_block, blocks, _key, tick)


__all__ = ["execute"]
