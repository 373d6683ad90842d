"""Models that ship inside emseg: ``builtin:NAME`` wherever a run directory or checkpoint is taken.

Each is a safetensors checkpoint like any run's (never pickle), in ``emseg/models/weights/``, with
its training data, scores, licence and training pixel size in its header (``builtin`` key). Its
SHA-256 is written here: a file that does not match (altered, truncated, replaced) is refused
before it is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from emseg.errors import BadInputError

PREFIX = "builtin:"
WEIGHTS = Path(__file__).parent / "weights"
#: name -> (file in WEIGHTS, its SHA-256).
MODELS: dict[str, tuple[str, str]] = {
    "membranes": ("membranes.safetensors", "6938a154c39ffeefe83390569c2800be9c1e9f7b94df769736936fbf903f2d8a"),
}


def is_builtin(spec: object) -> bool:
    """Whether ``spec`` (a path or text) names a built-in model."""
    return str(spec).startswith(PREFIX)


def builtin_path(spec: object) -> Path:
    """The checked file of ``builtin:NAME``: a known name whose file matches its recorded SHA-256."""
    name = str(spec)[len(PREFIX) :]
    if name not in MODELS:
        raise BadInputError(f"{spec}: no such built-in model (emseg models lists them: {', '.join(MODELS)})")
    file, digest = MODELS[name]
    path = WEIGHTS / file
    if not path.is_file():
        raise BadInputError(f"{spec}: its weights ({path}) are missing from this installation; reinstall emseg")
    if sha256(path) != digest:
        raise BadInputError(
            f"{spec}: {path} does not match the weights emseg shipped (SHA-256 differs): it was altered; "
            "reinstall emseg"
        )
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["MODELS", "PREFIX", "builtin_path", "is_builtin", "sha256"]
