"""``emseg export-model``: a trained network out of emseg, for the tools biologists use.

Writes into a folder:

- ``model.pt``: TorchScript (``torch.jit.load`` in Python or C++, deepImageJ, QuPath);
- ``model.onnx``: ONNX, batch, height and width dynamic (onnxruntime, ilastik, Fiji);
- ``emseg-model.json``: the intensity normalisation, size divisor and halo the files need;
- ``rdf.yaml`` with ``test_input.npy`` / ``test_output.npy``, ``README.md`` and ``cover.png``: a
  bioimage.io model package (ilastik, deepImageJ and QuPath open it from there).

Both files take (B, 1, H, W) float32 ``(raw - mean) / std`` with H and W multiples of the
divisor, and return (B, 1, H, W) P(cell interior) (a sigmoid is part of the exported network).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emseg._version import __version__
from emseg.errors import BadInputError
from emseg.io.outputs import Output, check_output
from emseg.models.checkpoint import load_trained

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


class Probability(nn.Module):
    """The trained network followed by a sigmoid: logits -> P(cell)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tensor(meta: dict[str, Any], divisor: int, halo: int) -> np.ndarray:
    """A (1, 1, S, S) float32 raw crop for the package's test: ISBI-like synthetic data."""
    from emseg.synthetic import synthetic_stack

    size = max(256, -(-(2 * halo + 64) // divisor) * divisor)
    raw, _ = synthetic_stack((1, size, size), seed=0)
    return raw[None].astype(np.float32)


def export_model(run: str | Path, output: str | Path, *, overwrite: bool = False, opset: int = 17) -> Path:
    """Export the model of ``run`` (a run directory or checkpoint) into the folder ``output``."""
    from emseg.models.halo import measure_halo

    check_output(Path(output).absolute(), overwrite, kind="run", inputs=[run])
    model, meta = load_trained(run, "cpu")
    divisor = int(meta["divisor"])
    halo = int(meta["halo"]) if meta.get("halo") is not None else measure_halo(model, divisor)
    mean, std = float(meta["normalization"]["mean"]), float(meta["normalization"]["std"])
    net = Probability(model).eval()
    raw = test_tensor(meta, divisor, halo)
    x = torch.from_numpy((raw - mean) / std)
    with torch.no_grad():
        expected = net(x).numpy()
    with Output(output, overwrite=overwrite, kind="run", command="export-model", inputs=[run]) as out:
        tmp = out.path
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated, TorchScript is what tools load
            traced = torch.jit.trace(net, x[..., : 2 * divisor, : 2 * divisor], check_trace=False)
        traced.save(str(tmp / "model.pt"))
        _onnx(net, x, tmp / "model.onnx", opset)
        np.save(tmp / "test_input.npy", raw)
        np.save(tmp / "test_output.npy", expected.astype(np.float32))
        info = {
            "emseg_version": __version__,
            "input": "(B, 1, H, W) float32: (raw - mean) / std, H and W multiples of divisor",
            "output": "(B, 1, H, W) float32: P(cell interior); membranes where P < 0.5",
            "normalization": {"mean": mean, "std": std},
            "divisor": divisor,
            "halo": halo,
            "architecture": meta["config"]["model"],
            "files": {"torchscript": "model.pt", "onnx": "model.onnx", "bioimageio": "rdf.yaml"},
        }
        (tmp / "emseg-model.json").write_text(json.dumps(info, indent=2) + "\n")
        _cover(raw[0, 0], expected[0, 0], tmp / "cover.png")
        (tmp / "README.md").write_text(_readme(info))
        _rdf(tmp, info, mean, std, divisor, halo, opset)
    return Path(output)


def _onnx(net: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
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


def _cover(raw: np.ndarray, prob: np.ndarray, path: Path) -> None:
    from emseg.viz import overlay, panel_rows

    panel_rows([{"image": raw, "prob: P(cell)": prob, "overlay: membranes": overlay(raw, prob < 0.5)}], path)


def _readme(info: dict[str, Any]) -> str:
    return (
        "# emseg U-Net: cell interior vs membrane in electron micrographs\n\n"
        "Trained with emseg (https://github.com/emseg/emseg) on annotated EM slices (ISBI 2012 layout:\n"
        "1 = cell interior, 0 = membrane).\n\n"
        f"- input: {info['input']}, mean {info['normalization']['mean']:.4f}, std {info['normalization']['std']:.4f}\n"
        f"- output: {info['output']}\n"
        f"- tile inputs overlapping by at least {2 * info['halo']} px (twice the halo) for seam-free stitching\n\n"
        "## Validation\n\n"
        "emseg scores held-out slices with the ISBI 2012 challenge's metrics (foreground-restricted V_rand and\n"
        "V_info after border thinning); the training run's metrics.csv and curves.png hold the figures.\n\n"
        "Cite the ISBI 2012 challenge (Arganda-Carreras et al. 2015, Frontiers in Neuroanatomy 9:142) and\n"
        "the U-Net (Ronneberger et al. 2015) when you use it.\n"
    )


def _rdf(folder: Path, info: dict[str, Any], mean: float, std: float, divisor: int, halo: int, opset: int) -> None:
    import yaml

    def space(axis: str) -> dict[str, Any]:
        return {
            "type": "space",
            "id": axis,
            "size": {"min": max(divisor, 2 * halo + divisor), "step": divisor},
            "unit": "nanometer",
            "scale": 4.0,
        }

    def out_space(axis: str) -> dict[str, Any]:
        return {
            "type": "space",
            "id": axis,
            "size": {"tensor_id": "raw", "axis_id": axis},
            "halo": halo,
            "unit": "nanometer",
            "scale": 4.0,
        }

    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": "emseg U-Net EM membrane segmentation",
        "description": "U-Net predicting P(cell interior) in serial-section electron micrographs (emseg).",
        "authors": [{"name": "emseg developers"}],
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
                "data": {"type": "float32"},
                "preprocessing": [{"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": mean, "std": std}}],
            }
        ],
        "outputs": [
            {
                "id": "probability",
                "description": "P(cell interior); membranes where it is below 0.5",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["cell"]},
                    out_space("y"),
                    out_space("x"),
                ],
                "test_tensor": {"source": "test_output.npy", "sha256": _sha256(folder / "test_output.npy")},
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
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
