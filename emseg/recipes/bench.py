"""Timing: the forward pass per precision and layout, end-to-end prediction (against MONAI's
sliding window when installed) and training steps. Used by ``emseg bench`` and ``benchmarks/``.

Every figure is a median of repeated runs after warm-up, with the device synchronised around
each timed run. FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts as two).
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emseg.config import ISBI_VOXEL_SIZE_NM, BenchConfig, IngestConfig, ModelConfig, PredictConfig, TrainConfig
from emseg.device import autocast_dtype, device_name, synchronize
from emseg.training.speed import timed, train_bench

log = logging.getLogger(__name__)

#: Dense peak TFLOP/s by GPU name fragment and precision (vendor data sheets, SXM parts).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
}


def peak_tflops(name: str, precision: str) -> float | None:
    """The dense peak TFLOP/s of the GPU called ``name`` at ``precision``; None when unknown."""
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass of ``model`` on an input of ``shape``, counted on a copy on the
    meta device (shapes only, no arithmetic)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        meta(torch.empty(shape, device="meta"))
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Variant:
    """One way of running the forward pass."""

    name: str
    precision: str  # fp32 | tf32 | bf16
    #: The layout and compilation this variant times (the plain variant times neither).
    channels_last: bool
    compiled: bool


def forward_variants(device: torch.device, torch_compile: bool) -> list[Variant]:
    """The variants worth timing on ``device`` (with ``torch_compile``, also a compiled one on CUDA)."""
    if device.type == "cuda":
        out = [
            Variant("fp32", "fp32", False, False),
            Variant("tf32", "tf32", False, False),
            Variant("bf16", "bf16", False, False),
            Variant("bf16 + channels_last", "bf16", True, False),
        ]
        if torch_compile:
            out.append(Variant("bf16 + channels_last + compile", "bf16", True, True))
        return out
    # bf16 on the CPU pays where it is native (AVX512-BF16, AMX); elsewhere oneDNN emulates it.
    return [
        Variant("fp32", "fp32", False, False),
        Variant("fp32 + channels_last", "fp32", True, False),
        Variant("bf16 + channels_last", "bf16", True, False),
    ]


def bf16_gain(rows: list[dict]) -> float | None:
    """MPix/s of "bf16 + channels_last" over "fp32 + channels_last" (None when either is missing)."""
    rate = {r["variant"]: r.get("mpix_per_s") for r in rows}
    fp32, bf16 = rate.get("fp32 + channels_last"), rate.get("bf16 + channels_last")
    return bf16 / fp32 if fp32 and bf16 else None


def forward_bench(  # noqa: PLR0913 - a benchmark's knobs are its arguments
    model: nn.Module,
    device: torch.device,
    tile: int,
    batch: int,
    *,
    torch_compile: bool = BenchConfig.torch_compile,
    compile_mode: str = "default",
    warmup: int = 3,
    repeats: int = 5,
    inner: int = 3,
) -> list[dict]:
    """MPix/s and TFLOP/s of the model's forward pass on (batch, 1, tile, tile) per variant.

    On CUDA each variant runs with cuDNN autotuning and TensorFloat-32 only for "tf32"; torch's
    flags are put back afterwards. A variant the device cannot run (a CUDA error, out of memory,
    torch.compile failing) is reported as a row with an ``error`` instead of a time."""
    import torch._dynamo

    from emseg.device import backend_flags

    model = model.to(device).eval()
    name = device_name(device)
    cuda = device.type == "cuda"
    x0 = torch.randn(batch, 1, tile, tile, device=device)
    flops = count_flops(model, tuple(x0.shape))
    rows: list[dict] = []
    for v in forward_variants(device, torch_compile):
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        net: Callable[..., Any] = model.to(memory_format=fmt)
        x = x0.contiguous(memory_format=fmt)
        if v.compiled:  # one shape, one compile; dynamo's caches start empty
            torch._dynamo.reset()
            net = torch.compile(net, mode=compile_mode, dynamic=False)
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if v.precision == "bf16" else nullcontext()

        def run(net: Callable[..., Any] = net, x: torch.Tensor = x, amp: Any = amp) -> None:
            with torch.inference_mode(), amp:
                net(x)

        flags = backend_flags(cudnn_benchmark=True, tf32=v.precision == "tf32") if cuda else nullcontext()
        # Past dynamo's recompile limit torch would run eager without a word: make it an error row.
        strict = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if v.compiled else nullcontext()
        try:
            with flags, strict:
                seconds = timed(run, device, warmup + (3 if v.compiled else 0), repeats, inner)
        except (RuntimeError, ImportError, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            # torch reports what a device cannot run (CUDA errors, out of memory, dynamo and
            # inductor failures) as RuntimeError subclasses; a missing compiler backend may be an
            # ImportError. Such a variant is a row with its error, not a failed benchmark.
            rows.append({"variant": v.name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        peak = peak_tflops(name, v.precision)
        tflops = flops / seconds / 1e12
        rows.append(
            {
                "variant": v.name,
                "tile": tile,
                "batch": batch,
                "ms": seconds * 1e3,
                "mpix_per_s": batch * tile * tile / seconds / 1e6,
                "tflop_per_s": tflops,
                "gflop_per_tile": flops / batch / 1e9,
                "fraction_of_peak": None if peak is None else tflops / peak,
            }
        )
    model.to(memory_format=torch.contiguous_format)
    return rows


def untrained_checkpoint(
    path: Path, model_config: ModelConfig, mean: float = 128.0, std: float = 40.0, seed: int = TrainConfig.seed
) -> Path:
    """A run directory holding an untrained network of ``model_config`` (speed needs no training)."""
    from emseg.models.build import build_model
    from emseg.models.checkpoint import save_checkpoint
    from emseg.training.run_dir import RunDir

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = build_model(model_config)  # a U-Net with halo and divisor
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    meta = run.meta(
        TrainConfig(model=model_config),
        {
            "normalization": {"mean": mean, "std": std},
            "halo": int(model.halo) if model_config.arch == "unet" else None,
            "divisor": int(model.divisor),
            "parameters": sum(p.numel() for p in model.parameters()),
            "untrained": True,
        },
    )
    run.write_config(meta)
    save_checkpoint(run.last, model, meta)
    return run.path


def synthetic_store(path: Path, slices: int, size: int) -> Path:
    """An OME-Zarr stack (slices, size, size) uint8 of mirrored ISBI-like slices (emseg's
    synthetic generator)."""
    import tifffile

    from emseg.io.ingest import ingest_stack
    from emseg.synthetic import synthetic_stack, tile_isbi_like

    base, _ = synthetic_stack((min(slices, 4), 512, 512), seed=0)
    tif = path.with_suffix(".tif")
    with tifffile.TiffWriter(tif, bigtiff=True) as tw:
        for z in range(slices):
            tw.write(tile_isbi_like(base[z % len(base)], (size, size)), contiguous=True, photometric="minisblack")
    out = ingest_stack(tif, path, IngestConfig(voxel_size=ISBI_VOXEL_SIZE_NM, overwrite=True))
    tif.unlink()
    return out


def predict_bench(  # noqa: PLR0913 - a benchmark's knobs are its arguments
    run: Path,
    data: Path,
    work: Path,
    device: str,
    tile: int,
    overlap: int,
    batch: int,
    torch_compile: bool = BenchConfig.torch_compile,
    repeats: int = 2,
) -> dict:
    """End-to-end ``predict``, zarr on disk to zarr on disk, timed in this process (model load,
    reading, inference, writing and pyramid included): one warm-up run, then the median of
    ``repeats`` runs."""
    from emseg.inference.predict import predict_store
    from emseg.io.zarr import open_ome

    out = work / "bench-pred.zarr"
    config = PredictConfig(
        tile=tile, overlap=overlap, batch_size=batch, device=device, torch_compile=torch_compile, overwrite=True
    )

    def once() -> float:
        t = time.perf_counter()
        predict_store(run, data, out, config)
        return time.perf_counter() - t

    once()
    seconds = statistics.median(once() for _ in range(repeats))
    shape = open_ome(data).shape
    return {"seconds": seconds, "mpix_per_s": shape[0] * shape[1] * shape[2] / seconds / 1e6, "stack": list(shape)}


def monai_bench(
    run: Path,
    data: Path,
    device: torch.device,
    tile: int,
    overlap: int,
    batch: int,
    torch_compile: bool = BenchConfig.torch_compile,
) -> dict:
    """MONAI's ``sliding_window_inference`` on the same network, tile, overlap, gaussian blending
    (sigma = tile / 8) and batch, over each slice already on the device as a normalised tensor.
    Raises ImportError without MONAI."""
    from monai.inferers import sliding_window_inference

    from emseg.io.zarr import open_ome
    from emseg.models.checkpoint import load_trained

    model, meta = load_trained(run, device)
    model = model.to(memory_format=torch.channels_last)  # the layout emseg runs it in, on any device
    net = torch.compile(model) if torch_compile else model
    norm = meta["normalization"]
    amp = autocast_dtype(device, PredictConfig.precision)

    def predictor(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return torch.sigmoid(net(t).float())

    image = open_ome(data)
    times = []
    for z in range(image.shape[0]):
        x = ((torch.from_numpy(np.asarray(image.array[z])).to(device).float() - norm["mean"]) / norm["std"])[None, None]
        with torch.inference_mode():
            if z == 0:
                sliding_window_inference(
                    x[..., : 2 * tile, : 2 * tile],
                    (tile, tile),
                    batch,
                    predictor,
                    overlap=overlap / tile,
                    mode="gaussian",
                    sigma_scale=0.125,
                )
            synchronize(device)
            t = time.perf_counter()
            sliding_window_inference(
                x, (tile, tile), batch, predictor, overlap=overlap / tile, mode="gaussian", sigma_scale=0.125
            )
            synchronize(device)
            times.append(time.perf_counter() - t)
    pixels = image.shape[1] * image.shape[2]
    return {"seconds_per_slice": statistics.median(times), "mpix_per_s": pixels / statistics.median(times) / 1e6}


@dataclass(frozen=True)
class BenchSizes:
    """What ``emseg bench`` measures on a device kind (the CPU gets smaller sizes)."""

    forward_tile: int
    forward_batch: int
    predict_size: int
    predict_slices: int
    train_batch: int
    train_crop: int
    small_model: ModelConfig | None  # used for predict and train when no --model is given


GPU_SIZES = BenchSizes(512, 16, 8192, 2, 16, 384, None)
CPU_SIZES = BenchSizes(256, 1, 1024, 2, 4, 256, ModelConfig(depth=3, base_channels=16))
#: ``emseg bench --quick``: seconds on any machine, a check that everything runs.
QUICK_SIZES = BenchSizes(64, 2, 256, 1, 2, 64, ModelConfig(depth=2, base_channels=8))


def run_bench(
    device: torch.device,
    model: str | Path | None = None,
    *,
    torch_compile: bool = BenchConfig.torch_compile,
    skip_monai: bool = False,
    quick: bool = BenchConfig.quick,
) -> dict:
    """Everything ``emseg bench`` reports, as a JSON-ready dict."""
    from emseg._version import __version__
    from emseg.models.checkpoint import load_trained

    sizes = QUICK_SIZES if quick else GPU_SIZES if device.type == "cuda" else CPU_SIZES
    result: dict[str, Any] = {
        "device": device_name(device),
        "emseg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    with tempfile.TemporaryDirectory(prefix="emseg-bench-") as tmp:
        work = Path(tmp)
        if model is not None:
            net, meta = load_trained(model, "cpu")
            run, label = Path(model), f"{model}"
            small_run, small_label = run, label
        elif quick:
            assert sizes.small_model is not None
            run = small_run = untrained_checkpoint(work / "small", sizes.small_model)
            net, _ = load_trained(run, "cpu")
            label = small_label = "U-Net depth 2, 8 base channels, untrained (--quick)"
        else:
            net, _ = load_trained(untrained_checkpoint(work / "default", ModelConfig()), "cpu")
            run, label = work / "default", "default U-Net (depth 4, 64 base channels), untrained"
            small = sizes.small_model
            small_run = untrained_checkpoint(work / "small", small) if small else run
            small_label = (
                f"U-Net depth {small.depth}, {small.base_channels} base channels, untrained" if small else label
            )
        result["compiled"] = "the forward pass only (one compile per process)" if torch_compile else None
        result["forward"] = {
            "model": label,
            "parameters": sum(p.numel() for p in net.parameters()),
            "rows": forward_bench(
                net,
                device,
                sizes.forward_tile,
                sizes.forward_batch,
                torch_compile=torch_compile,
                warmup=1 if quick else 3,
                repeats=5 if device.type == "cuda" else 3,
                inner=3 if device.type == "cuda" else 1,
            ),
        }
        result["forward"]["bf16_gain"] = bf16_gain(result["forward"]["rows"])
        store = synthetic_store(work / "bench.zarr", sizes.predict_slices, sizes.predict_size)
        dev = str(device)
        tile = 128 if quick else 512
        overlap = tile // 8
        result["predict"] = {
            "model": small_label,
            "tile": tile,
            "overlap": overlap,
            "batch": 8,
            "emseg": predict_bench(small_run, store, work, dev, tile, overlap, 8),
        }
        if not skip_monai:
            try:
                monai = monai_bench(small_run, store, device, tile, overlap, 8)
                result["predict"]["monai_in_memory"] = monai
                result["predict"]["ratio"] = result["predict"]["emseg"]["mpix_per_s"] / monai["mpix_per_s"]
            except ImportError:
                result["predict"]["monai_in_memory"] = "not installed (pip install monai)"
        train_store_path = train_store(work)
        train_model = (
            ModelConfig()
            if model is None and device.type == "cuda" and not quick
            else (sizes.small_model if model is None else load_trained(model, "cpu")[1]["config"]["model"])
        )
        if isinstance(train_model, dict):
            train_model = ModelConfig(**train_model)
        assert train_model is not None
        result["train"] = train_bench(
            train_store_path,
            device,
            train_model,
            sizes.train_batch,
            sizes.train_crop,
            steps=10 if device.type == "cuda" else 2,
            torch_compile=False,
            repeats=2 if quick else 3,
            warmup=1 if quick else 3,
        )
    return result


def bench(config: BenchConfig, model: str | Path | None = None, json_path: str | Path | None = None) -> dict[str, Any]:
    """``emseg bench``: :func:`run_bench` on the device ``config.device`` names, also written as
    JSON to ``json_path`` when given (values JSON cannot hold are written as text; an ``emseg``
    key marks the file, and an existing one is replaced only with ``config.overwrite`` when
    emseg wrote it)."""
    from emseg.device import resolve_device
    from emseg.io.outputs import Output, check_output, provenance, write_json_atomic

    if json_path is not None:  # before minutes of measuring
        check_output(Path(json_path).absolute(), config.overwrite, kind="file", inputs=[model])
    result = run_bench(
        resolve_device(config.device),
        model,
        torch_compile=config.torch_compile,
        skip_monai=not config.monai,
        quick=config.quick,
    )
    if json_path is not None:
        with Output(json_path, overwrite=config.overwrite, kind="file", command="bench", inputs=[model]) as out:
            write_json_atomic(out.path, {**json.loads(json.dumps(result, default=str)), "emseg": provenance("bench")})
    return result


def train_store(work: Path, data: Path | None = None, shape: tuple[int, int, int] = (8, 512, 512)) -> Path:
    """An annotated store to train on: the ISBI stacks (``data`` or found nearby), else a
    synthetic EM-like stack of ``shape``."""
    from emseg.io.ingest import ingest_stack
    from emseg.recipes.demo import find_isbi, write_synthetic

    folder = find_isbi(data) or write_synthetic(work / "synthetic", shape=shape)
    return ingest_stack(
        folder / "train-volume.tif",
        work / "train.zarr",
        IngestConfig(voxel_size=ISBI_VOXEL_SIZE_NM, overwrite=True),
        labels=folder / "train-labels.tif",
    )
