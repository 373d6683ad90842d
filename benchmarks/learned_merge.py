"""Does a learned merge decision beat the calibrated mean agglomeration? (issue 23, item 3)

Per run NAME, with the calibration slices A:B of ``tune.zarr`` predicted in ``valNAME.zarr`` and
slices 27-29 of ``isbi.zarr`` in ``predNAME.zarr``:

1. ``calibrate`` (emseg's mean agglomeration search) on the calibration slices;
2. on the same slices, over the seeding calibration chose (the defaults 0.7/4 if it fell back to
   the map's components), a classifier of the fragment graph's borders: features of the
   P(membrane) = heights/255 along a border (mean, 10/25/50/75/90 % quantiles from a 256-bin
   histogram, length in pixel pairs) and of its two regions (sizes min/max and their logs);
   labels "merge" when both regions' majority truth cell (4-connected components of cells > 0,
   membrane 0 counted as a class) is the same. Borders of mostly-membrane regions are either
   dropped (``ignore``) or labelled merge (``merge``). Training examples are the fragment graph's
   borders (``flat``) or every border state met along the full mean agglomeration of the
   calibration slices (``path``: merged regions' borders too, labelled by the merged regions'
   majority truth);
3. the learned agglomeration: the border with the highest p(merge) merges first, the merged
   region's borders are measured anew (histograms and sizes add) and predicted again, until no
   border has p(merge) above the threshold. A run to the end answers every threshold (the cut
   is the prefix of merges before the first one at or below it). The threshold is chosen on the
   calibration slices by V_rand with cross-fitted probabilities (each slice agglomerated by a
   classifier trained on the other calibration slices; the test slices by one trained on all);
   then calibration's min_size absorption (the mean-height rule ``_absorb_small``);
4. both scored on slices 27-29 with calibrate's ``_Scorer`` (``emseg evaluate``'s V_rand), beside
   P(cell)'s best-threshold V_rand there (chosen on 27-29 itself, ``emseg evaluate``'s figure).

With 6 or more calibration slices, also a two-fold check inside them (first half / second half:
calibrate and train on one, score on the other, both ways). ``--reverse`` also swaps the roles:
calibrate and train on the test slices, score on the calibration slices (both held out from the
U-Net's training).

    OMP_NUM_THREADS=1 python benchmarks/learned_merge.py s0:24:27 s1:24:27 s2:24:27 h0:24:27 --reverse \
        --json benchmarks/results/learned_merge.json

A run is NAME:A:B (its calibration slices A:B of tune.zarr); ``--data`` is the folder of stores
(default /tmp/cal).
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import time
from pathlib import Path

import numpy as np

QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
THRESHOLDS = tuple(round(0.02 * i, 2) for i in range(1, 50))  # p(merge) 0.02 ... 0.98
VARIANTS = (("path", "ignore"), ("path", "merge"), ("flat", "ignore"), ("flat", "merge"))


# --- data ------------------------------------------------------------------------------------------


def load(pred: Path, data: Path, a: int, b: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(P(cell) uint8 (Z, Y, X), truths as calibrate makes them) of data slices a:b."""
    from scipy import ndimage as ndi

    from emseg.io.zarr import first_slice, open_ome
    from emseg.probability import FOUR, probability_uint8

    prediction = open_ome(pred)
    offset = first_slice(prediction)
    prob = probability_uint8(np.asarray(prediction.array[a - offset : b - offset]), str(pred))
    truth = np.asarray(open_ome(data).labels["cells"].array[a:b])
    if prob.shape != truth.shape:
        raise SystemExit(f"{pred} slices {a}:{b} do not match {data}: {prob.shape} vs {truth.shape}")
    return prob, [ndi.label(t > 0, structure=FOUR)[0] for t in truth]


