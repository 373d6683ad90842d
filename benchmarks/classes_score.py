"""Score the two networks of benchmarks/classes.sh on the kept-out VNC sections 8-9.

    python benchmarks/classes_score.py /tmp/classes [--json benchmarks/results/classes.json]

The five-class network: each class's IoU and Dice over the labelled pixels (the predicted class
is the most probable one), mitochondria objects (``emseg.probability.blob_objects`` of
P(mitochondria) where it is the most probable class) against the true ones (4-connected
components per section; a match at IoU >= 0.5: precision, recall, F1; with the object settings
the run learned on its validation slice), and the V_rand of
membrane against the rest (P(not membrane)). The membrane-only network: its V_rand on the same
truth. Both predicted whole-slice as ``emseg predict`` does (``predict_planes``).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from emseg.classes import membrane_value
from emseg.config import TrainConfig
from emseg.evaluation.metrics import class_scores, evaluate_arrays
from emseg.evaluation.objects import match_objects, true_objects
from emseg.io.zarr import open_ome, store_classes
from emseg.models.checkpoint import load_trained
from emseg.probability import blob_objects, object_settings
from emseg.training.validate import predict_planes


def predict(run: Path, raw: np.ndarray) -> tuple[np.ndarray, dict]:
    model, meta = load_trained(run / "best.safetensors", "cpu")
    norm = meta["normalization"]
    return predict_planes(model, raw, (float(norm["mean"]), float(norm["std"])), TrainConfig()), meta


def _steps(run: Path) -> int:
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    return int(rows[-1].split(",")[header.index("step")]) if len(rows) > 1 else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("work", type=Path)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "classes.json")
    args = p.parse_args()
    test = open_ome(args.work / "test.zarr")
    classes = store_classes(test)
    assert classes is not None
    raw = np.asarray(test.array[:])
    truth = np.asarray(test.labels["classes"].array[:])
    membrane = membrane_value(classes)
    assert membrane is not None
    rest_truth = ((truth > 0) & (truth != membrane)).astype(np.uint8)

    prob, meta = predict(args.work / "classes", raw)
    pred = (prob.argmax(1) + 1).astype(np.uint8)
    per = class_scores(pred, truth, len(classes))
    out: dict = {"machine": platform.node(), "sections": [8, 9], "five_classes": {}, "membrane_only": {}}
    for c in classes:
        out["five_classes"][c.name] = per.get(c.value)
    mito = next(c.value for c in classes if c.name == "mitochondria")
    learned = (meta.get("class_bias") or {}).get("objects")  # what the run learned on its validation slice
    md, ms, _ = object_settings(learned, "mitochondria")
    objects = np.stack(
        [blob_objects(prob[z, mito - 1], pred[z] == mito, min_distance=md, min_size=ms) for z in range(len(pred))]
    )
    out["five_classes"]["class_bias"] = meta.get("class_bias")
    out["five_classes"]["mitochondria_objects"] = match_objects(objects, true_objects(truth == mito))
    v = evaluate_arrays(1.0 - prob[:, membrane - 1], rest_truth)
    out["five_classes"]["v_rand_membrane_vs_rest"] = v.v_rand
    out["five_classes"]["steps"] = _steps(args.work / "classes")
    binary, bmeta = predict(args.work / "binary", raw)
    out["membrane_only"]["v_rand"] = evaluate_arrays(binary, rest_truth).v_rand
    out["membrane_only"]["steps"] = _steps(args.work / "binary")
    for name in ("classes", "binary"):
        rows = (args.work / name / "metrics.csv").read_text().splitlines()
        out[f"{name}_epochs"] = len(rows) - 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
