"""dask.distributed for blockwise commands (predict, segment): connect to a cluster or start a
local one, and run any number of block tasks through a bounded submission window.

Submitting every block at once (``client.map``) makes the scheduler hold one task per block: 15
million for a petavoxel stack. :func:`run_windowed` keeps at most ``per_worker`` tasks in flight
per connected worker (recounted as workers join and leave) and submits the next block as each
finishes, so the client's and the scheduler's memory stay flat whatever the number of blocks.
Faults are dask's: a task whose worker dies is recomputed elsewhere (up to the scheduler's
``allowed-failures``), a task that raises is retried ``retries`` times, and a task that still
fails ends the run with its error after the tasks in flight are cancelled.

distributed's log lines and the multiprocessing resource tracker's warnings never reach the user's
terminal as they are (:func:`dask_logs_to_emseg`): a lost worker is one warning of emseg's, the rest
is emseg's debug log, and the worker processes of a local cluster leave Ctrl-C to this process
(which shuts them down) and log only what is critical, as one line (:func:`dask_setup`, their
preload).

A scheduler address from the user is checked where it enters (:func:`check_scheduler_address`):
its form as distributed parses it, then one TCP connect with a short timeout, so that a typo is
one line in a second rather than a traceback or a 20 s wait. A local cluster is the workers that
started: one that dies while starting costs a warning, not the run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import signal
import socket
import sys
import threading
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
#: Schemes a remote scheduler listens on, of those distributed knows (ucx only where installed).
REMOTE_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
#: Seconds a scheduler's host may take to resolve and to accept a TCP connection.
CONNECT_TIMEOUT_S = 5.0
#: Longer than any scheduler address (a host name has at most 253 characters).
_MAX_ADDRESS = 300
_EXPECTED = "expected tcp://HOST:PORT"


@dataclass
class WindowStats:
    """What :func:`run_windowed` did: tasks submitted and done, the most in flight at once."""

    submitted: int = 0
    done: int = 0
    max_in_flight: int = 0
    max_window: int = 0


def check_scheduler_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """The scheduler address ``address`` normalised (``SCHEME://HOST:PORT``; a bare ``HOST:PORT``
    gets distributed's default scheme, tcp) once it has a scheme a remote scheduler listens on
    (:data:`REMOTE_SCHEMES`, where distributed has the backend), a host, a port in 1..65535, and
    the host accepts a TCP connection on that port within ``timeout`` seconds (for tls, ws and
    wss too: the TCP connect is the check). An ``inproc://`` address passes only where it names a
    listener in this very process (a ``LocalCluster(processes=False)`` of the caller's). Raises
    :class:`BadInputError`, one line naming the address and what is wrong, otherwise. Starts no
    event loop: one name lookup and one connect."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, unparse_host_port

    if not isinstance(address, str):
        raise BadInputError(f"--scheduler {address!r}: not a scheduler address ({_EXPECTED})")
    said = f"--scheduler {_shown(address)}"
    text = address.strip()
    if not text:
        raise BadInputError(f"{said}: empty ({_EXPECTED})")
    if len(text) > _MAX_ADDRESS:
        raise BadInputError(f"{said}: {len(text)} characters, longer than any scheduler address ({_EXPECTED})")
    if ":" not in text:
        raise BadInputError(f"{said}: not a scheduler address ({_EXPECTED})")
    scheme, loc = parse_address(text)
    if scheme == "inproc":
        return _check_inproc(said, text, loc)
    if scheme not in REMOTE_SCHEMES:
        known = ", ".join(s for s in REMOTE_SCHEMES if s in registry.backends)
        raise BadInputError(f"{said}: scheme {_shown(scheme)} is not one a scheduler listens on ({known}; {_EXPECTED})")
    try:
        registry.get_backend(scheme)
    except ValueError:
        raise BadInputError(
            f"{said}: scheme {scheme} is not installed here (distributed has no {scheme} backend)"
        ) from None
    host, port = _host_port(said, scheme, loc)
    failure = _tcp_reach(host, port, timeout)
    if failure is not None:
        raise BadInputError(f"{said}: {failure}")
    return f"{scheme}://{unparse_host_port(host, port)}"


#: Memory one local worker process needs at the least (Python, torch, a model, a few blocks).
WORKER_BYTES = 2**29


def check_local_workers(workers: int) -> int:
    """Refuse a local cluster of more worker processes than this machine can hold: each needs
    about :data:`WORKER_BYTES` (half a GiB) of the memory available now, and at most
    ``Limits.max_local_workers`` (EMSEG_MAX_LOCAL_WORKERS raises it) start on one machine.
    Returns ``workers``."""
    import psutil

    from emseg.config import Limits

    limit = Limits.from_env().max_local_workers
    fits = max(1, int(psutil.virtual_memory().available // WORKER_BYTES))
    if workers > limit:
        raise BadInputError(
            f"--workers {workers}: more than the {limit} local worker processes emseg starts on one machine "
            "(raise it with EMSEG_MAX_LOCAL_WORKERS; for more, start a cluster and give --scheduler)"
        )
    if workers > fits:
        raise BadInputError(
            f"--workers {workers}: this machine has memory for about {fits} worker processes "
            f"({WORKER_BYTES / 2**30:.1f} GiB each); give fewer, or --scheduler for a cluster"
        )
    return workers


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int | None, threads: int) -> Iterator[tuple[Any, int | None]]:
    """A dask.distributed client: to the scheduler at ``scheduler`` (checked first by
    :func:`check_scheduler_address`), else to a new local cluster of ``workers`` processes sharing
    the CPUs this process may use. Yields (client, CPUs per local worker, None for an external
    cluster); closes what it opened. A local worker that fails to start is left out with a
    warning; :class:`EmsegRuntimeError` when none starts."""
    from distributed import Client

    if scheduler is not None:
        address = check_scheduler_address(scheduler)
        with dask_logs_to_emseg() as logs:
            try:
                client = Client(address, timeout="20s")
            except (OSError, TimeoutError, ValueError, TypeError) as exc:  # TypeError: tls:// without TLS settings
                message = " ".join(str(exc).split())
                raise BadInputError(f"--scheduler {_shown(scheduler)}: cannot connect ({message})") from None
            try:
                yield client, None
            finally:
                logs.closing = True
                client.close()
        return
    n = max(1, workers or 1)
    cpus_per_worker = max(1, available_cpus() // n)
    with dask_logs_to_emseg() as logs:
        cluster = _local_cluster(n, max(1, min(threads, cpus_per_worker)))
        try:
            client = Client(cluster)
        except BaseException:
            logs.closing = True
            cluster.close()
            raise
        try:
            yield client, cpus_per_worker
        finally:
            logs.closing = True  # what dask says while it shuts down (a worker killed after a timeout) is no news
            client.close()
            cluster.close()


# --- distributed's log and the worker processes ---------------------------------------------

#: Loggers whose records dask.distributed's run prints (distributed gives them their own stderr
#: handlers; asyncio's and tornado's report errors of its event loop).
DASK_LOGGERS = ("distributed", "tornado", "tornado.application", "asyncio")
#: distributed's line when a worker process dies (its nanny's, in this process for a local cluster).
_WORKER_DIED = re.compile(r"Worker process (\d+) (was killed by .*|exited with status .*)")
#: distributed's errors that it recovers from by itself: a result lost with its worker is computed
#: again (said at ERROR level, before or after the nanny's line of the death; a lasting failure
#: reaches emseg as the task's exception).
_RECOVERED = re.compile(r"Couldn't gather keys")


class _DaskLog(logging.Handler):
    """Receives distributed's records in place of its own stderr handlers and says them through
    emseg's log: a worker that died is one warning, an error one warning line (while the run
    goes on) unless distributed recovers from it itself, everything else debug."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.closing = False
        self.lost = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped, as logging does
            return
        died = _WORKER_DIED.match(text)
        if died and not self.closing:
            self.lost += 1
            log.warning("lost a dask worker (process %s %s); its tasks run again on the others", *died.groups())
        elif record.levelno >= logging.ERROR and not self.closing and not _RECOVERED.match(text):
            log.warning("dask: %s", text if len(text) <= 300 else text[:297] + "...")
        else:
            log.debug("dask: %s: %s", record.name, text)


@contextlib.contextmanager
def dask_logs_to_emseg() -> Iterator[_DaskLog]:
    """For the block, distributed's log goes through emseg's (:class:`_DaskLog`; set
    ``.closing`` once shutting down begins) instead of straight to stderr, and the resource
    tracker that multiprocessing starts for the worker processes keeps its "leaked semaphore"
    warnings to itself (a worker killed while it held one leaks nothing the tracker does not
    clean up). Every logger is as it was after."""
    handler = _DaskLog()
    loggers = [logging.getLogger(name) for name in DASK_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)  # a worker's death is an INFO record of its nanny
    _quiet_resource_tracker()
    try:
        yield handler
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


#: The warnings filter the resource tracker runs with (``-W``, a message prefix without colons).
_TRACKER_FILTER = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, unless it runs, with its leaked-resource warnings
    ignored: it prints them on stderr at exit when a worker process was killed (after Ctrl-C, or by
    the out-of-memory killer), and nobody can act on them. The tracker takes the interpreter's
    ``-W`` options as it starts; those of this process stay as they were."""
    from multiprocessing import resource_tracker

    added = _TRACKER_FILTER not in sys.warnoptions
    if added:
        sys.warnoptions.append(_TRACKER_FILTER)
    try:
        resource_tracker.ensure_running()
    except OSError as exc:  # no tracker: multiprocessing starts its own when it needs one
        log.debug("resource tracker not started: %s", exc)
    finally:
        if added:
            sys.warnoptions.remove(_TRACKER_FILTER)


#: The preload of a local cluster's worker processes (distributed imports it and calls dask_setup).
WORKER_PRELOAD = __name__


def dask_setup(worker: Any) -> None:
    """Run in each worker process of a local cluster as it starts (its preload): Ctrl-C is left to
    the process that started the cluster (the terminal sends it to every process; the workers
    are shut down by their nanny, not interrupted mid-task with a traceback each), and
    distributed's log there says only what is critical, one line each, in emseg's form: a task's
    error reaches the user through this process (:func:`run_windowed`), and what a worker logs
    as an error is its side of a shutdown or of a lost connection (a missed heartbeat)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave the signal as it is
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine("emseg: dask worker: %(levelname)s: %(message)s"))
    handler.setLevel(logging.CRITICAL)
    for name in DASK_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.propagate = False


class _OneLine(logging.Formatter):
    """A record as one line: no traceback, whitespace folded, the level in lower case."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.levelname = record.levelname.lower()
        return " ".join(self.formatMessage(record).split())


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


def _local_cluster(n: int, threads_per_worker: int) -> Any:
    """A LocalCluster of worker processes: those of the ``n`` that started. Logs a warning when
    some failed; raises :class:`EmsegRuntimeError` (and closes the cluster) when none started.

    ``LocalCluster(n_workers=n)`` fails as a whole when one nanny fails, and ``scale(n)`` starts
    the workers in a loop callback whose failure tornado logs with a traceback and nobody can
    await. So the cluster starts with no workers, gets ``n`` worker specs (``new_worker_spec``,
    as ``scale`` does) and starts them the way ``LocalCluster.__init__`` does
    (``_correct_state``, which waits for every worker before raising the first failure), with
    distributed's start-up error logs quieted: the warning names what went wrong instead."""
    import dask
    from distributed import LocalCluster

    preload = [*dask.config.get("distributed.worker.preload", default=[]), WORKER_PRELOAD]
    cluster = LocalCluster(
        n_workers=0,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=None,
        # no dashboard, but distributed's HTTP server (health, metrics) still listens: on a free port
        # of this host, not on 8787 with a warning when another cluster holds it
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        preload=preload,
    )
    try:
        with _quieter(("distributed", "tornado.application"), logging.CRITICAL):
            started, failure = cluster.sync(_start_workers, cluster, n)
        if failure is not None:
            log.debug("dask worker start-up failure", exc_info=failure)
        if started == 0:
            raise EmsegRuntimeError(f"none of {n} dask workers started ({_root_cause(failure)})")
        if started < n:
            log.warning(
                "started %d of %d dask workers (%d failed to start: %s)", started, n, n - started, _root_cause(failure)
            )
    except BaseException:
        cluster.close()
        raise
    return cluster


async def _start_workers(cluster: Any, n: int) -> tuple[int, BaseException | None]:
    """Start ``n`` workers in ``cluster`` (in its event loop); forget those that failed. Returns
    (workers running, the first failure or None)."""
    from distributed.core import Status

    names = []
    for _ in range(n):
        spec = cluster.new_worker_spec()
        cluster.worker_spec.update(spec)
        names.extend(spec)
    failure: BaseException | None = None
    try:
        await cluster._correct_state()
    except Exception as exc:  # noqa: BLE001 - not swallowed: reported, or re-raised below when no worker failed
        failure = exc
    running = [name for name in names if name in cluster.workers and cluster.workers[name].status == Status.running]
    for name in set(names) - set(running):  # closed by their failed start; the cluster is the rest
        cluster.worker_spec.pop(name, None)
        cluster.workers.pop(name, None)
    if failure is not None and len(running) == n:
        raise failure  # not a worker's start-up: a bug, keep its traceback
    return len(running), failure


@contextlib.contextmanager
def _quieter(names: tuple[str, ...], level: int) -> Iterator[None]:
    """Raise the named loggers to at least ``level`` for the block; restore them after."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def _root_cause(exc: BaseException | None) -> str:
    """The innermost cause of ``exc`` as one line ("RuntimeError: Nanny failed to start worker
    process")."""
    if exc is None:
        return "no error reported"
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_inproc(said: str, address: str, loc: str) -> str:
    """``address`` when it is a live in-process listener's (distributed's inproc registry)."""
    from distributed.comm.inproc import global_manager

    try:
        live = global_manager.get_listener_for(loc) is not None
    except ValueError:  # another process's or host's address
        live = False
    if not live:
        raise BadInputError(
            f"{said}: no scheduler in this process listens there (an inproc address works only in the "
            f"process that started the cluster; {_EXPECTED})"
        )
    return address


def _shown(text: str) -> str:
    """``text`` as it can stand in a one-line message: quoted and escaped where it is empty or
    holds spaces or control characters, cut where it is long."""
    if text and text.isprintable() and " " not in text and len(text) <= 80:
        return text
    return repr(text[:80]) + ("..." if len(text) > 80 else "")


def _host_port(said: str, scheme: str, loc: str) -> tuple[str, int]:
    """(host, port) of an address's location ``loc`` ("HOST:PORT", "[IPv6]:PORT"), parsed as
    distributed parses it, or a :class:`BadInputError` saying which part is wrong."""
    from distributed.comm.addressing import parse_host_port

    expected = f"expected {scheme}://HOST:PORT"
    tail = loc.rpartition("]")[2] if loc.startswith("[") else loc
    if ":" not in tail:
        raise BadInputError(f"{said}: no port ({expected})")
    port_text = tail.rpartition(":")[2]
    if not (port_text.isascii() and port_text.isdigit()):
        raise BadInputError(f"{said}: port {_shown(port_text)} is not a number ({expected})")
    try:
        host, port = parse_host_port(loc)
    except ValueError:
        raise BadInputError(f"{said}: not a scheduler address ({expected}; an IPv6 host in brackets: [::1])") from None
    if not host:
        raise BadInputError(f"{said}: no host ({expected})")
    if not 1 <= port <= 65535:
        raise BadInputError(f"{said}: port {port} is not in 1..65535")
    return host, port


def _tcp_reach(host: str, port: int, timeout: float) -> str | None:
    """None when ``host`` resolves and accepts a TCP connection on ``port`` within ``timeout``
    seconds in all, else what went wrong (one line)."""
    deadline = time.monotonic() + timeout
    try:
        infos = _resolve(host, port, timeout)
    except socket.gaierror as exc:
        return f"cannot resolve host {_shown(host)} ({exc.strerror})"
    except TimeoutError:
        return f"cannot resolve host {_shown(host)} within {timeout:g} s"
    except (UnicodeError, ValueError, OSError) as exc:
        return f"{_shown(host)} is not a host name ({' '.join(str(exc).split())})"
    error: OSError = TimeoutError()
    for family, kind, proto, _, sockaddr in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(sockaddr)
            return None
        except OSError as exc:
            error = exc
    if isinstance(error, ConnectionRefusedError):
        return "nothing listens there (connection refused)"
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s (a wrong host, or a firewall?)"
    return f"cannot connect ({error.strerror or error})"


def _resolve(host: str, port: int, timeout: float) -> list[Any]:
    """``socket.getaddrinfo`` for a TCP connection, given up after ``timeout`` seconds (a
    resolver that does not answer blocks for much longer; the lookup thread is left to end)."""
    box: list[Any] = []

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:  # noqa: BLE001 - not swallowed: re-raised in the caller's thread
            box.append(exc)

    thread = threading.Thread(target=lookup, name="emseg-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        raise TimeoutError
    if isinstance(box[0], Exception):
        raise box[0]
    return list(box[0])


_END = object()

__all__ = [
    "CONNECT_TIMEOUT_S",
    "PER_WORKER",
    "REMOTE_SCHEMES",
    "RETRIES",
    "WindowStats",
    "check_scheduler_address",
    "connect",
    "dask_logs_to_emseg",
    "dask_setup",
    "run_windowed",
    "run_windowed_threads",
    "worker_count",
]
