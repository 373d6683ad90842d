"""Defaults live in the config classes, once: a config's fields survive every public function,
a keyword that is given beats the config, and the CLI's defaults are the configs' defaults."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

import emseg
from emseg.config import (
    ExportConfig,
    IngestConfig,
    ModelConfig,
    PredictConfig,
    PreviewConfig,
    TrainConfig,
    merge,
    merge_train,
    slice_list,
    slice_range,
)
from emseg.errors import BadInputError
from emseg.io.zarr import open_ome

TINY_MODEL = ModelConfig(depth=2, base_channels=4)


def test_merge_keyword_beats_config_none_keeps_it() -> None:
    base = PredictConfig(tile=256, tta=True)
    assert merge(PredictConfig, base) == base
    assert merge(PredictConfig, base, tile=None, tta=None) == base
    merged = merge(PredictConfig, base, tile=128)
    assert (merged.tile, merged.tta) == (128, True)
    assert merge(PredictConfig, None, overlap=32) == PredictConfig(overlap=32)
    with pytest.raises(BadInputError):
        merge(PredictConfig, TrainConfig())


def test_merge_train_routes_model_fields() -> None:
    cfg = merge_train(
        TrainConfig(device="cpu", model=ModelConfig(depth=3, base_channels=8)), base_channels=16, epochs=2
    )
    assert (cfg.device, cfg.epochs, cfg.model.depth, cfg.model.base_channels) == ("cpu", 2, 3, 16)


def test_one_slice_parser() -> None:
    assert slice_range("27:30") == (27, 30) == slice_range((27, 30))
    assert slice_list("27:30") == (27, 28, 29) == slice_list("27,28,29") == slice_list([27, 28, 29])
    assert PredictConfig(slices="3:5").slices == (3, 5)
    assert TrainConfig(val_slices="29").val_slices == (29,)
    for bad in ("5:3", "a:b", "3", "-1:2"):
        with pytest.raises(BadInputError):
            slice_range(bad)


@pytest.mark.parametrize("changes", [dict(workers=0), dict(tile=0), dict(batch_size=0), dict(overlap=-1)])
def test_counts_must_be_positive(changes: dict) -> None:
    with pytest.raises(BadInputError):
        PredictConfig(**changes)


@pytest.mark.parametrize("changes", [dict(lr=float("nan")), dict(epochs=0), dict(time_limit=-1.0)])
def test_train_values_are_checked(changes: dict) -> None:
    with pytest.raises(BadInputError):
        TrainConfig(**changes)


def _option_defaults(command: str) -> dict[str, object]:
    """{python parameter name: default} of a CLI command's options."""
    from emseg.cli import app

    for info in app.registered_commands:
        if info.name == command:
            out = {}
            for name, param in inspect.signature(info.callback).parameters.items():
                default = getattr(param.default, "default", None)
                out[name] = default
            return out
    raise KeyError(command)


@pytest.mark.parametrize(
    "command, configs",
    [
        ("ingest", (IngestConfig,)),
        ("train", (TrainConfig, ModelConfig)),
        ("predict", (PredictConfig,)),
        ("export", (ExportConfig,)),
        ("augment-preview", (PreviewConfig,)),
    ],
)
def test_cli_defaults_are_the_config_defaults(command: str, configs: tuple) -> None:
    defaults = _option_defaults(command)
    checked = 0
    for cls in configs:
        instance = cls()
        for name, value in defaults.items():
            if hasattr(instance, name) and name not in ("overwrite", "resume"):
                expected = getattr(instance, name)
                assert value == expected or (value is None and expected is None), (command, name, value, expected)
                checked += 1
    assert checked >= 2, f"{command}: no option matched a config field"


