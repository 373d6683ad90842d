"""Instance segmentation: from P(cell) to one label per cell (``emseg segment``).

``watershed`` makes fragments (seeded watershed of the boundary map), ``agglomerate`` merges
them over a region adjacency graph, ``stitch`` joins blocks without seams, ``labels`` writes the
OME-Zarr label image and ``segment`` is :func:`~emseg.segmentation.segment.segment_store`.
"""
