"""Every option is declared once, in emseg/config.py: its default, bounds and help. The CLI's
options are generated from the config fields, the API's keywords carry the same names and keep
the config's field unless given, a config checks every field when it is built, and no module
writes an option's default again (an AST scan of the whole package)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

import emseg
from emseg import config as C
from emseg.config import (
    KEEP,
    ExportConfig,
    IngestConfig,
    ModelConfig,
    PredictConfig,
    PreviewConfig,
    SegmentConfig,
    TrainConfig,
    override,
    override_train,
    slice_list,
    slice_range,
)
from emseg.errors import BadInputError
from emseg.io.zarr import open_ome

PACKAGE = Path(emseg.__file__).parent
TINY_MODEL = ModelConfig(depth=2, base_channels=4)
#: The configs of the commands: CLI command -> (API function, config classes whose user options it takes).
COMMANDS = {
    "ingest": ("ingest", (C.IngestConfig,)),
    "show": ("show", (C.ShowConfig,)),
    "train": ("train", (C.TrainConfig, C.ModelConfig)),
    "predict": ("predict", (C.PredictConfig,)),
    "segment": ("segment", (C.SegmentConfig,)),
    "evaluate": ("evaluate", (C.EvaluateConfig,)),
    "bench": ("bench", (C.BenchConfig,)),
    "export": ("export", (C.ExportConfig,)),
    "export-model": ("export_model", (C.ExportModelConfig,)),
    "augment-preview": ("augment_preview", (C.PreviewConfig,)),
    "demo": ("demo", (C.DemoConfig,)),
}


def _configs() -> list[type]:
    return [
        v for v in vars(C).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == "emseg.config" and v is not C.Limits
    ]  # fmt: skip


def _option_names() -> set[str]:
    return {f.name for cls in _configs() for f in dataclasses.fields(cls)}


def _literal(node: ast.AST) -> bool:
    """A default written as a literal: a number, string or bool (or a tuple or negation of them)."""
    if isinstance(node, ast.Constant):
        return node.value is not None and node.value is not Ellipsis
    if isinstance(node, ast.Tuple):
        return bool(node.elts) and all(_literal(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        return _literal(node.operand)
    return False


def literal_defaults(source: str, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, name, default) of every parameter, dataclass field or Typer option named like an
    option in ``names`` whose default is a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = [*zip(pos[len(pos) - len(a.defaults) :], a.defaults, strict=True)]
            pairs += zip(a.kwonlyargs, a.kw_defaults, strict=True)
            for arg, default in pairs:
                if default is not None and arg.arg.rstrip("_") in names and _literal(default):
                    found.append((node.lineno, arg.arg, ast.unparse(default)))
        elif isinstance(node, ast.ClassDef):
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None:
                    if st.target.id in names and _literal(st.value):
                        found.append((st.lineno, st.target.id, ast.unparse(st.value)))
    return found


def test_no_module_writes_an_option_default_again() -> None:
    """An option's default is written in config.py only: a parameter, dataclass field or Typer
    option named like an option anywhere else defaults to the config's value, None or KEEP."""
    names = _option_names()
    leaks = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name} = {value}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "config.py"
        for line, name, value in literal_defaults(path.read_text(), names)
    ]
    assert not leaks, "defaults written outside emseg/config.py:\n" + "\n".join(leaks)


def test_the_scan_finds_a_leak() -> None:
    """The scan above can fail: a hard-coded default of each kind is found."""
    source = """
def f(tile: int = 512, *, blend: str = "crop", name: str = "x"): ...
class S:
    threshold: float = 0.5
    other: int = 3
"""
    assert [(n, v) for _, n, v in literal_defaults(source, _option_names())] == [
        ("tile", "512"),
        ("blend", "'crop'"),
        ("threshold", "0.5"),
    ]


