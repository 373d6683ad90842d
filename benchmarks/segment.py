"""Speed of ``emseg segment`` in 2D mode on an ISBI-like P(cell) map, per CPU core.

The map is the first slice of a prediction store (e.g. the README's small CPU model's prediction
of ISBI 27-29) mirrored into a ``--side``² slice (tile_isbi_like), or a synthetic map when no
store is given. Two figures, one thread each: the per-slice work alone (seeds, flooding,
agglomeration: ``segment_image``) and the whole command (``segment_store`` with ``threads=1``:
reading, both passes, stitching, the pyramid). Wall-clock and process CPU seconds are both
given: on a shared machine CPU seconds are the fairer per-core figure.

    python benchmarks/segment.py --pred /tmp/h15/pred.zarr --side 4096 --json segment.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def isbi_like_map(pred: str | None, side: int) -> np.ndarray:
    """(1, side, side) float32 P(cell): a predicted slice mirrored, or a synthetic one."""
    from emseg.synthetic import synthetic_stack, tile_isbi_like

    if pred:
        plane = np.asarray(zarr.open_array(str(Path(pred) / "0"), mode="r")[0]).astype(np.float32) / 255
    else:
        from scipy import ndimage as ndi

        _, labels = synthetic_stack((1, 1024, 1024), seed=0)
        rng = np.random.default_rng(0)
        plane = np.clip(ndi.gaussian_filter(labels[0] / 255.0, 1.5) + rng.normal(0, 0.08, labels[0].shape), 0, 1)
    return tile_isbi_like(plane.astype(np.float32), (side, side))[None]


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", help="prediction store whose slice 0 is mirrored (default: synthetic)")
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from emseg.config import SegmentConfig
    from emseg.io.outputs import provenance
    from emseg.io.zarr import LevelSpec, create_image_store, create_multiscale
    from emseg.segmentation.blocks import Job, segment_image
    from emseg.segmentation.segment import segment_store

    prob = isbi_like_map(args.pred, args.side)
    mpix = prob.size / 1e6
    cfg = SegmentConfig(threads=1)
    job = Job(
        "",
        "",
        "",
        "",
        "",
        "2d",
        cfg.seed_threshold,
        cfg.min_distance,
        cfg.merge_threshold,
        cfg.min_size,
        (50, 4, 4),
        cfg.seeds,
    )
    segment_image(prob[:, :256, :256], job)  # compile the flood once
    core_wall, core_cpu = min((timed(lambda: segment_image(prob, job)) for _ in range(3)), key=lambda t: t[1])
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "pred.zarr"
        root = create_image_store(store, "0.4", attrs={"emseg": provenance("predict")})
        spec = LevelSpec(shape=prob.shape, dtype="uint8", chunks=(1, 1024, 1024), pyramid_min_size=1024)
        create_multiscale(root, spec, (50, 4, 4), "0.4", "probabilities")[0][:] = np.round(prob * 255).astype(np.uint8)
        cmd_wall, cmd_cpu = timed(lambda: segment_store(store, Path(tmp) / "seg.zarr", cfg))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        "side": args.side,
        "mpix": mpix,
        "map": args.pred or "synthetic",
        "segment_image_mpix_per_s_wall": mpix / core_wall,
        "segment_image_mpix_per_s_cpu": mpix / core_cpu,
        "segment_store_mpix_per_s_wall": mpix / cmd_wall,
        "segment_store_mpix_per_s_cpu": mpix / cmd_cpu,
        "settings": {
            k: getattr(cfg, k) for k in ("seed_threshold", "seeds", "min_distance", "merge_threshold", "min_size")
        },
    }
    print(json.dumps(result, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
