"""Print the short table of a GPU check run (benchmarks/gpu_check.sh) from its JSON files."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    folder = Path(sys.argv[1])
    rows: list[tuple[str, str]] = []
    bench = load(folder, "bench.json")
    if bench:
        for r in bench["forward"]["rows"]:
            if "error" in r:
                rows.append((f"forward {r['variant']}", f"ERROR {r['error'][:100]}"))
                continue
            peak = "" if r["fraction_of_peak"] is None else f", {r['fraction_of_peak']:.0%} of peak"
            rows.append(
                (f"forward {r['variant']}", f"{r['mpix_per_s']:.3g} MPix/s, {r['tflop_per_s']:.3g} TFLOP/s{peak}")
            )
        if bench["forward"].get("bf16_gain"):
            rows.append(("forward bf16 / fp32 (channels_last)", f"{bench['forward']['bf16_gain']:.2f}x"))
        pb = bench.get("predict", {})
        if isinstance(pb.get("emseg"), dict):
            ratio = f", emseg/MONAI {pb['ratio']:.2f}" if isinstance(pb.get("ratio"), float) else ""
            stack = " x ".join(map(str, pb["emseg"]["stack"]))
            rows.append((f"predict {stack} (bench)", f"{pb['emseg']['mpix_per_s']:.3g} MPix/s{ratio}"))
        tb = bench.get("train")
        if isinstance(tb, dict):
            rows.append(
                (
                    f"train {tb['batch']} x {tb['crop']}^2 (bench)",
                    f"{tb['steps_per_s']:.3g} steps/s, augmentation {tb['augmentation_share']:.0%} of a step",
                )
            )
    pred = load(folder, "predict.json")
    if pred:
        e2e = pred["emseg_end_to_end"]
        rows.append(
            (
                "predict end to end (zarr to zarr)",
                f"{e2e['mpix_per_s']:.0f} MPix/s, peak RSS {e2e['peak_rss_mib']:.0f} MiB",
            )
        )
        if isinstance(pred.get("monai_in_memory"), dict):
            rows.append(
                (
                    "MONAI sliding window (in memory)",
                    f"{pred['monai_in_memory']['mpix_per_s']:.0f} MPix/s, "
                    f"emseg/MONAI {pred['ratio_emseg_over_monai']:.2f}",
                )
            )
        mem = pred.get("memory", {})
        if mem:
            rows.append(("predict peak RSS 1x / 4x", " / ".join(f"{v['peak_rss_mib']:.0f} MiB" for v in mem.values())))
    speed = load(folder, "train_speed.json")
    if speed:
        rows.append(
            (
                "train 16 x 384^2 bf16",
                f"{speed['steps_per_s']:.1f} steps/s, {speed['mpix_per_s']:.0f} MPix/s, "
                f"augmentation {speed['augmentation_share']:.0%} of a step",
            )
        )
    quality = load(folder, "quality.json")
    if quality:
        last, best = quality["last"], quality["best"]
        rows.append(
            (
                f"quality after {quality['minutes']:.1f} min",
                f"V_rand {last['v_rand']:.4f} (best {best['v_rand']:.4f}), pixel accuracy {last['val_accuracy']:.4f}",
            )
        )
    status = (folder / "status").read_text() if (folder / "status").exists() else ""
    width = max((len(a) for a, _ in rows), default=10)
    print(status.strip())
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    main()
