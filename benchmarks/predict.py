"""End-to-end prediction throughput, zarr on disk to zarr on disk, against MONAI's
``sliding_window_inference`` on the same data already in memory; and peak memory for a stack 1x
and 4x as large.

    python benchmarks/predict.py --device cuda                          # default U-Net, 8192^2 x 2, bf16
    python benchmarks/predict.py --device cuda --compile
    python benchmarks/predict.py --device cpu --depth 3 --base-channels 8 --slices 1 --memory-slices 1

Both use the same network (emseg's checkpoint), tile 512, overlap 64, gaussian blending with
sigma = tile / 8 and the same batch size. MONAI gets the normalised slice as a tensor on the
device and returns the float32 probabilities in memory (no reading, no writing, no conversion);
emseg reads the uint8 zarr, predicts, and writes uint8 probabilities plus the membrane mask.
Only the timed part differs: everything MONAI does is inside emseg's timed run too.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

RSS = """
import sys, time
import dask, torch, zarr  # a warm library, as in a pipeline: interpreter start and imports are not timed
from emseg.cli import main
t0 = time.perf_counter()
sys.argv = ["emseg", "predict", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(time.perf_counter() - t0, hwm)
"""


def make_stack(work: Path, n: int, size: int, name: str) -> Path:
    """An (n, size, size) uint8 OME-Zarr of mirrored EM-like slices."""
    from emseg.recipes.bench import synthetic_store

    return synthetic_store(work / f"{name}.zarr", n, size)


def make_model(work: Path, args: argparse.Namespace) -> Path:
    """A checkpoint of the benchmarked architecture (trained for one step: speed needs no quality)."""
    import emseg
    from emseg.recipes.demo import write_synthetic

    folder = write_synthetic(work / "synthetic", shape=(2, 256, 256))
    store = emseg.ingest(folder / "train-volume.tif", work / "train.zarr", labels=folder / "train-labels.tif")
    run = work / "model"
    emseg.train(
        store,
        run,
        depth=args.depth,
        base_channels=args.base_channels,
        crop=128,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        device="cpu",
        val_slices="1",
    )
    return run


def emseg_run(run: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """emseg predict as its users run it (the CLI, in a fresh process): seconds and VmHWM."""
    cmd = [
        str(run),
        str(data),
        "-o",
        str(out),
        "--device",
        args.device,
        "--tile",
        str(args.tile),
        "--overlap",
        str(args.overlap),
        "--batch-size",
        str(args.batch_size),
        "-q",
    ]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run([sys.executable, "-c", RSS, *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    seconds, hwm = proc.stdout.split()[-2:]
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": float(seconds), "peak_rss_mib": int(hwm) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--slices", type=int, default=2, help="slices of the throughput stack")
    parser.add_argument(
        "--memory-slices",
        type=int,
        default=3,
        help="slices of the 1x memory stack (4x is 4 times); at least the 3 block threads so both keep them all busy",
    )
    parser.add_argument(
        "--memory-size", type=int, default=None, help="slice side of the memory stacks (default --size)"
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="emseg-bench-predict-", dir=args.workdir))
    try:
        run = make_model(work, args)
        data = make_stack(work, args.slices, args.size, "data")
        pixels = args.slices * args.size**2
        e2e = emseg_run(run, data, work / "pred.zarr", args)
        result = {
            "benchmark": "predict",
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.node(),
            "device": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else f"CPU x{torch.get_num_threads()}",
            "torch": torch.__version__,
            "model": {"depth": args.depth, "base_channels": args.base_channels},
            "tile": args.tile,
            "overlap": args.overlap,
            "batch_size": args.batch_size,
            "compile": args.compile,
            "stack": [args.slices, args.size, args.size],
            "emseg_end_to_end": {
                **e2e,
                "mpix_per_s": pixels / e2e["seconds"] / 1e6,
                "note": "the whole CLI command in a process with torch imported: model load, reading, "
                "inference, writing, pyramid",
            },
        }
        if not args.skip_monai:
            try:
                from emseg.device import resolve_device
                from emseg.recipes.bench import monai_bench

                result["monai_in_memory"] = monai_bench(
                    run, data, resolve_device(args.device), args.tile, args.overlap, args.batch_size, args.compile
                )
                result["ratio_emseg_over_monai"] = (
                    result["emseg_end_to_end"]["mpix_per_s"] / result["monai_in_memory"]["mpix_per_s"]
                )
            except ImportError:
                result["monai_in_memory"] = "monai not installed (pip install -e '.[bench]')"
        shutil.rmtree(data)
        memory = {}
        for factor in (1, 4):
            stack = make_stack(work, args.memory_slices * factor, args.memory_size or args.size, f"mem{factor}")
            memory[f"{factor}x"] = {
                "slices": args.memory_slices * factor,
                "size": args.memory_size or args.size,
                **emseg_run(run, stack, work / f"mem{factor}-pred.zarr", args),
            }
            shutil.rmtree(stack)
        result["memory"] = memory
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
