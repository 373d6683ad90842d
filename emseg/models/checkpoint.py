"""Checkpoints: safetensors weights with the JSON config in their header. Never pickle.

A checkpoint file ``NAME.safetensors`` holds the model's tensors and, in its metadata, the
whole run config as JSON (``emseg`` key): the file alone rebuilds its model and its intensity
normalisation. A run directory holds ``best.safetensors``, ``last.safetensors``,
``resume.safetensors`` (for ``--resume``) and a human-readable ``config.json``.

Loading reads safetensors and JSON only: a file that is anything else (a pickle, say) is
refused before a byte of it is interpreted. :func:`load_trained` rebuilds the eval-mode network a
checkpoint describes; :func:`unwrap` reaches the plain network inside torch.compile and DDP.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emseg.config import ModelConfig, TrainConfig, from_dict
from emseg.device import resolve_device
from emseg.errors import BadInputError
from emseg.io.outputs import write_bytes_atomic
from emseg.io.untrusted import check_source
from emseg.models.build import build_model, check_model_config

META_KEY = "emseg"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside torch.compile (``_orig_mod``) and DistributedDataParallel or
    DataParallel (``.module``) wrappers, in any nesting; any other module is returned as is."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the model's state (contiguous CPU copies) and ``meta`` atomically to ``path``."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    data = save(tensors, metadata={META_KEY: json.dumps(meta)})
    write_bytes_atomic(path, data)
    return path


def add_meta(path: Path, **entries: Any) -> Path:
    """Rewrite the checkpoint ``path`` atomically with ``entries`` added to its meta (the
    segmentation settings a run calibrated after training, say); the tensors stay as they are."""
    from safetensors.torch import save

    tensors, meta = read_checkpoint(path)
    write_bytes_atomic(path, save(tensors, metadata={META_KEY: json.dumps({**meta, **entries})}))
    return path


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory's ``best.safetensors`` (else ``last.safetensors``), the file itself, or the
    checked file of a built-in model (``builtin:NAME``, :mod:`emseg.models.builtin`)."""
    from emseg.models.builtin import builtin_path, is_builtin

    if is_builtin(path):
        return builtin_path(path)
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such model (give a run directory or a .safetensors checkpoint)")
    check_source(path, "model")
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).exists():
                return check_source(path / name, "checkpoint")
        raise BadInputError(f"{path}: run directory holds no best.safetensors or last.safetensors")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors on the CPU, meta dict) of a checkpoint, without unpickling anything."""
    path = resolve_checkpoint(path)
    if not _is_safetensors(path):
        raise BadInputError(f"{path}: not a safetensors checkpoint (emseg never loads pickles)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    # An untrusted file: safetensors and torch raise many kinds of error on a malformed header or
    # tensor (SafetensorError, RuntimeError, TypeError, ...); any of them means a bad checkpoint.
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if META_KEY not in header:
        raise BadInputError(f"{path}: not an emseg checkpoint (no emseg config in its header)")
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as exc:
        raise BadInputError(f"{path}: corrupt config in checkpoint header ({exc})") from None
    return tensors, meta


def checked_config(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TrainConfig:
    """The training config of a checkpoint, after refusing one a model cannot safely come from:
    an incomplete config, a model outside :class:`~emseg.config.Limits` (checked before anything
    is built), a normalisation whose mean is not finite or whose std is not a positive number, or
    weights that are not all finite."""
    try:
        config = from_dict(TrainConfig, meta["config"])
        norm = meta["normalization"]
        mean, std = float(norm["mean"]), float(norm["std"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadInputError(f"{path}: checkpoint config is incomplete or from an incompatible emseg ({exc})") from None
    if not isinstance(config.model, ModelConfig):
        raise BadInputError(f"{path}: checkpoint config is incomplete (its model is {config.model!r})")
    check_model_config(config.model, source=f"{path}: checkpoint config")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise BadInputError(
            f"{path}: checkpoint normalisation mean {mean} / std {std} is unusable (a finite mean and a "
            "positive std are needed); the checkpoint is corrupt"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInputError(f"{path}: weight {name} holds NaN or infinite values; the checkpoint is corrupt")
    return config


def refuse_classes(meta: dict[str, Any], path: str | Path, command: str) -> None:
    """BadInputError for a network of several classes where ``command`` handles P(cell) only."""
    classes = meta.get("classes")
    if classes:
        names = ", ".join(str(c.get("name")) for c in classes)
        raise BadInputError(
            f"{path}: a network of {len(classes)} classes ({names}); {command} takes membrane networks (P(cell)) "
            "only so far: score it with its run's validation (metrics.csv) or benchmarks/classes_score.py"
        )


def check_trained(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, meta) after loading the model once on the CPU: everything
    :func:`load_trained` refuses is refused here, in the calling process, before any output exists."""
    resolved = resolve_checkpoint(path)
    _, meta = load_trained(resolved, "cpu")
    return resolved, meta


