"""Nothing emseg runs may destroy what it did not write (issue 11).

Every writing command x every kind of target that is not emseg's to write (the input itself, a
path inside it, a folder containing it, a symlink to it, a user's file, a user's folder, a FIFO,
a path under a regular file) x with and without --overwrite: exit code 2, one line, and every
pre-existing byte unchanged (the whole tree is hashed before and after). Then --overwrite
replaces what emseg wrote (its marker) and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from emseg.config import ModelConfig, TrainConfig, to_dict

FOREIGN = b"a user's own bytes \x00\x01\x02 that emseg must never touch\n"


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed, FIFOs not opened): its kind and content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            else:
                out[rel] = f"special:{stat.S_IFMT(mode)}"
    return out


def _tiny_run(run: Path, raw: np.ndarray) -> Path:
    """A run directory with an untrained tiny U-Net, written the way training writes it."""
    from emseg.models.build import build_model
    from emseg.models.checkpoint import save_checkpoint
    from emseg.training.run_dir import RunDir

    config = TrainConfig(model=ModelConfig(depth=2, base_channels=4), crop=32, batch_size=2, device="cpu")
    model = build_model(config.model)
    meta = RunDir(run).meta(
        config,
        {
            "normalization": {"mean": float(raw.mean()), "std": float(raw.std())},
            "halo": int(model.halo),
            "divisor": int(model.divisor),
        },
    )
    run.mkdir()
    save_checkpoint(run / "best.safetensors", model, meta)
    (run / "config.json").write_text(json.dumps(meta))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Inputs every command reads, made once: a slice folder and labels, a store, a run, a prediction."""
    import tifffile

    from emseg.config import IngestConfig, PredictConfig
    from emseg.inference.predict import predict_store
    from emseg.io.ingest import ingest_stack
    from emseg.synthetic import synthetic_stack

    root = tmp_path_factory.mktemp("world")
    raw, labels = synthetic_stack((3, 64, 64), seed=1)
    slices = root / "slices"
    slices.mkdir()
    for z in range(raw.shape[0]):
        tifffile.imwrite(slices / f"s{z}.tif", raw[z], photometric="minisblack")
    tifffile.imwrite(root / "lab.tif", labels, photometric="minisblack")
    data = ingest_stack(slices, root / "data.zarr", IngestConfig(voxel_size=(50, 4, 4)), labels=root / "lab.tif")
    run = _tiny_run(root / "run", raw)
    pred = predict_store(run, data, root / "pred.zarr", PredictConfig(tile=32, overlap=8, device="cpu"))
    (root / "user.bin").write_bytes(FOREIGN)
    return {"root": root, "slices": slices, "labels": root / "lab.tif", "data": data, "run": run, "pred": pred}


#: command -> (argv for an output path, the input the targets aim at, its other inputs)
COMMANDS = {
    "ingest": (lambda w, o: ["ingest", w["slices"], "-o", o, "--labels", w["labels"], "-q"], "slices"),
    "predict": (
        lambda w, o: ["predict", w["run"], w["data"], "-o", o, "--tile", "32", "--overlap", "8", "--device", "cpu"],
        "data",
    ),
    "predict-model": (
        lambda w, o: ["predict", w["run"], w["data"], "-o", o, "--tile", "32", "--overlap", "8", "--device", "cpu"],
        "run",
    ),
    "segment": (lambda w, o: ["segment", w["pred"], "-o", o, "--block", "32", "-q"], "pred"),
    "export": (lambda w, o: ["export", w["pred"], "-o", o, "--format", "tif", "-q"], "pred"),
    "export-png": (lambda w, o: ["export", w["pred"], "-o", o, "--format", "png", "-q"], "pred"),
    "export-model": (lambda w, o: ["export-model", w["run"], "-o", o, "-q"], "run"),
    "evaluate": (lambda w, o: ["evaluate", w["pred"], w["data"], "--json", o], "pred"),
    "evaluate-data": (lambda w, o: ["evaluate", w["pred"], w["data"], "--json", o], "data"),
    "show": (lambda w, o: ["show", w["data"], "-o", o, "--pred", w["pred"]], "data"),
    "show-pred": (lambda w, o: ["show", w["data"], "-o", o, "--pred", w["pred"]], "pred"),
    "augment-preview": (lambda w, o: ["augment-preview", w["data"], "-o", o, "--crop", "32", "-n", "1"], "data"),
    "train": (
        lambda w, o: [
            "train", w["data"], "-o", o, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
            "--crop", "32", "--depth", "2", "--base-channels", "4", "--device", "cpu", "-q",
        ],
        "data",
    ),
    "bench": (
        lambda w, o: ["bench", "--device", "cpu", "--quick", "--no-monai", "--model", w["run"], "--json", o],
        "run",
    ),
}  # fmt: skip

