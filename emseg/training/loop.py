"""fit(): the training loop, top to bottom: one flat loop over global steps (nanoGPT's shape).

Epoch ``step // steps_per_epoch`` ends with validation (a callable passed in) and a checkpoint, and
so does a stop at the time limit; the resume point is the next global step with the best score, the
elapsed time and the metrics rows, so ``--resume`` is just ``range(step, total)``. Randomness comes
only from generators seeded with (seed, epoch, step in the epoch, rank): the same seed gives the
same run on the CPU, and a resumed run continues exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from emseg.classes import classes_record
from emseg.config import INIT_LR, LR, TrainConfig
from emseg.device import autocast_dtype, backend_flags, is_cuda, synchronize
from emseg.errors import BadInputError, EmsegRuntimeError
from emseg.io.outputs import check_inputs, write_json_atomic
from emseg.io.zarr import OmeImage, store_classes
from emseg.models.base import SegmentationNet
from emseg.models.build import build_model
from emseg.models.checkpoint import read_checkpoint
from emseg.models.normalization import robust_normalization
from emseg.progress import Reporter, format_duration, reporter_or_null
from emseg.training import distributed as D
from emseg.training.augment import augment_batch, context_size
from emseg.training.data import (
    Annotated,
    CropSampler,
    check_validation_labels,
    load_slices,
    open_training_store,
    split_slices,
    training_label,
)
from emseg.training.ema import WeightAverage
from emseg.training.losses import Loss, make_loss
from emseg.training.run_dir import RunDir
from emseg.training.schedule import TimeBudget
from emseg.training.validate import Validate

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Split = tuple[list[int], list[int]]  # (training slices, validation slices)
#: Steps between host syncs: the loss is read from the device, and under DDP the ranks agree on
#: the time spent and on a finite loss (one all-reduce), every this many steps.
SYNC_EVERY = 10
#: Steps timed (after the first) for the estimate of the run's duration.
ESTIMATE_STEPS = 5
#: The README's small CPU configuration, suggested when the default would run for hours.
SMALL_CPU = "--depth 3 --base-channels 16 --crop 256 --batch-size 4 --steps-per-epoch 40 --epochs 10"


def generators(
    seed: int, epoch: int, step: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(host generator for crop positions, device generator for augmentation) of one step;
    ``step`` counts within the epoch."""
    key = ((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank
    host = torch.Generator().manual_seed(key % 2**63)
    dev = torch.Generator(device=device).manual_seed((key * 31 + 7) % 2**63) if is_cuda(device) else host
    return host, dev


def seeded_model(config: TrainConfig) -> SegmentationNet:
    """The network of ``config`` with initial weights that depend on the seed alone; refuses a
    crop the network cannot take."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model)
    if config.init is not None:  # the weights of a trained model (with_init made the network its)
        tensors = read_checkpoint(config.init)[0]
        own = model.state_dict()
        fresh = [k for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
        if fresh:  # another number of classes: every layer but the output one starts from it
            log.info("--init %s: %s start afresh (another number of output classes)", config.init, ", ".join(fresh))
        model.load_state_dict({k: (own[k] if k in fresh else v) for k, v in tensors.items()})
    if config.crop % model.divisor or config.crop < model.divisor:
        raise BadInputError(f"--crop {config.crop}: the model needs a multiple of {model.divisor}")
    return model


def with_classes(config: TrainConfig, image: OmeImage) -> TrainConfig:
    """``config`` with one output channel per class of the store's class image (``ingest --class``;
    a softmax network), or one (P(cell)) for a store of cells, and its peak learning rate when
    ``--lr`` was not given: :data:`~emseg.config.INIT_LR` for a network taken whole from
    ``--init``, :data:`~emseg.config.LR` otherwise (random weights, or a new output layer)."""
    classes = store_classes(image) if training_label(image) == "classes" else None
    n = 1 if classes is None else len(classes)
    if classes is not None and n < 2:
        raise BadInputError(f"{image.path}: labels/classes has one class; train on two or more (or on cells)")
    fresh_head = config.model.out_channels != n
    if fresh_head:
        config = replace(config, model=replace(config.model, out_channels=n))
    if config.lr is None:  # a tenth for a network taken whole from --init; a new output layer learns from scratch
        config = replace(config, lr=INIT_LR if config.init is not None and not fresh_head else LR)
    return config


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

    def step_done(self, budget: TimeBudget, remaining: int, spent: float) -> None:
        self.steps += 1
        if self.steps not in (0, ESTIMATE_STEPS):
            return
        synchronize(self.device)
        if self.steps == 0:
            self.started = self.clock()
            return
        per_step = (self.clock() - self.started) / ESTIMATE_STEPS
        seconds = min(remaining * per_step, budget.left(spent))
        text = f"{per_step:.2f} s per step: the remaining {remaining} steps take about {format_duration(seconds)}"
        if seconds < remaining * per_step:
            text += f" (the time limit stops the run after about {round(seconds / per_step)} of them)"
        if seconds > 3600 and self.device.type == "cpu":
            log.warning("%s on this CPU; for a first model in minutes try the small configuration: %s", text, SMALL_CPU)
        else:
            log.info("%s", text)


class Watch:
    """The checks after a step, in one all-reduce under DDP: a finite loss (read from the device every
    ``SYNC_EVERY`` steps of an epoch and at its end) and the seconds spent (at those steps too, and
    after every step in one process, every ``SYNC_EVERY`` global steps under DDP)."""

    def __init__(self, dist: D.Dist, device: torch.device, clock: Callable[[], float], spent: float) -> None:
        self.dist, self.device, self.clock = dist, device, clock
        self.t0, self.spent = clock() - spent, float(spent)
        self.every = SYNC_EVERY if dist.enabled else 1

    def elapsed(self) -> float:  # seconds of this run, earlier sessions included
        return self.clock() - self.t0

    def after_step(self, step: int, per_epoch: int, loss: torch.Tensor, meter: EpochMeter, run: Path) -> bool:
        """Whether the ranks checked after global ``step`` (then ``spent`` is fresh); refuses a non-finite loss."""
        epoch_ends = (step + 1) % per_epoch == 0
        check, bad = (step + 1) % self.every == 0 or epoch_ends, False
        if meter.steps % SYNC_EVERY == 0 or epoch_ends:
            meter.shown_loss = float(loss.detach())
            check, bad = True, not math.isfinite(float(meter.loss))
        if check:
            self.spent, worst = D.max_across([self.elapsed(), float(bad)], self.dist, self.device)
            if worst:
                raise EmsegRuntimeError(
                    f"the loss became non-finite at epoch {step // per_epoch} step {step % per_epoch}; stopped, the "
                    f"last good checkpoint is kept in {run} (try a lower --lr)"
                )
        return check


class EpochMeter:
    """Loss and pixel accuracy summed on the device since the epoch began (or the run resumed)."""

    def __init__(self, device: torch.device, shown_loss: float = float("nan")) -> None:
        self.loss, self.correct = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps, self.started, self.shown_loss = 0, time.perf_counter(), shown_loss

    def add(self, loss: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> None:
        self.loss += loss.detach()
        if logits.shape[1] == 1:
            self.correct += ((logits.detach() > 0) == (label > 0.5)).float().mean()
        else:  # the share of labelled pixels whose most probable class is theirs
            labelled = label[:, 0] > 0
            right = (logits.detach().argmax(1) + 1 == label[:, 0].long()) & labelled
            self.correct += right.sum() / labelled.sum().clamp(min=1)
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
    nearly the same network, and one lucky score on three slices no longer picks the weights. A
    network of several classes is judged by its mean IoU over the classes instead."""
    name = next((k for k in ("mean_iou", "v_rand") if k in row), "-train_loss")

    def value(r: dict[str, Any]) -> float:
        return -float(r["train_loss"]) if name == "-train_loss" else float(r[name])

    earlier = [value(r) for r in rows if r["epoch"] < row["epoch"] and (name == "-train_loss" or name in r)]
    window = [*earlier[-(SMOOTHING - 1) :], value(row)]
    return name, sum(window) / len(window), window


@dataclass
class Trainee:
    """The network in training and what its checkpoints hold besides: optimizer, weight average, meta."""

    model: SegmentationNet
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None
    meta: dict[str, Any]

    @property
    def judged(self) -> SegmentationNet:
        """The network that validation judges and the checkpoints hold: the average, if any."""
        return cast(SegmentationNet, self.average.model) if self.average is not None else self.model

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def update_average(self) -> None:
        if self.average is not None:
            self.average.update(self.model)


def make_trainee(model: SegmentationNet, config: TrainConfig, device: torch.device, meta: dict[str, Any]) -> Trainee:
    """``model`` moved to ``device`` in place (channels_last if configured), with AdamW and a weight average."""
    model.to(device)
    if config.channels_last:  # faster on CUDA and on oneDNN CPUs alike
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, weight_decay=config.weight_decay)
    return Trainee(model, optimizer, WeightAverage(model, config.ema_decay) if config.ema_decay else None, meta)