# --- every public function keeps a config's fields, and a keyword beats them -------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A small annotated synthetic stack as TIFF files and its store, and a tiny trained run."""
    from emseg.synthetic import synthetic_stack

    d = tmp_path_factory.mktemp("config")
    raw, labels = synthetic_stack((4, 128, 128), seed=1)
    tifffile.imwrite(d / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(d / "lab.tif", labels, photometric="minisblack")
    store = emseg.ingest(d / "raw.tif", d / "data.zarr", labels=d / "lab.tif", voxel_size=(50, 4, 4))
    cfg = TrainConfig(
        device="cpu", model=TINY_MODEL, epochs=1, steps_per_epoch=2, batch_size=2, crop=32, val_slices=(3,), seed=5
    )
    emseg.train(store, d / "run", config=cfg)
    return {"dir": d, "store": store, "run": d / "run"}


def test_ingest_config_survives_and_keyword_wins(small: dict[str, Path]) -> None:
    d = small["dir"]
    cfg = IngestConfig(chunks=(1, 64, 64), voxel_size=(40.0, 2.0, 2.0))
    a = open_ome(emseg.ingest(d / "raw.tif", d / "a.zarr", config=cfg))
    assert a.array.chunks == (1, 64, 64) and a.voxel_size == (40.0, 2.0, 2.0)
    b = open_ome(emseg.ingest(d / "raw.tif", d / "b.zarr", chunks=(1, 32, 32), config=cfg))
    assert b.array.chunks == (1, 32, 32) and b.voxel_size == (40.0, 2.0, 2.0)


def test_train_config_survives_and_keyword_wins(small: dict[str, Path]) -> None:
    saved = json.loads((small["run"] / "config.json").read_text())["config"]
    assert saved["device"] == "cpu" and saved["seed"] == 5 and saved["crop"] == 32
    assert saved["model"]["depth"] == 2 and saved["model"]["base_channels"] == 4
    cfg = TrainConfig(
        device="cpu", model=TINY_MODEL, epochs=1, steps_per_epoch=1, batch_size=2, crop=32, val_slices=(3,), seed=5
    )
    emseg.train(small["store"], small["dir"] / "run2", seed=9, base_channels=2, config=cfg)
    saved = json.loads((small["dir"] / "run2" / "config.json").read_text())["config"]
    assert saved["seed"] == 9 and saved["model"]["base_channels"] == 2
    assert saved["device"] == "cpu" and saved["steps_per_epoch"] == 1 and saved["model"]["depth"] == 2


def _settings(store: Path) -> dict:
    return open_ome(store).attrs["emseg"]["settings"]


def test_predict_config_survives_and_keyword_wins(small: dict[str, Path]) -> None:
    cfg = PredictConfig(tile=64, overlap=16, tta=True, blend="linear", dtype="float16", device="cpu", slices=(1, 3))
    out = emseg.predict(small["run"], small["store"], small["dir"] / "p1.zarr", config=cfg)
    s = _settings(out)
    assert (s["tile"], s["overlap"], s["tta"], s["blend"], s["dtype"]) == (64, 16, True, "linear", "float16")
    assert open_ome(out).shape == (2, 128, 128) and open_ome(out).array.dtype == np.float16
    out = emseg.predict(small["run"], small["store"], small["dir"] / "p2.zarr", tile=32, tta=False, config=cfg)
    s = _settings(out)
    assert (s["tile"], s["overlap"], s["tta"], s["blend"]) == (32, 16, False, "linear")


def test_export_config_survives_and_keyword_wins(small: dict[str, Path]) -> None:
    d = small["dir"]
    out = emseg.export(small["store"], d / "slices", config=ExportConfig(file_format="png", labels="cells"))
    pngs = sorted(out.iterdir())
    assert len(pngs) == 4 and {p.suffix for p in pngs} == {".png"}
    out = emseg.export(
        small["store"], d / "cells.tif", file_format="tif", config=ExportConfig(file_format="png", labels="cells")
    )
    assert set(np.unique(tifffile.imread(out)).tolist()) <= {0, 255}


def test_preview_config_survives_and_keyword_wins(small: dict[str, Path]) -> None:
    from PIL import Image

    d = small["dir"]
    cfg = PreviewConfig(crop=32, samples=3, seed=2)
    three = Image.open(emseg.augment_preview(small["store"], d / "three.png", config=cfg)).size
    one = Image.open(emseg.augment_preview(small["store"], d / "one.png", samples=1, config=cfg)).size
    # 4 rows of panels against 2, the same columns (pictures are cropped to what is drawn: a few
    # pixels of width may differ with the tick labels)
    assert abs(three[0] - one[0]) <= 0.02 * one[0] and three[1] > 1.5 * one[1]
