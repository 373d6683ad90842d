"""Choose ``emseg segment``'s parameters on annotated slices, then score them once elsewhere.

A grid over the seeds (``maxima`` | ``cores``), the seed threshold, the minimum distance, the
merge threshold and the minimum size is scored on the tuning prediction's slices (foreground-
restricted V_rand after thinning, as ``emseg evaluate`` scores a segmentation); the best is
printed and, with ``--apply``, applied once to another prediction and scored there. Beside each
segmentation score stands the oracle P(cell) score: V_rand of the thresholded P(cell) at the best
of 11 thresholds chosen on the scored slices themselves (``emseg evaluate``'s figure).

The fair protocol for ISBI 2012 (how emseg's defaults were chosen): cross-validation over the
training slices 0-26. Each ``--tune`` set is one fold, predicted by a model that did not train on
it (e.g. a model trained on the other 20 slices of a store of slices 0-26, with ``--val-slices``
on the fold); a setting's figure is its worst margin over the folds against each fold's own
best threshold (the issue's target is relative, and folds differ in how hard they are). The
best is applied once to the main models' predictions of 27-29, which nothing was chosen on.
emseg's defaults also had ``emseg demo``'s prediction of its synthetic stack as a fifth set;
``--synthetic`` adds a soft map (blurred ground truth) as one more::

    python benchmarks/segment_tune.py --tune predA.zarr tune.zarr 0:7 --tune predB.zarr tune.zarr 7:14 \
        --tune predC.zarr tune.zarr 13:20 --tune predT.zarr tune.zarr 20:27 \
        --tune emseg-demo/pred-val.zarr emseg-demo/train.zarr 27:30 \
        --apply pred.zarr isbi.zarr 27:30 --defaults --json benchmarks/results/segment_tuning.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def load(pred: str, data: str, span: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(P(cell) uint8 (Z, Y, X), truth {0, 1} (Z, Y, X), first slice) of data slices A:B."""
    from emseg.io.zarr import first_slice, open_ome
    from emseg.probability import probability_uint8

    a, b = (int(v) for v in span.split(":"))
    prediction, image = open_ome(pred), open_ome(data)
    offset = first_slice(prediction)
    prob = probability_uint8(np.asarray(prediction.array[a - offset : b - offset]), pred)
    truth = (np.asarray(image.labels["cells"].array[a:b]) > 0).astype(np.uint8)
    return prob, truth, a