TARGETS = (
    "the input",
    "inside the input",
    "a folder containing the input",
    "a symlink to the input",
    "a user's file",
    "a user's folder",
    "a FIFO",
    "a path under a regular file",
)


def _target(kind: str, world: dict[str, Path], source: Path, scratch: Path) -> Path:
    if kind == "the input":
        return source
    if kind == "inside the input":
        return source / "out" if source.is_dir() else source / "under"
    if kind == "a folder containing the input":
        return world["root"]
    if kind == "a symlink to the input":
        link = scratch / "link"
        link.symlink_to(source)
        return link
    if kind == "a user's file":
        f = scratch / "mine.out"
        f.write_bytes(FOREIGN)
        return f
    if kind == "a user's folder":
        d = scratch / "folder"
        d.mkdir()
        (d / "notes.txt").write_bytes(FOREIGN)
        (d / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + FOREIGN)  # a PNG emseg did not write
        return d
    if kind == "a FIFO":
        fifo = scratch / "fifo"
        os.mkfifo(fifo)
        return fifo
    if kind == "a path under a regular file":
        return world["root"] / "user.bin" / "out"
    raise AssertionError(kind)


#: Variants that differ from their command only in which input the targets aim at.
INPUT_VARIANTS = ("evaluate-data", "predict-model", "show-pred")
CASES = [
    (command, target)
    for command in sorted(COMMANDS)
    for target in TARGETS
    if command not in INPUT_VARIANTS or target in TARGETS[:4]
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("command, target", CASES)
def test_no_command_writes_over_what_is_not_its_own(world, tmp_path, cli, command, target, overwrite):
    argv_of, source_key = COMMANDS[command]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = _target(target, world, world[source_key], scratch)
    before = tree_digest(world["root"]), tree_digest(scratch)
    argv = argv_of(world, out) + (["--overwrite"] if overwrite else [])
    result = cli(*argv)
    assert result.exit_code == 2, (argv, result.output)
    message = result.stderr.strip()
    assert message.startswith("emseg: error:") and "\n" not in message, message
    assert "Traceback" not in result.output
    assert (tree_digest(world["root"]), tree_digest(scratch)) == before


# --- emseg's own lock and partial are emseg's: never followed, truncated or deleted ----------

#: Commands whose output is resumable: they keep an unfinished output in ``.NAME.partial/``.
RESUMABLE = ("predict", "segment")
OWN_PATHS = (
    "the lock is a symlink to a user's file",
    "the lock is a hard link to a user's file",
    "the lock is a folder",
    "the lock is a FIFO",
    "the lock holds a user's text",
    "the partial is a user's folder",
    "the partial is a user's file",
    "a user's folder is named like a dead run's partial",
)


def _plant(case: str, out: Path, scratch: Path) -> None:
    """Put what ``case`` names where emseg keeps its lock or partial for the output ``out``."""
    lock, partial = out.parent / f".{out.name}.lock", out.parent / f".{out.name}.partial"
    user = scratch / "precious.txt"
    user.write_bytes(FOREIGN)
    if case == "the lock is a symlink to a user's file":
        lock.symlink_to(user)
    elif case == "the lock is a hard link to a user's file":
        os.link(user, lock)
    elif case == "the lock is a folder":
        lock.mkdir()
        (lock / "notes.txt").write_bytes(FOREIGN)
    elif case == "the lock is a FIFO":
        os.mkfifo(lock)
    elif case == "the lock holds a user's text":
        lock.write_bytes(FOREIGN)
    elif case == "the partial is a user's folder":
        partial.mkdir()
        (partial / "thesis.txt").write_bytes(FOREIGN)
    elif case == "the partial is a user's file":
        partial.write_bytes(FOREIGN)
    else:
        import subprocess

        dead = subprocess.Popen(["true"])
        dead.wait()  # its PID no longer runs
        leftover = out.parent / f".{out.name}.partial-{dead.pid}-0123abcd"
        leftover.mkdir()
        (leftover / "thesis.txt").write_bytes(FOREIGN)


def _refused(case: str, command: str) -> bool:
    """Whether ``case`` must stop ``command``: a lock emseg cannot own stops every command; a
    foreign ``.NAME.partial`` stops the resumable ones (the others never use that name)."""
    return case.startswith("the lock") or (case.startswith("the partial") and command in RESUMABLE)


OWN_CASES = [
    pytest.param(command, case, marks=[] if _refused(case, command) else [pytest.mark.slow])
    for command in sorted(COMMANDS)
    if command not in INPUT_VARIANTS
    for case in OWN_PATHS
]


@pytest.mark.parametrize("command, case", OWN_CASES)
def test_emseg_s_lock_and_partial_are_never_followed_truncated_or_deleted(world, tmp_path, cli, command, case):
    """Every writing command x what a user may have put where emseg keeps its lock or its
    partial: refused in one line when emseg cannot use it, else the command runs around it;
    either way every byte that was there stays, and the symlink's target is untouched."""
    argv_of, _ = COMMANDS[command]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out" / "o"
    out.parent.mkdir()
    _plant(case, out, scratch)
    before = tree_digest(tmp_path)
    result = cli(*argv_of(world, out))
    if _refused(case, command):
        assert result.exit_code == 2, (case, result.output)
        message = result.stderr.strip()
        assert message.startswith("emseg: error:") and "\n" not in message, message
        assert tree_digest(tmp_path) == before
    else:
        assert result.exit_code == 0, (case, result.output)
        after = tree_digest(tmp_path)
        assert {k: v for k, v in after.items() if k in before} == before  # what was there stays


# --- --overwrite replaces what emseg wrote --------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "export",
        "export-png",
        "evaluate",
        pytest.param("show", marks=pytest.mark.slow),
        pytest.param("augment-preview", marks=pytest.mark.slow),
    ],
)
def test_overwrite_replaces_what_emseg_wrote(world, tmp_path, cli, command):
    argv_of, _ = COMMANDS[command]
    out = tmp_path / "out"
    assert cli(*argv_of(world, out)).exit_code == 0
    again = cli(*argv_of(world, out))
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert cli(*argv_of(world, out), "--overwrite").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no partial, lock or previous left


