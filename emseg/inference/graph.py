"""The dask graph of ``emseg predict``: one task per output block, locally or on a cluster.

Each task reads its block's input with a halo (real neighbouring pixels across chunk and block
borders, mirror reflection only beyond the stack's true edges), runs it through the process's
:class:`~emseg.inference.engine.Engine` (built once per process from the checkpoint path: the
model never travels inside the graph), writes the block's probabilities and membrane mask to
chunk-aligned regions of the output (so tasks never write the same chunk), and marks the block
done. ``--resume`` skips marked blocks; the pyramid levels are computed from level 0 at the end.

The output is written into a hidden sibling ``.NAME.partial`` and renamed into place when
complete; a lock file beside it stops a second ``emseg predict`` from writing the same output.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg.config import PredictConfig, to_dict
from emseg.errors import BadInputError, EmsegRuntimeError
from emseg.io.atomic import is_emseg_store
from emseg.io.ingest import provenance, reduce2
from emseg.io.zarr import (
    LevelSpec,
    create_image_store,
    create_label,
    create_multiscale,
    open_ome,
)
from emseg.progress import Reporter, reporter_or_null

log = logging.getLogger(__name__)

#: Inside the hidden ``.NAME.partial`` folder: the store being written, the done-markers of its
#: blocks and the settings an interrupted run must be resumed with.
STORE_DIR = "store.zarr"
PROGRESS_DIR = "done"
SETTINGS_FILE = "settings.json"
#: Settings that may differ between an interrupted run and its --resume.
RUNTIME_ONLY = ("device", "batch_size", "threads", "workers", "scheduler", "compile", "overwrite", "resume")


@dataclass(frozen=True)
class Job:
    """One block task: everything a worker needs, as plain data (no model, no arrays)."""

    model: str
    data: str
    output: str
    z_in: int
    z_out: int
    y: tuple[int, int]
    x: tuple[int, int]
    config: PredictConfig
    divisor: int
    #: Unique per run: workers that outlive a run never reuse its open arrays.
    run_id: str = ""
    torch_threads: int | None = None

    @property
    def name(self) -> str:
        return f"{self.z_out}-{self.y[0]}-{self.x[0]}"


# --- per-process caches (safe to drop) ------------------------------------------------------

_ENGINES: dict[tuple, Any] = {}
_ARRAYS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _engine(job: Job) -> Any:
    """The process's engine for this checkpoint and settings, built on first use."""
    from emseg.inference.engine import Engine, EngineSettings
    from emseg.inference.model import load_trained

    c = job.config
    key = (job.model, os.path.getmtime(job.model), c.device, c.batch_size, c.tta, c.dtype, c.threshold, c.compile)
    with _LOCK:
        if key not in _ENGINES:
            import torch

            if job.torch_threads:
                torch.set_num_threads(job.torch_threads)
            model, meta = load_trained(job.model, c.device)
            if c.compile:
                model = torch.compile(model, dynamic=False)
            norm = meta["normalization"]
            settings = EngineSettings(batch_size=c.batch_size, tta=c.tta, output_dtype=c.dtype, threshold=c.threshold)
            for old in _ENGINES.values():
                old.close()
            _ENGINES.clear()
            _ENGINES[key] = Engine(model, next(model.parameters()).device, norm["mean"], norm["std"], settings)
        return _ENGINES[key]


def _array(path: str, mode: str, run_id: str) -> Any:
    key = (path, mode, run_id)
    with _LOCK:
        if key not in _ARRAYS:
            _ARRAYS[key] = zarr.open_array(path, mode=mode)
        return _ARRAYS[key]


def drop_caches() -> None:
    """Close engines and forget open arrays (the next task rebuilds what it needs)."""
    with _LOCK:
        for engine in _ENGINES.values():
            engine.close()
        _ENGINES.clear()
        _ARRAYS.clear()


# --- the block task -------------------------------------------------------------------------


def run_block(job: Job) -> tuple[str, int]:
    """Predict one block and write it; returns (block name, pixels written)."""
    from emseg.inference.tiling import plan_block, read_reflected

    engine = _engine(job)
    c = job.config
    source = _array(str(Path(job.data) / "0"), "r", job.run_id)
    plan = plan_block(job.y, job.x, c.tile, c.overlap, job.divisor, c.blend, source.shape[1:])
    y0, y1, x0, x1 = plan.domain
    region = read_reflected(lambda r, s: source[job.z_in, r, s], source.shape[1:], y0, y1, x0, x1)
    prob, membranes = engine.run_block(region, plan)
    where = (job.z_out, slice(*job.y), slice(*job.x))
    _array(str(Path(job.output) / "0"), "r+", job.run_id)[where] = prob
    _array(str(Path(job.output) / "labels" / "membranes" / "0"), "r+", job.run_id)[where] = membranes
    (Path(job.output).parent / PROGRESS_DIR / job.name).touch()
    return job.name, prob.size


