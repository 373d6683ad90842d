"""How many blocks per second a dask scheduler sustains for emseg, and what it costs in memory,
with emseg's bounded submission window and with everything submitted at once (``client.map``).

A real scheduler and real workers run as separate processes (``dask scheduler``, ``dask worker``)
on this machine; the blocks are cheap (an identity over a small chunk), so the figures are the
scheduling overhead a real run pays on top of its GPU work. Peak resident memory of the client
(this process) and of the scheduler process is sampled every 50 ms.

    python benchmarks/scale.py                   # 10^4 and 10^5 blocks, both modes
    python benchmarks/scale.py --blocks 10000 --modes window window:16 --json benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from emseg.cluster import PER_WORKER, run_windowed, worker_count


def cheap_block(i: int) -> int:
    """An identity network over a small chunk: the cost of a block without its GPU work."""
    chunk = np.full((1, 16, 16), i % 251, dtype=np.uint8)
    return int(chunk.sum() // 256)


class PeakRss:
    """Peak resident memory (bytes) of some processes, sampled in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(workers: int) -> tuple[str, subprocess.Popen, list[subprocess.Popen]]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ],
        **quiet,  # fmt: skip
    )
    worker_procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--name",
                f"w{i}",
            ],
            **quiet,  # fmt: skip
        )
        for i in range(workers)
    ]
    return address, scheduler, worker_procs


def measure(address: str, scheduler_pid: int, n: int, mode: str) -> dict:
    from distributed import Client, as_completed

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(1)
        client.run(cheap_block, 0)  # workers import numpy before the clock starts
        done = 0
        t0 = time.perf_counter()
        with PeakRss({"client": psutil.Process().pid, "scheduler": scheduler_pid}) as rss:
            if mode.startswith("window"):  # "window" (emseg's default) or "window:K" (K per worker)
                per_worker = int(mode.split(":")[1]) if ":" in mode else PER_WORKER
                name = f"blk-{mode}-{n}-"
                stats = run_windowed(
                    client, cheap_block, range(n), lambda i: f"{name}{i}", lambda r: None, per_worker=per_worker
                )
                done, in_flight = stats.done, stats.max_in_flight
            else:
                futures = client.map(cheap_block, range(n), key=[f"blk-{mode}-{n}-{i}" for i in range(n)], pure=False)
                in_flight = n
                for future in as_completed(futures):
                    future.result()
                    done += 1
                del futures
        seconds = time.perf_counter() - t0
        workers = worker_count(client)
    return {
        "mode": mode,
        "blocks": n,
        "done": done,
        "workers": workers,
        "seconds": round(seconds, 2),
        "blocks_per_s": round(done / seconds, 1),
        "max_in_flight": in_flight,
        "client_peak_mib": round(rss.peak["client"] / 2**20, 1),
        "scheduler_peak_mib": round(rss.peak["scheduler"] / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["window", "all-at-once"])
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for n in args.blocks:
        for mode in args.modes:
            # a fresh scheduler per measurement, so one run's leftovers never weigh on the next
            address, scheduler, workers = start_cluster(args.workers)
            try:
                time.sleep(2)
                row = measure(address, scheduler.pid, n, mode)
            finally:
                for p in [*workers, scheduler]:
                    p.terminate()
                for p in [*workers, scheduler]:
                    p.wait(30)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "date": time.strftime("%Y-%m-%d"),
        "per_worker_window": PER_WORKER,
        "rows": rows,
    }
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
