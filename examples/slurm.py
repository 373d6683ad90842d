"""Predict a large stack on a SLURM cluster of GPU nodes with dask-jobqueue.

    pip install 'emseg[cluster]'                       # dask-jobqueue
    python examples/slurm.py MODEL DATA.zarr PRED.zarr --jobs 8 --partition gpu --walltime 04:00:00
    python examples/slurm.py MODEL DATA.zarr PRED.zarr --jobs 8 --dry-run     # print the job script only

Each SLURM job runs one dask worker with one GPU (``--gres=gpu:1``); the worker process sees
only that GPU, and emseg puts each worker on its own device. Blocks go to the workers through a
bounded window (a few per worker), so millions of blocks never flood the scheduler; a block whose
node is pre-empted is recomputed on another. When the allocation runs out before the stack is
done, run the same command again: it is started with ``resume=True``, so only unfinished blocks
are predicted. Workers must see MODEL, DATA and the output's folder at the same paths (a shared
file system).
"""

from __future__ import annotations

import argparse
import time

import emseg


def make_cluster(args: argparse.Namespace):  # -> dask_jobqueue.SLURMCluster
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=args.partition,
        account=args.account,
        cores=3,  # worker threads: blocks in flight per worker (reading and writing overlap the GPU)
        job_cpu=args.cores,  # CPU cores per job: decompression and the pyramid use them
        processes=1,  # one worker per job, one GPU per worker
        memory=args.memory,
        walltime=args.walltime,
        job_extra_directives=[f"--gres=gpu:{args.gpus_per_job}"],
        log_directory=args.logs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (= GPUs) to request")
    parser.add_argument("--adaptive", action="store_true", help="scale between 1 and --jobs jobs as work remains")
    parser.add_argument("--partition", default=None, help="SLURM partition (queue)")
    parser.add_argument("--account", default=None)
    parser.add_argument("--gpus-per-job", type=int, default=1)
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per job")
    parser.add_argument("--memory", default="64GB", help="memory per job")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--logs", default="dask-logs")
    parser.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    args = parser.parse_args()
    cluster = make_cluster(args)
    if args.dry_run:
        print(cluster.job_script())
        cluster.close()
        return
    if args.adaptive:
        cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)
    else:
        cluster.scale(jobs=args.jobs)
    t = time.perf_counter()
    try:
        out = emseg.predict(args.model, args.data, args.output, scheduler=cluster.scheduler_address, resume=True)
    finally:
        cluster.close()
    print(f"{out} in {time.perf_counter() - t:.0f} s on up to {args.jobs} SLURM jobs")


if __name__ == "__main__":
    main()
