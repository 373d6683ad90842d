"""emseg: segment electron-microscopy stacks.

TIFF stacks into OME-Zarr, a U-Net trained on a few annotated slices, seam-free tiled prediction
over stacks far larger than memory (locally or on a dask cluster), and the ISBI 2012 metrics.

Every CLI command is also a function here, with parameters named like the command's options::

    import emseg
    emseg.ingest("stack.tif", "data.zarr", labels="labels.tif")
    emseg.info("data.zarr")

The functions are imported lazily, so ``import emseg`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from emseg._version import __version__

_API = (
    "ingest",
    "info",
    "builtin_models",
    "show",
    "train",
    "predict",
    "segment",
    "evaluate",
    "export",
    "export_model",
    "load_model",
    "augment_preview",
    "bench",
    "demo",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from emseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'emseg' has no attribute {name!r}")
