"""fit(): the training loop, top to bottom: one flat loop over global steps (nanoGPT's shape).

Epoch ``step // steps_per_epoch`` ends with validation and a checkpoint, and so does a stop at the
time limit; the resume point is the next global step with the best score, the elapsed time and the
metrics rows, so ``--resume`` is just ``range(step, total)``. Randomness comes only from generators
seeded with (seed, epoch, step in the epoch, rank): the same seed gives the same run on the CPU,
and a resumed run continues exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emseg.config import TrainConfig
from emseg.device import autocast_dtype, is_cuda, synchronize
from emseg.errors import BadInputError, EmsegRuntimeError
from emseg.io.outputs import check_inputs, write_json_atomic
from emseg.models.base import SegmentationNet
from emseg.models.build import build_model
from emseg.models.normalization import robust_normalization
from emseg.progress import Reporter, reporter_or_null
from emseg.training import distributed as D
from emseg.training.augment import augment_batch, context_size
from emseg.training.data import (
    CropSampler,
    check_validation_labels,
    load_slices,
    open_training_store,
    split_slices,
)
from emseg.training.ema import WeightAverage
from emseg.training.losses import Loss, make_loss
from emseg.training.run_dir import RunDir
from emseg.training.schedule import budget_learning_rate, budget_progress, learning_rate
from emseg.training.validate import validate

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: Under DDP the ranks agree on the time spent (one all-reduce) every this many steps.
SYNC_EVERY = 10
#: Steps timed (after the first) for the estimate of the run's duration.
ESTIMATE_STEPS = 5
#: The README's small CPU configuration, suggested when the default would run for hours.
SMALL_CPU = "--depth 3 --base-channels 16 --crop 256 --batch-size 4 --steps-per-epoch 40 --epochs 10"


def step_learning_rate(step: int, total: int, spent: float, config: TrainConfig) -> float:
    """The learning rate of ``step``: over the run's steps, or over its time budget when it has
    one (``spent`` seconds of it gone); see :mod:`emseg.training.schedule`."""
    if config.time_limit is None:
        return learning_rate(step, total, config)
    return budget_learning_rate(step, budget_progress(step, total, spent, config.time_limit), config)


def generators(
    seed: int, epoch: int, step: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(host generator for crop positions, device generator for augmentation) of one step;
    ``step`` counts within the epoch."""
    key = ((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank
    host = torch.Generator().manual_seed(key % 2**63)
    dev = torch.Generator(device=device).manual_seed((key * 31 + 7) % 2**63) if is_cuda(device) else host
    return host, dev


def _readable(getter: Callable[[], Any]) -> Any:
    """``getter()``, or None where torch refuses to read a setting (a RuntimeError: the program
    mixed its older TF32 flags with the newer ``fp32_precision`` settings)."""
    try:
        return getter()
    except RuntimeError:
        return None


def fp32_precisions() -> list[tuple[Any, str]]:
    """(setting, value) of torch's ``fp32_precision`` for CUDA matmuls and cuDNN (torch >= 2.9)."""
    settings = [
        torch.backends.cuda.matmul,
        getattr(torch.backends.cudnn, "conv", None),
        getattr(torch.backends.cudnn, "rnn", None),
    ]
    return [(s, s.fp32_precision) for s in settings if s is not None and hasattr(s, "fp32_precision")]


@contextlib.contextmanager
def backend_flags(*, cudnn_benchmark: bool | None = None, tf32: bool | None = None) -> Iterator[None]:
    """Set torch's process-wide speed flags for the block (None leaves one alone) and put back
    what was there before, whatever happens in the block.

    TF32 is switched with torch's long-standing calls (float32 matmul precision "high" and
    ``cudnn.allow_tf32``), which keep its older and newer settings consistent; afterwards the older
    settings are put back (where torch can read them) and then the newer ``fp32_precision`` ones.
    """
    cudnn = torch.backends.cudnn
    benchmark, precisions = cudnn.benchmark, fp32_precisions()
    matmul, conv = _readable(torch.get_float32_matmul_precision), _readable(lambda: cudnn.allow_tf32)
    try:
        if cudnn_benchmark is not None:
            cudnn.benchmark = cudnn_benchmark
        if tf32 is not None:
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            cudnn.allow_tf32 = tf32
        yield
    finally:
        cudnn.benchmark = benchmark
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        if conv is not None:
            cudnn.allow_tf32 = conv
        for setting, value in precisions:
            setting.fp32_precision = value


def seeded_model(config: TrainConfig) -> SegmentationNet:
    """The network of ``config`` with initial weights that depend on the seed alone; refuses a
    crop the network cannot take."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model)
    if config.crop % model.divisor or config.crop < model.divisor:
        raise BadInputError(f"--crop {config.crop}: the model needs a multiple of {model.divisor}")
    return model


def draw_batch(sampler: CropSampler, config: TrainConfig, gens: tuple[torch.Generator, torch.Generator]) -> Batch:
    """Augmented (B, 1, crop, crop) float32 images, {0, 1} labels and weights of one step."""
    host, dev = gens
    crops = sampler.sample(config.batch_size, context_size(config.crop, config.augment), config.crop, host)
    image, label, weight = augment_batch(*crops, config.crop, config.augment, dev)
    assert weight is not None  # the sampler always gives a weight map
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, label, weight


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """The forward pass's autocast context as a zero-argument factory (off when ``dtype`` is None)."""
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def optimizer_step(
    net: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    batch: Batch,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on an augmented batch, the forward pass under ``autocast()``, the loss
    scaled by ``scaler`` (fp16) and the gradients' norm clipped to ``clip``; (loss, logits)."""
    image, label, weight = batch
    try:
        with autocast():
            logits = net(image)
        loss = loss_fn(logits, label, weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                _clip(optimizer, clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip is not None:
                _clip(optimizer, clip)
            optimizer.step()
    except torch.cuda.OutOfMemoryError:
        raise EmsegRuntimeError(
            f"out of GPU memory with --batch-size {image.shape[0]} and --crop {image.shape[-1]}; "
            "try a smaller batch or crop"
        ) from None
    return loss, logits


def _clip(optimizer: torch.optim.Optimizer, clip: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)


class DurationEstimate:
    """Times a few steps after the first and says how long the run will take (a warning with a
    smaller configuration when the default network would train on a CPU for over an hour)."""

    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.device, self.clock, self.steps, self.started = device, clock, -1, 0.0

    def step_done(self, config: TrainConfig, remaining: int, spent: float) -> None:
        self.steps += 1
        if self.steps not in (0, ESTIMATE_STEPS):
            return
        synchronize(self.device)
        if self.steps == 0:
            self.started = self.clock()
            return
        per_step = (self.clock() - self.started) / ESTIMATE_STEPS
        seconds = remaining * per_step
        if config.time_limit is not None:
            seconds = min(seconds, max(0.0, config.time_limit - spent))
        text = f"{per_step:.2f} s per step: the remaining {remaining} steps take about {_duration(seconds)}"
        if config.time_limit is not None and seconds < remaining * per_step:
            text += f" (the time limit stops the run after about {round(seconds / per_step)} of them)"
        if seconds > 3600 and self.device.type == "cpu":
            log.warning("%s on this CPU; for a first model in minutes try the small configuration: %s", text, SMALL_CPU)
        else:
            log.info("%s", text)


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class EpochMeter:
    """Loss and pixel accuracy summed on the device since the epoch began (or the run resumed)."""

    def __init__(self, device: torch.device, shown_loss: float = float("nan")) -> None:
        self.loss, self.correct = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps, self.started, self.shown_loss = 0, time.perf_counter(), shown_loss

    def add(self, loss: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.correct += ((logits.detach() > 0) == (label > 0.5)).float().mean()
        self.steps += 1

    def crops_per_s(self, crops_per_step: int) -> float:
        return self.steps * crops_per_step / max(time.perf_counter() - self.started, 1e-9)

    def means(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"train_loss": float(self.loss) / n, "train_accuracy": float(self.correct) / n}


SMOOTHING = 3  # validations averaged to choose the best weights


def selection_score(rows: list[dict[str, Any]], row: dict[str, Any]) -> tuple[str, float, list[float]]:
    """The score that chooses the best weights: the mean V_rand of this validation and the
    ``SMOOTHING - 1`` before it (minus the training loss when nothing is validated). Three
    validation slices are a noisy judge; the weights are an EMA, so neighbouring validations judge
    nearly the same network, and one lucky score on three slices no longer picks the weights."""
    name = "v_rand" if "v_rand" in row else "-train_loss"

    def value(r: dict[str, Any]) -> float:
        return float(r["v_rand"]) if name == "v_rand" else -float(r["train_loss"])

    earlier = [value(r) for r in rows if r["epoch"] < row["epoch"] and (name != "v_rand" or "v_rand" in r)]
    window = [*earlier[-(SMOOTHING - 1) :], value(row)]
    return name, sum(window) / len(window), window


def save_epoch(
    run: RunDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    row: dict[str, Any],
    state: dict[str, Any],
    steps_per_epoch: int,
    average: WeightAverage | None = None,
) -> None:
    """Keep the best selection score in ``state`` (:func:`selection_score`) and save the resume
    point and checkpoints; the row says which weights were saved and why. The header also names
    the epoch and step in it, for people."""
    name, score, window = selection_score(run.rows, row)
    improved, previous = score > state["best"], state["best"]
    state["best"] = max(state["best"], score)
    row["weights"] = "ema" if average is not None else "raw"
    judged = f"mean {name} of {len(window)} validations ({' '.join(f'{v:.4f}' for v in window)}) {score:.4f}"
    if improved:
        row["saved"] = f"best+last: {judged} > {previous:.4f}"
    else:
        row["saved"] = f"last: {judged} <= best {previous:.4f}"
    if average is not None:
        state["ema_updates"] = average.updates
    step = state["step"]
    saved = {"step": step, "epoch": step // steps_per_epoch, "next_step": step % steps_per_epoch, **state}
    run.save(model, optimizer, meta, saved, improved, row, average)


def fit(
    data: str | Path,
    run_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Reporter | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train a network on ``data`` (an OME-Zarr store with labels/cells) into ``run_dir``.

    ``clock`` returns seconds (default ``time.perf_counter``): the time limit and the budget
    schedule read it, so a test can run a budget deterministically. Returns a summary: the run
    directory, finished epochs, whether the time limit stopped the run, the last validation
    scores, the best V_rand and the metrics rows.
    """
    clock = clock or time.perf_counter
    check_inputs(run_dir, [data])  # a run directory never overlaps the data it trains on
    dist, device = D.init_distributed(config.device)
    progress = reporter_or_null(progress if dist.is_main else None)
    image = open_training_store(str(data))
    train_idx, val_idx = split_slices(image.shape[0], config.val_slices)
    check_validation_labels(image, val_idx)  # before anything is written
    model = seeded_model(config)
    loss_fn = make_loss(config.loss)
    run = RunDir(run_dir)
    fast = True if is_cuda(device) else None
    claim = run.claim(resume, overwrite) if dist.is_main else contextlib.nullcontext()
    with backend_flags(cudnn_benchmark=fast, tf32=fast), claim:
        D.barrier(dist)
        train = load_slices(image, train_idx, config.w0, config.sigma)
        val = load_slices(image, val_idx, config.w0, config.sigma)
        norm = robust_normalization(train.raw, config.norm_percentiles)
        mean, std = norm["mean"], norm["std"]
        sampler = CropSampler(train, mean, std, device)
        model.to(device)
        if config.channels_last:  # faster on CUDA and on oneDNN CPUs alike
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
        meta = run.meta(
            config,
            {
                "normalization": norm,
                "halo": int(model.halo) if config.model.arch == "unet" else None,
                "divisor": int(model.divisor),
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_slices": train_idx,
                "val_slices": val_idx,
                "data": {
                    "path": str(Path(data).resolve()),
                    "shape": list(image.shape),
                    "voxel_size_nm": list(image.voxel_size),
                },
            },
        )
        state: dict[str, Any] = {"step": 0, "best": -math.inf, "elapsed": 0.0}
        if resume:
            state = run.resume(model, optimizer, config, average)
        if dist.is_main:
            run.write_config(meta)
        net = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
        forward = torch.compile(net) if config.compile else net
        amp = autocast_dtype(device, config.precision) if config.amp else None
        autocast = autocast_context(device, amp)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        judged = average.model if average is not None else model
        validate_model = functools.partial(validate, judged, val, mean, std, device, config, loss_fn, model.divisor)
        per_epoch, total = config.steps_per_epoch, config.epochs * config.steps_per_epoch
        if config.time_limit is None:
            progress.start("train", total=total, unit="steps")
        else:  # the budget, not the step count, ends the run: no ETA of hours for a 3-minute run
            progress.start(f"train (for {_duration(config.time_limit)})", total=None, unit="steps")
        progress.advance(state["step"])
        t0, stop, scores, meter = clock() - state["elapsed"], False, {}, EpochMeter(device)
        spent, sync_every, estimate = float(state["elapsed"]), SYNC_EVERY if dist.enabled else 1, None
        if dist.is_main and not config.compile:
            estimate = DurationEstimate(device, clock)
        for step in range(state["step"], total):
            epoch, epoch_ends = step // per_epoch, (step + 1) % per_epoch == 0
            lr = step_learning_rate(step, total, spent, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = draw_batch(sampler, config, generators(config.seed, epoch, step % per_epoch, dist.rank, device))
            loss, logits = optimizer_step(forward, optimizer, loss_fn, batch, autocast, scaler, config.grad_clip)
            if average is not None:
                average.update(model)
            meter.add(loss, logits, batch[1])
            check, bad = (step + 1) % sync_every == 0 or epoch_ends, False
            if meter.steps % 10 == 0 or epoch_ends:  # one host sync per 10 steps
                meter.shown_loss = float(loss.detach())
                check, bad = True, not math.isfinite(float(meter.loss))
            if check:  # the ranks agree on the time spent and on a non-finite loss (one all-reduce)
                spent, worst = D.max_across([clock() - t0, float(bad)], dist, device)
                if worst:
                    raise EmsegRuntimeError(
                        f"the loss became non-finite at epoch {epoch} step {step % per_epoch}; stopped, the last "
                        f"good checkpoint is kept in {run.path} (try a lower --lr)"
                    )
            stop = check and config.time_limit is not None and spent > config.time_limit
            if estimate is not None:
                estimate.step_done(config, total - step - 1, spent)
            shown: dict[str, Any] = {} if math.isnan(meter.shown_loss) else {"loss": meter.shown_loss}
            if config.time_limit is not None:
                shown["time_left"] = _duration(max(0.0, config.time_limit - spent))
            progress.advance(1, **shown, crops_per_s=meter.crops_per_s(config.batch_size * dist.world))
            state["step"] = step + 1
            if not (epoch_ends or stop):
                continue
            D.sync_buffers(model, dist)
            row: dict[str, Any] = {"epoch": epoch, "step": step + 1, **meter.means(), "lr": lr}
            if average is not None:
                D.sync_buffers(average.model, dist)
            if dist.is_main:
                if val.indices and ((epoch + 1) % config.val_every == 0 or stop or epoch + 1 == config.epochs):
                    scores = validate_model()
                    row.update(scores)
                state["elapsed"] = row["seconds"] = clock() - t0
                save_epoch(run, model, optimizer, meta, row, state, per_epoch, average)
            D.barrier(dist)
            meter = EpochMeter(device, shown_loss=meter.shown_loss)  # the last loss shown stays until the next
            if stop:
                log.info(
                    "time limit of %s s reached at epoch %d step %d", config.time_limit, epoch, step % per_epoch + 1
                )
                break
        digests = D.gather_digests(model, dist)
        if dist.is_main and dist.enabled:
            write_json_atomic(run.path / "ddp.json", {"world_size": dist.world, "weights_sha256": digests})
        progress.finish()
    D.shutdown(dist)
    return {
        "run_dir": str(run.path),
        "epochs_done": state["step"] // per_epoch,
        "stopped_early": stop,
        **scores,
        "best_v_rand": max((float(r["v_rand"]) for r in run.rows if "v_rand" in r), default=None),
        "selection_score": state["best"],
        "rows": run.rows,
    }
