"""Frozen configuration dataclasses. Every default of emseg lives here and only here.

A config is plain data (numbers, strings, tuples) so it converts to and from JSON losslessly;
the whole training config goes into every checkpoint, so a checkpoint alone rebuilds its model.

The Python API and the CLI read their defaults from here: API keywords default to ``None`` and
:func:`merge` lets a keyword that was given replace the field of a config that was passed (or of
the defaults), so ``predict(..., config=PredictConfig(tile=256))`` runs with tile 256 and
``predict(..., tile=128, config=PredictConfig(tile=256))`` with tile 128. Fields given as text
(``slices="27:30"``) or lists are normalised when a config is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from emseg.errors import BadInputError

T = TypeVar("T")

#: ISBI 2012 voxel size in nanometres (z, y, x).
ISBI_VOXEL_SIZE_NM = (50.0, 4.0, 4.0)


def slice_range(spec: str | Sequence[int], option: str = "--slices") -> tuple[int, int]:
    """The one slice-range parser: ``"A:B"`` or ``(A, B)`` -> (A, B), half-open, 0 <= A < B."""
    try:
        if isinstance(spec, str):
            a, b = spec.split(":", 1)
            start, stop = int(a), int(b)
        else:
            start, stop = (int(v) for v in spec)
    except (TypeError, ValueError):
        raise BadInputError(f"{option} {spec!r}: expected A:B (slices A to B - 1)") from None
    if not 0 <= start < stop:
        raise BadInputError(f"{option} {spec!r}: expected 0 <= A < B")
    return start, stop


def slice_list(spec: str | Sequence[int], option: str = "--val-slices") -> tuple[int, ...]:
    """``"27:30"`` (via :func:`slice_range`), ``"27,28,29"``, ``"27"`` or a sequence -> (27, 28, 29)."""
    if isinstance(spec, str) and ":" in spec:
        return tuple(range(*slice_range(spec, option)))
    try:
        values = [int(t) for t in spec.split(",") if t.strip()] if isinstance(spec, str) else [int(v) for v in spec]
    except (TypeError, ValueError):
        raise BadInputError(f"{option} {spec!r}: expected A:B or a comma-separated list") from None
    if not values or min(values) < 0:
        raise BadInputError(f"{option} {spec!r}: expected slice indices >= 0")
    return tuple(values)


def _tuple(value: Any, kind: type, n: int | None, option: str) -> Any:
    """A list or tuple given for a tuple field, as a tuple of ``kind`` (None stays None)."""
    if value is None:
        return None
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise BadInputError(f"{option} {value!r}: expected {n or 'some'} numbers") from None
    if n is not None and len(out) != n:
        raise BadInputError(f"{option} {value!r}: expected {n} numbers")
    return out


def _at_least(config: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= minimum:  # also refuses NaN
            raise BadInputError(f"--{name.replace('_', '-')} {value}: must be at least {minimum:g}")


#: Seeds are what numpy's SeedSequence and torch take alike: 0 to 2**63 - 1.
MAX_SEED = 2**63 - 1


def _seed(config: Any) -> None:
    if not 0 <= config.seed <= MAX_SEED:
        raise BadInputError(f"--seed {config.seed}: must be within 0 and 2**63 - 1")


def _positive(config: Any, *names: str) -> None:
    import math

    for name in names:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BadInputError(f"--{name.replace('_', '-')} {value}: must be a positive number")


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
    #: Of a TIFF holding several series that do not form one stack: the one to ingest.
    series: int | None = None
    #: Of a TIFF with several channels: the one to ingest.
    channel: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngff", str(self.ngff))
        object.__setattr__(self, "chunks", _tuple(self.chunks, int, 3, "--chunks"))
        object.__setattr__(self, "shards", _tuple(self.shards, int, 3, "--shards"))
        object.__setattr__(self, "voxel_size", _tuple(self.voxel_size, float, 3, "--voxel-size"))


@dataclass(frozen=True)
class ExportConfig:
    """How ``emseg export`` writes a store as TIFF or PNG slices."""

    #: "tif" (an ImageJ hyperstack; an OME-TIFF when ImageJ cannot hold the data), "ome-tiff" or
    #: "png" (a folder of slices); None picks ome-tiff for .ome.tif, tif for .tif/.tiff.
    file_format: str | None = None
    #: Export ``labels/NAME`` (e.g. "membranes") as 0/255 instead of the image.
    labels: str | None = None
    #: Pyramid level.
    level: int = 0
    overwrite: bool = False


@dataclass(frozen=True)
class PreviewConfig:
    """What ``emseg augment-preview`` draws."""

    #: Crop side in pixels.
    crop: int = 256
    #: Augmented image/mask pairs to draw.
    samples: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, 16, "crop")
        _at_least(self, 1, "samples")
        _seed(self)
        check_batch_memory(self.crop, self.samples, "--crop", "--samples")


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
    #: Probability of a gamma change (exponent log-uniform in ``gamma``, on each sample's [min, max]).
    gamma_p: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.4)
    #: Probability of a Gaussian blur (sigma uniform in ``blur_sigma`` pixels): focus and
    #: resolution differ between sessions.
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.5)


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

    def __post_init__(self) -> None:
        if self.encoder_weights is not None and not str(self.arch).startswith("smp:"):
            raise BadInputError(
                f"--encoder-weights {self.encoder_weights}: pretrained weights need an smp encoder "
                "(--arch smp:ENCODER); emseg's own U-Net starts from random weights"
            )


LOSSES = ("weighted-bce", "bce", "dice", "bce+dice")
#: "auto": bf16 autocast where the device computes bf16 natively (CUDA with native bf16, CPUs with
#: AVX512-BF16 or AMX), else fp32; "fp32" and "bf16" force one.
PRECISIONS = ("auto", "fp32", "bf16")
#: How predict normalises intensities (see PredictConfig.normalization).
NORMALIZATIONS = ("stack", "checkpoint")


def _choice(value: str, choices: tuple[str, ...], option: str) -> None:
    if value not in choices:
        raise BadInputError(f"{option} {value!r}: expected one of {', '.join(choices)}")


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
    #: With a time limit, the warm-up ends at this fraction of the budget (or after
    #: ``warmup_steps``, whichever comes first) and the cosine decay ends with the budget.
    warmup_fraction: float = 0.1
    #: Exponential moving average of the weights, used for validation and the checkpoints
    #: (decay per step, ramped up as (1 + t) / (10 + t) early on); None trains without one.
    ema_decay: float | None = 0.99
    #: Clip the gradients' total norm to this (None: no clipping).
    grad_clip: float | None = 1.0
    #: Intensity normalisation: the training stack's robust percentiles (low, high); predict
    #: maps a new stack's same percentiles onto the same values.
    norm_percentiles: tuple[float, float] = (1.0, 99.0)
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
    #: Autocast (mixed precision) at all; ``precision`` says which.
    amp: bool = True
    #: "auto", "fp32" or "bf16" (see PRECISIONS).
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    #: Validation tiles (full held-out slices, through the predict engine).
    val_tile: int = 512
    val_overlap: int = 64
    #: Validate every this many epochs (and always after the last).
    val_every: int = 1

    def __post_init__(self) -> None:
        if self.val_slices is not None:
            object.__setattr__(self, "val_slices", slice_list(self.val_slices))
        _at_least(self, 1, "epochs", "steps_per_epoch", "batch_size", "crop", "val_every")
        _seed(self)
        check_batch_memory(self.crop, self.batch_size, "--crop")
        _choice(self.precision, PRECISIONS, "--precision")
        _positive(self, "lr", "time_limit", "ema_decay", "grad_clip", "warmup_fraction")
        object.__setattr__(self, "norm_percentiles", _tuple(self.norm_percentiles, float, 2, "norm_percentiles"))


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
    #: "auto", "fp32" or "bf16" (see PRECISIONS).
    precision: str = "auto"
    #: "stack": the input stack's robust percentiles mapped onto the training stack's (for
    #: checkpoints that record them; else as "checkpoint"); "checkpoint": the training stack's.
    normalization: str = "stack"
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _choice(self.precision, PRECISIONS, "--precision")
        _choice(self.normalization, NORMALIZATIONS, "--normalization")
        if self.slices is not None:
            object.__setattr__(self, "slices", slice_range(self.slices))
        _at_least(self, 1, "tile", "batch_size", "block", "threads", "workers")
        _at_least(self, 0, "overlap")
        check_batch_memory(self.tile, self.batch_size, "--tile")


@dataclass(frozen=True)
class Limits:
    """Bounds on what a file emseg reads may make it allocate; each can be raised with the
    environment variable named in its comment (for data that really is that large)."""

    #: Pixels of one slice (EMSEG_MAX_SLICE_PIXELS): 2**32, e.g. 65536 x 65536.
    max_slice_pixels: int = 2**32
    #: Bytes one TIFF strip or tile decodes to at once (EMSEG_MAX_DECODE_BYTES): 1 GiB.
    max_decode_bytes: int = 2**30
    #: Model depth (EMSEG_MAX_DEPTH), first-level channels (EMSEG_MAX_CHANNELS) and estimated
    #: parameter count (EMSEG_MAX_PARAMETERS) a checkpoint or the options may ask for.
    max_depth: int = 8
    max_channels: int = 1024
    max_parameters: int = 2 * 10**9
    #: Bytes of one zarr chunk (EMSEG_MAX_CHUNK_BYTES) and of one array (EMSEG_MAX_ARRAY_BYTES).
    max_chunk_bytes: int = 2**31
    max_array_bytes: int = 2**50
    #: Estimated bytes of a training crop batch or a prediction tile batch (EMSEG_MAX_BATCH_BYTES):
    #: batch x side² x 128 bytes (about 32 float32 values per pixel held at once).
    max_batch_bytes: int = 2**38
    #: Worker processes of a local dask cluster (EMSEG_MAX_LOCAL_WORKERS).
    max_local_workers: int = 64

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, with every ``EMSEG_<FIELD>`` environment variable that is set replacing its field."""
        import os

        changes: dict[str, int] = {}
        for f in dataclasses.fields(cls):
            name = "EMSEG_" + f.name.upper()
            if os.environ.get(name):
                try:
                    changes[f.name] = int(float(os.environ[name]))
                except ValueError:
                    raise BadInputError(f"{name}={os.environ[name]!r}: expected a number") from None
        return dataclasses.replace(cls(), **changes)


