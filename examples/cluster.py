"""Predict on a dask.distributed cluster: start one on this machine, or connect to yours.

    python examples/cluster.py MODEL DATA.zarr PRED.zarr --workers 4             # a local cluster
    python examples/cluster.py MODEL DATA.zarr PRED.zarr --scheduler tcp://head:8786

On an HPC system, start a scheduler and workers with dask-jobqueue or `dask scheduler` /
`dask worker` (one GPU per worker: CUDA_VISIBLE_DEVICES) and pass its address. Every worker must
see MODEL, DATA and the output's folder at the same paths (a shared file system); each loads
the model once, from its path: the network never travels through the scheduler.
"""

from __future__ import annotations

import argparse
import time

import emseg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("output")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=2, help="processes of a local cluster")
    where.add_argument("--scheduler", default=None, help="address of an existing scheduler")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    t = time.perf_counter()
    out = emseg.predict(
        args.model,
        args.data,
        args.output,
        tile=args.tile,
        device=args.device,
        overwrite=True,
        workers=None if args.scheduler else args.workers,
        scheduler=args.scheduler,
    )
    info = emseg.info(out)
    print(
        f"{out}: {' x '.join(map(str, info['shape']))} in {time.perf_counter() - t:.1f} s "
        f"({'scheduler ' + args.scheduler if args.scheduler else f'{args.workers} local workers'})"
    )


if __name__ == "__main__":
    main()
