"""Ingest throughput and peak memory: emseg's streaming ingest against the naive way.

The naive way reads the whole stack with ``tifffile.imread`` and writes it as one zarr array with
the same compression (no pyramid, no labels). emseg streams band by band and also writes the
pyramid levels. Each runs in its own process so that peak RSS is its own.

    python benchmarks/ingest.py                 # 64 x 4096 x 4096 uint8 (1.07 GB) BigTIFF
    python benchmarks/ingest.py --slices 16     # quicker
    python benchmarks/ingest.py --json out.json

The stack is built from the ISBI slices mirrored to 4096 x 4096 when ../shared/data is present,
else from emseg's synthetic EM-like generator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ISBI = HERE.parent.parent / "shared" / "data" / "isbi2012" / "train-volume.tif"

NAIVE = """
import sys, time, numpy as np, tifffile, zarr, numcodecs
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
data = tifffile.imread(src)
z = zarr.create_array(dst, shape=data.shape, chunks=(1, 1024, 1024), dtype=data.dtype, zarr_format=2,
    compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE),
    chunk_key_encoding={"name": "v2", "separator": "/"})
z[:] = data
print(time.perf_counter() - t0, [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""

# emseg runs as its users run it: the CLI's main(), in this process so that VmHWM is its own.
EMSEG = """
import atexit, sys, time
t0 = time.perf_counter()
def report():
    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    print(time.perf_counter() - t0, hwm)
atexit.register(report)
from emseg.cli import main
sys.argv = ["emseg", "ingest", sys.argv[1], "-o", sys.argv[2], "--voxel-size", "50", "4", "4", "--quiet"]
main()
"""


def make_stack(path: Path, n_slices: int, size: int) -> int:
    """Write an (n_slices, size, size) uint8 BigTIFF page by page; returns its size in bytes."""
    import tifffile

    if ISBI.exists():
        base = tifffile.imread(ISBI)
    else:
        from emseg.synthetic import synthetic_stack

        base, _ = synthetic_stack((30, 512, 512), seed=0)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for z in range(n_slices):
            plane = base[z % base.shape[0]]
            reps = -(-size // plane.shape[0])
            big = np.pad(plane, ((0, plane.shape[0] * (reps - 1)), (0, plane.shape[1] * (reps - 1))), mode="symmetric")
            tw.write(big[:size, :size], contiguous=True)
    return path.stat().st_size


def run(script: str, src: Path, dst: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of ``script`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(dst)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    seconds, peak_kib = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="emseg-bench-ingest-"))
    try:
        src = work / "stack.tif"
        nbytes = make_stack(src, args.slices, args.size)
        t_emseg, rss_emseg = run(EMSEG, src, work / "emseg.zarr")
        t_naive, rss_naive = run(NAIVE, src, work / "naive.zarr")
        result = {
            "benchmark": "ingest",
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "stack": [args.slices, args.size, args.size],
            "source_mb": nbytes / 1e6,
            "emseg": {"seconds": t_emseg, "mb_per_s": nbytes / 1e6 / t_emseg, "peak_rss_mib": rss_emseg},
            "naive": {"seconds": t_naive, "mb_per_s": nbytes / 1e6 / t_naive, "peak_rss_mib": rss_naive},
        }
        result["throughput_ratio"] = result["emseg"]["mb_per_s"] / result["naive"]["mb_per_s"]
        result["memory_ratio"] = rss_emseg / rss_naive
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