class Graph:
    """One slice's fragments, their border histograms and their truth overlaps."""

    def __init__(self, prob: np.ndarray, truth: np.ndarray, seed_threshold: float, min_distance: int) -> None:
        from emseg.segmentation.agglomerate import region_edges
        from emseg.segmentation.watershed import fragments

        frags, heights = fragments(prob, seed_threshold, min_distance, None, "cores")
        self.frags = frags.astype(np.int64)
        self.n = n = int(frags.max()) + 1
        self.sizes = np.bincount(self.frags.reshape(-1), minlength=n).astype(np.int64)
        keys, hs = [], []
        for la, lb, ha, hb in (
            (self.frags[:, :-1], self.frags[:, 1:], heights[:, :-1], heights[:, 1:]),
            (self.frags[:-1], self.frags[1:], heights[:-1], heights[1:]),
        ):
            d = la != lb
            k = np.minimum(la[d], lb[d]) * n + np.maximum(la[d], lb[d])
            keys += [k, k]
            hs += [ha[d].astype(np.int64), hb[d].astype(np.int64)]
        key, h = np.concatenate(keys), np.concatenate(hs)
        uniq, inv = np.unique(key, return_inverse=True)
        self.pairs = np.stack(np.divmod(uniq, n), axis=1)
        self.hist = np.bincount(inv * 256 + h, minlength=len(uniq) * 256).reshape(len(uniq), 256)
        # the same graph as emseg's (the mean agglomeration and _absorb_small use these)
        pairs, self.sums, self.counts = region_edges(frags, heights)
        assert np.array_equal(pairs, self.pairs)
        assert np.allclose(self.sums, (self.hist * np.arange(256)).sum(1))
        assert np.array_equal(2 * self.counts, self.hist.sum(1))
        k = int(truth.max()) + 1
        overlap, count = np.unique(self.frags.reshape(-1) * k + truth.reshape(-1), return_counts=True)
        self.overlap = [dict() for _ in range(n)]  # fragment -> {truth cell (0 membrane): pixels}
        for (f, t), c in zip(zip(*np.divmod(overlap, k), strict=True), count, strict=True):
            self.overlap[int(f)][int(t)] = int(c)


def features(hist: np.ndarray, size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    """(k, 256) border histograms of heights and the two regions' sizes -> (k, 11) features."""
    total = hist.sum(1).astype(np.float64)
    mean = (hist * np.arange(256)).sum(1) / total / 255.0
    cum = np.cumsum(hist, axis=1)
    quant = [np.argmax(cum >= q * total[:, None], axis=1) / 255.0 for q in QUANTILES]
    lo, hi = np.minimum(size_a, size_b).astype(np.float64), np.maximum(size_a, size_b).astype(np.float64)
    return np.column_stack([mean, *quant, total / 2.0, lo, hi, np.log(lo), np.log(hi)])


def majority(counts: dict[int, int]) -> int:
    return max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]


# --- agglomeration ---------------------------------------------------------------------------------


