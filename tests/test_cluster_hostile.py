"""Hostile input around dask.distributed: scheduler addresses that are not one, and local worker
processes that die while the cluster starts. Real sockets, real schedulers, real processes."""

from __future__ import annotations

import logging
import socket

import pytest

from emseg.cluster import check_scheduler_address, connect
from emseg.errors import BadInputError, EmsegRuntimeError


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A local TCP port nothing listens on: bound, then closed (connecting is refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BAD_ADDRESSES = [
    ("garbage", "not a scheduler address"),
    ("file:///etc/passwd", "scheme file is not one a scheduler listens on"),
    ("http://localhost:8786", "scheme http is not one a scheduler listens on"),
    ("inproc://192.0.2.1/1/1", "no scheduler in this process listens there"),
    ("tcp://localhost", "no port"),
    ("tcp://localhost:0", "port 0 is not in 1..65535"),
    ("tcp://localhost:70000", "port 70000 is not in 1..65535"),
    ("tcp://localhost:87a6", "port 87a6 is not a number"),
    ("tcp://localhost:+8786", "port +8786 is not a number"),
    ("tcp://::1:8786", "IPv6 host in brackets"),
    ("", "empty"),
    ("   ", "empty"),
    ("tcp://:8786", "no host"),
    ("tcp://no such host:8786", "cannot resolve host"),
    ("tcp://localhost:87\n86", "port '87\\n86' is not a number"),
    ("tcp://" + "a" * 400 + ":8786", "longer than any scheduler address"),
    ("tcp://127.0.0.1:{closed}", "nothing listens there (connection refused)"),
    ("127.0.0.1:{closed}", "nothing listens there (connection refused)"),
]


@pytest.mark.parametrize(("address", "wrong"), BAD_ADDRESSES)
def test_a_bad_scheduler_address_is_one_line_naming_it(address: str, wrong: str, closed_port: int) -> None:
    address = address.replace("{closed}", str(closed_port))
    with pytest.raises(BadInputError) as caught:
        check_scheduler_address(address, timeout=5.0)
    message = str(caught.value)
    assert "\n" not in message and message.isprintable(), message
    assert message.startswith("--scheduler ") and (address[:40] in message or repr(address)[:40] in message), message
    assert wrong in message, message


def test_connect_refuses_a_bad_address_before_connecting(closed_port: int) -> None:
    for address in ("tcp://localhost", f"tcp://127.0.0.1:{closed_port}"):
        with pytest.raises(BadInputError, match="^--scheduler "), connect(address, None, 1):
            pytest.fail("connected to a bad address")


def test_a_listening_scheduler_passes_and_its_address_is_normalised() -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None) as lc:
        address = lc.scheduler_address
        port = address.rpartition(":")[2]
        assert check_scheduler_address(address) == address
        assert check_scheduler_address(f"  127.0.0.1:{port}\n") == f"tcp://127.0.0.1:{port}"
        with connect(f"localhost:{port}", None, 1) as (client, cpus):
            assert cpus is None
            assert client.submit(lambda: 1).result() == 1
        # reachable, but not a TLS scheduler and no TLS settings here: one line, not distributed's TypeError
        with pytest.raises(BadInputError, match="cannot connect"), connect(f"tls://127.0.0.1:{port}", None, 1):
            pytest.fail("connected over TLS to a plain TCP scheduler")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        # a Python caller's in-process cluster: its inproc address is live in this process
        assert lc.scheduler_address.startswith("inproc://")
        assert check_scheduler_address(lc.scheduler_address) == lc.scheduler_address


_PRELOAD = """
import os

if "EMSEG_TEST_PRELOAD_SLOT" not in os.environ:  # distributed imports a preload twice per worker
    for slot in range(64):
        try:
            os.close(os.open(os.path.join({slots!r}, str(slot)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            continue
    os.environ["EMSEG_TEST_PRELOAD_SLOT"] = str(slot)
    if {everyone!r} or slot == 0:
        os._exit(1)  # dies at start-up, as a worker killed by the OOM killer or a crashing import
"""


def _preload(tmp_path, everyone: bool) -> str:
    """A worker preload module that kills the first worker process to start (or every one)."""
    slots = tmp_path / "slots"
    slots.mkdir(parents=True)
    module = tmp_path / "die_at_start.py"
    module.write_text(_PRELOAD.format(slots=str(slots), everyone=everyone))
    return str(module)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(240)
def test_a_local_cluster_is_the_workers_that_started(tmp_path, capfd) -> None:
    """One of three worker processes dies at start-up: the run goes on with two and a warning;
    when all three die, one line. distributed's own start-up errors print no traceback, and its
    log levels are back after."""
    import dask

    records = _Records()
    logger = logging.getLogger("emseg.cluster")
    logger.addHandler(records)
    levels = {name: logging.getLogger(name).level for name in ("distributed", "tornado.application")}
    try:
        with dask.config.set({"distributed.worker.preload": [_preload(tmp_path / "one", everyone=False)]}):
            with connect(None, 3, 1) as (client, _):
                assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
                assert client.submit(lambda: 1).result() == 1
        warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith("started 2 of 3 dask workers (1 failed to start: ")
        assert {name: logging.getLogger(name).level for name in levels} == levels

        with dask.config.set({"distributed.worker.preload": [_preload(tmp_path / "all", everyone=True)]}):
            with pytest.raises(EmsegRuntimeError) as caught, connect(None, 3, 1):
                pytest.fail("a cluster without workers")
        assert str(caught.value).startswith("none of 3 dask workers started (") and "\n" not in str(caught.value)
        assert {name: logging.getLogger(name).level for name in levels} == levels
    finally:
        logger.removeHandler(records)
    assert "Traceback" not in capfd.readouterr().err
