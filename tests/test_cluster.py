"""Blocks on a real dask.distributed cluster: a bounded submission window, retries, clear errors."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time

import pytest

from emseg.cluster import run_windowed, run_windowed_threads
from emseg.errors import BadInputError, EmsegRuntimeError


@pytest.fixture(scope="module")
def cluster():
    """Two in-process workers (threads): a real scheduler, cheap to start."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        with Client(lc) as client:
            yield lc, client


def _slow_square(x: int) -> int:
    time.sleep(0.002)
    return x * x


def _fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError("bad block")
    return x


def _bad_input(x: int) -> int:
    raise BadInputError(f"block {x}: bad data")


def test_the_window_bounds_tasks_in_flight_and_on_the_scheduler(cluster) -> None:
    lc, client = cluster
    consumed = []
    seen_tasks = []
    results = []

    def items():
        for i in range(300):
            consumed.append(i)
            yield i

    def on_result(value: int) -> None:
        results.append(value)
        seen_tasks.append(len(lc.scheduler.tasks))
        if len(results) == 1:
            consumed_at_first.append(len(consumed))

    consumed_at_first: list[int] = []
    stats = run_windowed(client, _slow_square, items(), lambda i: f"sq-{i}", on_result, per_worker=3)
    window = 3 * 2
    assert sorted(results) == [i * i for i in range(300)]
    assert stats.submitted == stats.done == 300
    assert stats.max_in_flight <= window
    assert consumed_at_first[0] <= window  # the generator is read only as the window opens
    assert max(seen_tasks) <= 2 * window  # the scheduler never holds more than a few windows


def test_the_thread_window_is_bounded_and_reads_items_lazily() -> None:
    consumed: list[int] = []
    results: list[int] = []

    def items():
        for i in range(100):
            consumed.append(i)
            yield i

    def on_result(value: int) -> None:
        results.append(value)
        assert len(consumed) - len(results) <= 3 * 2  # never more than the window ahead

    stats = run_windowed_threads(_slow_square, items(), 3, on_result, per_thread=2)
    assert sorted(results) == [i * i for i in range(100)]
    assert stats.submitted == stats.done == 100 and stats.max_in_flight <= 6


def test_the_first_thread_error_is_raised() -> None:
    with pytest.raises(ValueError, match="bad block"):
        run_windowed_threads(_fail_on_five, range(50), 2, lambda r: None)


def test_a_task_that_keeps_failing_ends_the_run_with_one_line(cluster) -> None:
    _, client = cluster
    with pytest.raises(EmsegRuntimeError, match="failed after 1 retries: ValueError: bad block"):
        run_windowed(client, _fail_on_five, range(20), lambda i: f"f-{i}", lambda r: None, retries=1)


def test_emseg_errors_from_a_task_reach_the_user_as_they_are(cluster) -> None:
    _, client = cluster
    with pytest.raises(BadInputError, match="bad data"):
        run_windowed(client, _bad_input, range(3), lambda i: f"b-{i}", lambda r: None)


class KillOne:
    """Progress that SIGKILLs one worker process once a few tasks are done (the nanny restarts it)."""

    def __init__(self, client, after: int = 8) -> None:
        self.client, self.after, self.done, self.killed = client, after, 0, None

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        pass

    def advance(self, amount: float = 1, **fields) -> None:
        import os
        import signal

        self.done += amount
        if self.killed is None and self.done >= self.after:
            self.killed = sorted(self.client.run(os.getpid).values())[0]
            os.kill(self.killed, signal.SIGKILL)

    def finish(self) -> None:
        pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A 4 x 256 x 256 store in 64² chunks, an untrained tiny model and its prediction."""
    import tifffile

    import emseg
    from emseg.config import ModelConfig
    from emseg.recipes.bench import untrained_checkpoint
    from emseg.synthetic import synthetic_stack

    d = tmp_path_factory.mktemp("killed")
    raw, _ = synthetic_stack((4, 256, 256), seed=3)
    tifffile.imwrite(d / "raw.tif", raw, photometric="minisblack")
    data = emseg.ingest(d / "raw.tif", d / "data.zarr", voxel_size=(50, 4, 4), chunks=(1, 64, 64))
    run = untrained_checkpoint(d / "run", ModelConfig(depth=2, base_channels=4))
    pred = emseg.predict(run, data, d / "pred.zarr", tile=64, overlap=16, block=64, device="cpu", precision="fp32")
    return {"dir": d, "data": data, "run": run, "pred": pred}


def _three_workers():
    from distributed import LocalCluster

    return LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None)


@pytest.mark.slow
def test_a_worker_killed_mid_prediction_changes_nothing(stack) -> None:
    """Three worker processes; one is SIGKILLed after a few blocks. dask reruns its tasks
    elsewhere and the output equals an undisturbed run's, bit for bit."""
    import numpy as np
    from distributed import Client

    import emseg
    from emseg.io.zarr import open_ome

    d = stack["dir"]
    options = dict(tile=64, overlap=16, block=64, device="cpu", dtype="float32", precision="fp32")
    with _three_workers() as lc, Client(lc) as client:
        client.run(lambda: __import__("torch").set_num_threads(1))
        calm = emseg.predict(stack["run"], stack["data"], d / "calm.zarr", scheduler=lc.scheduler_address, **options)
        killer = KillOne(client)
        hit = emseg.predict(
            stack["run"], stack["data"], d / "hit.zarr", scheduler=lc.scheduler_address, progress=killer, **options
        )
        client.run(lambda: __import__("torch").set_num_threads(1))
    assert killer.killed is not None
    a, b = open_ome(calm).array[:], open_ome(hit).array[:]
    assert a.shape == (4, 256, 256)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_worker_killed_mid_segmentation_changes_nothing(stack) -> None:
    import numpy as np
    from distributed import Client

    import emseg
    from emseg.io.zarr import open_ome

    d = stack["dir"]
    options = dict(block=64, halo=16, min_size=10)
    calm = emseg.segment(stack["pred"], d / "calm-seg.zarr", **options)  # threads: the reference
    with _three_workers() as lc, Client(lc) as client:
        killer = KillOne(client, after=6)
        hit = emseg.segment(
            stack["pred"], d / "hit-seg.zarr", scheduler=lc.scheduler_address, progress=killer, **options
        )
    assert killer.killed is not None
    a, b = open_ome(calm).array[:], open_ome(hit).array[:]
    assert a.max() > 1
    np.testing.assert_array_equal(a, b)