def check_batch_memory(side: int, batch: int, option: str, batch_option: str = "--batch-size") -> None:
    """Refuse a crop or tile side (``option``) whose batch could not fit in any memory, from the
    estimate of :attr:`Limits.max_batch_bytes`, before anything is allocated."""
    limits = Limits.from_env()
    if side * side > limits.max_slice_pixels:
        raise BadInputError(
            f"{option} {side}: more than the limit of {limits.max_slice_pixels} pixels (EMSEG_MAX_SLICE_PIXELS)"
        )
    need = batch * side * side * 128
    if need > limits.max_batch_bytes:
        raise BadInputError(
            f"{option} {side} with {batch_option} {batch}: about {need / 2**30:.0f} GiB of activations, more than the "
            f"limit of {limits.max_batch_bytes / 2**30:.0f} GiB (raise it with EMSEG_MAX_BATCH_BYTES)"
        )


SEGMENT_MODES = ("2d", "3d")


@dataclass(frozen=True)
class SegmentConfig:
    """How ``emseg segment`` turns P(cell) into instance labels. The defaults score best at their
    worst, against the best threshold of the same P(cell), over five sets, none of them ISBI's
    held-out 27-29: four cross-validation folds of ISBI slices 0-26 (each predicted by a small
    model that did not train on it) and ``emseg demo``'s synthetic stack predicted by its
    3-minute model (benchmarks/README.md)."""

    #: "2d": every slice on its own (serial sections); "3d": volumes, anisotropy from the voxel size.
    mode: str = "2d"
    #: Seeds grow from the distance transform of the pixels with P(cell) above this.
    seed_threshold: float = 0.7
    #: "maxima": distance maxima within 2 * min_distance + 1 pixels; "cores": the confident
    #: regions farther than min_distance from the membrane (finest axis in 3D).
    seeds: str = "cores"
    min_distance: int = 4
    #: Neighbouring segments merge, lowest border first, while the mean P(membrane) along their
    #: whole shared border is below this.
    merge_threshold: float = 0.78
    #: Segments of fewer pixels (voxels) join their lowest-border neighbour.
    min_size: int = 200
    #: Block side in y and x (whole chunks); in 3D mode also the block depth in slices.
    block: int = 2048
    #: Pixels each block reads beyond its borders in y and x (scaled by the voxel size in z).
    halo: int = 128
    #: Blocks at once in this process; None = the CPUs this process may use.
    threads: int | None = None
    #: Start a local dask.distributed cluster of this many processes.
    workers: int | None = None
    #: Address of an existing dask.distributed scheduler (tcp://HOST:PORT).
    scheduler: str | None = None
    #: Write the labels into the prediction store as labels/cells instead of a new store.
    into: bool = False
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _choice(self.mode, SEGMENT_MODES, "--mode")
        _choice(self.seeds, ("maxima", "cores"), "--seeds")
        _at_least(self, 1, "block", "halo", "threads", "workers", "min_size")
        _at_least(self, 0, "min_distance")
        for name in ("seed_threshold", "merge_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise BadInputError(f"--{name.replace('_', '-')} {value}: must be within [0, 1]")


def merge(cls: type[T], config: T | None = None, **changes: Any) -> T:
    """``config`` (default: ``cls()``) with every keyword that is not None replacing its field.

    This is how the public functions combine a config and their keywords: a keyword that was
    given beats the config, one left at None keeps the config's value.
    """
    base = cls() if config is None else config
    if not isinstance(base, cls):
        raise BadInputError(f"config: expected a {cls.__name__}, got {type(base).__name__}")
    given = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(base, **given)  # type: ignore[type-var]


_MODEL_FIELDS = ("arch", "depth", "base_channels", "encoder_weights")


def merge_train(config: TrainConfig | None = None, **changes: Any) -> TrainConfig:
    """:func:`merge` for a :class:`TrainConfig`, whose model fields (arch, depth, base_channels,
    encoder_weights) go to its nested :class:`ModelConfig`."""
    base = config if config is not None else TrainConfig()
    model = merge(ModelConfig, base.model, **{k: changes.pop(k, None) for k in _MODEL_FIELDS})
    return merge(TrainConfig, base, model=model, **changes)


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


__all__ = [
    "IngestConfig",
    "ExportConfig",
    "PreviewConfig",
    "AugmentConfig",
    "ModelConfig",
    "TrainConfig",
    "PredictConfig",
    "SegmentConfig",
    "Limits",
    "LOSSES",
    "ISBI_VOXEL_SIZE_NM",
    "merge",
    "merge_train",
    "slice_range",
    "slice_list",
    "to_dict",
    "from_dict",
]