def test_markers_tell_emseg_outputs_from_a_users(world, tmp_path, cli):
    from emseg.io.outputs import is_emseg_file, is_emseg_output

    tif, folder, js, png = tmp_path / "a.tif", tmp_path / "pngs", tmp_path / "s.json", tmp_path / "v.png"
    for argv in (
        COMMANDS["export"][0](world, tif),
        COMMANDS["export-png"][0](world, folder),
        COMMANDS["evaluate"][0](world, js),
        COMMANDS["show"][0](world, png),
    ):
        assert cli(*argv).exit_code == 0
    assert all(is_emseg_file(p) for p in (tif, js, png)) and is_emseg_output(folder, "slices")
    assert json.loads(js.read_text())["emseg"]["command"] == "evaluate"
    import tifffile
    from PIL import Image

    tifffile.imwrite(tmp_path / "user.tif", np.zeros((4, 4), np.uint8))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "user.png")
    (tmp_path / "user.json").write_text('{"v_rand": 1}')
    assert not any(is_emseg_file(tmp_path / n) for n in ("user.tif", "user.png", "user.json"))
    (folder / "mine.png").write_bytes((tmp_path / "user.png").read_bytes())
    assert not is_emseg_output(folder, "slices")  # one foreign slice: the folder is no longer emseg's alone
    result = cli(*COMMANDS["export-png"][0](world, folder), "--overwrite")
    assert result.exit_code == 2 and (folder / "mine.png").exists()


def test_a_hard_link_to_the_input_is_the_input(world, tmp_path, cli):
    link = tmp_path / "lab-again.tif"
    os.link(world["labels"], link)
    result = cli("evaluate", world["pred"], world["data"], "--json", link, "--overwrite")
    assert result.exit_code == 2 and "input" in result.stderr


