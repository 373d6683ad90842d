"""Frozen configuration dataclasses: every option of emseg is declared here, once.

An option is a config field made with :func:`option`: its default, its help text, its bounds
(or choices) and the flag the CLI shows. Everything else reads it from here: the Typer options
of ``emseg.cli`` are generated from the fields (:func:`emseg.cli.opt`), the keywords of
``emseg.api`` carry the same names, and a config checks every field when it is built, so
``PredictConfig(threshold=2.0)`` or ``PredictConfig(dtype="int7")`` is one
:class:`~emseg.errors.BadInputError` line at once, not a failure later. ``tests/test_config.py``
fails on a literal default of an option written anywhere else.

A config is plain data (numbers, strings, tuples) so it converts to and from JSON losslessly;
the whole training config goes into every checkpoint, so a checkpoint alone rebuilds its model.

The Python API combines a config and keywords with :func:`override`: a keyword left at
:data:`KEEP` keeps the config's field, one that is given replaces it, and ``None`` clears an
optional field (``train(..., time_limit=None, config=TrainConfig(time_limit=60))`` runs without
a limit). Fields given as text (``slices="27:30"``) or lists are normalised when a config is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from emseg.classes import parse_classes
from emseg.errors import BadInputError

T = TypeVar("T")

#: ISBI 2012 voxel size in nanometres (z, y, x).
ISBI_VOXEL_SIZE_NM = (50.0, 4.0, 4.0)
#: Where ``emseg show`` and ``emseg augment-preview`` write when no output is given.
SHOW_OUTPUT = "view.png"
PREVIEW_OUTPUT = "augment.png"
#: Seeds are what numpy's SeedSequence and torch take alike: 0 to 2**63 - 1.
MAX_SEED = 2**63 - 1
LOSSES = ("weighted-bce", "bce", "dice", "bce+dice")
#: "auto": bf16 autocast where the device computes bf16 natively (CUDA with native bf16, CPUs with
#: AVX512-BF16 or AMX), else fp32; "fp32" and "bf16" force one.
PRECISIONS = ("auto", "fp32", "bf16")
#: How predict normalises intensities (see PredictConfig.normalization).
NORMALIZATIONS = ("slice", "stack", "checkpoint")
#: How predict stores P(cell).
OUTPUT_DTYPES = ("uint8", "float16", "float32")
BLENDS = ("gaussian", "linear", "crop")
SEGMENT_MODES = ("2d", "3d")
SEEDS = ("maxima", "cores")
NGFF_VERSIONS = ("0.4", "0.5")
EXPORT_FORMATS = ("tif", "ome-tiff", "png")


# --- parsing what users type --------------------------------------------------------------------


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


# --- declaring an option ------------------------------------------------------------------------


class _Keep:
    """The default of the API's keywords: keep the config's field (one instance, :data:`KEEP`)."""

    def __repr__(self) -> str:
        return "KEEP"


#: An API keyword left at KEEP keeps the config's field (see :func:`override`).
KEEP: Any = _Keep()


def option(  # noqa: PLR0913 - the declaration of an option: each keyword is one of its properties
    default: Any,
    help: str,  # noqa: A002 - the name Typer and argparse give it
    *,
    kind: Any = None,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    parse: Callable[[Any, str], Any] | None = None,
    runtime: bool = False,
    cli: bool = True,
) -> Any:
    """A config field that is a user's option: its ``default`` and ``help``, what values it
    takes (``kind``: int, float, str, bool, or ``(item, n)`` for a tuple of n items, ``n`` None
    for any length; by default the default's type), its bounds (``ge``, ``gt``, ``le``) or
    ``choices``, a ``parse`` function for text such as ``"27:30"``, the CLI's ``flag`` (default
    ``--name-with-dashes``), ``short`` flag and ``metavar``, and whether it is ``runtime`` only
    (how a command runs, not what it computes: left out of resume records)."""
    if kind is None:
        kind = _kind_of(default)
    meta = {
        "help": help, "kind": kind, "flag": flag, "short": short, "metavar": metavar, "ge": ge, "gt": gt,
        "le": le, "choices": tuple(choices) if choices else None, "parse": parse, "runtime": runtime, "cli": cli,
    }  # fmt: skip
    return field(default=default, metadata=meta)


def _kind_of(default: Any) -> Any:
    if isinstance(default, tuple):
        return (type(default[0]), len(default))
    if default is None:
        raise TypeError("an option whose default is None needs kind=")
    return type(default)


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a config field (``--tile``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


#: What ``--help`` shows for one value of a tuple option's item type, where no metavar is declared.
_ITEM_METAVARS = {int: "N", float: "X", str: "TEXT"}


def metavar_of(f: dataclasses.Field) -> str | None:
    """What ``--help`` shows after the flag of a config field: what the parser accepts. The
    declared ``metavar``; nothing for a flag (it takes no value); the ``choices`` (``a|b|c``);
    one word per item of a fixed-length tuple (``N N``, the form typed: space-separated); None
    for a single number or text, which the CLI shows by its type (``<int>``, ``<float>``)."""
    meta = f.metadata
    kind = meta["kind"]
    if meta["metavar"] is not None:
        return str(meta["metavar"])
    if kind is bool:
        return ""
    if meta["choices"]:
        return "|".join(meta["choices"])
    if isinstance(kind, tuple) and kind[1] is not None and meta["parse"] is None:
        return " ".join([_ITEM_METAVARS.get(kind[0], "VALUE")] * kind[1])
    return None


def options(cls: type) -> dict[str, dataclasses.Field]:
    """The option fields of a config class (those made with :func:`option`), by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def user_options(cls: type) -> dict[str, dataclasses.Field]:
    """The options of a config class that the CLI shows and the API takes as keywords."""
    return {name: f for name, f in options(cls).items() if f.metadata["cli"]}


