"""Frozen configuration dataclasses. Every default of emseg lives here and only here.

A config is plain data (numbers, strings, tuples) so it converts to and from JSON losslessly;
the whole training config goes into every checkpoint, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

#: ISBI 2012 voxel size in nanometres (z, y, x).
ISBI_VOXEL_SIZE_NM = (50.0, 4.0, 4.0)


@dataclass(frozen=True)
class IngestConfig:
    """How ``emseg ingest`` writes an OME-Zarr store."""

    #: NGFF version: "0.4" (zarr v2, widest viewer support) or "0.5" (zarr v3).
    ngff: str = "0.4"
    #: Chunk shape (z, y, x), clipped to the image.
    chunks: tuple[int, int, int] = (1, 1024, 1024)
    #: Shard shape (z, y, x) for NGFF 0.5; None writes no shards.
    shards: tuple[int, int, int] | None = None
    #: Voxel size (z, y, x) in nanometres; None reads it from the source, else 1 with a warning.
    voxel_size: tuple[float, float, float] | None = None
    #: Downsample by 2 in y and x until the largest side is at most this many pixels.
    pyramid_min_size: int = 1024
    #: Blosc-zstd compression level.
    clevel: int = 3
    #: Replace an existing output store.
    overwrite: bool = False


@dataclass(frozen=True)
class AugmentConfig:
    """Joint augmentation of image, label and weight map (see ``emseg.train.augment``)."""

    #: Random 90-degree rotations and flips.
    flips: bool = True
    #: Probability of a random affine transform.
    affine_p: float = 0.75
    #: Rotation range in degrees (uniform in [-rotate, rotate]).
    rotate: float = 45.0
    #: Isotropic scale range (log-uniform between the two).
    scale: tuple[float, float] = (0.8, 1.25)
    #: Shear range in degrees (uniform in [-shear, shear]).
    shear: float = 8.0
    #: Translation range as a fraction of the crop size.
    translate: float = 0.05
    #: Probability of an elastic deformation.
    elastic_p: float = 0.75
    #: Elastic displacement magnitude alpha in pixels (uniform in the range).
    elastic_alpha: tuple[float, float] = (100.0, 300.0)
    #: Smoothing sigma of the random displacement field in pixels (uniform in the range).
    elastic_sigma: tuple[float, float] = (10.0, 15.0)
    #: Probability of brightness/contrast jitter.
    intensity_p: float = 0.8
    #: Brightness offset range (in units of the normalised image's standard deviation).
    brightness: float = 0.15
    #: Contrast factor range (uniform).
    contrast: tuple[float, float] = (0.8, 1.25)
    #: Probability of additive Gaussian noise.
    noise_p: float = 0.3
    #: Noise standard deviation range (normalised units).
    noise_std: tuple[float, float] = (0.0, 0.1)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build; stored in every checkpoint so it rebuilds itself."""

    #: "unet" (emseg's U-Net) or "smp:ENCODER" (a segmentation-models-pytorch U-Net).
    arch: str = "unet"
    #: Levels of down-sampling of the custom U-Net (input sizes must be multiples of 2**depth).
    depth: int = 4
    #: Channels of the first level of the custom U-Net (doubling per level).
    base_channels: int = 64
    #: Pretrained encoder weights for smp architectures ("imagenet" needs internet); None offline.
    encoder_weights: str | None = None
    in_channels: int = 1
    out_channels: int = 1


LOSSES = ("weighted-bce", "bce", "dice", "bce+dice")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``emseg train`` needs besides the data; saved whole in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 50
    steps_per_epoch: int = 100
    batch_size: int = 16
    #: Side of the square training crops (a multiple of the model's divisor).
    crop: int = 384
    #: Peak learning rate of AdamW (after linear warm-up, then cosine decay to lr * min_lr_ratio).
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    #: "weighted-bce" (U-Net weight map), "bce", "dice" or "bce+dice".
    loss: str = "weighted-bce"
    #: U-Net weight map: border weight w0 and width sigma (pixels).
    w0: float = 10.0
    sigma: float = 5.0
    #: Held-out slices for validation; None = the last 10 % (at least one).
    val_slices: tuple[int, ...] | None = None
    seed: int = 0
    #: Stop cleanly at the first step past this many seconds (then validate and save).
    time_limit: float | None = None
    device: str = "auto"
    #: bf16 autocast on CUDA.
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    #: Validation tiles (full held-out slices, through the predict engine).
    val_tile: int = 512
    val_overlap: int = 64
    #: Validate every this many epochs (and always after the last).
    val_every: int = 1


@dataclass(frozen=True)
class PredictConfig:
    """How ``emseg predict`` tiles, blends, batches and schedules."""

    tile: int = 512
    overlap: int = 64
    batch_size: int = 8
    #: "gaussian" (sigma = tile / 8), "linear" (ramps over the overlap) or "crop" (centres only).
    blend: str = "gaussian"
    #: Average the 8 rotations and flips.
    tta: bool = False
    #: Membranes are where P(cell) < threshold.
    threshold: float = 0.5
    #: Stored probabilities: "uint8" (0-255), "float16" or "float32".
    dtype: str = "uint8"
    #: Slices [start, stop) of the input to predict; None = all.
    slices: tuple[int, int] | None = None
    device: str = "auto"
    #: Block side (pixels) a task computes, rounded to whole output chunks; an axis at most
    #: 1.5 times this is one block. Larger blocks mean fewer tiles cut at block borders.
    block: int = 8192
    #: Block tasks run at once per process (they overlap reading and writing with inference).
    threads: int = 3
    #: Start a local dask.distributed cluster of this many processes.
    workers: int | None = None
    #: Address of an existing dask.distributed scheduler (tcp://HOST:PORT).
    scheduler: str | None = None
    compile: bool = False
    overwrite: bool = False
    resume: bool = False


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error.

    Nested dataclass fields and tuple fields are restored to their declared types.
    """
    hints = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = _default_of(hints[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


__all__ = ["IngestConfig", "AugmentConfig", "ModelConfig", "TrainConfig", "PredictConfig", "LOSSES", "ISBI_VOXEL_SIZE_NM", "to_dict", "from_dict", "field"]
