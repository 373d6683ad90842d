"""The public functions: one per CLI command, with parameters named like the command's options.

``emseg.cli`` is a thin wrapper over these; notebooks and pipelines call them directly::

    import emseg
    emseg.ingest("train-volume.tif", "isbi.zarr", labels="train-labels.tif", voxel_size=(50, 4, 4))
    print(emseg.info("isbi.zarr"))

Each function delegates to one library function. Its keywords are the options of a config class
(:mod:`emseg.config`, where each is declared once with its default, bounds and help) and default
to :data:`~emseg.config.KEEP`: a keyword that is given replaces the field of ``config`` (or of
the config's defaults), ``None`` clears an optional field, one left out keeps it. Imports are
lazy so that ``import emseg`` stays cheap.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from emseg.config import (
    KEEP,
    BenchConfig,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ExportModelConfig,
    IngestConfig,
    ModelConfig,
    PredictConfig,
    PreviewConfig,
    SegmentConfig,
    ShowConfig,
    TrainConfig,
    override,
    override_train,
    user_options,
)
from emseg.progress import Reporter

if TYPE_CHECKING:
    from torch import nn

    from emseg.recipes.demo import DemoResult

PathLike = str | Path
F = TypeVar("F", bound=Callable[..., Any])


def options_of(*classes: type) -> Callable[[F], F]:
    """Give a public function the user options of ``classes`` as keyword-only parameters: its
    signature (``help()``, ``inspect``, notebooks' completion) lists each with its declared type
    and :data:`~emseg.config.KEEP` as default, and a keyword that is no option of them is a
    TypeError, as for any function. The options are declared in :mod:`emseg.config` only."""
    names = {name: f for cls in classes for name, f in user_options(cls).items()}

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = next((i for i, p in enumerate(own) if p.name in ("config", "progress")), len(own))
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=KEEP, annotation=f.type)
                 for n, f in names.items()]  # fmt: skip

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            unknown = [k for k in kwargs if k not in names and k not in signature.parameters]
            if unknown:
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {unknown[0]!r}")
            return fn(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*own[:at], *added, *own[at:]])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


@options_of(IngestConfig)
def ingest(
    source: PathLike,
    output: PathLike,
    *,
    labels: PathLike | None = None,
    config: IngestConfig | None = None,
    progress: Reporter | None = None,
    **options: Any,
) -> Path:
    """Convert a TIFF/BigTIFF stack, a folder of TIFF/PNG slices or a 2D image to OME-Zarr.

    ``labels`` (same kinds of source, same shape) are binarised into ``labels/cells``.
    ``voxel_size`` is (z, y, x) in nm; by default it comes from the TIFF metadata, else 1.
    ``series`` and ``channel`` pick one of a TIFF that holds several. Returns the output path.
    """
    from emseg.io.ingest import ingest_stack

    return ingest_stack(source, output, override(IngestConfig, config, **options), labels=labels, progress=progress)


def info(path: PathLike) -> dict[str, Any]:
    """Shape, dtype, chunks, voxel size, levels and labels of a store: a mask's foreground
    fraction, an instance label image's object count."""
    from emseg.io.info import describe_store

    return describe_store(path)


def builtin_models() -> list[dict[str, Any]]:
    """The built-in models (``builtin:NAME``, usable wherever a run directory is): name, file,
    size, parameters, training data, pixel size, scores and licence."""
    from emseg.models.checkpoint import list_models

    return list_models()


@options_of(ShowConfig)
def show(
    data: PathLike, output: PathLike, *, pred: PathLike | None = None, config: ShowConfig | None = None, **options: Any
) -> Path:
    """Save a PNG of slice ``z``: the image, its ``labels/cells`` mask when present, and with
    ``pred`` the predicted P(cell) and an overlay of the predicted membranes. ``level`` picks a
    pyramid level (default: the finest at most 2048 px wide); ``overwrite`` replaces a PNG emseg wrote."""
    from emseg.recipes.show import show_slice

    return show_slice(data, output, override(ShowConfig, config, **options), pred)


@options_of(DemoConfig)
def demo(
    *, data: PathLike | None = None, config: DemoConfig | None = None, progress: Reporter | None = None, **options: Any
) -> DemoResult:
    """Ingest, train (``minutes`` of it: 3 on a CPU, 4 on a GPU by default), predict, evaluate and
    draw, on the ISBI 2012 stacks (``data`` or found nearby) or, offline, a synthetic EM-like stack
    (into ``output``); returns a :class:`emseg.recipes.demo.DemoResult` with the paths and the
    validation scores."""
    from emseg.recipes.demo import run_demo

    return run_demo(override(DemoConfig, config, **options), data=data, progress=progress)


@options_of(TrainConfig, ModelConfig)
def train(
    data: PathLike,
    output: PathLike,
    *,
    config: TrainConfig | None = None,
    progress: Reporter | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train a U-Net on ``data`` (OME-Zarr with labels/cells) into the run directory ``output``.

    ``val_slices`` is "A:B", "a,b,c" or a sequence (default: the last 10 %). At the end the
    validation slices calibrate ``emseg segment``'s settings for the run (``segmentation.json``).
    Returns a summary with the last validation scores, the metrics rows and the calibration.
    """
    from emseg.training.calibrate import train as train_and_calibrate

    return train_and_calibrate(data, output, override_train(config, **options), progress=progress)


def load_model(path: PathLike, device: str | None = None) -> nn.Module:
    """The trained network of a run directory or checkpoint, as an eval-mode torch module on
    ``device`` (None: the CPU).

    The module carries ``emseg_meta`` (config, normalisation ``mean``/``std``, ``halo``,
    ``divisor``): feed it ``(x - mean) / std`` of shape (B, 1, H, W) with H, W multiples of
    ``divisor``; it returns logits of P(cell).
    """
    from emseg.models.checkpoint import load_trained

    return load_trained(path, device or "cpu")[0]


@options_of(PreviewConfig)
def augment_preview(data: PathLike, output: PathLike, *, config: PreviewConfig | None = None, **options: Any) -> Path:
    """Save a PNG: a crop of slice ``z`` with its mask, then ``samples`` augmented image/mask pairs
    (``overwrite`` replaces a PNG emseg wrote)."""
    from emseg.recipes.preview import augment_preview_png

    return augment_preview_png(data, output, override(PreviewConfig, config, **options))


@options_of(PredictConfig)
def predict(
    model: PathLike,
    data: PathLike,
    output: PathLike,
    *,
    config: PredictConfig | None = None,
    progress: Reporter | None = None,
    **options: Any,
) -> Path:
    """Segment ``data`` (OME-Zarr) with a trained ``model`` (run directory or checkpoint) into an
    OME-Zarr ``output`` holding ``probabilities`` (P(cell)) and ``labels/membranes``.

    Tiles of ``tile``² pixels overlap by ``overlap`` and are blended (gaussian, linear or crop);
    ``slices`` is (start, stop) or "A:B". ``workers`` starts a local dask.distributed cluster,
    ``scheduler`` connects to one; otherwise ``threads`` blocks run at once in this process.
    """
    from emseg.inference.predict import predict_store

    return predict_store(model, data, output, override(PredictConfig, config, **options), progress=progress)


@options_of(SegmentConfig)
def segment(
    pred: PathLike,
    output: PathLike | None = None,
    *,
    into: bool = KEEP,
    config: SegmentConfig | None = None,
    progress: Reporter | None = None,
    **options: Any,
) -> Path:
    """Instance labels (one ID per cell) from the P(cell) of ``pred`` (an ``emseg predict``
    store): seeded watershed of 1 - P(cell), fragments merged along weak borders, blockwise
    without seams. Writes the OME-Zarr label image ``output``, or with ``into=True`` the
    prediction store's ``labels/cells``; ``mode`` "2d" (per slice) or "3d"."""
    from emseg.segmentation.segment import segment_store

    return segment_store(pred, output, override(SegmentConfig, config, into=into, **options), progress=progress)


@options_of(ExportConfig)
def export(
    source: PathLike,
    output: PathLike,
    *,
    config: ExportConfig | None = None,
    progress: Reporter | None = None,
    **options: Any,
) -> Path:
    """Export a store (e.g. a prediction) with its voxel size to an ImageJ hyperstack (``OUT.tif``;
    an OME-TIFF when ImageJ cannot hold the data), an OME-TIFF (``file_format="ome-tiff"``) or a
    folder of PNG slices (``file_format="png"``); ``labels="membranes"`` exports a label mask."""
    from emseg.io.export import export_store

    return export_store(source, output, override(ExportConfig, config, **options), progress=progress)


@options_of(EvaluateConfig)
def evaluate(
    pred: PathLike,
    data: PathLike,
    *,
    json_path: PathLike | None = None,
    config: EvaluateConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score ``pred`` (an ``emseg predict`` store, or a TIFF stack of P(cell), uint8 or float 0-1)
    against ``data``'s labels/cells: pixel error, IoU, Dice, and the ISBI 2012 foreground-restricted
    V_rand and V_info (best over thresholds 0.0-1.0, with their split and merge parts).
    ``slices`` ("A:B" or (A, B)) picks data slices; ``json_path`` also writes the scores there
    (``overwrite`` replaces a JSON file emseg wrote)."""
    from emseg.evaluation.evaluate import evaluate as _evaluate

    return _evaluate(pred, data, override(EvaluateConfig, config, **options), json_path)


@options_of(BenchConfig)
def bench(
    *,
    model: PathLike | None = None,
    json_path: PathLike | None = None,
    config: BenchConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Time the forward pass (per precision and layout), end-to-end predict (against MONAI's
    sliding window when installed) and training steps on ``device``; smaller sizes on the CPU.
    ``model`` is a run directory (default: an untrained default U-Net, and a small one on the CPU);
    ``quick`` uses tiny sizes (a check that everything runs, not a measurement)."""
    from emseg.recipes.bench import bench as _bench

    return _bench(override(BenchConfig, config, **options), model, json_path)


@options_of(ExportModelConfig)
def export_model(run: PathLike, output: PathLike, *, config: ExportModelConfig | None = None, **options: Any) -> Path:
    """Export a trained model to ``output``: TorchScript, ONNX, the normalisation and halo as JSON,
    and a bioimage.io package (rdf.yaml with test tensors) for ilastik, deepImageJ and QuPath."""
    from emseg.models.export import export_model as _export

    return _export(run, output, override(ExportModelConfig, config, **options))