def test_the_slurm_example_writes_a_one_gpu_per_worker_job_script(tmp_path) -> None:
    import subprocess
    import sys

    from .conftest import REPO

    pytest.importorskip("dask_jobqueue")
    args = ["m", "d.zarr", "o.zarr", "--jobs", "2", "--partition", "gpu", "--walltime", "02:00:00"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "slurm.py"), *args, "--logs", str(tmp_path / "logs"), "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=8"):
        assert line in script, script
    assert "dask_worker" in script and "--nthreads 3" in script


# --- distributed's log goes through emseg's ---------------------------------------------------

#: A line as distributed's own handlers write it ("2026-01-01 12:00:00,000 - distributed.nanny - WARNING - ...").
RAW_DASK_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - (distributed|tornado|asyncio)", re.M)


def _sleepy(x: int) -> int:
    time.sleep(0.05)
    return x


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(240)
def test_a_lost_worker_is_one_warning_and_no_raw_dask_line(capfd) -> None:
    """A local cluster (worker processes) loses a worker mid-run: emseg's log says so once, the
    run completes, and nothing of distributed's own log reaches stderr; its loggers are as they
    were after."""
    import distributed  # noqa: F401 - configures its loggers as it is imported: what to compare with

    from emseg.cluster import DASK_LOGGERS, connect

    records = _Records()
    logger = logging.getLogger("emseg.cluster")
    logger.addHandler(records)
    before = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in DASK_LOGGERS}
    results: list[int] = []
    try:
        with connect(None, 2, 1) as (client, _):
            killed: list[int] = []

            def on_result(value: int) -> None:
                results.append(value)
                if len(results) == 10:
                    killed.append(sorted(client.run(os.getpid).values())[0])
                    os.kill(killed[0], signal.SIGKILL)

            run_windowed(client, _sleepy, range(60), lambda i: f"sleepy-{i}", on_result)
    finally:
        logger.removeHandler(records)
    assert sorted(results) == list(range(60))
    warnings = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"lost a dask worker (process {killed[0]} was killed by signal 9); its tasks run again on the others"
    ]
    assert {name: (logging.getLogger(name).handlers, logging.getLogger(name).level) for name in DASK_LOGGERS} == before
    err = capfd.readouterr().err
    assert not RAW_DASK_LINE.search(err) and "Traceback" not in err, err


@pytest.mark.timeout(300)
def test_a_run_on_a_local_cluster_prints_only_emseg_lines(tmp_path) -> None:
    """``emseg predict --workers 2``, as a user runs it: every line on stderr is emseg's (also when
    another cluster holds distributed's dashboard port, 8787, which this test holds if it can)."""
    import socket

    import tifffile

    import emseg
    from emseg.config import ModelConfig
    from emseg.recipes.bench import untrained_checkpoint
    from emseg.synthetic import synthetic_stack

    from .conftest import run_emseg

    raw, _ = synthetic_stack((4, 64, 64), seed=5)
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    emseg.ingest(tmp_path / "raw.tif", tmp_path / "data.zarr", voxel_size=(50, 4, 4), chunks=(1, 64, 64))
    untrained_checkpoint(tmp_path / "run", ModelConfig(depth=2, base_channels=4))
    args = ["predict", "run", "data.zarr", "-o", "p.zarr", "--tile", "32", "--overlap", "8", "--device", "cpu"]
    with socket.socket() as port:
        with contextlib.suppress(OSError):  # already held by another: the same for the test
            port.bind(("0.0.0.0", 8787))
            port.listen()
        proc = run_emseg(*args, "--workers", "2", cwd=tmp_path, env={"EMSEG_PROGRESS_INTERVAL": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith(("emseg: ", "wrote ")) for line in lines), proc.stderr
    assert not [line for line in lines if "warning" in line or "error" in line], proc.stderr


def test_what_distributed_recovers_from_by_itself_is_no_warning() -> None:
    """A result lost with its worker ("Couldn't gather keys", an ERROR of distributed's, logged
    before or after the worker's death under load) is computed again: debug only; other errors
    stay one warning line."""
    from emseg.cluster import dask_logs_to_emseg

    records = _Records()
    logger = logging.getLogger("emseg.cluster")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with dask_logs_to_emseg():
            logging.getLogger("distributed").error("Couldn't gather keys: sleepy-11")
            logging.getLogger("distributed").error("Failed to serialize a task")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    warnings = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    assert warnings == ["dask: Failed to serialize a task"]
    assert any("Couldn't gather keys" in r.getMessage() for r in records.records if r.levelno == logging.DEBUG)
