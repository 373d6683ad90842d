"""The direction of imports (docs/ARCHITECTURE.md): every module imports only from its own layer
or the layers below, peers of the middle layer do not import each other, and there is no cycle.
Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emseg"

#: Layers from the bottom; a module's layer is that of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    (
        "emseg._version",
        "emseg.blocks",
        "emseg.classes",
        "emseg.errors",
        "emseg.config",
        "emseg.cluster",
        "emseg.progress",
        "emseg.system",
        "emseg.device",
        "emseg.viz",
        "emseg.probability",
        "emseg.reflection",
        "emseg.synthetic",
    ),
    ("emseg.io",),
    ("emseg.models",),
    ("emseg.inference", "emseg.evaluation", "emseg.segmentation"),
    ("emseg.training",),
    ("emseg.recipes",),
    ("emseg.api", "emseg.napari"),
    ("emseg.cli", "emseg.__main__", "emseg"),
]
#: The layer whose rooms are peers: prediction, evaluation and segmentation never import each other.
MIDDLE = 3


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """emseg modules imported anywhere in ``path`` (top level and inside functions)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", known)


def imports_in(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """emseg modules imported anywhere in ``source``, the text of module ``name``."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("emseg") and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the prefix that placed it there)."""
    best = (-1, "")
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (index, prefix)
    assert best[0] >= 0, f"{name} belongs to no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_point_down() -> None:
    wrong = []
    for name, targets in graph().items():
        layer, prefix = layer_of(name)
        for target in targets:
            t_layer, t_prefix = layer_of(target)
            if name == "emseg" and target.startswith("emseg."):
                continue  # the package root re-exports the API lazily; it sits on top
            if t_layer > layer:
                wrong.append(f"{name} (layer {layer}) imports {target} (layer {t_layer})")
            elif t_layer == layer == MIDDLE and t_prefix != prefix:
                wrong.append(f"{name} imports its peer {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    edges = {k: {t for t in v if not t == "emseg"} for k, v in graph().items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from emseg.io.zarr import open_ome\n", {"emseg.io.zarr"}),
        ("def f():\n    from emseg import api\n", {"emseg.api"}),
        ("import emseg.training.loop as L\n", {"emseg.training.loop"}),
        ("from .show import show_slice\n", {"emseg.recipes.show"}),
        ("from ..io import zarr\n", {"emseg.io.zarr"}),
    ],
)
def test_the_walker_sees_lazy_relative_and_aliased_imports(source: str, expected: set[str]) -> None:
    assert imports_in(source, "emseg.recipes.probe", False, set(modules())) == expected


def test_the_rule_catches_an_upward_import() -> None:
    """A module of io importing the training layer is what test_imports_point_down must refuse."""
    found = imports_in("def f():\n    from emseg.training.loop import fit\n", "emseg.io.probe", False, set(modules()))
    assert found == {"emseg.training.loop"}
    assert layer_of("emseg.training.loop")[0] > layer_of("emseg.io.probe")[0]


def test_training_only_trains() -> None:
    """The loop and its data never reach into prediction or evaluation: validation enters ``fit``
    as a callable, built by ``training.validate`` (the one module that may import them)."""
    reaching = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if name.startswith("emseg.training") and name != "emseg.training.validate"
        for target in targets
        if target.startswith(("emseg.inference", "emseg.evaluation"))
    ]
    assert not reaching, "\n".join(reaching)
