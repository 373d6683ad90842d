"""``emseg export-model``: a trained network out of emseg, for the tools biologists use.

Writes into a folder:

- ``model.pt``: TorchScript (``torch.jit.load`` in Python or C++, deepImageJ, QuPath);
- ``model.onnx``: ONNX, batch, height and width dynamic (onnxruntime, ilastik, Fiji);
- ``emseg-model.json``: the intensity normalisation, size divisor and halo the files need;
- ``rdf.yaml`` with ``test_input.npy`` / ``test_output.npy``, ``sample_input.tif`` /
  ``sample_output.tif``, ``README.md`` and ``cover.png``: a bioimage.io model package (ilastik,
  deepImageJ and QuPath open it from there). Its test and sample tensors and its cover are a crop of
  the run's own training data; its voxel size is the training store's.

Both files take (B, 1, H, W) float32 normalised intensities and return (B, 1, H, W) P(cell interior)
(a sigmoid is part of the exported network). They treat a slice's edges as ``emseg predict`` does
(:class:`SliceEdges`): mirror reflection beyond the edges by predict's context and up to a
multiple of the size divisor, so any size is accepted. NaN pixels mark padding beyond the image:
the network runs on the rows and columns inside it only, so a tool that tiles and pads with NaN
gets emseg's prediction at the edges too. The package declares no halo (it is in the README and
``config.emseg.context``): bioimageio.core pads a whole image by the declared halo *before* it
measures the percentiles (the spec allows no NaN padding), which would shift the normalisation;
without one, its whole-image prediction equals emseg's whole-slice pass, edges included.

The package normalises as ``emseg predict`` does by default (``--normalization slice``): each
slice's own percentiles (the checkpoint's, usually 1 and 99, over every pixel, numpy's linear
ones) are mapped where the training stack's went (``scale_range`` per sample over channel, y and
x, then ``scale_linear``); a checkpoint without percentiles gets its fixed mean and std
(``fixed_zero_mean_unit_variance``), as predict gives it. ``--normalization stack`` (one mapping
for the whole stack) has no bioimage.io equivalent: its predictions differ from the package's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emseg._version import __version__
from emseg.config import ExportModelConfig, PredictConfig
from emseg.errors import BadInputError
from emseg.io.outputs import Output, check_output
from emseg.models.checkpoint import load_trained

log = logging.getLogger(__name__)

ISBI_CITATION = {
    "text": "Arganda-Carreras et al. 2015, Crowdsourcing the creation of image segmentation algorithms for "
    "connectomics, Frontiers in Neuroanatomy 9:142",
    "doi": "10.3389/fnana.2015.00142",
}
UNET_CITATION = {
    "text": "Ronneberger, Fischer and Brox 2015, U-Net: Convolutional Networks for Biomedical "
    "Image Segmentation, MICCAI",
    "doi": "10.1007/978-3-319-24574-4_28",
}
#: The GitHub account of the package's authors (bioimage.io asks for one).
GITHUB_USER = "emseg"
#: Largest side of the test and sample tensors (a central crop of a training slice).
TEST_SIDE = 512
#: scale_range's epsilon in bioimageio.core: ``(x - low) / (high - low + eps)``.
SCALE_RANGE_EPS = 1e-6


class Probability(nn.Module):
    """The trained network followed by a sigmoid (logits -> P(cell)), or by a softmax over its
    channels for a network of several classes (logits -> one probability per class)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.classes = int(getattr(net, "out_channels", 1)) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.softmax(y, dim=1) if self.classes else torch.sigmoid(y)