# --- bad input is found before anything is written ------------------------------------------


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--device", "cuda:7"], "--device"),
        (["--device", "tpu"], "--device"),
        (["--scheduler", "not an address"], "--scheduler"),
        (["--workers", "0"], "--workers"),
        (["--tile", "1000000"], "--tile"),
    ],
)
def test_bad_prediction_settings_leave_no_partial(world, tmp_path, cli, extra, says):
    out = tmp_path / "p.zarr"
    result = cli("predict", world["run"], world["data"], "-o", out, "--tile", "32", "--overlap", "8", *extra)
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


def test_resume_on_a_complete_output_with_other_settings_is_an_error(world, tmp_path, cli):
    out = tmp_path / "p.zarr"
    base = ["predict", world["run"], world["data"], "-o", out, "--tile", "32", "--overlap", "8", "--device", "cpu"]
    assert cli(*base).exit_code == 0
    assert cli(*base, "--resume").exit_code == 0  # the same settings: complete, nothing to do
    other = cli(*base[:-4], "--overlap", "4", "--device", "cpu", "--resume")
    assert other.exit_code == 2 and "other settings" in other.stderr


# --- what emseg reads cannot size its allocations --------------------------------------------


def _checkpoint(path: Path, model_cfg: dict, norm: dict, tensors: dict | None = None) -> Path:
    import torch
    from safetensors.torch import save

    config = to_dict(TrainConfig())
    config["model"] = model_cfg
    meta = {"config": config, "normalization": norm, "halo": 1, "divisor": 4}
    tensors = tensors if tensors is not None else {"w": torch.zeros(4)}
    path.write_bytes(save(tensors, metadata={"emseg": json.dumps(meta)}))
    return path


@pytest.mark.parametrize(
    "model, norm, says",
    [
        ({"arch": "unet", "depth": 4, "base_channels": 8000}, {"mean": 0, "std": 1}, "EMSEG_MAX_CHANNELS"),
        ({"arch": "unet", "depth": 11, "base_channels": 64}, {"mean": 0, "std": 1}, "EMSEG_MAX_DEPTH"),
        ({"arch": "unet", "depth": 8, "base_channels": 1024}, {"mean": 0, "std": 1}, "EMSEG_MAX_PARAMETERS"),
        ({"arch": "rm -rf", "depth": 2, "base_channels": 4}, {"mean": 0, "std": 1}, "--arch"),
        ({"arch": "unet", "depth": 2, "base_channels": 4}, {"mean": 0, "std": 0}, "std"),
        ({"arch": "unet", "depth": 2, "base_channels": 4}, {"mean": 0, "std": float("nan")}, "std"),
        ({"arch": "unet", "depth": 2, "base_channels": 4}, {"mean": 0, "std": -1}, "std"),
    ],
)
def test_absurd_or_broken_checkpoints_are_refused_before_building(tmp_path, cli, world, model, norm, says):
    full = {**to_dict(ModelConfig()), **model}
    ckpt = _checkpoint(tmp_path / "c.safetensors", full, norm)
    result = cli("predict", ckpt, world["data"], "-o", tmp_path / "p.zarr", "--tile", "32")
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_non_finite_weights_are_refused_at_load(tmp_path, world):
    from emseg.errors import BadInputError
    from emseg.models.checkpoint import load_trained, read_checkpoint

    tensors, meta = read_checkpoint(world["run"])
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    ckpt = _checkpoint(tmp_path / "nan.safetensors", meta["config"]["model"], meta["normalization"], tensors)
    with pytest.raises(BadInputError, match="NaN or infinite"):
        load_trained(ckpt, "cpu")


