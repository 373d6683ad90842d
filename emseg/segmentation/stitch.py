"""Joining the fragments of blocks with halos into one labelling without seams.

Every block (:class:`emseg.blocks.Block`) segments its read region, the write region grown by a
halo (clipped at the stack's edges), and keeps the write region, with local IDs 1..n. Global IDs
are ``offset + local`` with offsets the running sum of the blocks' counts, so they are unique.
Across each face between two blocks A (below) and B (above) lie two planes of pixels, A's last
and B's first; both blocks segmented both (the halo). A pixel pair straddling the face joins A's
object with B's when *both* blocks put the two pixels in one object; where either block draws a
boundary, they stay apart. The joins are the edges of a graph over global IDs whose connected
components (scipy) are the final objects, numbered 1..K by a lookup table; a last pass writes
``table[offset + local]``.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from emseg.blocks import Block


def face_planes(block: Block, labels: np.ndarray) -> dict[str, np.ndarray]:
    """What the neighbours of ``block`` need from its (Z, Y, X) read-region ``labels``: for each
    axis with a neighbour below (``lo{axis}``) or above (``hi{axis}``), a (2, ...) array of the
    plane inside the write region and the plane just outside it."""
    out = {}
    inner = block.inner()
    for axis in range(3):
        (w0, w1), (r0, r1) = block.write[axis], block.read[axis]
        for side, inside, outside in (("lo", w0, w0 - 1), ("hi", w1 - 1, w1)):
            if r0 <= outside < r1:
                index = list(inner)
                planes = []
                for at in (inside, outside):
                    index[axis] = slice(at - r0, at - r0 + 1)
                    planes.append(np.squeeze(labels[tuple(index)], axis=axis))
                out[f"{side}{axis}"] = np.stack(planes)
    return out


def face_joins(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Pairs (local ID in the lower block, local ID in the upper block), (P, 2) int64, joined
    across one face. ``low`` is the lower block's ``hi`` planes (its last plane, the upper
    block's first), ``high`` the upper block's ``lo`` planes (its first plane, the lower block's
    last); a pixel pair joins where both blocks give its two pixels one ID (0, no object, joins nothing)."""
    agree = (low[0] == low[1]) & (high[0] == high[1]) & (low[0] != 0) & (high[0] != 0)
    pairs = np.stack([low[0][agree], high[0][agree]], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def neighbours(blocks: list[Block]) -> list[tuple[int, int, int]]:
    """(index of the lower block, index of the upper block, axis) for every shared face."""
    starts = {}
    for j, r in enumerate(blocks):
        for axis in range(3):
            others = tuple(r.write[a] for a in range(3) if a != axis)
            starts[(axis, r.write[axis][0], others)] = j
    found = []
    for i, r in enumerate(blocks):
        for axis in range(3):
            others = tuple(r.write[a] for a in range(3) if a != axis)
            upper = starts.get((axis, r.write[axis][1], others))
            if upper is not None:
                found.append((i, upper, axis))
    return found


def global_table(counts: list[int], joins: list[tuple[int, int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (B,) int64, table (N + 1,) int64): block b's local ID l is global ID
    ``offsets[b] + l`` and final ID ``table[offsets[b] + l]`` (1..K, consecutive; 0 stays 0).
    ``joins`` holds (lower block, upper block, pairs of local IDs) from :func:`face_joins`."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(sum(counts)) + 1
    edges = [np.stack([offsets[a] + p[:, 0], offsets[b] + p[:, 1]], axis=1) for a, b, p in joins if len(p)]
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    component = connected_components(graph, directed=False)[1].astype(np.int64)
    # number the components 1..K in order of their smallest global ID; 0 stays 0
    first = np.full(int(component.max()) + 1, n, np.int64)
    np.minimum.at(first, component, np.arange(n))
    rank = np.argsort(np.argsort(first))
    table = rank[component]
    return offsets, table


def label_dtype(count: int) -> str:
    """uint32 for up to 2**32 - 1 objects, else uint64."""
    return "uint32" if count < 2**32 else "uint64"


__all__ = ["face_joins", "face_planes", "global_table", "label_dtype", "neighbours"]