def runtime_fields(cls: type) -> tuple[str, ...]:
    """Fields that say how a command runs, not what it computes (left out of resume records)."""
    return tuple(name for name, f in options(cls).items() if f.metadata["runtime"])


def optional(f: dataclasses.Field) -> bool:
    """Whether the field takes None (its annotation says ``| None``)."""
    return "None" in str(f.type)


class Checked:
    """Mixin of the configs: every option field is checked (and normalised) when a config is
    built; :meth:`_check` adds what involves several fields."""

    def __post_init__(self) -> None:
        for name, f in options(type(self)).items():
            value = _checked(f, getattr(self, name))
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        pass


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """``value`` of option ``f``, normalised (tuples, parsed text, ints as floats), after
    checking its type, bounds and choices; :class:`BadInputError` naming the flag otherwise."""
    meta, flag = f.metadata, flag_of(f)
    if value is None:
        if optional(f):
            return None
        raise BadInputError(f"{flag}: needs a value (it has no 'none')")
    if meta["parse"] is not None:
        return meta["parse"](value, flag)
    kind = meta["kind"]
    if isinstance(kind, tuple):
        items = _items(value, kind, flag)
        for item in items:
            _bounds(meta, item, f"{flag} {_shown(value)}")
        return items
    value = _typed(value, kind, flag)
    _bounds(meta, value, f"{flag} {_shown(value)}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise BadInputError(f"{flag} {value!r}: expected one of {', '.join(meta['choices'])}")
    return value


#: What a user is told a value of each kind must be.
_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _typed(value: Any, kind: type, flag: str) -> Any:
    if kind is str and isinstance(value, os.PathLike):  # a folder or file option given as a Path
        value = os.fspath(value)
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)
    if not ok:
        raise BadInputError(f"{flag} {_shown(value)}: expected {_KIND_WORDS.get(kind, kind.__name__)}")
    return float(value) if kind is float else value


def _items(value: Any, kind: tuple[type, int | None], flag: str) -> tuple[Any, ...]:
    item, n = kind
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise BadInputError(f"{flag} {_shown(value)}: expected {n or 'some'} numbers")
    out = tuple(_typed(float(v) if item is float and isinstance(v, int) else v, item, flag) for v in value)
    if n is not None and len(out) != n:
        raise BadInputError(f"{flag} {_shown(value)}: expected {n} numbers")
    return out


