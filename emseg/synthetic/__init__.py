"""Synthetic EM-like stacks with ground truth, for offline demos, tests and benchmarks.

The stack imitates the ISBI 2012 challenge data (serial-section TEM of Drosophila neural tissue,
4 x 4 x 50 nm voxels, 512 x 512 slices):

- cells are the sections of a 3D tessellation of random seeds in an anisotropic volume (slice
  ``z`` sits at ``ZSTEP * z``), so cross-sections change smoothly from slice to slice and cells
  appear and vanish as the slices pass their ends. It is a power diagram (each seed lifted into a
  4th dimension): sparse big seeds with small lifts and dense small seeds with large ones give the
  broad, skewed size distribution of ISBI's sections;
- the boundaries are wiggly (pixels are warped by a smooth displacement before the nearest-seed
  query), the corners rounded (a smooth minimum of the distances to the two nearest boundaries),
  and drawn as dark membranes whose half-width varies smoothly between 1.5 and 4 px;
- interiors get a per-cell mean intensity (a few darker cells), smooth multi-scale texture and
  fine grain, small dark vesicles (rings and dots, densities varying between cells) and darker
  mitochondria with cristae in some of the bigger cells -- none of which is membrane in the
  labels, and all of which fade out before the labelled membrane;
- the image is blurred (Gaussian, sigma 1 px) and noised. Its intensity statistics are calibrated
  on the ISBI training volume: membrane mean/std about 81/32 (ISBI 85/33), interior 138/38
  (ISBI 138/40), membrane fraction about 21 % (ISBI 22 %).

Labels use the ISBI ``train-labels.tif`` encoding: 255 = cell interior, 0 = membrane.

Everything is a deterministic function of (seed, position), generated slice by slice and each
slice in horizontal strips of about 2**19 pixels (with a halo, so the blur is exact and the
result does not depend on the strips): memory is bounded by one slice's outputs, a strip's
working arrays and the seeds (a few per ``cell_size**3 / ZSTEP`` voxels). Each pixel's nearest
three seeds are found exactly: one k-d tree query per 16 x 16 pixels gives the candidates, and a
vectorised brute force ranks them for every pixel.

Modules: ``params`` (the calibrated numbers), ``fields`` (smooth random fields), ``cells`` (the
cell scene: seeds, per-cell attributes, nearest-seed boundaries), ``render`` (one slice: membranes,
organelles, grain, blur, noise), ``stack`` (the generators) and ``mirror`` (mirror tiling).
Pure numpy and scipy.
"""

from __future__ import annotations

from emseg.synthetic.mirror import tile_isbi_like
from emseg.synthetic.stack import synthetic_slices, synthetic_stack

__all__ = ["synthetic_stack", "synthetic_slices", "tile_isbi_like"]