def load_trained(
    path: str | Path, device: str | torch.device, *, compiled: bool = False, threads: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(eval-mode model on ``device``, checkpoint meta) of a run directory or checkpoint. The meta
    has ``config``, ``normalization`` {mean, std}, ``halo`` and ``divisor``; the model carries it
    as ``emseg_meta``. ``compiled`` wraps it in ``torch.compile`` (static shapes; :func:`unwrap`
    reaches the network); ``threads`` sets torch's CPU threads of this process (a dask worker
    sharing the machine's cores)."""
    tensors, meta = read_checkpoint(path)
    config = checked_config(path, tensors, meta)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    # offline always: an smp encoder is built without pretrained weights, then the saved ones load
    model = build_model(dataclasses.replace(config.model, encoder_weights=None))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise BadInputError(
            f"{path}: weights do not fit the model its config describes ({str(exc).splitlines()[0]})"
        ) from None
    model.to(dev).eval()
    model.emseg_meta = meta  # type: ignore[assignment]
    if threads:
        torch.set_num_threads(threads)
    if compiled:
        model = torch.compile(model, dynamic=False)  # type: ignore[assignment]
    return model, meta


def list_models() -> list[dict[str, Any]]:
    """Every built-in model: its name, file, size and what its header says of it (training data,
    pixel size, scores, licence, parameters)."""
    from emseg.models.builtin import MODELS, PREFIX, builtin_path

    out = []
    for name in MODELS:
        path = builtin_path(PREFIX + name)
        meta = read_checkpoint(path)[1]
        out.append(
            {
                "name": PREFIX + name,
                "file": str(path),
                "size_bytes": path.stat().st_size,
                "parameters": meta.get("parameters"),
                **meta.get("builtin", {}),
            }
        )
    return out


def save_resume_point(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
    """Everything ``--resume`` needs in one file, written atomically: the model's tensors
    (``model/...``), the optimizer's (``optim/N.key``), and as JSON its param groups and scalars
    plus ``extra`` (the loop's state). One file: a crash can never pair weights and optimizer
    state of different steps."""
    from safetensors.torch import save

    tensors = {f"model/{k}": v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars, "extra": extra}
    write_bytes_atomic(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))
    return path


def load_resume_point(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer saved by :func:`save_resume_point`; returns (model tensors, extra)."""
    tensors, meta = read_checkpoint(path)
    model: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, tensor in tensors.items():
            kind, rest = name.split("/", 1)
            if kind == "model":
                model[rest] = tensor
            else:
                index, key = rest.split(".", 1)
                state.setdefault(int(index), {})[key] = tensor
        for index, values in meta["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadInputError(
            f"--resume: {path} does not fit this model (saved with other model settings, e.g. another --depth: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}); give the options it was "
            "trained with, or start afresh with --overwrite"
        ) from None
    return model, meta.get("extra", {})
