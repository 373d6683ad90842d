"""Ground truth as emseg scores against it: labels/cells, 0 for membrane and > 0 for cell.

``emseg evaluate`` and training's validation both refuse truth that lacks one of the two classes
with :func:`check_both_classes`, training before it writes anything.
"""

from __future__ import annotations

import numpy as np

from emseg.errors import BadInputError


def check_both_classes(labels: np.ndarray, what: str) -> None:
    """Refuse ground truth without both classes (cells > 0 and membrane 0): every score against it
    (V_rand 1.0 for all-background truth) would be meaningless."""
    cells = int(np.count_nonzero(labels))
    if cells == 0 or cells == labels.size:
        kind = "membrane (0)" if cells == 0 else "cell (> 0)"
        raise BadInputError(
            f"{what}: the ground truth holds only {kind} pixels; scores need both cells and membranes "
            "(check the labels, or choose other slices)"
        )


__all__ = ["check_both_classes"]