def _bounds(meta: Any, value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta["ge"] is not None and not value >= meta["ge"]:  # also refuses NaN
        raise BadInputError(f"{what}: must be at least {meta['ge']:g}")
    if meta["gt"] is not None and not value > meta["gt"]:
        raise BadInputError(f"{what}: must be more than {meta['gt']:g}")
    if meta["le"] is not None and not value <= meta["le"]:
        raise BadInputError(f"{what}: must be at most {meta['le']:g}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInputError(f"{what}: must be a finite number")


def _shown(value: Any) -> str:
    text = " ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _seed_option(help: str = "Random seed (same seed, same run on the CPU).") -> Any:  # noqa: A002
    return option(0, help, ge=0, le=MAX_SEED)


def _overwrite(help: str = "Replace an existing output written by emseg.") -> Any:  # noqa: A002
    return option(False, help, runtime=True)


def _device(default: str = "auto") -> Any:
    return option(default, "auto, cpu, cuda or cuda:N.", metavar="DEVICE", runtime=True)


#: ``emseg segment``'s settings where neither an option, a calibration nor the prediction's run
#: chose them. They score best at their worst, against the best threshold of the same P(cell), over
#: five sets, none of them ISBI's held-out 27-29: four cross-validation folds of ISBI slices 0-26
#: and the demo's synthetic stack (benchmarks/README.md).
SEGMENT_DEFAULTS: dict[str, Any] = {
    "seed_threshold": 0.7, "min_distance": 4, "merge_threshold": 0.78, "min_size": 200, "components": None,
}  # fmt: skip
#: The settings calibration chooses (SegmentConfig fields).
CALIBRATED = tuple(SEGMENT_DEFAULTS)


def _calibrated(text: str, name: str) -> str:
    return f"{text} (default: the run's calibration, else {SEGMENT_DEFAULTS[name]})."


# --- the configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestConfig(Checked):
    """How ``emseg ingest`` writes an OME-Zarr store."""

    voxel_size: tuple[float, float, float] | None = option(
        None, "Voxel size Z Y X in nm (default: from the TIFF, else 1).", kind=(float, 3), metavar="Z Y X", gt=0
    )
    chunks: tuple[int, int, int] = option((1, 1024, 1024), "Chunk shape Z Y X.", metavar="Z Y X", ge=1)
    ngff: str = option("0.4", "OME-Zarr version: 0.4 (zarr v2) or 0.5 (zarr v3).", choices=NGFF_VERSIONS)
    shards: tuple[int, int, int] | None = option(
        None, "Shard shape Z Y X (--ngff 0.5).", kind=(int, 3), metavar="Z Y X", ge=1
    )
    series: int | None = option(
        None, "Of a TIFF whose series do not form one stack: the series to ingest (from 0).", kind=int, ge=0
    )
    channel: int | None = option(None, "Of a multi-channel TIFF: the channel (from 0).", kind=int, ge=0)
    classes: tuple[tuple[str, tuple[int, ...]], ...] | None = option(
        None,
        "A class of a multi-class label image, NAME=CODE[,CODE...]; repeat it, one per class, in the order "
        "that numbers them (codes no class names are unlabelled). Without it labels are cell (> 0) / membrane.",
        kind=(str, None),
        flag="--class",
        metavar="NAME=CODES",
        parse=parse_classes,
    )
    pyramid_min_size: int = option(1024, "Halve y and x level by level down to this side.", ge=1, cli=False)
    clevel: int = option(3, "Blosc-zstd compression level.", ge=0, le=9, cli=False)
    overwrite: bool = _overwrite()

    def _check(self) -> None:
        if self.shards is not None:
            if self.ngff == "0.4":
                raise BadInputError("--shards needs --ngff 0.5 (zarr v3); NGFF 0.4 has no sharding")
            if any(s % c for s, c in zip(self.shards, self.chunks, strict=True)):
                raise BadInputError(f"--shards {_shown(self.shards)}: each must be a multiple of the chunk size")


@dataclass(frozen=True)
class ShowConfig(Checked):
    """What ``emseg show`` draws."""

    z: int = option(0, "Slice index.", flag="--slice", short="-z", ge=0)
    level: int | None = option(None, "Pyramid level (default: fits 2048 px).", kind=int, ge=0)
    overwrite: bool = _overwrite()


@dataclass(frozen=True)
class ExportConfig(Checked):
    """How ``emseg export`` writes a store as TIFF or PNG slices."""

    file_format: str | None = option(
        None,
        "tif (default for .tif: an ImageJ/Fiji hyperstack with the voxel size; an OME-TIFF when ImageJ cannot hold "
        "the data), ome-tiff (default for .ome.tif) or png (a folder of slices).",
        kind=str,
        flag="--format",
        choices=EXPORT_FORMATS,
    )
    labels: str | None = option(None, "Export labels/NAME (e.g. membranes) as 0/255.", kind=str, metavar="NAME")
    level: int = option(0, "Pyramid level.", ge=0)
    overwrite: bool = _overwrite()


@dataclass(frozen=True)
class PreviewConfig(Checked):
    """What ``emseg augment-preview`` draws."""

    z: int = option(0, "Slice to augment.", flag="--slice", short="-z", ge=0)
    crop: int = option(256, "Crop side in pixels.", ge=16)
    samples: int = option(6, "Augmented pairs to draw.", short="-n", ge=1)
    seed: int = _seed_option("Random seed.")
    overwrite: bool = _overwrite()

    def _check(self) -> None:
        check_batch_memory(self.crop, self.samples, "--crop", "--samples")


@dataclass(frozen=True)
class AugmentConfig:
    """Joint augmentation of image, label and weight map (see ``emseg.training.augment``)."""

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
class ModelConfig(Checked):
    """Which network to build; stored in every checkpoint so it rebuilds itself."""

    arch: str = option(
        "unet", "unet, or smp:ENCODER for a segmentation-models-pytorch U-Net.", metavar="unet|smp:ENCODER"
    )
    depth: int = option(4, "U-Net depth (levels of down-sampling).", ge=1)
    base_channels: int = option(64, "U-Net channels at the first level.", ge=1)
    encoder_weights: str | None = option(
        None, "smp encoder weights, e.g. imagenet (downloads; needs internet).", kind=str, metavar="NAME"
    )
    in_channels: int = 1
    out_channels: int = 1

    def _check(self) -> None:
        if not (self.arch == "unet" or self.arch.startswith("smp:")):
            raise BadInputError(f"--arch {self.arch!r}: expected 'unet' or 'smp:ENCODER' (e.g. smp:resnet34)")
        if self.encoder_weights is not None and not self.arch.startswith("smp:"):
            raise BadInputError(
                f"--encoder-weights {self.encoder_weights}: pretrained weights need an smp encoder "
                "(--arch smp:ENCODER); emseg's own U-Net starts from random weights"
            )


#: Warm-up steps of a run that starts from trained weights (``--init``): they need no long ramp.
INIT_WARMUP_STEPS = 20
#: Peak learning rate from random weights, and from trained ones (``--init``; without ``--lr``): a
#: tenth, as fine-tuning goes (100 steps on VNC sections from builtin:membranes: V_rand 0.9734 at
#: 1e-3, below the model it started from, 0.9773 at 3e-4, 0.9800 at 1e-4; benchmarks/README.md).
LR, INIT_LR = 1e-3, 1e-4
#: TrainConfig fields that live in its nested ModelConfig (the API and CLI take them flat).
MODEL_FIELDS = tuple(options(ModelConfig))


@dataclass(frozen=True)
class TrainConfig(Checked):
    """Everything ``emseg train`` needs besides the data; saved whole in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = option(50, "Epochs.", ge=1)
    steps_per_epoch: int = option(100, "Optimizer steps per epoch.", ge=1)
    batch_size: int = option(16, "Crops per step (per process under torchrun).", ge=1)
    crop: int = option(384, "Crop side in pixels (a multiple of 2**depth).", ge=1)
    lr: float | None = option(
        None,
        "Peak learning rate (AdamW, warm-up then cosine decay); default 1e-3, and 1e-4 when starting from --init.",
        kind=float,
        gt=0,
    )
    #: The cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.01
    warmup_steps: int = 200
    warmup_fraction: float = option(
        0.1,
        "With a time limit, warm-up ends at this share of the budget (or after warmup_steps).",
        gt=0,
        le=1,
        cli=False,
    )
    ema_decay: float | None = option(
        0.99, "Per-step decay of the weights' moving average, which validates and is saved (none: no average).",
        gt=0, le=1, cli=False,
    )  # fmt: skip
    grad_clip: float | None = option(1.0, "Clip the gradients' total norm (none: no clipping).", gt=0, cli=False)
    norm_percentiles: tuple[float, float] = option(
        (1.0, 99.0), "The training stack's robust percentiles that predict maps a new stack's onto.",
        ge=0, le=100, cli=False,
    )  # fmt: skip
    weight_decay: float = 1e-4
    loss: str = option("weighted-bce", "weighted-bce (U-Net weight map), bce, dice or bce+dice.", choices=LOSSES)
    w0: float = option(10.0, "Weight map: border weight w0.", ge=0, cli=False)
    sigma: float = option(5.0, "Weight map: border width sigma in pixels.", gt=0, cli=False)
    val_slices: tuple[int, ...] | None = option(
        None,
        "Held-out slices, A:B or a,b,c (default: last 10 %).",
        kind=(int, None),
        metavar="A:B|I,J,K",
        parse=slice_list,
    )
    seed: int = _seed_option()
    time_limit: float | None = option(
        None, "Stop cleanly after this many seconds (warm-up and decay follow the budget).", kind=float, gt=0
    )
    device: str = _device()
    #: Autocast (mixed precision) at all; ``precision`` says which.
    amp: bool = True
    precision: str = option("auto", "auto (bf16 where native), fp32 or bf16 autocast.", choices=PRECISIONS)
    channels_last: bool = True
    torch_compile: bool = option(False, "torch.compile the network (CUDA).", flag="--compile", runtime=True)
    val_tile: int = option(512, "Validation tiles (whole held-out slices, as predict runs).", ge=1, cli=False)
    val_overlap: int = option(64, "Validation tile overlap.", ge=0, cli=False)
    val_every: int = option(1, "Validate every this many epochs (and after the last).", ge=1, cli=False)
    init: str | None = option(
        None,
        "Start from these weights: builtin:NAME, a run directory or a checkpoint (its network, a shorter warm-up).",
        kind=str,
        metavar="MODEL",
    )
    resume: bool = option(False, "Continue the run in OUTPUT from its last checkpoint.", runtime=True)
    overwrite: bool = _overwrite("Start afresh in an existing run directory.")

    def _check(self) -> None:
        check_batch_memory(self.crop, self.batch_size, "--crop")

    @property
    def peak_lr(self) -> float:
        """``lr`` as training uses it: :func:`emseg.training.loop.with_classes` chooses it (from
        :data:`LR` and :data:`INIT_LR`) when ``--lr`` was not given, before anything trains."""
        if self.lr is None:
            raise ValueError("TrainConfig.lr is chosen by emseg.training.loop.with_classes before training")
        return self.lr


@dataclass(frozen=True)
class PredictConfig(Checked):
    """How ``emseg predict`` tiles, blends, batches and schedules."""

    tile: int = option(512, "Tile side in pixels (a multiple of the model's divisor).", ge=1)
    overlap: int = option(64, "Overlap of neighbouring tiles in pixels.", ge=0)
    batch_size: int = option(8, "Tiles per forward pass (halved on GPU out-of-memory).", ge=1, runtime=True)
    blend: str = option("gaussian", "gaussian, linear or crop.", choices=BLENDS)
    tta: bool = option(False, "Average the 8 rotations and flips.")
    threshold: float = option(0.5, "Membrane where P(cell) < threshold.", ge=0, le=1)
    dtype: str = option("uint8", "Stored probabilities: uint8 (0-255), float16 or float32.", choices=OUTPUT_DTYPES)
    slices: tuple[int, int] | None = option(
        None, "Predict slices A:B only.", kind=(int, 2), metavar="A:B", parse=slice_range
    )
    device: str = _device()
    block: int = option(8192, "Pixels per side of one task's block (whole chunks; an axis up to 1.5x is one).", ge=1)
    threads: int = option(3, "Block tasks at once per process.", ge=1, runtime=True)
    workers: int | None = option(
        None, "Start a local dask.distributed cluster of N processes.", kind=int, ge=1, runtime=True
    )
    scheduler: str | None = option(
        None, "Use the dask.distributed scheduler at this address.", kind=str, metavar="tcp://HOST:PORT", runtime=True
    )
    torch_compile: bool = option(False, "torch.compile the network (CUDA).", flag="--compile", runtime=True)
    precision: str = option("auto", "auto (bf16 where the device has it natively), fp32 or bf16.", choices=PRECISIONS)
    normalization: str = option(
        "slice",
        "slice: map each slice's intensity percentiles onto training's (what an exported bioimage.io package "
        "does); stack: one mapping from a sample of the stack, padding values 0 and 255 left out; checkpoint: "
        "training's mean/std.",
        choices=NORMALIZATIONS,
    )
    rescale: bool = option(
        True,
        "Resample the input to the pixel size the model records (built-in models) when the store's differs by "
        "more than 10 %, and the output back.",
        flag="--rescale/--no-rescale",
    )
    #: Autocast and the channels-last layout (on CUDA and oneDNN CPUs alike faster).
    amp: bool = True
    channels_last: bool = True
    clevel: int = option(
        5, "Blosc-zstd compression level of the stored probabilities.", ge=0, le=9, runtime=True, cli=False
    )
    overwrite: bool = _overwrite()
    resume: bool = option(False, "Finish an interrupted prediction (only unfinished blocks).", runtime=True)

    def _check(self) -> None:
        check_batch_memory(self.tile, self.batch_size, "--tile")


@dataclass(frozen=True)
class SegmentConfig(Checked):
    """How ``emseg segment`` turns P(cell) into instance labels. The settings of
    :data:`CALIBRATED` left at None come from ``calibrate`` (labelled slices), else from the
    calibration of the run that made the prediction, else from :data:`SEGMENT_DEFAULTS`."""

    mode: str = option("2d", "2d (per slice) or 3d (anisotropy from the voxel size).", choices=SEGMENT_MODES)
    seed_threshold: float | None = option(
        None, _calibrated("Seeds grow from pixels with P(cell) above this", "seed_threshold"), kind=float, ge=0, le=1
    )
    seeds: str = option("cores", "maxima (of the distance) or cores.", choices=SEEDS)
    min_distance: int | None = option(
        None, _calibrated("Seeds: distance maxima within 2N+1 pixels, or cores N away", "min_distance"), kind=int, ge=0
    )
    merge_threshold: float | None = option(
        None, _calibrated("Merge neighbours whose border P(membrane) is below", "merge_threshold"), kind=float,
        ge=0, le=1,
    )  # fmt: skip
    min_size: int | None = option(None, _calibrated("Smaller segments join a neighbour", "min_size"), kind=int, ge=1)
    components: float | None = option(
        None,
        "Instead of watershed and merging: the cells are the components of P(cell) > this, thinned as the ISBI "
        "metrics do (what calibration falls back to when no setting beats the map).",
        kind=float, ge=0, le=1,
    )  # fmt: skip
    objects: str | None = option(
        None,
        "Of a multi-class prediction: the objects of this blob-like class (e.g. mitochondria: a seeded watershed of "
        "its probability, touching ones split; --min-distance (0: not split) and --min-size default to what the "
        "run learned on its validation slices) instead of cells.",
        kind=str,
        metavar="CLASS",
    )
    calibrate: str | None = option(
        None, "Choose the settings on the labelled slices of this store (labels/cells) first.", kind=str,
        metavar="DATA.zarr",
    )  # fmt: skip
    slices: tuple[int, int] | None = option(
        None, "With --calibrate: its labelled slices A:B (default: all the prediction covers).", kind=(int, 2),
        metavar="A:B", parse=slice_range,
    )  # fmt: skip
    block: int = option(
        2048, "Block side in pixels (whole chunks; in 3d also its depth; an axis up to 1.5x is one).", ge=1
    )
    halo: int = option(128, "Pixels each block reads beyond its borders.", ge=1)
    threads: int | None = option(
        None, "Blocks at once in this process (default: its CPUs).", kind=int, ge=1, runtime=True
    )
    workers: int | None = option(
        None, "Start a local dask.distributed cluster of N processes.", kind=int, ge=1, runtime=True
    )
    scheduler: str | None = option(
        None, "Use the dask.distributed scheduler at this address.", kind=str, metavar="tcp://HOST:PORT", runtime=True
    )
    into: bool = option(
        False, "Write the labels into the prediction store as labels/cells instead of a new store.", cli=False
    )
    overwrite: bool = _overwrite()
    resume: bool = option(False, "Finish an interrupted segmentation.", runtime=True)

    def _check(self) -> None:
        if self.slices is not None and self.calibrate is None:
            raise BadInputError("--slices: says which labelled slices --calibrate reads; give --calibrate DATA.zarr")


@dataclass(frozen=True)
class EvaluateConfig(Checked):
    """What ``emseg evaluate`` scores."""

    slices: tuple[int, int] | None = option(
        None, "Evaluate data slices A:B only.", kind=(int, 2), metavar="A:B", parse=slice_range
    )
    overwrite: bool = _overwrite()


@dataclass(frozen=True)
class BenchConfig(Checked):
    """What ``emseg bench`` times."""

    device: str = _device()
    torch_compile: bool = option(False, "Also time torch.compile.", flag="--compile")
    monai: bool = option(True, "Compare with MONAI's sliding window (when installed).", flag="--monai/--no-monai")
    quick: bool = option(False, "Tiny sizes: checks that everything runs, in seconds.")
    overwrite: bool = _overwrite()


@dataclass(frozen=True)
class DemoConfig(Checked):
    """What ``emseg demo`` runs."""

    output: str = option("emseg-demo", "Folder for everything the demo writes.", short="-o", metavar="DIR")
    device: str = _device()
    minutes: float | None = option(None, "Training time (default 3 on a CPU, 4 on a GPU).", kind=float, gt=0)
    classes_minutes: float = option(
        2.0,
        "Training time of the second part, several classes on the VNC sections when found nearby "
        "(../shared/data/vnc, ./data/vnc or $EMSEG_VNC); 0 skips it.",
        ge=0,
    )


@dataclass(frozen=True)
class ExportModelConfig(Checked):
    """How ``emseg export-model`` writes a model package."""

    overwrite: bool = _overwrite()


# --- bounds on what files may make emseg allocate -----------------------------------------------


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
    #: Bytes of one zarr chunk (EMSEG_MAX_CHUNK_BYTES).
    max_chunk_bytes: int = 2**31
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


# --- combining configs and keywords ---------------------------------------------------------------


def override(cls: type[T], config: T | None = None, **changes: Any) -> T:
    """``config`` (default: ``cls()``) with every keyword that is not :data:`KEEP` replacing its
    field; ``None`` clears an optional field. This is how the public functions combine a config
    and their keywords: a keyword that was given beats the config."""
    base = cls() if config is None else config
    if not isinstance(base, cls):
        raise BadInputError(f"config: expected a {cls.__name__}, got {type(base).__name__}")
    given = {k: v for k, v in changes.items() if v is not KEEP}
    return dataclasses.replace(base, **given) if given else base  # type: ignore[type-var]


def override_train(config: TrainConfig | None = None, **changes: Any) -> TrainConfig:
    """:func:`override` for a :class:`TrainConfig`, whose model fields (arch, depth,
    base_channels, encoder_weights) go to its nested :class:`ModelConfig`."""
    base = config if config is not None else TrainConfig()
    model = override(ModelConfig, base.model, **{k: changes.pop(k, KEEP) for k in MODEL_FIELDS})
    return override(TrainConfig, base, model=model, **changes)


def given(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (a CLI command's parameters, a public function's keywords) that
    are user options of ``cls`` (:func:`user_options`)."""
    names = user_options(cls)
    return {k: v for k, v in values.items() if k in names}


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(config)


#: Fields renamed since checkpoints and stores were first written: old name -> new name.
RENAMED = {"compile": "torch_compile"}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output (older names accepted, see :data:`RENAMED`);
    unknown keys are an error. Nested dataclass fields and tuple fields are restored to their
    declared types."""
    data = {RENAMED.get(k, k): v for k, v in data.items()}
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
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


__all__ = [
    "KEEP",
    "IngestConfig",
    "ShowConfig",
    "ExportConfig",
    "PreviewConfig",
    "AugmentConfig",
    "ModelConfig",
    "TrainConfig",
    "PredictConfig",
    "SegmentConfig",
    "EvaluateConfig",
    "BenchConfig",
    "DemoConfig",
    "ExportModelConfig",
    "Limits",
    "LOSSES",
    "SEGMENT_DEFAULTS",
    "ISBI_VOXEL_SIZE_NM",
    "override",
    "override_train",
    "given",
    "options",
    "option",
    "runtime_fields",
    "user_options",
    "slice_range",
    "slice_list",
    "to_dict",
    "from_dict",
]
