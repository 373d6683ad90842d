"""Classes of a multi-class label image: ``NAME=CODE[,CODE...]`` declarations, their numbers.

A label image from an annotation tool holds one code per class (the VNC stack: 0-128 membranes,
159 glia, 191 mitochondria, 223 synapses, 255 cell interior). ``emseg ingest --class`` names the
classes; the store keeps ``labels/classes`` with 0 = unlabelled (every code no class names) and
1, 2, ... the classes in the order given. That order is the class numbering everywhere after it
(the network's output channels, the predicted class image), so a class that never occurs keeps
its number: numbers never shift with the data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emseg.errors import BadInputError

#: A class name: a letter, then letters, digits, "_" or "-" (it names napari layers and channels).
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
#: uint8 class numbers, 0 being unlabelled.
MAX_CLASSES = 255
#: The class whose pixels separate cells: the U-Net border term and the cells of `emseg segment`.
MEMBRANE = "membrane"
#: Colours (RGB) of the usual classes; others take the next of FALLBACK.
COLORS = {
    "membrane": (0, 160, 255),
    "glia": (160, 90, 255),
    "mitochondria": (255, 120, 0),
    "synapse": (255, 0, 90),
    "cell": (255, 200, 0),
}
FALLBACK = ((0, 200, 80), (200, 200, 200), (120, 60, 0), (0, 220, 220), (255, 90, 255), (90, 90, 255))


@dataclass(frozen=True)
class LabelClass:
    """One class: its ``name``, the source ``codes`` that are it and its class ``value`` (1, 2, ...)."""

    name: str
    codes: tuple[int, ...]
    value: int

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS.get(self.name.lower(), FALLBACK[(self.value - 1) % len(FALLBACK)])


Declared = tuple[tuple[str, tuple[int, ...]], ...]


def _code(text: Any, what: str) -> int:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BadInputError(f"{what}: {text!r} is not a label code (a whole number >= 0)") from None
    if not value.is_integer() or value < 0:
        raise BadInputError(f"{what}: {text!r} is not a label code (a whole number >= 0)")
    return int(value)


def _one(item: Any, flag: str) -> tuple[str, tuple[int, ...]]:
    if isinstance(item, str):
        name, sep, codes_text = item.partition("=")
        codes: Sequence[Any] = [c for c in codes_text.split(",") if c.strip()] if sep else []
        if not sep or not codes:
            raise BadInputError(f"{flag} {item!r}: expected NAME=CODE[,CODE...], e.g. mitochondria=191")
    elif isinstance(item, Sequence) and len(item) == 2:
        name, raw = item
        codes = [raw] if isinstance(raw, (int, float, str)) else list(raw)
    else:
        raise BadInputError(f"{flag} {item!r}: expected NAME=CODE[,CODE...]")
    name = str(name).strip()
    if not NAME.match(name):
        raise BadInputError(f"{flag} {item!r}: a class name is a letter then letters, digits, '_' or '-' (at most 32)")
    return name, tuple(_code(c.strip() if isinstance(c, str) else c, f"{flag} {name}") for c in codes)


def parse_classes(value: Any, flag: str = "--class") -> Declared:
    """``--class`` values (``["membrane=0,32", "mitochondria=191"]``, a mapping name -> codes, or
    pairs) as ((name, codes), ...) in the given order; BadInputError for a malformed one, a name
    or a code given twice, or more than :data:`MAX_CLASSES` classes."""
    if isinstance(value, str):
        value = [value]
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    declared = tuple(_one(item, flag) for item in items)
    if not declared:
        raise BadInputError(f"{flag}: no class given")
    if len(declared) > MAX_CLASSES:
        raise BadInputError(f"{flag}: {len(declared)} classes; at most {MAX_CLASSES} fit a uint8 class image")
    names: dict[str, str] = {}
    owner: dict[int, str] = {}
    for name, codes in declared:
        if name.lower() in names:
            raise BadInputError(f"{flag}: class {name!r} is given twice")
        names[name.lower()] = name
        for code in codes:
            if code in owner:
                where = "twice" if owner[code] == name else f"to both {owner[code]!r} and {name!r}"
                raise BadInputError(f"{flag}: code {code} is given {where}; each code belongs to one class")
            owner[code] = name
    return declared


def label_classes(declared: Declared) -> list[LabelClass]:
    """The classes, numbered 1, 2, ... in the declared order."""
    return [LabelClass(name, codes, i) for i, (name, codes) in enumerate(declared, start=1)]


def map_codes(label: np.ndarray, classes: Sequence[LabelClass]) -> np.ndarray:
    """(…) label codes -> (…) uint8 class numbers, 0 where no class names the code."""
    if label.dtype in (np.uint8, np.uint16):  # one table lookup
        lut = np.zeros(np.iinfo(label.dtype).max + 1, np.uint8)
        for c in classes:
            lut[[code for code in c.codes if code < len(lut)]] = c.value
        return lut[label]
    out = np.zeros(label.shape, np.uint8)
    for c in classes:
        out[np.isin(label, np.asarray(c.codes))] = c.value
    return out


class CodeCount:
    """Pixels per source code over the bands of a label image (at most ``limit`` distinct codes
    are tracked: beyond that it is an instance image, not a class image)."""

    def __init__(self, limit: int = 4096) -> None:
        self.counts: dict[int | float, int] = {}
        self.limit, self.overflow = limit, False

    def add(self, label: np.ndarray) -> None:
        if self.overflow:
            return
        if label.dtype in (np.uint8, np.uint16):
            counts = np.bincount(label.ravel(), minlength=1)
            values = np.flatnonzero(counts)
            pairs = zip(values.tolist(), counts[values].tolist(), strict=True)
        else:
            values, counts = np.unique(label, return_counts=True)
            pairs = zip(values.tolist(), counts.tolist(), strict=True)
        for v, n in pairs:
            self.counts[v] = self.counts.get(v, 0) + int(n)
        self.overflow = len(self.counts) > self.limit

    def report(self, classes: Sequence[LabelClass], source: str) -> list[str]:
        """Warnings: codes no class names (left unlabelled) and classes that never occur."""
        if self.overflow:
            return [
                f"labels {source} hold more than {self.limit} distinct values: an instance image? every value "
                "no --class names is left unlabelled (0)"
            ]
        total = max(sum(self.counts.values()), 1)
        named = {code for c in classes for code in c.codes}
        unknown = sorted((v, n) for v, n in self.counts.items() if v not in named)
        notes = []
        if unknown:
            shown = ", ".join(f"{v:g} ({100 * n / total:.2g} %)" for v, n in unknown[:12])
            more = f" and {len(unknown) - 12} more" if len(unknown) > 12 else ""
            notes.append(
                f"labels {source}: codes {shown}{more} belong to no --class; they are unlabelled (0) and "
                "training ignores them"
            )
        for c in classes:
            if not any(self.counts.get(code) for code in c.codes):
                codes = ",".join(str(v) for v in c.codes)
                notes.append(f"labels {source}: class {c.name} ({codes}) never occurs; it keeps number {c.value}")
        return notes


def image_label_metadata(classes: Sequence[LabelClass]) -> dict[str, Any]:
    """NGFF image-label ``colors`` and ``properties`` naming every class (0 stays transparent)."""
    return {
        "colors": [{"label-value": c.value, "rgba": [*c.rgb, 160]} for c in classes],
        "properties": [{"label-value": c.value, "name": c.name, "codes": list(c.codes)} for c in classes],
    }


def classes_record(classes: Sequence[LabelClass]) -> list[dict[str, Any]]:
    """The classes as JSON (store attributes, checkpoints): value, name, codes, colour."""
    return [{"value": c.value, "name": c.name, "codes": list(c.codes), "rgb": list(c.rgb)} for c in classes]


def from_record(record: Sequence[Mapping[str, Any]]) -> list[LabelClass]:
    """The classes of a :func:`classes_record` (checked: values 1, 2, ... in order)."""
    out = [LabelClass(str(r["name"]), tuple(int(c) for c in r.get("codes", ())), int(r["value"])) for r in record]
    if [c.value for c in out] != list(range(1, len(out) + 1)):
        raise BadInputError(f"class record {[c.value for c in out]}: expected values 1, 2, ... in order")
    return out


def membrane_value(classes: Sequence[LabelClass]) -> int | None:
    """The class number of the membrane class, if there is one."""
    return next((c.value for c in classes if c.name.lower() == MEMBRANE), None)


def not_membrane(labels: np.ndarray, membrane: int) -> np.ndarray:
    """The cells of a class image as ISBI ground truth (uint8, 1 = labelled and not membrane, 0 =
    membrane or unlabelled)."""
    return ((labels > 0) & (labels != membrane)).astype(np.uint8)


__all__ = [
    "MAX_CLASSES",
    "MEMBRANE",
    "CodeCount",
    "LabelClass",
    "classes_record",
    "from_record",
    "image_label_metadata",
    "label_classes",
    "map_codes",
    "membrane_value",
    "not_membrane",
    "parse_classes",
]
