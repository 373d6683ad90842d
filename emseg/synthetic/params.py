"""The numbers that define the synthetic stacks' look, calibrated on the ISBI 2012 training volume.

Geometry is in pixels of the anisotropic (y, x, ZSTEP * z) space the cells live in; intensities
are grey levels before blur and noise. Changing any of them changes every generated stack.
"""

from __future__ import annotations

#: Distance between two slices in pixel units of the anisotropic space the cells live in. ISBI
#: sections are 50 nm apart at 4 nm pixels (12.5 px), but neurites run mostly across the
#: sections, so a smaller step gives ISBI-like slice-to-slice change.
ZSTEP = 5.0
#: Mean spacing of the big and the small seeds, as multiples of ``cell_size``, and their lifts
#: into the 4th dimension (uniform in [0, BIG_LIFT] and in SMALL_LIFT, times ``cell_size``).
BIG_SPACING = 1.4
SMALL_SPACING = 0.8
BIG_LIFT = 0.2
SMALL_LIFT = (0.7, 1.0)
HALO = 4  # rows/columns computed beyond a strip so the blur (sigma 1, truncate 4) is exact
BLUR_SIGMA = 1.0
WARP = (5.0, 0.9)  # px, amplitudes of the coarse and fine warp that makes boundaries wiggly
WARP_MAX = 10.0  # px, bound of the displacement
ROUND = 10.0  # px, range of the smooth minimum that rounds the cells' corners
HALFWIDTH = 2.35  # px, mean membrane half-width (varies smoothly in 1.5 .. 4)
#: px kept free of vesicles and mitochondria along the boundaries (widest membrane + rounding).
MARGIN = 4.0 + ROUND / 4 + 1.0

# Intensity model (grey levels before blur and noise), calibrated against ISBI train-volume.tif.
CELL_MEAN = 147.0
CELL_MEAN_SD = 20.0
MEMBRANE_LEVEL = 35.0
TEX1 = 16.0
TEX2 = 18.0
LIGHT = 8.0
GRAIN_SD = 36.0
NOISE_SD = 11.0
VESICLE_DENSITY = 1 / 300.0  # median vesicles per px^2 of a cell (log-normal over cells)
VESICLE_DENSITY_MAX = 1 / 100.0  # cap
MITO_P = 0.5

# Random-stream tags: each random quantity draws from ``default_rng([seed, TAG, ...])``.
TAG_SEEDS, TAG_VESICLES, TAG_GRAIN, TAG_NOISE = 1, 2, 3, 4
TAG_WARP_Y, TAG_WARP_X, TAG_WARP_Y2, TAG_WARP_X2 = 10, 11, 12, 13
TAG_WIDTH, TAG_TEX1, TAG_TEX2, TAG_LIGHT = 20, 22, 23, 24