def load_data(
    image: OmeImage, split: Split, config: TrainConfig, device: torch.device
) -> tuple[CropSampler, Annotated, dict[str, Any]]:
    """(crops of the training slices on ``device``, the validation slices, the training slices' normalisation)."""
    train = load_slices(image, split[0], config.w0, config.sigma)
    val = load_slices(image, split[1], config.w0, config.sigma)
    norm = robust_normalization(train.raw, config.norm_percentiles)
    return CropSampler(train, norm["mean"], norm["std"], device), val, norm


def run_meta(
    run: RunDir, config: TrainConfig, model: SegmentationNet, norm: dict[str, Any], image: OmeImage, split: Split
) -> dict[str, Any]:
    """The run's description, in config.json and every checkpoint."""
    data = {"path": str(image.path.resolve()), "shape": list(image.shape), "voxel_size_nm": list(image.voxel_size)}
    extra = {
        "normalization": norm,
        "halo": int(model.halo) if config.model.arch == "unet" else None,
        "divisor": int(model.divisor),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_slices": split[0],
        "val_slices": split[1],
        "data": data,
        **({"classes": classes_record(classes)} if (classes := store_classes(image)) is not None else {}),
    }
    return run.meta(config, extra)


def start_progress(progress: Reporter, budget: TimeBudget, total: int, done: int) -> None:
    """Steps to go, or, when the budget ends the run, the budget (no ETA of hours for a 3-minute run)."""
    if budget.seconds is None:
        progress.start("train", total=total, unit="steps")
    else:
        progress.start(f"train (for {format_duration(budget.seconds)})", total=None, unit="steps")
    progress.advance(done)


