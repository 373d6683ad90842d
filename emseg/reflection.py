"""The one reflection rule of emseg: coordinates beyond a slice's edge read its mirror image.

Prediction reads tiles beyond a slice's edges with it (numpy), training cuts crops larger than a
slice with it (torch), so both see the same context at the edges.
"""

from __future__ import annotations

from typing import Any


def reflect_index(index: Any, n: int) -> Any:
    """Map integer coordinates into ``[0, n)`` by mirror reflection about the edge pixels
    (numpy's ``mode="reflect"``: -1 -> 1, n -> n - 2), repeated for coordinates far outside.

    Written with ``%``, ``*`` and comparisons only, so it takes a numpy array or a torch tensor
    and returns the same type.
    """
    if n == 1:
        return index * 0
    m = index % (2 * (n - 1))  # the sign of the divisor for numpy and torch alike
    return m - 2 * (m - (n - 1)) * (m >= n)


__all__ = ["reflect_index"]
