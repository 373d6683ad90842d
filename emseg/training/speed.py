"""How fast a training step runs here: :func:`train_bench` for ``emseg bench`` and the demo, which
measures it before choosing between random weights and the built-in model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from emseg.config import BenchConfig, ModelConfig, TrainConfig
from emseg.device import autocast_dtype, synchronize


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, inner: int = 1) -> float:
    """Median seconds of one call of ``fn`` (each repeat times ``inner`` calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def train_bench(  # noqa: PLR0913 - a benchmark's knobs are its arguments
    store: Path,
    device: torch.device,
    model_config: ModelConfig,
    batch: int,
    crop: int,
    *,
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 3,
    torch_compile: bool = BenchConfig.torch_compile,
    slices: int | None = None,
) -> dict:
    """Training steps/s with the full augmentation, and the share of a step spent sampling and
    augmenting (the two are timed separately, so under load the share can exceed 1). The crops
    come from the first ``slices`` slices (default: all but the last); a step costs the same
    whatever their number, so a quick probe loads one or two.

    The steps are the training loop's own (:func:`emseg.training.loop.draw_batch` and
    :func:`~emseg.training.loop.optimizer_step`, weighted BCE, bf16 autocast on CUDA) with the
    loop's torch flags."""
    from emseg.device import backend_flags
    from emseg.models.build import build_model
    from emseg.training.data import CropSampler, load_slices, normalization, open_training_store
    from emseg.training.loop import autocast_context, draw_batch, generators, optimizer_step
    from emseg.training.losses import weighted_bce

    image = open_training_store(str(store))
    n = max(1, image.shape[0] - 1) if slices is None else max(1, min(slices, image.shape[0]))
    data = load_slices(image, list(range(n)), TrainConfig.w0, TrainConfig.sigma)
    mean, std = normalization(data.raw)
    sampler = CropSampler(data, mean, std, device)
    model = build_model(model_config).to(device)
    model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if torch_compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = TrainConfig(model=model_config, crop=crop, batch_size=batch)
    autocast = autocast_context(device, autocast_dtype(device, TrainConfig.precision))
    counter = iter(range(10**9))

    def data_step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw_batch(sampler, config, generators(0, 0, next(counter), 0, device))

    def one_step() -> None:
        optimizer_step(net, opt, weighted_bce, data_step(), autocast)

    fast = True if device.type == "cuda" else None
    with backend_flags(cudnn_benchmark=fast, tf32=fast):
        step_s = timed(one_step, device, warmup, repeats, steps)
        aug_s = timed(data_step, device, 1, repeats, steps)
    return {
        "batch": batch,
        "crop": crop,
        "model": {"depth": model_config.depth, "base_channels": model_config.base_channels},
        "steps_per_s": 1 / step_s,
        "crops_per_s": batch / step_s,
        "mpix_per_s": batch * crop * crop / step_s / 1e6,
        "augmentation_ms": aug_s * 1e3,
        "step_ms": step_s * 1e3,
        "augmentation_share": aug_s / step_s,
    }


__all__ = ["timed", "train_bench"]
