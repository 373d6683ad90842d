"""Agglomeration of fragments over their region adjacency graph.

The graph's edges are the pairs of fragments that touch (face neighbours), weighted by the mean
boundary height along their shared border (the mean over the neighbouring pixel pairs of both
pixels' heights). The lowest border merges first and the merged segment's borders are measured
anew, until every border left is at least the threshold (:func:`merge_hierarchical`, the mean
agglomeration of waterz and GALA); then every segment smaller than the minimum size joins the
neighbour it shares the lowest border with. The graph is built with numba (the differing
neighbour pairs) and numpy (``np.unique`` of their keys); the priority queue is numba too:
skimage's ``rag_boundary``/``merge_hierarchical`` build a networkx graph in Python, over a
hundred times slower on a megapixel of fragments, and waterz needs a C++ build from source and
affinities rather than a boundary map.
"""

from __future__ import annotations

import heapq

import numba
import numpy as np
from numba import types
from numba.typed import Dict, List
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def region_edges(labels: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The region adjacency graph of ``labels`` ((Y, X) or (Z, Y, X) int labels 1..N) on uint8
    ``heights``: (pairs (E, 2) int64 with a < b, summed heights (E,) float64, pixel pairs (E,)
    int64). The mean border height of edge e is ``sums[e] / (2 * counts[e])``."""
    n = int(labels.max()) + 1
    flat = np.ascontiguousarray(labels).reshape(-1)
    hflat = np.ascontiguousarray(heights).reshape(-1)
    none_k, none_w = np.zeros(0, np.int64), np.zeros(0, np.float64)
    axes, total = [], 0
    for axis in range(labels.ndim):  # axis as (outer, length, inner) of the flat array
        outer, inner = int(np.prod(labels.shape[:axis])), int(np.prod(labels.shape[axis + 1 :]))
        axes.append((outer, labels.shape[axis], inner, total))
        total += _border_pairs(flat, hflat, outer, labels.shape[axis], inner, n, none_k, none_w, False)
    if total == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0, np.int64)
    keys, weights = np.empty(total, np.int64), np.empty(total, np.float64)
    for outer, length, inner, start in axes:
        _border_pairs(flat, hflat, outer, length, inner, n, keys[start:], weights[start:], True)
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=weights)
    counts = np.bincount(inverse).astype(np.int64)
    return np.stack(np.divmod(uniq, n), axis=1), sums, counts


@numba.njit(cache=True, nogil=True)
def _border_pairs(  # noqa: PLR0913 - a numba kernel takes arrays and counts, not objects
    labels: np.ndarray, heights: np.ndarray, outer: int, length: int, inner: int, n: int,
    keys: np.ndarray, weights: np.ndarray, fill: bool,
) -> int:  # pragma: no cover - compiled  # fmt: skip
    """The neighbouring pixel pairs along one axis whose labels differ: their count, and with
    ``fill`` their keys ``min * n + max`` and summed heights. The axis is the middle one of the
    flat arrays seen as (outer, length, inner)."""
    e = 0
    for a in range(outer):
        for k in range(length - 1):
            base = (a * length + k) * inner
            for b in range(inner):
                i = base + b
                la, lb = labels[i], labels[i + inner]
                if la != lb:
                    if fill:
                        keys[e] = np.int64(min(la, lb)) * n + max(la, lb)
                        weights[e] = np.float64(heights[i]) + np.float64(heights[i + inner])
                    e += 1
    return e


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Node -> component id (int64, 0..K-1) of the graph on ``n`` nodes with edges ``pairs``."""
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def agglomerate(
    labels: np.ndarray, heights: np.ndarray, merge_threshold: float, min_size: int
) -> tuple[np.ndarray, int]:
    """Merge fragments: (labels (Y, X) or (Z, Y, X) int32 1..N, uint8 heights) -> (int32 labels
    1..K, K). Neighbours merge, lowest border first, while the mean P(membrane) along their whole
    shared border is below ``merge_threshold`` (0-1) (:func:`merge_hierarchical`); then each
    segment of fewer than ``min_size`` pixels joins its lowest-border neighbour."""
    n = int(labels.max()) + 1
    sizes = np.bincount(labels.reshape(-1), minlength=n)
    pairs, sums, counts = region_edges(labels, heights)
    lut = merge_hierarchical(n, pairs, sums, counts, merge_threshold)
    if min_size > 1 and len(pairs):
        lut = _absorb_small(sizes, lut, pairs, sums, counts, min_size)
    # compact: background 0 stays 0, the rest 1..K in order of first appearance in the lut
    present = np.zeros(int(lut.max()) + 1, bool)
    present[lut[sizes > 0]] = True
    present[lut[0]] = False
    new = np.cumsum(present).astype(np.int32)
    new[~present] = 0
    return new[lut][labels], int(present.sum())


def merge_hierarchical(n: int, pairs: np.ndarray, sums: np.ndarray, counts: np.ndarray, threshold: float) -> np.ndarray:
    """Node -> segment (int64): hierarchical mean agglomeration. The border with the lowest mean
    height merges first; the merged segment's borders with each neighbour are the union of its
    parts' borders (sums and lengths add up, no pixel is read again) and are measured anew; this
    repeats until every border left has a mean of at least ``threshold`` (0-1).

    Measuring the merged border whole joins a cell cut in three by an organelle, which a single
    threshold cut of the fragment graph leaves apart; merging one border at a time in order keeps
    a one-pixel fragment on a faint membrane from bridging the two cells on either side (the
    threshold cut joins every low border at once, whatever lies between)."""
    return merge_tree(n, pairs, sums, counts, threshold)[0]


def merge_tree(
    n: int, pairs: np.ndarray, sums: np.ndarray, counts: np.ndarray, threshold: float = np.inf
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(node -> segment at ``threshold`` as :func:`merge_hierarchical` gives it, the merges in
    their order as (M, 2) int64 node pairs, their mean border heights (M,) float64 0-1).

    The heights never decrease: a merged border is the weighted mean of two borders that were
    both still in the queue, so at least the height just merged. The agglomeration at any
    threshold ``t`` is therefore the first merges whose height is below ``t``
    (:func:`cut_tree`): one agglomeration with the default ``threshold`` (merge everything)
    answers every threshold."""
    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64), np.zeros((0, 2), np.int64), np.zeros(0)
    parent, merged, heights, m = _merge_hierarchical(
        n, pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), np.asarray(sums, np.float64).copy(),
        np.asarray(counts, np.float64).copy(), float(min(threshold, 2.0)),
    )  # fmt: skip
    return parent, merged[:m], heights[:m]


def cut_tree(n: int, merges: np.ndarray, heights: np.ndarray, threshold: float) -> np.ndarray:
    """Node -> segment (int64 component ids) after the merges of :func:`merge_tree` whose height
    is below ``threshold``: the same partition as :func:`merge_hierarchical` at ``threshold``."""
    return _components(n, merges[: int(np.searchsorted(heights, threshold, side="left"))])


@numba.njit(cache=True, nogil=True)
def _merge_hierarchical(  # noqa: C901 - one compiled loop over a heap; split, numba would call across functions in the hot path
    n: int, ea: np.ndarray, eb: np.ndarray, sums: np.ndarray, counts: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover - compiled  # fmt: skip
    """The priority queue of :func:`merge_tree`: a heap of (mean, edge, version) with stale
    entries skipped, a dict of neighbour -> edge per segment, the segment with fewer neighbours
    merged into the other; each merge recorded with its mean."""
    alive = np.ones(len(ea), np.bool_)
    version = np.zeros(len(ea), np.int64)
    merged = np.empty((max(n - 1, 0), 2), np.int64)
    heights = np.empty(max(n - 1, 0), np.float64)
    m = 0
    adjacency = List()
    for _ in range(n):
        adjacency.append(Dict.empty(key_type=types.int64, value_type=types.int64))
    for e in range(len(ea)):
        adjacency[ea[e]][eb[e]] = e
        adjacency[eb[e]][ea[e]] = e
    scale = 2.0 * 255.0
    heap = [(sums[e] / (scale * counts[e]), e, np.int64(0)) for e in range(len(ea))]
    heapq.heapify(heap)
    parent = np.arange(n)
    while len(heap):
        mean, e, stamp = heapq.heappop(heap)
        if not alive[e] or stamp != version[e]:
            continue
        if mean >= threshold:
            break
        u, v = ea[e], eb[e]
        if len(adjacency[u]) < len(adjacency[v]):
            u, v = v, u
        alive[e] = False
        del adjacency[u][v]
        parent[v] = u
        merged[m, 0], merged[m, 1], heights[m] = u, v, mean
        m += 1
        for w, e2 in adjacency[v].items():
            if w == u:
                continue
            del adjacency[w][v]
            if w in adjacency[u]:
                e1 = adjacency[u][w]
                sums[e1] += sums[e2]
                counts[e1] += counts[e2]
                alive[e2] = False
                version[e1] += 1
                heapq.heappush(heap, (sums[e1] / (scale * counts[e1]), e1, version[e1]))
            else:
                adjacency[u][w] = e2
                adjacency[w][u] = e2
                if ea[e2] == v:
                    ea[e2] = u
                else:
                    eb[e2] = u
        adjacency[v].clear()
    for i in range(n):  # each merge hung a root under a root: find each node's root, compressing the path
        root = i
        while parent[root] != root:
            root = parent[root]
        node = i
        while parent[node] != root:
            parent[node], node = root, parent[node]
    return parent, merged, heights, m


def _absorb_small(
    fragment_sizes: np.ndarray, lut: np.ndarray, pairs: np.ndarray, sums: np.ndarray, counts: np.ndarray, min_size: int
) -> np.ndarray:
    """``lut`` after every merged segment smaller than ``min_size`` joined the neighbour it
    shares the lowest mean border with (one round; a small one may join a small one)."""
    sizes = np.bincount(lut, weights=fragment_sizes, minlength=int(lut.max()) + 1)
    a, b = lut[pairs[:, 0]], lut[pairs[:, 1]]
    keep = a != b
    a, b, s, c = a[keep], b[keep], sums[keep], counts[keep]
    if a.size == 0:
        return lut
    k = int(lut.max()) + 1
    key = np.minimum(a, b) * k + np.maximum(a, b)
    uniq, inverse = np.unique(key, return_inverse=True)
    mean = np.bincount(inverse, weights=s) / np.bincount(inverse, weights=c)
    lo, hi = np.divmod(uniq, k)
    src = np.concatenate([lo, hi])
    dst = np.concatenate([hi, lo])
    weight = np.concatenate([mean, mean])
    small = sizes[src] < min_size
    src, dst, weight = src[small], dst[small], weight[small]
    order = np.lexsort((weight, src))
    first = np.unique(src[order], return_index=True)[1]
    joins = np.stack([src[order][first], dst[order][first]], axis=1)
    return _components(k, joins)[lut]


__all__ = ["agglomerate", "cut_tree", "merge_hierarchical", "merge_tree", "region_edges"]