# --- planning -------------------------------------------------------------------------------


def axis_blocks(length: int, chunk: int, target: int) -> list[tuple[int, int]]:
    """Split [0, length) into blocks of whole chunks close to ``target`` pixels; an axis at most
    1.5 times the target is one block."""
    if length <= 1.5 * target:
        return [(0, length)]
    step = max(1, round(target / chunk)) * chunk
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def plan_jobs(model: str, data: str, output: str, config: PredictConfig, z_range: tuple[int, int],
              shape: tuple[int, int, int], chunks: tuple[int, int, int], divisor: int) -> list[Job]:
    ys = axis_blocks(shape[1], chunks[1], config.block)
    xs = axis_blocks(shape[2], chunks[2], config.block)
    run_id = uuid.uuid4().hex
    return [
        Job(model, data, output, z, z - z_range[0], y, x, config, divisor, run_id)
        for z in range(*z_range) for y in ys for x in xs
    ]


def _settings_record(model: Path, data: Path, config: PredictConfig) -> dict[str, Any]:
    stat = model.stat()
    kept = {k: v for k, v in to_dict(config).items() if k not in RUNTIME_ONLY}
    return {"model": str(model), "model_size": stat.st_size, "model_mtime": stat.st_mtime,
            "data": str(data), "config": kept}


# --- locking and the partial output ---------------------------------------------------------


class OutputLock:
    """An exclusive lock on ``.NAME.lock`` beside the output; a second writer is refused."""

    def __init__(self, final: Path) -> None:
        self.path = final.parent / f".{final.name}.lock"
        self._fh: Any = None

    def acquire(self) -> None:
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise BadInputError(
                    f"{self.path.parent / self.path.name[1:-5]}: another emseg predict is writing this output"
                ) from None
            # the file may have been unlinked by a finishing run between open and flock
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fh = fh
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()}\n")
                fh.flush()
                return
            fh.close()

    def release(self) -> None:
        if self._fh is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _prepare(final: Path, partial: Path, record: dict[str, Any], config: PredictConfig,
             create: Any) -> bool:
    """Make ``partial`` ready; returns True when resuming an interrupted run."""
    settings = partial / SETTINGS_FILE
    if partial.exists() and config.resume and settings.is_file():
        saved = json.loads(settings.read_text())
        if saved != record:
            raise BadInputError(
                f"--resume: the interrupted run in {partial.name} used other settings or another model; "
                "run again without --resume to start afresh"
            )
        return True
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    create(partial / STORE_DIR)
    (partial / PROGRESS_DIR).mkdir()
    settings.write_text(json.dumps(record))
    return False


# --- the whole prediction -------------------------------------------------------------------