def _cli_params(command: str) -> dict[str, object]:
    from typer.main import get_command

    from emseg.cli import app

    return {p.name: p for p in get_command(app).commands[command].params}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_options_are_the_config_options(command: str) -> None:
    """Each command offers exactly the user options of its configs, with their declared flag,
    default and help (generated: a value typed into cli.py again would differ or be missing)."""
    _, classes = COMMANDS[command]
    params = _cli_params(command)
    declared = {name: f for cls in classes for name, f in C.user_options(cls).items()}
    assert set(declared) <= set(params), f"{command}: options missing from the CLI: {set(declared) - set(params)}"
    for name, f in declared.items():
        p = params[name]
        assert C.flag_of(f).split("/")[0] in p.opts, (command, name, p.opts)
        assert p.default == f.default, (command, name, p.default, f.default)
        assert p.help == f.metadata["help"], (command, name)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_api_keywords_are_the_config_options_and_keep_by_default(command: str) -> None:
    function, classes = COMMANDS[command]
    from emseg import api

    signature = inspect.signature(getattr(api, function))
    declared = {name for cls in classes for name in C.user_options(cls)}
    keywords = {n: p for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert declared <= set(keywords), f"{function}: keywords missing: {declared - set(keywords)}"
    for name in declared:
        assert keywords[name].default is KEEP, (function, name, keywords[name].default)
    extra = {n for n, p in keywords.items() if p.default is KEEP} - declared
    assert extra <= {"into"}, f"{function}: KEEP keywords that are no option of its config: {extra}"


def test_override_keyword_beats_config_keep_keeps_none_clears() -> None:
    base = PredictConfig(tile=256, tta=True, workers=2)
    assert override(PredictConfig, base) == base
    assert override(PredictConfig, base, tile=KEEP, tta=KEEP) == base
    merged = override(PredictConfig, base, tile=128)
    assert (merged.tile, merged.tta) == (128, True)
    assert override(PredictConfig, base, workers=None).workers is None  # an optional field is cleared
    assert override(TrainConfig, TrainConfig(time_limit=60), time_limit=None).time_limit is None
    with pytest.raises(BadInputError, match="--tile"):
        override(PredictConfig, base, tile=None)  # not optional: None is refused, not kept
    assert override(PredictConfig, None, overlap=32) == PredictConfig(overlap=32)
    with pytest.raises(BadInputError):
        override(PredictConfig, TrainConfig())


def test_override_train_routes_model_fields() -> None:
    cfg = override_train(
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


@pytest.mark.parametrize(
    "cls, changes, says",
    [
        (PredictConfig, dict(workers=0), "--workers"),
        (PredictConfig, dict(tile=0), "--tile"),
        (PredictConfig, dict(batch_size=0), "--batch-size"),
        (PredictConfig, dict(overlap=-1), "--overlap"),
        (PredictConfig, dict(threshold=2.0), "--threshold"),
        (PredictConfig, dict(threshold=float("nan")), "--threshold"),
        (PredictConfig, dict(dtype="int7"), "--dtype"),
        (PredictConfig, dict(blend="median"), "--blend"),
        (PredictConfig, dict(tile="512"), "--tile"),
        (PredictConfig, dict(tta="yes"), "--tta"),
        (TrainConfig, dict(lr=float("nan")), "--lr"),
        (TrainConfig, dict(epochs=0), "--epochs"),
        (TrainConfig, dict(time_limit=-1.0), "--time-limit"),
        (TrainConfig, dict(seed=-1), "--seed"),
        (TrainConfig, dict(loss="l2"), "--loss"),
        (TrainConfig, dict(ema_decay=1.5), "--ema-decay"),
        (SegmentConfig, dict(merge_threshold=1.5), "--merge-threshold"),
        (SegmentConfig, dict(mode="4d"), "--mode"),
        (IngestConfig, dict(chunks=(1, 0, 64)), "--chunks"),
        (IngestConfig, dict(voxel_size=(50, -4, 4)), "--voxel-size"),
        (IngestConfig, dict(chunks=(1, 2)), "--chunks"),
        (ExportConfig, dict(file_format="jpeg"), "--format"),
        (ModelConfig, dict(arch="vgg"), "--arch"),
    ],
)
def test_a_config_checks_its_fields_when_built(cls: type, changes: dict, says: str) -> None:
    with pytest.raises(BadInputError, match=says):
        cls(**changes)


def test_runtime_fields_are_declared_with_their_options() -> None:
    """What a resume record leaves out comes from the declarations (not a list per command)."""
    assert set(C.runtime_fields(PredictConfig)) >= {"device", "batch_size", "workers", "scheduler", "overwrite"}
    assert "tile" not in C.runtime_fields(PredictConfig) and "merge_threshold" not in C.runtime_fields(SegmentConfig)


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
