"""How good a segmentation is: the ISBI 2012 metrics (``metrics``) and ``emseg evaluate`` (``evaluate``)."""