def predict_store(model: str | Path, data: str | Path, output: str | Path, config: PredictConfig,
                  progress: Reporter | None = None) -> Path:
    """Predict every block of ``data`` (level 0, slices ``config.slices``) into ``output``."""
    from emseg.inference.model import load_trained  # noqa: F401  (fails early on a bad checkpoint)
    from emseg.inference.tiling import check_tiling
    from emseg.models.checkpoint import read_checkpoint, resolve_checkpoint

    progress = reporter_or_null(progress)
    model_path = resolve_checkpoint(model).resolve()
    _, meta = read_checkpoint(model_path)
    divisor = int(meta.get("divisor") or 1)
    check_tiling(config.tile, config.overlap, divisor, config.blend)
    if config.dtype not in ("uint8", "float16", "float32"):
        raise BadInputError(f"--dtype {config.dtype}: expected uint8, float16 or float32")
    if not 0 <= config.threshold <= 1:
        raise BadInputError(f"--threshold {config.threshold}: must be within [0, 1]")
    if config.batch_size < 1 or config.threads < 1:
        raise BadInputError("--batch-size and the thread count must be at least 1")
    image = open_ome(data)
    if image.array.ndim != 3:
        raise BadInputError(f"{data}: expected a (z, y, x) image")
    z0, z1 = config.slices or (0, image.shape[0])
    if not 0 <= z0 < z1 <= image.shape[0]:
        raise BadInputError(f"--slices {z0}:{z1}: {data} has slices 0-{image.shape[0] - 1}")
    final = Path(output).absolute()
    if final.is_symlink():
        raise BadInputError(f"{final}: is a symbolic link; give the real path of the output")
    if final.exists() and not (config.overwrite or config.resume):
        raise BadInputError(f"{final}: already exists (use --overwrite to replace it, or --resume)")
    if final.exists() and not is_emseg_store(final):
        raise BadInputError(f"{final}: exists and was not written by emseg; refusing to replace it")
    if final.exists() and config.resume and not config.overwrite:
        log.info("%s is complete; nothing to resume", final)
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"{final}: cannot create {final.parent} ({exc.strerror})") from None
    partial = final.parent / f".{final.name}.partial"
    shape = (z1 - z0, image.shape[1], image.shape[2])
    chunks = (1, *image.array.chunks[1:])
    spec = LevelSpec(shape=shape, dtype=config.dtype, chunks=chunks, pyramid_min_size=_pyramid_min(image))
    record = _settings_record(model_path, image.path.resolve(), config)
    prov = provenance("predict", model=str(model_path), data=str(image.path.resolve()), slices=[z0, z1],
                      settings={k: v for k, v in to_dict(config).items() if k not in ("overwrite", "resume")},
                      model_meta={k: meta.get(k) for k in ("halo", "divisor", "normalization", "parameters")})

    def create(path: Path) -> None:
        root = create_image_store(path, image.version, attrs={"emseg": {**prov, "complete": False}})
        create_multiscale(root, spec, image.voxel_size, image.version, "probabilities")
        create_label(root, "membranes", spec, image.voxel_size, image.version)

    lock = OutputLock(final)
    lock.acquire()
    try:
        resumed = _prepare(final, partial, record, config, create)
        done = {p.name for p in (partial / PROGRESS_DIR).iterdir()}
        store = partial / STORE_DIR
        jobs = plan_jobs(str(model_path), str(image.path.resolve()), str(store), config, (z0, z1), image.shape,
                         chunks, divisor)
        todo = [j for j in jobs if j.name not in done]
        if resumed:
            log.info("resuming: %d of %d blocks already done", len(jobs) - len(todo), len(jobs))
        progress.start("predict", total=len(jobs), unit="blocks")
        progress.advance(len(jobs) - len(todo))
        _execute(todo, config, progress)
        progress.finish()
        _pyramid(store)
        root = zarr.open_group(str(store), mode="r+")
        root.attrs["emseg"] = {**prov, "complete": True}
        if final.exists():
            trash = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, trash)
            os.rename(store, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(store, final)
        shutil.rmtree(partial)
    except OSError as exc:
        raise EmsegRuntimeError(f"{final}: writing failed ({exc.strerror or exc}); rerun with --resume") from exc
    finally:
        lock.release()
    return final


def _pyramid_min(image: Any) -> int:
    """The input's own pyramid depth: stop where its smallest level stops."""
    levels = image.levels
    if len(levels) <= 1:
        return max(image.shape[1:])
    return max(levels[-1].shape[1:])


def _pyramid(path: Path) -> None:
    """Levels 1.. of the probabilities (block mean) and membranes (block majority) from level 0."""
    for sub, kind in (("", "mean"), ("labels/membranes", "majority")):
        group = zarr.open_group(str(path / sub) if sub else str(path), mode="r+")
        names = sorted((k for k in group.array_keys()), key=int)
        for a, b in zip(names, names[1:]):
            src, dst = group[a], group[b]
            rows = dst.chunks[1]
            for z in range(dst.shape[0]):
                for y in range(0, dst.shape[1], rows):
                    block = np.asarray(src[z : z + 1, 2 * y : 2 * (y + rows)])
                    dst[z : z + 1, y : y + rows] = reduce2(block, kind)[:, : min(rows, dst.shape[1] - y)]


def _execute(jobs: list[Job], config: PredictConfig, progress: Reporter) -> None:
    """Run the block tasks: dask's threaded scheduler, or a dask.distributed cluster."""
    if not jobs:
        return
    t0, pixels = time.perf_counter(), 0

    def tick(npix: int) -> None:
        nonlocal pixels
        pixels += npix
        progress.advance(1, mpix_per_s=pixels / 1e6 / max(time.perf_counter() - t0, 1e-9))

    if config.workers is None and config.scheduler is None:
        import dask
        from dask.callbacks import Callback

        tasks = [dask.delayed(run_block, pure=False)(j, dask_key_name=f"emseg-block-{j.name}") for j in jobs]

        class Ticker(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                if isinstance(result, tuple) and len(result) == 2:
                    tick(result[1])

        try:
            with Ticker():
                dask.compute(*tasks, scheduler="threads", num_workers=config.threads)
        finally:
            drop_caches()
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if config.scheduler is not None:
        try:
            client = Client(config.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise BadInputError(f"--scheduler {config.scheduler}: cannot connect ({exc})") from None
    else:
        cores = os.cpu_count() or 1
        threads = max(1, cores // max(1, config.workers or 1))
        cluster = LocalCluster(n_workers=config.workers, threads_per_worker=min(config.threads, threads),
                               processes=True, dashboard_address=None)
        client = Client(cluster)
        jobs = [dataclasses.replace(j, torch_threads=threads) for j in jobs]
    try:
        futures = client.map(run_block, jobs, key=[f"emseg-block-{j.name}" for j in jobs], pure=False)
        for future in as_completed(futures):
            tick(future.result()[1])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


__all__ = ["predict_store", "run_block", "plan_jobs", "axis_blocks", "Job", "OutputLock", "drop_caches"]
