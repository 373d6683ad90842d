"""The demo and every example run, in a reduced size, so none can rot."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emseg
from emseg.config import DemoConfig
from emseg.errors import BadInputError
from emseg.recipes.demo import run_demo, write_synthetic

from .conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end runs of trained models


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EMSEG_DATA"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_demo_runs_end_to_end_on_synthetic_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ISBI data nearby: the synthetic default
    monkeypatch.delenv("EMSEG_DATA", raising=False)
    result = run_demo(DemoConfig(output=str(tmp_path / "demo"), device="cpu", minutes=0.15), shape=(8, 128, 128))
    assert result.data.startswith("synthetic")
    for key in ("curves", "pictures_validation", "pictures_test", "scores", "prediction_test"):
        assert Path(result.outputs[key]).exists(), key
    scores = json.loads(Path(result.outputs["scores"]).read_text())
    assert 0 < scores["v_rand"] <= 1 and 0 < scores["pixel_accuracy"] <= 1
    assert result.scores["steps"] >= 1
    cells = json.loads(Path(result.outputs["scores_cells"]).read_text())
    assert result.scores["cells_v_rand"] == cells["v_rand"] and result.scores["cells_objects"] == cells["n_objects"] > 0
    assert emseg.info(result.outputs["prediction_test"])["shape"] == [8, 128, 128]


def test_demo_refuses_a_data_folder_without_the_isbi_files(tmp_path):
    with pytest.raises(BadInputError, match="missing"):
        run_demo(DemoConfig(output=str(tmp_path / "x"), device="cpu", minutes=0.01), data=tmp_path)


def test_isbi2012_recipe(tmp_path):
    data = write_synthetic(tmp_path / "data", shape=(30, 96, 96))
    env = {
        **_env(),
        "DATA": str(data),
        "OUT": str(tmp_path / "out"),
        "EPOCHS": "1",
        "STEPS": "2",
        "MODEL": "--depth 2 --base-channels 4 --crop 64 --batch-size 2",
        "DEVICE": "cpu",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "isbi2012.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n_slices"] == 3
    for name in ("test-probabilities.tif", "check28.png", "augmentation.png", "model/rdf.yaml", "run/curves.png"):
        assert (out / name).exists(), name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    folder = write_synthetic(base / "data", shape=(4, 128, 128))
    train = emseg.ingest(folder / "train-volume.tif", base / "t.zarr", labels=folder / "train-labels.tif")
    run = base / "run"
    emseg.train(train, run, depth=2, base_channels=4, crop=64, batch_size=2, epochs=1, steps_per_epoch=2, device="cpu")
    return run


def test_large_stack_example(tiny_run, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "large_stack.py"),
            "--model",
            str(tiny_run),
            "--slices",
            "2",
            "--size",
            "1024",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak resident memory" in proc.stdout
    assert emseg.info(tmp_path / "pred.zarr")["shape"] == [2, 1024, 1024]


def test_cluster_example_connects_to_a_running_scheduler(tiny_run, tmp_path):
    from distributed import LocalCluster

    tif = tmp_path / "d.tif"
    import tifffile

    tifffile.imwrite(
        tif, np.random.default_rng(0).integers(0, 255, (3, 200, 160), dtype=np.uint8), photometric="minisblack"
    )
    data = emseg.ingest(tif, tmp_path / "d.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "cluster.py"),
                str(tiny_run),
                str(data),
                str(tmp_path / "p.zarr"),
                "--scheduler",
                cluster.scheduler_address,
                "--device",
                "cpu",
                "--tile",
                "128",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=_env(),
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scheduler tcp://" in proc.stdout
    assert emseg.info(tmp_path / "p.zarr")["shape"] == [3, 200, 160]


@pytest.mark.slow
def test_the_demo_second_part_learns_several_classes_on_vnc_sections(tmp_path):
    """The second part on a crop of the VNC sections: five classes ingested, a softmax network
    fine-tuned from the built-in model, the held-out sections scored per class, mitochondria
    segmented, a picture."""
    import tifffile

    from emseg.recipes.demo import CPU_PLAN, VNC_FILES, classes_part, find_vnc

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "vnc"
    source = find_vnc(None) or (shared if (shared / VNC_FILES[0]).is_file() else None)
    if source is None:
        pytest.skip("VNC sections not found")
    folder = tmp_path / "vnc"
    folder.mkdir()
    for name in VNC_FILES:  # 5 sections, 192 x 192: a minute's test
        tifffile.imwrite(folder / name, tifffile.imread(source / name)[:5, 256:448, 256:448], photometric="minisblack")
    with pytest.raises(BadInputError, match="missing train-volume.tif, train-labels.tif"):
        find_vnc(tmp_path)
    plan = dataclasses.replace(CPU_PLAN, crop=64, batch_size=2, steps_per_epoch=3)
    outputs, result = classes_part(folder, tmp_path, plan, 0.1, "cpu", None)
    assert result["sections"] == {"train": [0, 1], "validation": [2], "held_out": [3, 4]}
    assert set(result["classes"]) <= {"membrane", "glia", "mitochondria", "synapse", "cell"}
    assert "membrane" in result["classes"] and "cell" in result["classes"]
    for score in result["classes"].values():
        assert 0.0 <= score["iou"] <= 1.0 and 0.0 <= score["dice"] <= 1.0
    assert result["steps"] >= 1
    for key in ("classes_prediction", "classes_scores", "classes_mitochondria", "classes_pictures"):
        assert Path(outputs[key]).exists(), key
    assert emseg.info(outputs["classes_prediction"])["shape"] == [5, 2, 192, 192]