@pytest.mark.slow
def test_loading_an_smp_checkpoint_never_downloads(tmp_path, monkeypatch):
    """A checkpoint of a model trained with ImageNet encoder weights is built with
    encoder_weights=None, then its saved weights are loaded: no network."""
    pytest.importorskip("segmentation_models_pytorch")
    import segmentation_models_pytorch as smp

    from emseg.models.build import build_model
    from emseg.models.checkpoint import load_trained, save_checkpoint

    cfg = ModelConfig(arch="smp:resnet18")
    model = build_model(cfg)
    config = to_dict(TrainConfig(model=cfg))
    config["model"]["encoder_weights"] = "imagenet"
    meta = {"config": config, "normalization": {"mean": 0.0, "std": 1.0}, "halo": 16, "divisor": 32}
    ckpt = save_checkpoint(tmp_path / "smp.safetensors", model, meta)
    real = smp.Unet

    def offline_unet(*args, **kwargs):
        assert kwargs.get("encoder_weights") is None, "would download encoder weights"
        return real(*args, **kwargs)

    monkeypatch.setattr(smp, "Unet", offline_unet)
    loaded, _ = load_trained(ckpt, "cpu")
    first = next(iter(model.state_dict()))
    assert loaded.state_dict()[first].equal(model.state_dict()[first])


def _tiff(path: Path, width: int, length: int, bits: int, compression: int, rows: int, pages: int, data: bytes) -> Path:
    """A little-endian TIFF of ``pages`` pages whose one-strip headers claim the given sizes;
    each strip holds ``data``."""
    import struct

    out = bytearray(b"II*\x00" + struct.pack("<I", 0))
    next_at = 4  # where the offset of the next IFD goes
    for _ in range(pages):
        data_at = len(out)
        out += data
        entries = [
            (256, 4, width),
            (257, 4, length),
            (258, 3, bits),
            (259, 3, compression),
            (262, 3, 1),
            (273, 4, data_at),
            (277, 3, 1),
            (278, 4, rows),
            (279, 4, len(data)),
            (339, 3, 3 if bits == 32 else 1),
        ]
        if len(out) % 2:
            out += b"\x00"
        struct.pack_into("<I", out, next_at, len(out))
        out += struct.pack("<H", len(entries))
        for tag, typ, val in entries:
            out += struct.pack("<HHII", tag, typ, 1, val) if typ == 4 else struct.pack("<HHIHH", tag, typ, 1, val, 0)
        next_at = len(out)
        out += struct.pack("<I", 0)
    path.write_bytes(bytes(out))
    return path


def test_a_small_tiff_claiming_a_huge_compressed_strip_is_refused_from_its_header(tmp_path, cli):
    """The issue's case: one zlib strip of 30000 x 30000 float32 (3.4 GiB decoded)."""
    import zlib

    bomb = _tiff(tmp_path / "bomb.tif", 30000, 30000, 32, 8, 30000, 1, zlib.compress(b"\x00" * 2**16))
    result = cli("ingest", bomb, "-o", tmp_path / "o.zarr")
    assert result.exit_code == 2 and "EMSEG_MAX_DECODE_BYTES" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tif"]