class SliceEdges(nn.Module):
    """``net`` applied as ``emseg predict`` applies it to a slice, for any (B, 1, H, W) input.

    Rows and columns that are NaN throughout are padding outside the image: the network runs on
    the image inside them only, whatever padding a tool added. The image is mirrored (numpy's
    "reflect", emseg's one reflection rule) by ``context`` pixels beyond every edge and up to a
    multiple of ``divisor`` at its far end, as predict's tiles mirror it (half predict's default
    overlap, on the size grid: :func:`emseg.inference.tiling.mirrored_context`), and cut back. The
    output is 0 outside the image. Every step is a tensor operation (no Python branches on data),
    so tracing keeps it for TorchScript and ONNX.
    """

    def __init__(self, net: nn.Module, divisor: int, context: int = 0) -> None:
        super().__init__()
        self.net = net
        self.divisor = int(divisor)
        self.context = int(context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = ~torch.isnan(x)
        rows = real.any(3).any(1).any(0)
        cols = real.any(2).any(1).any(0)
        inputs = x
        back = []
        c = self.context
        for axis, inside in ((2, rows), (3, cols)):
            n = inside.shape[0]
            index = torch.arange(n, device=x.device)
            start = torch.where(inside, index, n).min()
            stop = torch.maximum(torch.where(inside, index, -1).max() + 1, start + 1)
            size = stop - start
            grid = torch.div(size + self.divisor - 1, self.divisor, rounding_mode="floor") * self.divisor
            steps = torch.arange(grid + 2 * c, device=x.device) - c  # type: ignore[call-overload]  # 0-d tensor: kept dynamic by tracing
            m = steps % torch.clamp(2 * (size - 1), min=1)
            reflected = m - 2 * (m - (size - 1)) * (m >= size).to(m.dtype)
            inputs = inputs.index_select(axis, start + reflected)
            source = torch.minimum((index - start).clamp(min=0), grid - 1) + c
            back.append((axis, source, (index >= start) & (index < stop)))
        y = self.net(inputs)
        for axis, source, _ in back:
            y = y.index_select(axis, source)
        inside_both = back[0][2][:, None] & back[1][2][None, :]
        return torch.where(inside_both, y, torch.zeros((), dtype=y.dtype, device=y.device))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_context(halo: int, divisor: int) -> int:
    """The halo the package declares: the network's, rounded up to a multiple of ``divisor``, so a
    tool's blocks start where whole-slice pooling starts (emseg aligns its tiles the same way)."""
    return -(-int(halo) // divisor) * divisor


def edge_context(divisor: int) -> int:
    """The mirrored context ``emseg predict`` gives a slice's edges with its default overlap
    (:func:`emseg.inference.tiling.mirrored_context`; models/ does not import inference/)."""
    overlap = PredictConfig.overlap
    return -(-(overlap // 2) // divisor) * divisor if overlap else 0


def normalize(raw: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """(..., H, W) raw -> float32 network input, as the package's preprocessing computes it: with
    percentiles recorded, this array's own percentiles (numpy's linear ones, NaN ignored) mapped
    where the training stack's went; else the checkpoint's mean and std."""
    x = np.asarray(raw, dtype=np.float32)
    if not has_percentiles(norm):
        return ((x - np.float32(norm["mean"])) / np.float32(norm["std"])).astype(np.float32)
    gain, offset = scale_linear(norm)
    low, high = np.nanpercentile(x, [float(p) for p in norm["percentiles"][:2]])
    u = (x - np.float32(low)) / np.float32(high - low + SCALE_RANGE_EPS)
    return (u * np.float32(gain) + np.float32(offset)).astype(np.float32)


def has_percentiles(norm: dict[str, Any]) -> bool:
    return {"percentiles", "low", "high"} <= set(norm)


def scale_linear(norm: dict[str, Any]) -> tuple[float, float]:
    """(gain, offset) that send 0 and 1 (the input's percentiles after ``scale_range``) where the
    training stack's percentiles ``low`` and ``high`` went under the checkpoint's mean and std:
    emseg's :func:`~emseg.models.normalization.for_stack` written as two bioimage.io steps."""
    mean, std = float(norm["mean"]), float(norm["std"])
    low, high = float(norm["low"]), float(norm["high"])
    return max(high - low, 1e-6) / std, (low - mean) / std


def preprocessing(norm: dict[str, Any]) -> list[dict[str, Any]]:
    """The bioimage.io preprocessing that normalises as ``emseg predict`` does by default."""
    if not has_percentiles(norm):
        return [{"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": norm["mean"], "std": norm["std"]}}]
    gain, offset = scale_linear(norm)
    low_pct, high_pct = (float(p) for p in norm["percentiles"][:2])
    return [
        {
            "id": "scale_range",
            "kwargs": {
                "axes": ["channel", "y", "x"],  # per sample: each slice (batch entry) by its own percentiles
                "min_percentile": low_pct,
                "max_percentile": high_pct,
                "eps": SCALE_RANGE_EPS,
            },
        },
        {"id": "scale_linear", "kwargs": {"gain": gain, "offset": offset}},
    ]


def training_crop(meta: dict[str, Any], divisor: int, min_side: int) -> tuple[np.ndarray, str]:
    """((S, S) float32 raw, where it came from): the central crop, at most :data:`TEST_SIDE` a side,
    of the middle training slice of the run's training store; synthetic EM-like data (with a
    warning) when the store is gone or its slices are too small."""
    from emseg.io.zarr import open_ome

    data = meta.get("data") or {}
    slices = meta.get("train_slices") or [0]
    try:
        image = open_ome(data["path"])
        z = int(slices[len(slices) // 2])
        h, w = image.shape[1:]
        side = min(TEST_SIDE, h, w) // divisor * divisor
        if side < min_side:
            raise BadInputError(f"its slices ({h} x {w}) are smaller than the {min_side} px the package needs")
        y0, x0 = (h - side) // 2, (w - side) // 2
        crop = np.asarray(image.array[z, y0 : y0 + side, x0 : x0 + side], dtype=np.float32)
        return crop, f"slice {z} (rows {y0}-{y0 + side}, columns {x0}-{x0 + side}) of {data['path']}"
    except (KeyError, TypeError, BadInputError) as exc:
        from emseg.synthetic import synthetic_stack

        log.warning("training data unavailable for the test tensors and cover (%s); using synthetic data", exc)
        side = max(256, -(-min_side // divisor) * divisor)
        raw, _ = synthetic_stack((1, side, side), seed=0)
        return raw[0].astype(np.float32), "synthetic EM-like data (the training store was unavailable)"


def voxel_size(meta: dict[str, Any]) -> tuple[float, float] | None:
    """(y, x) pixel size in nm of the training store, None when the checkpoint does not say."""
    size = (meta.get("data") or {}).get("voxel_size_nm")
    if not size or len(size) < 2:
        return None
    y, x = float(size[-2]), float(size[-1])
    return (y, x) if y > 0 and x > 0 else None


#: The ONNX operator set the exported graph uses.
ONNX_OPSET = 17


def export_model(run: str | Path, output: str | Path, config: ExportModelConfig | None = None) -> Path:
    """Export the model of ``run`` (a run directory or checkpoint) into the folder ``output``
    (an existing export is replaced only with ``config.overwrite``)."""
    from emseg.models.halo import measure_halo

    overwrite, opset = (config or ExportModelConfig()).overwrite, ONNX_OPSET

    check_output(Path(output).absolute(), overwrite, kind="run", inputs=[run])
    model, meta = load_trained(run, "cpu")
    classes = [str(c["name"]) for c in meta.get("classes") or []]
    divisor = int(meta["divisor"])
    halo = int(meta["halo"]) if meta.get("halo") is not None else measure_halo(model, divisor)
    context = package_context(halo, divisor)
    norm = dict(meta["normalization"])
    net = SliceEdges(Probability(model), divisor, edge_context(divisor)).eval()
    raw, source = training_crop(meta, divisor, min_side=2 * context + divisor)
    x = torch.from_numpy(normalize(raw, norm))[None, None]
    with torch.no_grad():
        expected = net(x).numpy()
    with Output(output, overwrite=overwrite, kind="run", command="export-model", inputs=[run]) as out:
        tmp = out.path
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.trace is deprecated and warns of traced sizes; both are dynamic here
            traced = torch.jit.trace(net, x[..., : 2 * divisor, : 2 * divisor], check_trace=False)
        traced.save(str(tmp / "model.pt"))
        _onnx(net, x[..., : 2 * divisor, : 2 * divisor], tmp / "model.onnx", opset)
        np.save(tmp / "test_input.npy", raw[None, None])
        np.save(tmp / "test_output.npy", expected.astype(np.float32))
        _samples(raw, expected[0] if classes else expected[0, 0], tmp)
        info = {
            "emseg_version": __version__,
            "input": "(B, 1, H, W) float32 normalised intensities (the package's preprocessing); NaN marks padding",
            "output": (
                f"(B, {len(classes)}, H, W) float32: the probability of each class ({', '.join(classes)}); "
                "the most probable class per pixel"
                if classes
                else "(B, 1, H, W) float32: P(cell interior); membranes where P < 0.5"
            ),
            "classes": classes,
            "normalization": norm,
            "preprocessing": preprocessing(norm),
            "divisor": divisor,
            "halo": halo,
            "context": context,
            "voxel_size_nm": list(voxel_size(meta) or []),
            "test_data": source,
            "architecture": meta["config"]["model"],
            "files": {"torchscript": "model.pt", "onnx": "model.onnx", "bioimageio": "rdf.yaml"},
        }
        (tmp / "emseg-model.json").write_text(json.dumps(info, indent=2) + "\n")
        _cover(raw, expected[0], tmp / "cover.png", meta.get("classes"))
        (tmp / "README.md").write_text(_readme(info))
        _rdf(tmp, info, meta, opset)
    return Path(output)


def _onnx(net: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # a dependency of emseg: only a broken install lacks it
        raise BadInputError("export-model needs the onnx package, a dependency of emseg: pip install onnx")
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net,
                (x,),
                str(path),
                dynamo=False,
                input_names=["raw"],
                output_names=["probability"],
                dynamic_axes={"raw": axes, "probability": axes},
                opset_version=opset,
            )
        except (ImportError, RuntimeError) as exc:  # pragma: no cover - exporter availability varies
            # torch.onnx's errors (OnnxExporterError, UnsupportedOperatorError) are RuntimeErrors
            raise BadInputError(f"ONNX export failed ({type(exc).__name__}: {exc})") from None


def _samples(raw: np.ndarray, prob: np.ndarray, folder: Path) -> None:
    """sample_input.tif (the raw crop) and sample_output.tif (P(cell), or (C, Y, X) class
    probabilities): float32 TIFFs."""
    import tifffile

    tifffile.imwrite(folder / "sample_input.tif", raw.astype(np.float32), photometric="minisblack")
    tifffile.imwrite(folder / "sample_output.tif", prob.astype(np.float32), photometric="minisblack")


def _cover(raw: np.ndarray, prob: np.ndarray, path: Path, classes: list[dict[str, Any]] | None = None) -> None:
    """A 2:1 PNG: the training crop beside it with the predicted membranes (P < 0.5) tinted, or
    with ``classes`` each pixel's most probable class in its colour over the grey image.
    ``prob``: (1, Y, X) P(cell) or (C, Y, X) class probabilities."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image

    from emseg.viz import display_range, overlay

    lo, hi = display_range(raw)
    grey = np.clip((raw - lo) / (hi - lo), 0, 1)
    if classes:
        colours = np.asarray([c.get("rgb", (255, 255, 255)) for c in classes], np.float32) / 255.0
        tinted = 0.5 * grey[..., None] + 0.5 * colours[prob.argmax(0)]
    else:
        tinted = overlay(raw, prob[0] < 0.5)
    picture = np.concatenate([np.repeat(grey[..., None], 3, axis=2), tinted], axis=1)
    matplotlib.image.imsave(path, np.clip(picture, 0, 1))


def _readme(info: dict[str, Any]) -> str:
    norm = info["normalization"]
    if has_percentiles(norm):
        low_pct, high_pct = norm["percentiles"][:2]
        how = (
            f"each input's own {low_pct:g} and {high_pct:g} percentiles are mapped where the training stack's "
            f"({norm['low']:.4g}, {norm['high']:.4g}) went under mean {norm['mean']:.4g}, std {norm['std']:.4g} "
            "(emseg predict's default, `--normalization slice`: each slice by its own percentiles)"
        )
    else:
        how = f"(raw - {norm['mean']:.4f}) / {norm['std']:.4f}"
    size = info["voxel_size_nm"]
    pixel = f"{size[0]:g} x {size[1]:g} nm" if size else "unknown"
    what = (
        f"# emseg U-Net: {', '.join(info['classes'])} in electron micrographs\n\n"
        "Trained with emseg (https://github.com/emseg/emseg) on EM slices annotated with these classes.\n\n"
        if info["classes"]
        else "# emseg U-Net: cell interior vs membrane in electron micrographs\n\n"
        "Trained with emseg (https://github.com/emseg/emseg) on annotated EM slices (ISBI 2012 layout:\n"
        "1 = cell interior, 0 = membrane).\n\n"
    )
    return (
        what
        + f"- input: raw EM slice, pixel size {pixel} (the training data's); normalised by the preprocessing: {how}\n"
        f"- output: {info['output']}\n"
        f"- halo {info['context']} px: a tool that tiles should overlap tiles by at least {2 * info['context']} px\n"
        "  and pad with NaN beyond the image (the network leaves NaN rows and columns out, so the slice edges then\n"
        "  match `emseg predict`; other padding changes the outermost pixels). The package declares no halo:\n"
        "  bioimageio.core would pad by it before measuring the percentiles, which shifts the normalisation;\n"
        "  its whole-image prediction equals `emseg predict`'s whole-slice pass\n"
        f"- test and sample tensors, cover: {info['test_data']}\n\n"
        "## Validation\n\n"
        "emseg scores held-out slices with the ISBI 2012 challenge's metrics (foreground-restricted V_rand and\n"
        "V_info after border thinning); the training run's metrics.csv and curves.png hold the figures.\n\n"
        "Cite the ISBI 2012 challenge (Arganda-Carreras et al. 2015, Frontiers in Neuroanatomy 9:142) and\n"
        "the U-Net (Ronneberger et al. 2015) when you use it.\n"
    )


def _rdf(folder: Path, info: dict[str, Any], meta: dict[str, Any], opset: int) -> None:
    divisor = int(info["divisor"])
    size = voxel_size(meta)

    def scaled(axis: str, entry: dict[str, Any]) -> dict[str, Any]:
        if size is not None:
            entry.update(unit="nanometer", scale=size[0] if axis == "y" else size[1])
        return entry

    def space(axis: str) -> dict[str, Any]:
        return scaled(axis, {"type": "space", "id": axis, "size": {"min": divisor, "step": divisor}})

    def out_space(axis: str) -> dict[str, Any]:
        return scaled(axis, {"type": "space", "id": axis, "size": {"tensor_id": "raw", "axis_id": axis}})

    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": f"emseg U-Net EM segmentation of {len(info['classes'])} classes"
        if info["classes"]
        else "emseg U-Net EM membrane segmentation",
        "description": (
            f"U-Net predicting {', '.join(info['classes'])} in serial-section electron micrographs (emseg)."
            if info["classes"]
            else "U-Net predicting P(cell interior) in serial-section electron micrographs (emseg)."
        ),
        "authors": [{"name": "emseg developers", "github_user": GITHUB_USER}],
        "cite": [ISBI_CITATION, UNET_CITATION],
        "license": "BSD-3-Clause",
        "documentation": "README.md",
        "covers": ["cover.png"],
        "tags": ["electron-microscopy", "segmentation", "unet", "2d", "membranes", "connectomics"],
        "version": "0.1.0",
        "inputs": [
            {
                "id": "raw",
                "description": "raw EM slice (any intensity range; normalised by the preprocessing)",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, space("y"), space("x")],
                "test_tensor": {"source": "test_input.npy", "sha256": _sha256(folder / "test_input.npy")},
                "sample_tensor": {"source": "sample_input.tif", "sha256": _sha256(folder / "sample_input.tif")},
                "data": {"type": "float32"},
                "preprocessing": info["preprocessing"],
            }
        ],
        "outputs": [
            {
                "id": "probability",
                "description": (
                    f"probability of each class ({', '.join(info['classes'])}); the most probable class per pixel"
                    if info["classes"]
                    else "P(cell interior); membranes where it is below 0.5"
                ),
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": info["classes"] or ["cell"]},
                    out_space("y"),
                    out_space("x"),
                ],
                "test_tensor": {"source": "test_output.npy", "sha256": _sha256(folder / "test_output.npy")},
                "sample_tensor": {"source": "sample_output.tif", "sha256": _sha256(folder / "sample_output.tif")},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            }
        ],
        "weights": {
            "torchscript": {
                "source": "model.pt",
                "sha256": _sha256(folder / "model.pt"),
                "pytorch_version": torch.__version__.split("+")[0],
            },
            "onnx": {
                "source": "model.onnx",
                "sha256": _sha256(folder / "model.onnx"),
                "opset_version": opset,
                "parent": "torchscript",
            },
        },
        "config": {"emseg": info},
    }
    write_rdf(folder, rdf)


def write_rdf(folder: Path, rdf: dict[str, Any]) -> Path:
    """``folder``/rdf.yaml: ``rdf`` built into bioimageio.spec's model description (every field
    and file hash validated; no network: the GitHub user is not looked up) and written by
    bioimageio.spec (plain YAML, no anchors). An invalid description is a bug in emseg: it raises
    before anything is written."""
    from bioimageio.spec import ModelDescr, ValidationContext, build_description, save_bioimageio_yaml_only

    with ValidationContext(root=folder, perform_io_checks=False):
        description = build_description(rdf)
    if not isinstance(description, ModelDescr):
        errors = [
            f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in description.validation_summary.details for e in d.errors
        ]
        raise RuntimeError(f"emseg built an invalid bioimage.io model description: {'; '.join(errors[:5])}")
    path = folder / "rdf.yaml"
    save_bioimageio_yaml_only(description, path)
    return path
