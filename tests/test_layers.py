"""The shape of ``src/tidings``: its import graph, read from the source.

What docs/architecture.md promises about the code, checked so that it stays
true: layers import downwards only and in no circle, the storage engines
depend on the records and the state machine but never on the wire protocol or
anything above the seam, nothing outside ``engine/mongo/`` names MongoDB, and
the client library stands apart from the server.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidings

ROOT = Path(tidings.__file__).parent

# Each module's layer: a module imports only from layers below its own, or
# from its own package (``engine.mongo``, ``metrics``, ``client``...). The
# order is the path of a message, read from the bottom up.
LAYERS: list[tuple[str, ...]] = [
    # What everything shares: no Tidings import but each other's, downwards.
    ("ids", "emails", "states", "errors", "limits", "logs"),
    ("config", "models"),
    ("engine.base",),
    ("engine.memory", "engine.mongo"),
    ("engine",),
    ("client_frames", "server_frames", "auth", "metrics"),
    ("recorder", "hub", "outbox"),
    ("session",),
    ("handlers", "connection"),
    ("services",),
    ("endpoint", "health", "console"),
    ("app",),
    ("wsprotocol", "asyncapi"),
    ("server",),
    ("cli",),
]
# The client library and the package's lazy entry point stand outside the
# server's layers; the client imports only what both sides share.
CLIENT_MAY_IMPORT = {"ids", "emails"}
OUTSIDE = {"client", ""}  # "" is tidings/__init__.py
# What an engine may import from the rest of Tidings.
ENGINE_MAY_IMPORT = {"models", "states", "errors", "config", "engine.base"}
DRIVERS = re.compile(r"^(pymongo|bson|motor|gridfs)(\.|$)")
MONGO_NAME = re.compile(r"mongo", re.IGNORECASE)
# Where naming MongoDB is the point: the factory that opens its engine, and the
# settings that configure it (TIDINGS_MONGODB_*); and the engine itself.
MAY_NAME_MONGO = {"engine", "config"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> Iterator[str]:
    """Every module ``name`` imports, ``TYPE_CHECKING`` blocks and function bodies included."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{name}: relative import"
            for alias in node.names:
                # ``from tidings.metrics import counts`` imports a module.
                submodule = f"{node.module}.{alias.name}"
                own = submodule.removeprefix("tidings.")
                yield submodule if own in MODULES else node.module


def tidings_imports(name: str) -> set[str]:
    found = set()
    for imported in imports(name):
        if imported == "tidings":
            found.add("")
        elif imported.startswith("tidings."):
            found.add(imported.removeprefix("tidings."))
    return found - {name}


def owner(name: str, owners: set[str]) -> str | None:
    """The longest of ``owners`` that ``name`` is or lies inside."""
    candidates = [o for o in owners if name == o or name.startswith(o + ".")]
    return max(candidates, key=len, default=None)


RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}


def rank_of(name: str) -> int:
    unit = owner(name, set(RANK))
    assert unit is not None, f"{name} is in no layer: add it to LAYERS"
    return RANK[unit]


def in_package(name: str, other: str) -> bool:
    """Whether both lie in one package of the layer table (``engine.mongo``, ``metrics``)."""
    unit = owner(name, set(RANK))
    return unit is not None and unit == owner(other, set(RANK))


def test_every_module_has_a_layer_or_stands_outside() -> None:
    for name in MODULES:
        if owner(name, OUTSIDE - {""}) is None and name != "":
            rank_of(name)


def test_layers_import_downwards_only() -> None:
    wrong = []
    for name in MODULES:
        if name == "" or owner(name, OUTSIDE - {""}):
            continue
        for imported in tidings_imports(name):
            if imported == "" or owner(imported, OUTSIDE - {""}):
                if name != "cli":  # the command line dispatches to the terminal client
                    wrong.append(f"{name} -> {imported or 'tidings'}")
                continue
            if rank_of(imported) < rank_of(name) or in_package(name, imported):
                continue
            wrong.append(f"{name} (layer {rank_of(name)}) -> {imported} ({rank_of(imported)})")
    assert wrong == []


def test_the_import_graph_has_no_circle() -> None:
    graph = {name: tidings_imports(name) & set(MODULES) for name in MODULES}
    # A package's __init__ imports its modules; an import of a package's module
    # runs the __init__ first, so a module that imports its own package's name
    # is part of a circle as much as any other import.
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail("import circle: " + " -> ".join(n or "tidings" for n in cycle))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(MODULES):
        visit(name, [])


def test_engines_import_only_the_records_the_states_errors_and_config() -> None:
    wrong = []
    for name in MODULES:
        engine = owner(name, {"engine.memory", "engine.mongo"})
        if engine is None:
            continue
        for imported in tidings_imports(name):
            if owner(imported, {engine}) or imported in ENGINE_MAY_IMPORT:
                continue
            wrong.append(f"{name} -> {imported}")
    assert wrong == []


def test_nothing_outside_the_mongodb_engine_imports_its_driver_or_it() -> None:
    wrong = []
    for name in MODULES:
        if owner(name, {"engine.mongo"}):
            continue
        for imported in imports(name):
            if DRIVERS.match(imported):
                wrong.append(f"{name} -> {imported}")
            if imported.startswith("tidings.engine.mongo") and name != "engine":
                wrong.append(f"{name} -> {imported}")
    assert wrong == []


def identifiers(path: Path) -> Iterator[tuple[int, str]]:
    """The names code uses (not its comments or strings), with their lines."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.lineno, node.name
        elif isinstance(node, ast.alias):
            yield node.lineno, node.asname or node.name


def test_nothing_outside_the_mongodb_engine_names_mongodb_in_code() -> None:
    wrong = [
        f"{name}:{line}: {identifier}"
        for name, path in MODULES.items()
        if name not in MAY_NAME_MONGO and owner(name, {"engine.mongo"}) is None
        for line, identifier in identifiers(path)
        if MONGO_NAME.search(identifier)
    ]
    assert wrong == []


def test_the_client_library_imports_nothing_of_the_server() -> None:
    wrong = []
    for name in MODULES:
        if not owner(name, {"client"}):
            continue
        for imported in tidings_imports(name):
            if owner(imported, {"client"}) or imported in CLIENT_MAY_IMPORT:
                continue
            wrong.append(f"{name} -> {imported}")
    assert wrong == []


def test_the_checks_see_a_wrong_import(tmp_path: Path) -> None:
    """The walkers find imports where a careless edit would put them."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tidings.session import Session\n"
        "def f():\n    from tidings.metrics import counts\n    import pymongo\n"
    )
    MODULES["probe"] = source
    try:
        assert tidings_imports("probe") == {"session", "metrics.counts"}
        assert "pymongo" in set(imports("probe"))
    finally:
        del MODULES["probe"]
