"""The napari plugin (``pip install 'emseg[napari]'``), declared in ``emseg/napari.yaml``.

- :mod:`emseg.napari.reader`: opens emseg's OME-Zarr stores (``napari --plugin emseg data.zarr``)
  with the EM, P(cell) as a translucent layer above it and the labels visible, in nanometres.
- :mod:`emseg.napari.predict`: an image layer through ``emseg predict`` (no Qt).
- :mod:`emseg.napari.widget`: the dock widget that runs it in a background worker (progress
  with ETA, Cancel, resume or overwrite of a kept output, errors as notifications).

Nothing here is imported by the rest of emseg; napari and Qt are needed only by the widget.
"""
