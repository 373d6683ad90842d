"""Package a trained run as emseg's built-in membrane model (issue 29).

    python benchmarks/package_builtin.py /tmp/builtin/run benchmarks/results/builtin_model.json \
        [benchmarks/results/builtin_finetune.json]

copies RUN/best.safetensors to emseg/models/weights/membranes.safetensors with a ``builtin`` block in
its header (task, training pixel size, training data, licence, the command that trained it and the
scores measured in RESULTS, written by benchmarks/train_builtin.py, and, when given, the VNC
figures of the packaged model through ``emseg predict builtin:membranes`` that
benchmarks/builtin_finetune.sh wrote), and prints the file's SHA-256 for
``emseg.models.builtin.MODELS``. The weights are copied unchanged: packaging again with more
scores changes the SHA-256, never a prediction.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from emseg.models.builtin import WEIGHTS, sha256
from emseg.models.checkpoint import add_meta, read_checkpoint

TRAINING_DATA = (
    "ISBI 2012 training slices 0-26 (never 27-29 or the test volume; Arganda-Carreras et al. 2015, "
    "Cardona et al. 2010); emseg's synthetic EM-like slices (emseg.synthetic, six appearances)"
)
LICENCE = "BSD-3-Clause, as emseg (weights trained only on ISBI 2012 training slices and synthetic data)"


def main(run: Path, results: Path, finetune: Path | None = None) -> None:
    measured = json.loads(results.read_text())
    target = WEIGHTS / "membranes.safetensors"
    WEIGHTS.mkdir(exist_ok=True)
    shutil.copyfile(run / "best.safetensors", target)
    meta = read_checkpoint(target)[1]
    names = {"isbi_27_29": "V_rand ISBI 27-29"}
    scores = {label: round(float(measured["measured"][key]["v_rand"]), 4) for key, label in names.items()}
    if finetune is not None:  # the packaged model through emseg predict: VNC resampled to 4 nm and back
        vnc = json.loads(finetune.read_text())
        scores["V_rand VNC 0-9 (emseg predict, resampled to 4 nm)"] = vnc["zeroshot-all"]["v_rand"]
        scores["V_rand VNC 0-9 (--no-rescale, 4.6 nm)"] = vnc["zeroshot-native"]["v_rand"]
    else:
        scores["V_rand VNC 0-9 (4.6 nm)"] = round(float(measured["measured"]["vnc_native"]["v_rand"]), 4)
    data = {**meta.get("data", {}), "path": "ISBI 2012 slices 0-26 + synthetic (benchmarks/train_builtin.py)"}
    builtin = {
        "task": "membranes: P(cell), cell interior against membrane",
        "pixel_size_nm": 4.0,
        "training_data": TRAINING_DATA,
        "licence": LICENCE,
        "command": measured["command"],
        "seed": measured["seed"],
        "scores": scores,
    }
    add_meta(target, builtin=builtin, data=data, segmentation=None)
    print(json.dumps({"file": str(target), "bytes": target.stat().st_size, "sha256": sha256(target)}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