def test_a_truncated_compressed_multipage_tiff_is_an_error_not_a_shorter_stack(tmp_path, cli):
    import tifffile

    raw = np.random.default_rng(0).integers(0, 255, (5, 64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", raw, compression="zlib", photometric="minisblack")
    whole = (tmp_path / "full.tif").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 16):
        (tmp_path / "cut.tif").write_bytes(whole[:cut])
        result = cli("ingest", tmp_path / "cut.tif", "-o", tmp_path / "o.zarr")
        assert result.exit_code == 2 and "truncated" in result.stderr, result.output
        assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("chunks", [[0, 64, 64], [1, 2**20, 2**20]])
def test_zero_or_oversized_zarr_chunks_are_refused(world, tmp_path, cli, chunks):
    import shutil

    store = tmp_path / "d.zarr"
    shutil.copytree(world["data"], store)
    meta = json.loads((store / "0" / ".zarray").read_text())
    meta["chunks"] = chunks
    (store / "0" / ".zarray").write_text(json.dumps(meta))
    result = cli("show", store, "-o", tmp_path / "v.png")
    assert result.exit_code == 2 and "\n" not in result.stderr.strip(), result.output
    assert not (tmp_path / "v.png").exists()


# --- never silently wrong -------------------------------------------------------------------


def test_ground_truth_without_both_classes_is_refused(world, tmp_path, cli):
    import shutil

    import zarr

    store = tmp_path / "d.zarr"
    shutil.copytree(world["data"], store)
    cells = zarr.open_array(str(store / "labels" / "cells" / "0"), mode="r+")
    cells[:] = 0
    result = cli("evaluate", world["pred"], store)
    assert result.exit_code == 2 and "only membrane" in result.stderr, result.output
    train = COMMANDS["train"][0](world, tmp_path / "run")
    train[1] = store
    result = cli(*train)
    assert result.exit_code == 2 and "only membrane" in result.stderr, result.output
    assert not (tmp_path / "run").exists()


def test_non_finite_predictions_are_an_error(world, tmp_path):
    import tifffile

    from emseg.config import IngestConfig, PredictConfig
    from emseg.errors import EmsegRuntimeError
    from emseg.inference.predict import predict_store
    from emseg.io.ingest import ingest_stack

    raw = np.full((1, 64, 64), np.nan, np.float32)
    raw[0, 0, 0] = 1.0
    tifffile.imwrite(tmp_path / "nan.tif", raw)
    # ingest refuses NaN itself; write the store through ingest of finite data, then poison it
    tifffile.imwrite(tmp_path / "ok.tif", np.ones((1, 64, 64), np.float32))
    store = ingest_stack(tmp_path / "ok.tif", tmp_path / "f.zarr", IngestConfig())
    import zarr

    zarr.open_array(str(store / "0"), mode="r+")[:] = raw
    with pytest.raises(EmsegRuntimeError, match="NaN or infinite"):
        predict_store(world["run"], store, tmp_path / "p.zarr", PredictConfig(tile=32, overlap=8, device="cpu"))


# --- one line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "{data}", "-o", "{out}", "--lr", "nan"],
        ["train", "{data}", "-o", "{user}"],
        ["train", "{data}", "-o", "{out}", "--crop", "100000"],
        ["predict", "{run}", "{data}", "-o", "{out}", "--workers", "0"],
        ["predict", "{run}", "{data}", "-o", "{out}", "--batch-size", "0"],
        ["augment-preview", "{data}", "-o", "{out}", "--samples", "0"],
    ],
)
def test_user_fixable_input_is_one_line(world, tmp_path, cli, argv):
    values = {"data": world["data"], "run": world["run"], "out": tmp_path / "o", "user": world["root"] / "user.bin"}
    result = cli(*[a.format(**{k: str(v) for k, v in values.items()}) for a in argv])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("emseg: error:") and "\n" not in result.stderr.strip()


def test_a_bool_store_exports_as_0_255(world, tmp_path, cli):
    import shutil

    import tifffile
    import zarr

    store = tmp_path / "b.zarr"
    shutil.copytree(world["data"], store)
    level = zarr.open_array(str(store / "0"), mode="r")
    data = np.asarray(level) > 100
    shutil.rmtree(store / "0")
    zarr.create_array(str(store / "0"), shape=data.shape, chunks=level.chunks, dtype=bool, zarr_format=2)[:] = data
    for name in [p.name for p in store.iterdir() if p.name.isdigit() and p.name != "0"]:
        shutil.rmtree(store / name)
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"] = attrs["multiscales"][0]["datasets"][:1]
    (store / ".zattrs").write_text(json.dumps(attrs))
    result = cli("export", store, "-o", tmp_path / "b.tif")
    assert result.exit_code == 0, result.output
    assert set(np.unique(tifffile.imread(tmp_path / "b.tif")).tolist()) <= {0, 255}


# --- hypothesis-generated headers under an address-space limit --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["checkpoint", "tiff"])
def test_generated_headers_never_allocate_past_a_bound(kind):
    """tests/bounded_fuzz.py under RLIMIT_AS (3 GiB above the imports): checkpoint headers
    (absurd depth, channels, arch, normalisation, non-finite weights, wrong types) and TIFF
    headers (absurd sizes, compressed strips, missing pages) end in a result or one line; a
    MemoryError or any other exception fails. With the limits switched off through the
    environment, the same run fails: the bound is what the checks enforce."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bounded_fuzz.py"), kind, "60", str(3 * 2**30)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0 and "bounded: ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_with_another_depth_is_one_line(world, tmp_path, cli):
    train = COMMANDS["train"][0](world, tmp_path / "run")
    assert cli(*train).exit_code == 0
    depth = train.index("--depth") + 1
    train[depth] = "3"
    result = cli(*train, "--resume")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("emseg: error: --resume") and "\n" not in result.stderr.strip()