def agglomerate(g: Graph, priority, record: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge to the end, the highest ``priority(features)`` first, each merged region's borders
    measured anew: (the merges in order (M, 2), their priorities (M,)). With ``record``, every
    border state's (features, merge label 1/0, membrane flag) is appended to it."""
    hist = g.hist.copy()
    ea, eb = g.pairs[:, 0].copy(), g.pairs[:, 1].copy()
    sizes = g.sizes.copy()
    alive = np.ones(len(ea), bool)
    version = np.zeros(len(ea), np.int64)
    adjacency: list[dict[int, int]] = [{} for _ in range(g.n)]
    for e, (a, b) in enumerate(g.pairs):
        adjacency[a][b] = e
        adjacency[b][a] = e
    truth = [dict(o) for o in g.overlap] if record is not None else None

    def evaluate(edges: list[int]) -> np.ndarray:
        idx = np.asarray(edges, np.int64)
        x = features(hist[idx], sizes[ea[idx]], sizes[eb[idx]])
        if record is not None:
            for row, e in zip(x, edges, strict=True):
                ma, mb = majority(truth[ea[e]]), majority(truth[eb[e]])
                record.append((row, int(ma == mb), int(ma == 0 or mb == 0)))
        return priority(x)

    heap = [(-p, e, 0) for e, p in enumerate(evaluate(list(range(len(ea)))))] if len(ea) else []
    heapq.heapify(heap)
    merges, prios = [], []
    while heap:
        p, e, stamp = heapq.heappop(heap)
        if not alive[e] or stamp != version[e]:
            continue
        u, v = int(ea[e]), int(eb[e])
        if len(adjacency[u]) < len(adjacency[v]):
            u, v = v, u
        alive[e] = False
        del adjacency[u][v]
        del adjacency[v][u]
        merges.append((u, v))
        prios.append(-p)
        sizes[u] += sizes[v]
        if truth is not None:
            for t, c in truth[v].items():
                truth[u][t] = truth[u].get(t, 0) + c
        for w, e2 in adjacency[v].items():
            del adjacency[w][v]
            if w in adjacency[u]:
                hist[adjacency[u][w]] += hist[e2]
                alive[e2] = False
            else:
                adjacency[u][w] = e2
                adjacency[w][u] = e2
                if ea[e2] == v:
                    ea[e2] = u
                else:
                    eb[e2] = u
        adjacency[v] = {}
        changed = list(adjacency[u].values())  # every border of u: its size changed
        if changed:
            for e1, q in zip(changed, evaluate(changed), strict=True):
                version[e1] += 1
                heapq.heappush(heap, (-q, e1, int(version[e1])))
    return np.asarray(merges, np.int64).reshape(-1, 2), np.asarray(prios, np.float64)


def cut(n: int, merges: np.ndarray, prios: np.ndarray, threshold: float) -> np.ndarray:
    """Node -> segment after the merges before the first one with priority <= ``threshold``."""
    from emseg.segmentation.agglomerate import _components

    stop = np.flatnonzero(prios <= threshold)
    return _components(n, merges[: int(stop[0]) if stop.size else len(merges)])


class SliceSet:
    """Slices as one numbered graph for scoring (emseg's 2d mode): each slice's Graph, offsets."""

    def __init__(self, prob: np.ndarray, truths: list[np.ndarray], seed_threshold: float, min_distance: int) -> None:
        from emseg.segmentation.calibrate import _Scorer

        self.graphs = [Graph(p, t, seed_threshold, min_distance) for p, t in zip(prob, truths, strict=True)]
        ends = np.cumsum([g.n - 1 for g in self.graphs])
        self.offsets, self.n = np.concatenate([[0], ends[:-1]]), int(ends[-1]) + 1
        labels = np.stack(
            [np.where(g.frags > 0, g.frags + o, 0) for g, o in zip(self.graphs, self.offsets, strict=True)]
        )
        self.sizes = np.bincount(labels.reshape(-1), minlength=self.n)
        self.pairs = np.concatenate([g.pairs + o for g, o in zip(self.graphs, self.offsets, strict=True)])
        self.sums = np.concatenate([g.sums for g in self.graphs])
        self.counts = np.concatenate([g.counts for g in self.graphs])
        self.scorer = _Scorer(labels, truths, lines=True)

    def lut(self, luts: list[np.ndarray], min_size: int) -> np.ndarray:
        """Global lut of per-slice luts (node -> segment), then min_size absorption."""
        from emseg.segmentation.agglomerate import _absorb_small

        out, top = np.zeros(self.n, np.int64), 0
        for g, o, lut in zip(self.graphs, self.offsets, luts, strict=True):
            out[o + 1 : o + g.n] = lut[1:] + top
            top += int(lut.max()) + 1
        if min_size > 1 and len(self.pairs):
            out = _absorb_small(self.sizes, out, self.pairs, self.sums, self.counts, min_size)
        return out

    def per_slice(self, luts: list[np.ndarray], min_size: int) -> np.ndarray:
        return self.scorer.per_slice(self.lut(luts, min_size))


# --- the learned merge -----------------------------------------------------------------------------


def training_set(g: Graph, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, merge labels, membrane flags) of one slice: fragment borders or the whole path."""
    record: list = []
    if kind == "flat":
        x = features(g.hist, g.sizes[g.pairs[:, 0]], g.sizes[g.pairs[:, 1]])
        ma = np.array([majority(g.overlap[a]) for a in g.pairs[:, 0]])
        mb = np.array([majority(g.overlap[b]) for b in g.pairs[:, 1]])
        return x, (ma == mb).astype(int), ((ma == 0) | (mb == 0)).astype(int)
    agglomerate(g, lambda x: 1.0 - x[:, 0], record)  # the mean agglomeration, lowest border first
    x = np.stack([r[0] for r in record])
    return x, np.array([r[1] for r in record]), np.array([r[2] for r in record])


def fit(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], membrane: str, seed: int = 0):
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    m = np.concatenate([p[2] for p in parts]).astype(bool)
    if membrane == "ignore":
        x, y = x[~m], y[~m]
    else:
        y = np.where(m, 1, y)
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=seed)
    model.fit(x, y)
    return model, {"examples": int(len(y)), "merge_fraction": round(float(y.mean()), 4)}


def learned(train: SliceSet, test: SliceSet, min_size: int, variant: tuple[str, str]) -> dict:
    """Train on ``train``'s slices (threshold by cross-fitted V_rand there), score on ``test``."""
    kind, membrane = variant
    parts = [training_set(g, kind) for g in train.graphs]

    def run(model, g: Graph) -> tuple[np.ndarray, np.ndarray]:
        return agglomerate(g, lambda x: model.predict_proba(x)[:, 1])

    paths = []  # each calibration slice by a model trained on the others
    for i, g in enumerate(train.graphs):
        model, _ = fit([p for j, p in enumerate(parts) if j != i], membrane)
        paths.append(run(model, g))
    grid = {}
    for t in THRESHOLDS:
        luts = [cut(g.n, m, p, t) for g, (m, p) in zip(train.graphs, paths, strict=True)]
        grid[t] = float(train.per_slice(luts, min_size).mean())
    threshold = max(grid, key=lambda t: (grid[t], -abs(t - 0.5)))
    model, info = fit(parts, membrane)
    test_paths = [run(model, g) for g in test.graphs]
    luts = [cut(g.n, m, p, threshold) for g, (m, p) in zip(test.graphs, test_paths, strict=True)]
    per = test.per_slice(luts, min_size)
    per_none = test.per_slice(luts, 1)
    test_best = max(
        float(
            test.per_slice(
                [cut(g.n, m, p, t) for g, (m, p) in zip(test.graphs, test_paths, strict=True)], min_size
            ).mean()
        )
        for t in THRESHOLDS
    )
    return {
        "variant": f"{kind}/{membrane}", **info, "threshold": threshold,
        "cal_v_rand_crossfit": round(grid[threshold], 4),
        "v_rand": round(float(per.mean()), 4), "per_slice": [round(float(v), 4) for v in per],
        "v_rand_no_min_size": round(float(per_none.mean()), 4),
        "v_rand_oracle_threshold": round(test_best, 4),
    }  # fmt: skip


# --- one comparison --------------------------------------------------------------------------------


def compare(cal: tuple[np.ndarray, list], test: tuple[np.ndarray, list], variants) -> dict:
    """Calibrate and train on ``cal`` (prob, truths), score both on ``test``."""
    from emseg.config import SEGMENT_DEFAULTS
    from emseg.segmentation.agglomerate import merge_tree
    from emseg.segmentation.blocks import thinned_components
    from emseg.segmentation.calibrate import _best_map, _Scorer, _Seeding, calibrate

    start = time.perf_counter()
    prob, truths = cal
    c = calibrate(prob, np.stack(truths) > 0, mode="2d")
    s = dict(c.settings)
    out: dict = {"calibration": c.to_dict()}
    if c.fallback:  # the learned merge needs a seeding: the defaults, mean merge re-chosen on it
        seeding = (SEGMENT_DEFAULTS["seed_threshold"], SEGMENT_DEFAULTS["min_distance"])
        sd = _Seeding(prob, truths, *seeding, "2d", "cores", (1.0, 1.0, 1.0))
        from emseg.segmentation.calibrate import MERGE_THRESHOLDS, MIN_SIZES

        best = max(((sd.score(t, m), t, m) for t in MERGE_THRESHOLDS for m in MIN_SIZES), key=lambda r: r[0])
        merge_threshold, min_size = best[1], best[2]
        out["mean_on_default_seeding"] = {
            "merge_threshold": merge_threshold,
            "min_size": min_size,
            "cal_v_rand": round(best[0], 4),
        }
    else:
        seeding = (s["seed_threshold"], s["min_distance"])
        merge_threshold, min_size = s["merge_threshold"], s["min_size"]
    out["seeding"] = {"seed_threshold": seeding[0], "min_distance": seeding[1], "seeds": "cores"}
    out["min_size"] = min_size
    tprob, ttruths = test
    train_set, test_set = SliceSet(prob, truths, *seeding), SliceSet(tprob, ttruths, *seeding)
    # the mean agglomeration on the test slices, as emseg's merge_tree cuts it
    _, merges, heights = merge_tree(test_set.n, test_set.pairs, test_set.sums, test_set.counts)
    from emseg.segmentation.agglomerate import cut_tree

    lut = cut_tree(test_set.n, merges, heights, merge_threshold)
    mean_per = test_set.scorer.per_slice(_absorb(test_set, lut, min_size))
    # the Python agglomerator ordered by mean height must give the same: a check of the heap
    paths = [agglomerate(g, lambda x: 1.0 - x[:, 0]) for g in test_set.graphs]
    check = test_set.per_slice(
        [cut(g.n, m, p, 1.0 - merge_threshold) for g, (m, p) in zip(test_set.graphs, paths, strict=True)], min_size
    )
    out["mean"] = {
        "merge_threshold": merge_threshold, "v_rand": round(float(mean_per.mean()), 4),
        "per_slice": [round(float(v), 4) for v in mean_per], "python_heap_check": round(float(check.mean()), 4),
    }  # fmt: skip
    if c.fallback:
        labels, _ = thinned_components(tprob, s["components"])
        comp = _Scorer(labels.astype(np.int64), ttruths, lines=False).per_slice(np.arange(int(labels.max()) + 1))
        out["calibrated_components"] = {"threshold": s["components"], "v_rand": round(float(comp.mean()), 4)}
    out["calibrated_emseg_v_rand"] = out.get("calibrated_components", out["mean"])["v_rand"]
    threshold, map_v, _ = _best_map(tprob, ttruths)
    out["map_best"] = {"threshold": threshold, "v_rand": round(map_v, 4)}
    out["learned"] = [learned(train_set, test_set, min_size, v) for v in variants]
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _absorb(test_set: SliceSet, lut: np.ndarray, min_size: int) -> np.ndarray:
    from emseg.segmentation.agglomerate import _absorb_small

    if min_size > 1:
        lut = _absorb_small(test_set.sizes, lut, test_set.pairs, test_set.sums, test_set.counts, min_size)
    return lut


def folds(cal: tuple[np.ndarray, list], a: int, b: int, variants) -> dict:
    """Calibrate and train on the first half of slices a:b, score on the second, and back."""
    h = (b - a) // 2
    first, second = (cal[0][:h], cal[1][:h]), (cal[0][h:], cal[1][h:])
    return {
        f"{a}:{a + h}->{a + h}:{b}": compare(first, second, variants),
        f"{a + h}:{b}->{a}:{a + h}": compare(second, first, variants),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME:A:B, the calibration slices A:B of tune.zarr in valNAME.zarr")
    parser.add_argument("--data", type=Path, default=Path("/tmp/cal"))
    parser.add_argument("--test", default="27:30", help="slices of isbi.zarr in predNAME.zarr")
    parser.add_argument("--variants", default=",".join(f"{k}/{m}" for k, m in VARIANTS))
    parser.add_argument("--reverse", action="store_true", help="also calibrate on the test slices, score on A:B")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "learned_merge.json")
    args = parser.parse_args()
    variants = [tuple(v.split("/")) for v in args.variants.split(",")]
    ta, tb = (int(v) for v in args.test.split(":"))
    started = time.perf_counter()
    results: dict = {
        "machine": platform.node(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
        "test_slices": [ta, tb], "thresholds": list(THRESHOLDS), "runs": {},
    }  # fmt: skip
    for spec in args.runs:
        name, a, b = spec.split(":")
        a, b = int(a), int(b)
        cal = load(args.data / f"val{name}.zarr", args.data / "tune.zarr", a, b)
        test = load(args.data / f"pred{name}.zarr", args.data / "isbi.zarr", ta, tb)
        run = {"calibration_slices": [a, b], "test": compare(cal, test, variants)}
        if args.reverse:  # the other way round: calibrate and train on the test slices
            run["reverse"] = {f"{ta}:{tb}->{a}:{b}": compare(test, cal, variants)}
        if b - a >= 6:  # two folds inside the calibration slices
            run["folds"] = folds(cal, a, b, variants)
        results["runs"][name] = run
        print(name, json.dumps(summary(run)), flush=True)
        results["seconds"] = round(time.perf_counter() - started, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    results["summary"] = {name: summary(run) for name, run in results["runs"].items()}
    args.json.write_text(json.dumps(results, indent=1))
    print(f"{results['seconds']} s -> {args.json}")


def summary(run: dict) -> dict:
    def one(r: dict) -> dict:
        return {
            "calibrated": r["calibrated_emseg_v_rand"], "mean": r["mean"]["v_rand"],
            "map_best": r["map_best"]["v_rand"],
            **{f"learned {x['variant']}": x["v_rand"] for x in r["learned"]},
            "learned chosen": max(r["learned"], key=lambda x: x["cal_v_rand_crossfit"])["variant"],
            "learned chosen v_rand": max(r["learned"], key=lambda x: x["cal_v_rand_crossfit"])["v_rand"],
        }  # fmt: skip

    out = {"test": one(run["test"])}
    for k, r in [*run.get("reverse", {}).items(), *run.get("folds", {}).items()]:
        out[k] = one(r)
    return out


if __name__ == "__main__":
    main()
