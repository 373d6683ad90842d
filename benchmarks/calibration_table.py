"""The figures of benchmarks/calibration.sh as JSON (and a Markdown table on stderr).

python benchmarks/calibration_table.py /tmp/calibration > benchmarks/results/calibration.json
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(folder: Path) -> dict:
    rows = []
    for run in sorted(folder.glob("run-*")):
        name = run.name.removeprefix("run-")
        if not (folder / f"segdef-{name}.json").is_file():
            continue  # not finished
        calibration = json.loads((run / "segmentation.json").read_text())
        metrics = list(csv.DictReader((run / "metrics.csv").open()))
        scores = {what: json.loads((folder / f"{what}-{name}.json").read_text()) for what in ("pred", "seg", "segdef")}
        train_seconds = float(metrics[-1]["seconds"])
        rows.append(
            {
                "run": name,
                "steps": int(metrics[-1]["step"]),
                "train_seconds": round(train_seconds, 1),
                "calibration_seconds": calibration["seconds"],
                "calibration_share": round(calibration["seconds"] / train_seconds, 4),
                "settings": calibration["settings"],
                "calibration_slices": calibration["slices"],
                "calibrated_v_rand_there": round(calibration["v_rand"], 4),
                "map_v_rand_there": round(calibration["map_v_rand"], 4),
                "map_v_rand_27_29": round(scores["pred"]["v_rand"], 4),
                "map_threshold_27_29": scores["pred"]["v_rand_threshold"],
                "cells_v_rand_27_29": round(scores["seg"]["v_rand"], 4),
                "defaults_v_rand_27_29": round(scores["segdef"]["v_rand"], 4),
                "margin": round(scores["seg"]["v_rand"] - scores["pred"]["v_rand"], 4),
                "defaults_margin": round(scores["segdef"]["v_rand"] - scores["pred"]["v_rand"], 4),
            }
        )
    margins = [r["margin"] for r in rows]
    head = "| run | steps | settings | P(cell) best (thr) | cells | margin | defaults | calibration s / train s |"
    table = [head]
    table.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s = r["settings"]
        chosen = (
            f"components > {s['components']}"
            if s["components"] is not None
            else f"{s['seed_threshold']} / {s['min_distance']} / {s['merge_threshold']} / {s['min_size']}"
        )
        table.append(
            f"| {r['run']} | {r['steps']} | {chosen} | {r['map_v_rand_27_29']:.4f} ({r['map_threshold_27_29']}) | "
            f"{r['cells_v_rand_27_29']:.4f} | {r['margin']:+.4f} | {r['defaults_v_rand_27_29']:.4f} "
            f"({r['defaults_margin']:+.4f}) | {r['calibration_seconds']:.1f} / {r['train_seconds']:.0f} |"
        )
    print("\n".join(table), file=sys.stderr)
    return {"rows": rows, "mean_margin": round(sum(margins) / len(margins), 4), "min_margin": min(margins)}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
