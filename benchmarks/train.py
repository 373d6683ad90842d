"""Training speed (steps/s, crops/s, MPix/s, share of the step spent in augmentation) and
quality (V_rand and pixel accuracy on the held-out ISBI slices 27-29 after a time budget).

    python benchmarks/train.py speed --device cuda                 # default U-Net, batch 16 x 384^2, bf16
    python benchmarks/train.py speed --device cpu --depth 3 --base-channels 16 --batch-size 4 --crop 256
    python benchmarks/train.py quality --device cpu --minutes 5 --depth 3 --base-channels 16 --crop 256 --batch-size 4

Uses the ISBI 2012 stacks from --data (default ../shared/data/isbi2012), else synthetic data.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_store(data: Path | None, work: Path) -> Path:
    from emseg.recipes.bench import train_store

    return train_store(work, data if data is not None and data.exists() else None, shape=(30, 512, 512))


def speed(args: argparse.Namespace, store: Path) -> dict:
    from emseg.config import ModelConfig
    from emseg.device import device_name, resolve_device
    from emseg.recipes.bench import train_bench

    device = resolve_device(args.device)
    result = train_bench(
        store,
        device,
        ModelConfig(depth=args.depth, base_channels=args.base_channels),
        args.batch_size,
        args.crop,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        torch_compile=args.compile,
    )
    return {"device": device_name(device), "compile": args.compile, **result}


def quality(args: argparse.Namespace, store: Path, work: Path) -> dict:
    import emseg
    from emseg.device import device_name, resolve_device

    summary = emseg.train(
        store,
        work / "run",
        depth=args.depth,
        base_channels=args.base_channels,
        batch_size=args.batch_size,
        crop=args.crop,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        time_limit=args.minutes * 60,
        device=args.device,
        torch_compile=args.compile,
        seed=args.seed,
    )
    rows = summary["rows"]
    best = max((r for r in rows if r.get("v_rand") is not None), key=lambda r: r["v_rand"])
    last = rows[-1]
    return {
        "device": device_name(resolve_device(args.device)),
        "minutes": args.minutes,
        "depth": args.depth,
        "base_channels": args.base_channels,
        "batch_size": args.batch_size,
        "crop": args.crop,
        "steps": last["step"],
        "epochs": len(rows),
        "last": {k: last.get(k) for k in ("val_accuracy", "val_iou", "v_rand", "v_info", "val_loss", "seconds")},
        "best": {k: best.get(k) for k in ("epoch", "val_accuracy", "v_rand", "v_info")},
        "baseline_all_cell": "pixel accuracy 0.80, V_rand 0.09 (predicting cell everywhere, per the issue)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("speed", "quality"))
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "isbi2012")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="speed: steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=5.0, help="quality: training time budget")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emseg-bench-train-") as tmp:
        work = Path(tmp)
        store = make_store(args.data, work)
        result = speed(args, store) if args.mode == "speed" else quality(args, store, work)
    result = {
        "benchmark": f"train-{args.mode}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}",
        "torch": torch.__version__,
        **result,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
