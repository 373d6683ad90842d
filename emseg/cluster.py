"""dask.distributed for blockwise commands (predict, segment): connect to a cluster or start a
local one, and run any number of block tasks through a bounded submission window.

Submitting every block at once (``client.map``) makes the scheduler hold one task per block: 15
million for a petavoxel stack. :func:`run_windowed` keeps at most ``per_worker`` tasks in flight
per connected worker (recounted as workers join and leave) and submits the next block as each
finishes, so the client's and the scheduler's memory stay flat whatever the number of blocks.
Faults are dask's: a task whose worker dies is recomputed elsewhere (up to the scheduler's
``allowed-failures``), a task that raises is retried ``retries`` times, and a task that still
fails ends the run with its error after the tasks in flight are cancelled.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from emseg.errors import BadInputError, EmsegError, EmsegRuntimeError
from emseg.system import available_cpus

log = logging.getLogger(__name__)

#: Tasks in flight per worker: enough to hide a task's start-up and data transfer, few enough
#: that the scheduler holds a handful of tasks per worker.
PER_WORKER = 4
#: Retries of a task that raised (a transient read error, a pre-empted node's last gasp).
RETRIES = 2
#: Seconds between recounts of the workers (each recount asks the scheduler).
RECOUNT_S = 2.0


@dataclass
class WindowStats:
    """What :func:`run_windowed` did: tasks submitted and done, the most in flight at once."""

    submitted: int = 0
    done: int = 0
    max_in_flight: int = 0
    max_window: int = 0


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int | None, threads: int) -> Iterator[tuple[Any, int | None]]:
    """A dask.distributed client: to the scheduler at ``scheduler``, else to a new local cluster
    of ``workers`` processes sharing the CPUs this process may use. Yields (client, CPUs per
    local worker, None for an external cluster); closes what it opened."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise BadInputError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        try:
            yield client, None
        finally:
            client.close()
        return
    n = max(1, workers or 1)
    cpus_per_worker = max(1, available_cpus() // n)
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=max(1, min(threads, cpus_per_worker)),
        processes=True,
        dashboard_address=None,
    )
    client = Client(cluster)
    try:
        yield client, cpus_per_worker
    finally:
        client.close()
        cluster.close()


def worker_count(client: Any) -> int:
    """Workers connected to the client's scheduler now (at least 1, so a run waits for one)."""
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


def run_windowed(
    client: Any,
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    key: Callable[[Any], str],
    on_result: Callable[[Any], None],
    *,
    per_worker: int = PER_WORKER,
    retries: int = RETRIES,
) -> WindowStats:
    """Run ``fn(item)`` for every item on the cluster, at most ``per_worker`` x workers at once.

    ``items`` may be a generator (it is consumed as the window opens); ``key(item)`` names each
    task; ``on_result`` gets each result in completion order. Returns the :class:`WindowStats`.
    """
    from distributed import as_completed

    if per_worker < 1:
        raise BadInputError(f"tasks per worker {per_worker}: must be at least 1")
    stats = WindowStats()
    pending = iter(items)
    # Results travel to the client in the event loop as tasks finish (with_results), and finished
    # tasks are handled in batches: no round trip per task from this thread.
    running = as_completed(loop=client.loop, with_results=True, raise_errors=False)
    in_flight: set[Any] = set()
    window, counted_at = per_worker * worker_count(client), time.monotonic()

    def fill() -> None:
        free = window - len(in_flight)
        batch = list(itertools.islice(pending, max(0, free)))
        if not batch:
            return
        futures = client.map(fn, batch, key=[key(item) for item in batch], pure=False, retries=retries)
        in_flight.update(futures)
        running.update(futures)
        stats.submitted += len(futures)
        stats.max_in_flight = max(stats.max_in_flight, len(in_flight))

    try:
        stats.max_window = window
        fill()
        for finished in running.batches():
            for future, result in finished:
                in_flight.discard(future)
                if future.status != "finished":
                    _raise_task_error(future, retries)
                on_result(result)
                future.release()
                stats.done += 1
            if time.monotonic() - counted_at > RECOUNT_S:
                window, counted_at = per_worker * worker_count(client), time.monotonic()
                stats.max_window = max(stats.max_window, window)
            fill()
    finally:
        if in_flight:
            client.cancel(list(in_flight))
    return stats


def run_windowed_threads(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    threads: int,
    on_result: Callable[[Any], None],
    *,
    per_thread: int = 2,
) -> WindowStats:
    """:func:`run_windowed` on a thread pool in this process: ``fn(item)`` for every item, at most
    ``per_thread`` x ``threads`` submitted at once; the first error cancels what has not started
    and is raised."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    stats = WindowStats(max_window=per_thread * threads)
    pending = iter(items)
    in_flight: set[Future[Any]] = set()
    with ThreadPoolExecutor(threads, thread_name_prefix="emseg-block") as pool:
        try:
            while True:
                while len(in_flight) < stats.max_window:
                    item = next(pending, _END)
                    if item is _END:
                        break
                    in_flight.add(pool.submit(fn, item))
                    stats.submitted += 1
                    stats.max_in_flight = max(stats.max_in_flight, len(in_flight))
                if not in_flight:
                    return stats
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_result(future.result())
                    stats.done += 1
        finally:
            for future in in_flight:
                future.cancel()


def _raise_task_error(future: Any, retries: int) -> None:
    """Re-raise a failed task's error: emseg's own as they are (one line for the user), anything
    else as a runtime failure naming the task."""
    exc = future.exception()
    if isinstance(exc, EmsegError):
        raise exc
    if exc is None:  # cancelled, e.g. the cluster went away
        raise EmsegRuntimeError(f"task {future.key} was {future.status} (the cluster shut down?); rerun with --resume")
    raise EmsegRuntimeError(
        f"task {future.key} failed after {retries} retries: {type(exc).__name__}: {exc}; rerun with --resume "
        "once the cause is fixed"
    ) from exc


_END = object()

__all__ = ["PER_WORKER", "RETRIES", "WindowStats", "connect", "run_windowed", "run_windowed_threads", "worker_count"]
