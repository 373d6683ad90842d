"""``emseg demo``: the whole flow on a default that works offline.

With the ISBI 2012 stacks (``--data DIR`` or found in the usual places) it uses them; otherwise
it generates a synthetic EM-like stack with ground truth (``emseg.synthetic``) in the same layout
(train-volume.tif, train-labels.tif, test-volume.tif), so it runs anywhere without internet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emseg.config import ISBI_VOXEL_SIZE_NM
from emseg.errors import BadInputError
from emseg.progress import Reporter

log = logging.getLogger(__name__)

ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")


def find_isbi(data: str | Path | None) -> Path | None:
    """The folder holding the ISBI stacks: ``data`` if given (it must hold them), else the first of
    $EMSEG_DATA, ./data/isbi2012 and ../shared/data/isbi2012 that does; None when none does."""
    if data is not None:
        folder = Path(data)
        missing = [f for f in ISBI_FILES if not (folder / f).is_file()]
        if missing:
            raise BadInputError(f"--data {folder}: missing {', '.join(missing)} (the ISBI 2012 layout)")
        return folder
    candidates = [os.environ.get("EMSEG_DATA"), "data/isbi2012", "../shared/data/isbi2012"]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in ISBI_FILES):
            return Path(c)
    return None


def write_synthetic(folder: Path, shape: tuple[int, int, int] = (30, 512, 512), seed: int = 0) -> Path:
    """Write a synthetic EM-like stack in the ISBI layout (train volume + labels, test volume)."""
    import tifffile

    from emseg.synthetic import synthetic_stack

    folder.mkdir(parents=True, exist_ok=True)
    raw, labels = synthetic_stack(shape, seed=seed)
    test, _ = synthetic_stack(shape, seed=seed + 1)
    resolution = (1e7 / ISBI_VOXEL_SIZE_NM[2], 1e7 / ISBI_VOXEL_SIZE_NM[1])
    for name, stack in zip(ISBI_FILES, (raw, labels, test)):
        tifffile.imwrite(folder / name, stack, photometric="minisblack", resolution=resolution, resolutionunit="CENTIMETER")
    return folder


@dataclass
class DemoResult:
    """Where everything went, and the scores."""

    data: str
    outputs: dict[str, str] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)


def run_demo(
    data: str | Path | None = None,
    output: str | Path = "emseg-demo",
    progress: Reporter | None = None,
) -> DemoResult:
    """Ingest the training and test stacks, then describe and picture them."""
    from emseg import api

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    folder = find_isbi(data)
    source = "ISBI 2012" if folder is not None else "synthetic EM-like stack"
    if folder is None:
        folder = write_synthetic(out / "synthetic")
    result = DemoResult(data=f"{source} ({folder})")
    train = api.ingest(
        folder / "train-volume.tif", out / "train.zarr", labels=folder / "train-labels.tif",
        voxel_size=ISBI_VOXEL_SIZE_NM, overwrite=True, progress=progress,
    )
    test = api.ingest(folder / "test-volume.tif", out / "test.zarr", voxel_size=ISBI_VOXEL_SIZE_NM,
                      overwrite=True, progress=progress)
    result.outputs.update(train=str(train), test=str(test))
    result.scores["train_info"] = api.info(train)
    result.outputs["view"] = str(api.show(train, out / "view-train-slice0.png", slice=0))
    return result