def oracle(prob: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(best V_rand of thresholded P(cell) over ``emseg evaluate``'s thresholds, that threshold)."""
    from emseg.evaluation.metrics import evaluate_arrays

    scores = evaluate_arrays(prob.astype(np.float32) / 255, truth)
    return scores.v_rand, scores.v_rand_threshold


def segment(prob: np.ndarray, params: dict) -> np.ndarray:
    from emseg.segmentation.blocks import Job, segment_image

    job = Job(prob="", scratch="", labels="", faces="", done="", mode="2d", voxel_size=(50.0, 4.0, 4.0), **params)
    return segment_image(prob, job)[0]


def score(labels: np.ndarray, truth: np.ndarray) -> float:
    from emseg.evaluation.instances import score_instances

    return score_instances(labels, truth).v_rand


def synthetic_set() -> tuple[np.ndarray, np.ndarray]:
    """(P(cell) uint8, truth) of a synthetic EM-like stack (3 x 256², blurred noisy map from its
    ground truth, as tests/test_segment.py makes it): small cells with faint membranes."""
    from scipy import ndimage as ndi

    from emseg.probability import probability_uint8
    from emseg.synthetic import synthetic_stack

    _, labels = synthetic_stack((3, 256, 256), seed=2)
    smooth = ndi.gaussian_filter((labels > 0).astype(np.float32), sigma=(0, 1.5, 1.5))
    noisy = np.clip(smooth + np.random.default_rng(0).normal(0, 0.08, labels.shape), 0, 1).astype(np.float32)
    return probability_uint8(noisy, "synthetic"), (labels > 0).astype(np.uint8)


def grid(
    sets: list[tuple[np.ndarray, np.ndarray]], baselines: list[float], args: argparse.Namespace
) -> list[tuple[float, dict, list[float]]]:
    """(worst margin over ``sets`` against ``baselines``, parameters, score per set) of every
    combination, best first."""
    from emseg.segmentation.agglomerate import agglomerate
    from emseg.segmentation.watershed import fragments

    results = []
    for seeds, seed_thr, dist in itertools.product(args.seeds, args.seed_thresholds, args.min_distances):
        frags = [[fragments(p, seed_thr, dist, None, seeds) for p in prob] for prob, _ in sets]
        for merge, size in itertools.product(args.merge_thresholds, args.min_sizes):
            scores = [
                score(np.stack([agglomerate(f, h, merge, size)[0] for f, h in set_frags]), truth)
                for set_frags, (_, truth) in zip(frags, sets, strict=True)
            ]
            params = {
                "seeds": seeds,
                "seed_threshold": seed_thr,
                "min_distance": dist,
                "merge_threshold": merge,
                "min_size": size,
            }
            results.append((min(v - b for v, b in zip(scores, baselines, strict=True)), params, scores))
    return sorted(results, key=lambda r: -r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", nargs=3, metavar=("PRED", "DATA", "A:B"), action="append", required=True)
    parser.add_argument("--apply", nargs=3, metavar=("PRED", "DATA", "A:B"), action="append", default=[])
    parser.add_argument("--seeds", nargs="+", default=["maxima", "cores"])
    parser.add_argument("--seed-thresholds", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--min-distances", nargs="+", type=int, default=[2, 4, 7, 10, 15])
    parser.add_argument("--merge-thresholds", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85])
    parser.add_argument("--min-sizes", nargs="+", type=int, default=[30, 100, 200])
    parser.add_argument("--defaults", action="store_true", help="Also score emseg's default parameters.")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="Also tune on a synthetic stack (one more fold).",
    )
    parser.add_argument("--json", dest="json_path", type=Path)
    args = parser.parse_args()

    from emseg.config import SegmentConfig

    t0 = time.perf_counter()
    sets = [load(*t)[:2] for t in args.tune]
    names = [f"{t[0]} {t[2]}" for t in args.tune]
    if args.synthetic:
        sets.append(synthetic_set())
        names.append("synthetic")
    oracles = [oracle(prob, truth) for prob, truth in sets]
    ranked = grid(sets, [o[0] for o in oracles], args)
    margin, best, per_set = ranked[0]
    report: dict = {
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/segment_tune.py", *sys.argv[1:]]),
        "tune": [
            {"set": n, "segment_v_rand": v, "p_best": o[0], "p_best_threshold": o[1]}
            for n, v, o in zip(names, per_set, oracles, strict=True)
        ],
        "chosen": best,
        "worst_margin": margin,
        "top5": [{"worst_margin": w, **p, "v_rand_per_set": v} for w, p, v in ranked[:5]],
        "combinations": len(ranked),
    }
    defaults = SegmentConfig()
    default_params = {k: getattr(defaults, k) for k in best}
    print(f"chosen {best}: worst margin {margin:+.4f} against each set's best threshold")
    for n, v, o in zip(names, per_set, oracles, strict=True):
        print(f"  {n}: segment {v:.4f}, P(cell) best {o[0]:.4f} (threshold {o[1]})")
    report["apply"] = []
    for pred, data, span in args.apply:
        prob2, truth2, _ = load(pred, data, span)
        applied = score(segment(prob2, best), truth2)
        p2, t2 = oracle(prob2, truth2)
        row = {"pred": pred, "slices": span, "segment_v_rand": applied, "p_best": p2, "p_best_threshold": t2}
        print(f"applied to {pred} {span}: segment {applied:.4f}; P(cell) best {p2:.4f} (threshold {t2})")
        if args.defaults:
            row["defaults_v_rand"] = score(segment(prob2, default_params), truth2)
            print(f"  defaults {default_params}: {row['defaults_v_rand']:.4f}")
        report["apply"].append(row)
    report["seconds"] = time.perf_counter() - t0
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
