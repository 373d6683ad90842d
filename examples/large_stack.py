"""Predict a stack far larger than you would load into memory, and watch memory stay flat.

    python examples/large_stack.py --model runs/isbi                       # 64 x 8192 x 8192 (4.3 GB)
    python examples/large_stack.py --model runs/isbi --slices 8 --size 4096

The stack is generated slice by slice straight into OME-Zarr (emseg's synthetic EM-like data,
mirror-tiled), so making it needs no more memory than predicting it. Without --model a small
network is trained for a minute first.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

import emseg
from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale
from emseg.synthetic import synthetic_stack, tile_isbi_like


def generate(path: Path, slices: int, size: int) -> Path:
    """Write an (slices, size, size) uint8 OME-Zarr one slice at a time."""
    root = create_image_store(path, "0.4", attrs={"emseg": {"command": "examples/large_stack.py"}})
    arrays = create_multiscale(root, LevelSpec(shape=(slices, size, size), dtype="uint8"), (50, 4, 4), "0.4", "large")
    base, _ = synthetic_stack((4, 512, 512), seed=0)
    for z in range(slices):
        arrays[0][z] = tile_isbi_like(base[z % 4], (size, size))
    for level in range(1, len(arrays)):  # a viewer wants the pyramid; built from the level above
        for z in range(slices):
            src = np.asarray(arrays[level - 1][z])
            arrays[level][z] = src[::2, ::2][: arrays[level].shape[1], : arrays[level].shape[2]]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="run directory from emseg train")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("large-stack"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "large.zarr"
    if not data.exists():
        generate(data, args.slices, args.size)
    model = args.model
    if model is None:
        from emseg.recipes.demo import find_isbi, write_synthetic

        folder = find_isbi(None) or write_synthetic(args.out / "train-data", shape=(8, 256, 256))
        train = emseg.ingest(
            folder / "train-volume.tif", args.out / "train.zarr", labels=folder / "train-labels.tif", overwrite=True
        )
        model = args.out / "run"
        emseg.train(
            train,
            model,
            depth=3,
            base_channels=8,
            crop=128,
            batch_size=4,
            time_limit=60,
            epochs=100,
            steps_per_epoch=20,
            device=args.device,
            overwrite=True,
        )

    peak, stop = [0], threading.Event()

    def watch() -> None:
        proc = psutil.Process()
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    t = time.perf_counter()
    out = emseg.predict(model, data, args.out / "pred.zarr", device=args.device, overwrite=True)
    seconds = time.perf_counter() - t
    stop.set()
    shape = zarr.open_array(str(data / "0"), mode="r").shape
    gb = np.prod(shape) / 1e9
    print(f"predicted {shape} ({gb:.2f} GB of uint8) in {seconds:.1f} s: {np.prod(shape) / seconds / 1e6:.2f} MPix/s")
    print(f"peak resident memory {peak[0] / 2**20:.0f} MiB; output in {out}")


if __name__ == "__main__":
    main()
