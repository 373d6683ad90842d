"""Where the blocks of ``emseg predict`` run: dask's threads in this process, a local
dask.distributed cluster of processes (``workers``), or an existing scheduler (``scheduler``).

Each block is one task named ``emseg-block-Z-Y-X``; progress advances by one block per finished
task, with the pixel rate. A local cluster shares the CPUs this process may use
(:func:`emseg.system.available_cpus`: affinity mask and cgroup quota, as under SLURM) among its
workers, so it never runs more threads than it was given.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from emseg.config import PredictConfig
from emseg.errors import BadInputError
from emseg.inference.blocks import Block, drop_caches, run_block
from emseg.progress import Reporter
from emseg.system import available_cpus


def execute(blocks: list[Block], config: PredictConfig, progress: Reporter) -> None:
    """Run every block (``config.threads`` at once per process); returns when all are written,
    raises the first block's error."""
    if not blocks:
        return
    t0, pixels = time.perf_counter(), 0

    def tick(npix: int) -> None:
        nonlocal pixels
        pixels += npix
        progress.advance(1, mpix_per_s=pixels / 1e6 / max(time.perf_counter() - t0, 1e-9))

    if config.workers is None and config.scheduler is None:
        _run_threads(blocks, config.threads, tick)
    else:
        _run_distributed(blocks, config, tick)


def _key(block: Block) -> str:
    return f"emseg-block-{block.name}"


def _run_threads(blocks: list[Block], threads: int, tick: Any) -> None:
    """dask's threaded scheduler in this process; the engine is shared by the threads."""
    import dask
    from dask.callbacks import Callback

    tasks = [dask.delayed(run_block, pure=False)(b, dask_key_name=_key(b)) for b in blocks]

    class Ticker(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(result, tuple) and len(result) == 2:
                tick(result[1])

    try:
        with Ticker():
            dask.compute(*tasks, scheduler="threads", num_workers=threads)
    finally:
        drop_caches()


def _run_distributed(blocks: list[Block], config: PredictConfig, tick: Any) -> None:
    """A dask.distributed cluster: the one at ``config.scheduler``, or ``config.workers`` local
    processes sharing this process's CPUs."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if config.scheduler is not None:
        try:
            client = Client(config.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise BadInputError(f"--scheduler {config.scheduler}: cannot connect ({exc})") from None
    else:
        cpus_per_worker = max(1, available_cpus() // max(1, config.workers or 1))
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=min(config.threads, cpus_per_worker),
            processes=True,
            dashboard_address=None,
        )
        client = Client(cluster)
        run = dataclasses.replace(blocks[0].run, torch_threads=cpus_per_worker)
        blocks = [dataclasses.replace(b, run=run) for b in blocks]
    try:
        futures = client.map(run_block, blocks, key=[_key(b) for b in blocks], pure=False)
        for future in as_completed(futures):
            tick(future.result()[1])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


__all__ = ["execute"]
