"""``emseg segment --objects NAME``: objects of a blob-like class of a multi-class prediction.

Mitochondria, synapses and other compact structures are objects of their own class, not cells
between membranes: each section's objects are :func:`~emseg.probability.blob_objects` of
P(NAME) where NAME is the most probable class (``labels/classes``): a seeded watershed of the
distance to the blob's edge (so two that touch are split at the neck), objects under a minimum
size dropped. Their IDs run on across sections (unique in the stack). The result is an OME-Zarr
label image of its own, written through the output lifecycle like the cells (partial, lock,
previous output kept until done). A section is read whole: memory is a few times one section of
the prediction (a 16384² section: about 2 GiB).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import zarr

from emseg.config import SegmentConfig
from emseg.errors import BadInputError
from emseg.io.outputs import Output, provenance
from emseg.io.pyramid import build_levels
from emseg.io.zarr import LevelSpec, create_image_store, emseg_attrs, open_ome, store_classes
from emseg.probability import blob_objects, object_settings, probability_float
from emseg.progress import Reporter, reporter_or_null
from emseg.segmentation.labels import create_label_image

log = logging.getLogger(__name__)


def segment_objects(
    pred: str | Path, output: str | Path | None, config: SegmentConfig, progress: Reporter | None = None
) -> Path:
    """The objects of class ``config.objects`` of the multi-class prediction ``pred`` as the
    OME-Zarr label image ``output`` ((Z, Y, X) uint32 IDs, 0 elsewhere). ``config.min_distance``
    and ``config.min_size`` (when given) set the seeds' spacing and the smallest object."""
    progress = reporter_or_null(progress)
    name = str(config.objects)
    if config.into or config.calibrate is not None or config.components is not None:
        raise BadInputError(
            "--objects writes a label image of its own with -o (not --into, --calibrate or --components)"
        )
    if output is None:
        raise BadInputError("--objects: give the output label image with -o")
    image = open_ome(pred, channels=True)
    classes = store_classes(image)
    if not image.channels or classes is None:
        raise BadInputError(f"--objects {name}: {pred} is not a prediction of a network of several classes")
    chosen = next((c for c in classes if c.name == name), None)
    if chosen is None:
        raise BadInputError(f"--objects {name}: {pred} has the classes {', '.join(c.name for c in classes)}")
    learned_distance, learned_size, source = object_settings(emseg_attrs(image).get("objects"), name)
    min_distance = learned_distance if config.min_distance is None else config.min_distance
    min_size = learned_size if config.min_size is None else config.min_size
    if config.min_distance is None or config.min_size is None:
        log.info("%s objects: min distance %d, min size %d (%s)", name, min_distance, min_size, source)
    settings = {"objects": name, "min_distance": min_distance, "min_size": min_size}
    prov = provenance("segment", prediction=str(image.path.resolve()), settings=settings, objects_class=name)
    chunks = (1, *(int(c) for c in image.array.chunks[-2:]))
    levels = image.levels
    pyramid_min = max(levels[-1].shape[-2:]) if len(levels) > 1 else max(image.shape[1:])
    spec = LevelSpec(shape=image.shape, dtype="uint32", chunks=chunks, pyramid_min_size=pyramid_min, clevel=1)

    def create(path: Path) -> None:
        create_image_store(path, image.version, attrs={"emseg": {**prov, "complete": False}})

    final = Path(output).absolute()
    with Output(
        final, overwrite=config.overwrite, kind="store", command="segment", create=create, inputs=[image.path]
    ) as out:
        root = zarr.open_group(str(out.path), mode="r+")
        attrs = {"emseg": {**prov, "complete": False}}
        level0 = create_label_image(root, spec, image.voxel_size, image.version, attrs, False, image.origin, name)[0]
        classes_image = image.labels["classes"].array
        last = 0
        progress.start(f"segment: {name} objects", total=image.shape[0], unit="slices")
        for z in range(image.shape[0]):
            prob = probability_float(np.asarray(image.array[chosen.value - 1, z]), str(pred))
            mask = np.asarray(classes_image[z]) == chosen.value
            labels = blob_objects(prob, mask, min_distance=min_distance, min_size=min_size)
            labels[labels > 0] += np.uint32(last)
            last = max(last, int(labels.max()))
            level0[z] = labels
            progress.advance(1)
        progress.finish()
        build_levels(out.path, "mode")
        root.attrs["emseg"] = {**prov, "complete": True, "objects": last}
    log.info("%d %s objects in %s", last, name, final)
    return final


__all__ = ["segment_objects"]
