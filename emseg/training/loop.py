"""fit(): the training loop, top to bottom.

Randomness comes only from generators seeded with (seed, epoch, step, rank): the same seed gives
the same run on the CPU, and ``--resume`` continues exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from emseg.config import TrainConfig
from emseg.device import autocast_dtype, is_cuda
from emseg.errors import BadInputError, EmsegRuntimeError
from emseg.io.atomic import check_output
from emseg.models.build import build_model
from emseg.progress import Reporter, reporter_or_null
from emseg.training import distributed as D
from emseg.training.augment import augment_batch, context_size
from emseg.training.data import CropSampler, load_slices, normalization, open_training_store, split_slices
from emseg.training.losses import Loss, make_loss
from emseg.training.run import RunDir
from emseg.training.validate import validate

log = logging.getLogger(__name__)
RUN_FILES = ("config.json", "best.safetensors", "last.safetensors", "optimizer.safetensors", "metrics.csv", "curves.png", "ddp.json")


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up (at most 10 % of the run), then cosine decay to lr * min_lr_ratio."""
    warmup = min(config.warmup_steps, max(1, total // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def generators(seed: int, epoch: int, step: int, rank: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(host generator for crop positions, device generator for augmentation) of one step."""
    key = ((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank
    host = torch.Generator().manual_seed(key % 2**63)
    dev = torch.Generator(device=device).manual_seed((key * 31 + 7) % 2**63) if is_cuda(device) else host
    return host, dev


def optimizer_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss,
                   batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on an augmented (image, label, weight) batch under autocast; (loss, logits)."""
    image, label, weight = batch
    with torch.autocast(image.device.type, dtype=amp, enabled=amp is not None):
        logits = net(image)
    loss = loss_fn(logits, label, weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing run needs --resume or --overwrite (which removes only the
    files emseg writes there)."""
    if path.is_symlink():
        raise BadInputError(f"{path}: is a symbolic link; give the real path of the run directory")
    existing = [f for f in RUN_FILES if (path / f).exists()]
    if existing and not resume and not overwrite:
        raise BadInputError(f"{path}: already holds a run ({', '.join(existing)}); use --resume or --overwrite")
    if overwrite and not resume:
        for f in existing:
            (path / f).unlink()
    if not path.exists():
        check_output(path, overwrite=False, kind="run")
    path.mkdir(parents=True, exist_ok=True)


def fit(data: str | Path, run_dir: str | Path, config: TrainConfig, *, resume: bool = False,
        overwrite: bool = False, progress: Reporter | None = None) -> dict[str, Any]:
    """Train a network on ``data`` (an OME-Zarr store with labels/cells) into ``run_dir``."""
    dist, device = D.init_distributed(config.device)
    progress = reporter_or_null(progress if dist.is_main else None)
    image = open_training_store(str(data))
    train_idx, val_idx = split_slices(image.shape[0], config.val_slices)
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(config.seed)
        model = build_model(config.model)
    if config.crop % model.divisor or config.crop < model.divisor:
        raise BadInputError(f"--crop {config.crop}: the model needs a multiple of {model.divisor}")
    if dist.is_main:
        prepare_run_dir(Path(run_dir), resume, overwrite)
    D.barrier(dist)
    run = RunDir(run_dir)
    train = load_slices(image, train_idx, config.w0, config.sigma)
    val = load_slices(image, val_idx, config.w0, config.sigma)
    mean, std = normalization(train.raw)
    sampler = CropSampler(train, mean, std, device)
    model.to(device)
    if is_cuda(device):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if config.channels_last:  # faster on CUDA and on oneDNN CPUs alike
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = make_loss(config.loss)
    meta = run.meta(config, {
        "normalization": {"mean": mean, "std": std}, "halo": int(model.halo) if config.model.arch == "unet" else None, "divisor": int(model.divisor),
        "parameters": sum(p.numel() for p in model.parameters()), "train_slices": train_idx, "val_slices": val_idx,
        "data": {"path": str(Path(data).resolve()), "shape": list(image.shape), "voxel_size_nm": list(image.voxel_size)},
    })
    state = {"epoch": 0, "next_step": 0, "best": -math.inf, "elapsed": 0.0}
    if resume:
        state = {**state, **run.resume(model, optimizer, config)}
    if dist.is_main:
        run.write_config(meta)
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    step_fn = torch.compile(net) if config.compile else net
    amp = autocast_dtype(device) if config.amp else None
    ctx = context_size(config.crop, config.augment)
    total = config.epochs * config.steps_per_epoch
    progress.start("train", total=total, unit="steps")
    progress.advance(state["epoch"] * config.steps_per_epoch + state["next_step"])
    t0, stop, last_scores = time.perf_counter() - state["elapsed"], False, {}
    for epoch in range(state["epoch"], config.epochs):
        running = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        first = state["next_step"] if epoch == state["epoch"] else 0
        steps_done, t_epoch, shown_loss = 0, time.perf_counter(), float("nan")
        for step in range(first, config.steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch * config.steps_per_epoch + step, total, config)
            host_gen, dev_gen = generators(config.seed, epoch, step, dist.rank, device)
            image_b, label_b, weight_b = sampler.sample(config.batch_size, ctx, config.crop, host_gen)
            image_b, label_b, weight_b = augment_batch(image_b, label_b, weight_b, config.crop, config.augment, dev_gen)
            if config.channels_last:
                image_b = image_b.contiguous(memory_format=torch.channels_last)
            try:
                loss, logits = optimizer_step(step_fn, optimizer, loss_fn, (image_b, label_b, weight_b), amp)
            except torch.cuda.OutOfMemoryError:
                raise EmsegRuntimeError(
                    f"out of GPU memory with --batch-size {config.batch_size} and --crop {config.crop}; "
                    "try a smaller batch or crop"
                ) from None
            running += loss.detach()
            correct += ((logits.detach() > 0) == (label_b > 0.5)).float().mean()
            steps_done += 1
            state["next_step"] = step + 1
            if steps_done % 10 == 0 or step + 1 == config.steps_per_epoch:  # one host sync per 10 steps
                shown_loss = float(loss.detach())
                if D.any_flag(not math.isfinite(float(running)), dist, device):
                    raise EmsegRuntimeError(
                        f"the loss became non-finite at epoch {epoch} step {step}; stopped, the last good "
                        f"checkpoint is kept in {run.path} (try a lower --lr)"
                    )
            over_time = config.time_limit is not None and time.perf_counter() - t0 > config.time_limit
            stop = D.any_flag(over_time, dist, device)
            crops_per_s = steps_done * config.batch_size * dist.world / max(time.perf_counter() - t_epoch, 1e-9)
            progress.advance(1, loss=shown_loss, crops_per_s=crops_per_s)
            if stop:
                break
        D.sync_buffers(model, dist)
        global_step = epoch * config.steps_per_epoch + state["next_step"]
        if state["next_step"] == config.steps_per_epoch:
            state.update(epoch=epoch + 1, next_step=0)
        row: dict[str, Any] = {
            "epoch": epoch, "step": global_step,
            "train_loss": float(running) / max(steps_done, 1), "train_accuracy": float(correct) / max(steps_done, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if dist.is_main:
            if val.indices and ((epoch + 1) % config.val_every == 0 or stop or epoch + 1 == config.epochs):
                last_scores = validate(model, val, mean, std, device, config, loss_fn, model.divisor)
                row.update(last_scores)
            score = row.get("v_rand", -row["train_loss"])
            best = score > state["best"]
            state["best"] = max(state["best"], score)
            state["elapsed"] = row["seconds"] = time.perf_counter() - t0
            run.save(model, optimizer, meta, dict(state), best, row)
        D.barrier(dist)
        if stop:
            log.info("time limit of %s s reached at epoch %d step %d", config.time_limit, epoch, state["next_step"])
            break
    digests = D.gather_digests(model, dist)
    if dist.is_main and dist.enabled:
        from emseg.io.atomic import write_json_atomic

        write_json_atomic(run.path / "ddp.json", {"world_size": dist.world, "weights_sha256": digests})
    progress.finish()
    D.shutdown(dist)
    return {"run_dir": str(run.path), "epochs_done": state["epoch"], "stopped_early": stop, **last_scores,
            "best_v_rand": state["best"] if val.indices else None, "rows": run.rows}

