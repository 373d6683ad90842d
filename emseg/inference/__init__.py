"""Tiled, out-of-core inference: tiling (pure numpy), the batched engine, the dask graph."""