def progress_fields(meter: EpochMeter, budget: TimeBudget, spent: float, crops_per_step: int) -> dict[str, Any]:
    """The progress line after a step: the last loss read (none before the first), time left, crops per second."""
    shown: dict[str, Any] = {} if math.isnan(meter.shown_loss) else {"loss": meter.shown_loss}
    if budget.seconds is not None:
        shown["time_left"] = format_duration(budget.left(spent))
    return {**shown, "crops_per_s": meter.crops_per_s(crops_per_step)}


def validation_due(config: TrainConfig, epoch: int, stop: bool) -> bool:
    """Every ``val_every`` epochs, after the last and when the time limit stops the run."""
    return (epoch + 1) % config.val_every == 0 or stop or epoch + 1 == config.epochs


def end_epoch(
    run: RunDir,
    trainee: Trainee,
    state: dict[str, Any],
    row: dict[str, Any],
    judge: Callable[[], dict[str, float]] | None,
    watch: Watch,
    steps_per_epoch: int,
) -> dict[str, float]:
    """The end of an epoch or of the budget: the ranks' buffers made equal; on the main rank ``judge``
    run (validation, when due), the best :func:`selection_score` kept in ``state``, the checkpoints
    saved and ``row`` (which weights, and why) added to metrics.csv. Returns the scores, {} if none."""
    D.sync_buffers(trainee.model, watch.dist)
    if trainee.average is not None:
        D.sync_buffers(trainee.average.model, watch.dist)
    scores = judge() if judge is not None and watch.dist.is_main else {}
    if watch.dist.is_main:
        row.update(scores)
        state["elapsed"] = row["seconds"] = watch.elapsed()
        name, score, window = selection_score(run.rows, row)
        improved, previous = score > state["best"], state["best"]
        state["best"] = max(state["best"], score)
        row["weights"] = "ema" if trainee.average is not None else "raw"
        why = f"mean {name} of {len(window)} validations ({' '.join(f'{v:.4f}' for v in window)}) {score:.4f}"
        row["saved"] = f"best+last: {why} > {previous:.4f}" if improved else f"last: {why} <= best {previous:.4f}"
        if trainee.average is not None:
            state["ema_updates"] = trainee.average.updates
        step = state["step"]
        saved = {"step": step, "epoch": step // steps_per_epoch, "next_step": step % steps_per_epoch, **state}
        run.save(trainee.model, trainee.optimizer, trainee.meta, saved, improved, row, trainee.average)
    D.barrier(watch.dist)
    return scores


def write_ddp_record(run: RunDir, model: nn.Module, dist: D.Dist) -> None:
    """ddp.json under DDP: the world size and each rank's weights digest (they must agree)."""
    digests = D.gather_digests(model, dist)
    if dist.is_main and dist.enabled:
        write_json_atomic(run.path / "ddp.json", {"world_size": dist.world, "weights_sha256": digests})


def summary(run: RunDir, state: dict[str, Any], per_epoch: int, stopped: bool, scores: dict[str, float]) -> dict:
    """What :func:`fit` returns: run directory, epochs done, stopped early, last scores, best V_rand, rows."""
    return {
        "run_dir": str(run.path),
        "epochs_done": state["step"] // per_epoch,
        "stopped_early": stopped,
        **scores,
        "best_v_rand": max((float(r["v_rand"]) for r in run.rows if "v_rand" in r), default=None),
        "selection_score": state["best"],
        "rows": run.rows,
    }


def fit(
    data: str | Path,
    run_dir: str | Path,
    config: TrainConfig,
    *,
    validate: Validate,
    progress: Reporter | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train a network on ``data`` (an OME-Zarr store with labels/cells) into ``run_dir``; see :func:`summary`.

    ``validate`` scores the judged network on the held-out slices at epoch ends (built above the
    loop: :func:`~emseg.training.validate.validator` of ``config`` for the standard one);
    ``config.resume`` continues the run there, ``config.overwrite`` starts it afresh. The time
    budget reads ``clock`` (default ``time.perf_counter``): a test can fake it.
    """
    clock = clock or time.perf_counter
    resume, overwrite = config.resume, config.overwrite
    check_inputs(run_dir, [data])  # a run directory never overlaps the data it trains on
    dist, device = D.init_distributed(config.device)
    progress = reporter_or_null(progress if dist.is_main else None)
    image = open_training_store(str(data))
    split = split_slices(image.shape[0], config.val_slices)
    check_validation_labels(image, split[1])  # before anything is written
    config = with_classes(config, image)
    model, budget, run = seeded_model(config), TimeBudget.of(config), RunDir(run_dir)
    loss_fn = make_loss(config.loss, config.model.out_channels)
    fast = True if is_cuda(device) else None
    claim = run.claim(resume, overwrite) if dist.is_main else contextlib.nullcontext()
    with backend_flags(cudnn_benchmark=fast, tf32=fast), claim:
        D.barrier(dist)
        sampler, val, norm = load_data(image, split, config, device)
        trainee = make_trainee(model, config, device, run_meta(run, config, model, norm, image, split))
        state: dict[str, Any] = {"step": 0, "best": -math.inf, "elapsed": 0.0}
        if resume:
            state = run.resume(model, trainee.optimizer, config, trainee.average)
        if dist.is_main:
            run.write_config(trainee.meta)
        net = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
        forward = torch.compile(net) if config.torch_compile else net
        amp = autocast_dtype(device, config.precision) if config.amp else None
        autocast = autocast_context(device, amp)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        judge = functools.partial(validate, trainee.judged, val, (norm["mean"], norm["std"])) if val.indices else None
        per_epoch, total = config.steps_per_epoch, config.epochs * config.steps_per_epoch
        start_progress(progress, budget, total, state["step"])
        watch, meter, stop = Watch(dist, device, clock, state["elapsed"]), EpochMeter(device), False
        scores: dict[str, float] = {}  # of the last validation
        estimate = DurationEstimate(device, clock) if dist.is_main and not config.torch_compile else None
        for step in range(state["step"], total):
            epoch, epoch_ends = step // per_epoch, (step + 1) % per_epoch == 0
            lr = budget.learning_rate(step, total, watch.spent, config)
            trainee.set_learning_rate(lr)
            batch = draw_batch(sampler, config, generators(config.seed, epoch, step % per_epoch, dist.rank, device))
            loss, logits = optimizer_step(
                forward, trainee.optimizer, loss_fn, batch, autocast, scaler, config.grad_clip
            )
            trainee.update_average()
            meter.add(loss, logits, batch[1])
            stop = watch.after_step(step, per_epoch, loss, meter, run.path) and budget.exhausted(watch.spent)
            if estimate is not None:
                estimate.step_done(budget, total - step - 1, watch.spent)
            progress.advance(1, **progress_fields(meter, budget, watch.spent, config.batch_size * dist.world))
            state["step"] = step + 1
            if not (epoch_ends or stop):
                continue
            row = {"epoch": epoch, "step": step + 1, **meter.means(), "lr": lr}
            judge_now = judge if validation_due(config, epoch, stop) else None
            scores = end_epoch(run, trainee, state, row, judge_now, watch, per_epoch) or scores
            meter = EpochMeter(device, shown_loss=meter.shown_loss)  # the last loss shown stays until the next
            if stop:
                log.info("time limit of %s s reached at epoch %d step %d", budget.seconds, epoch, step % per_epoch + 1)
                break
        write_ddp_record(run, model, dist)
        if dist.is_main:
            run.finish()
        progress.finish()
    D.shutdown(dist)
    return summary(run, state, per_epoch, stop, scores)
