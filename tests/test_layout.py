"""The package's layers: imports go down the layers and never in a circle, and the top folder
stays small enough to read at a glance."""

import ast
from pathlib import Path

import medmerge

ROOT = Path(medmerge.__file__).parent
# lowest first: a module may import its own layer's modules and those of the layers below
LAYERS = [
    "errors", "version", "models", "io", "config", "methods", "vocab", "plan", "engine",
    "check", "eval", "synthetic", "studies", "demo", "cli", "__init__",
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Every module by dotted name below `medmerge` (a package by its own name)."""
    found = {}
    for file in ROOT.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        found[".".join(p for p in parts if p != "__init__") or "__init__"] = file
    return found


def imports(file: Path, known: dict) -> set[str]:
    """The medmerge modules a file imports, anywhere in it (functions too)."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "medmerge" or not name.startswith("medmerge."):
                continue
            module = name.removeprefix("medmerge.")
            while module not in known and "." in module:
                module = module.rsplit(".", 1)[0]  # a name imported from a module
            if module in known:
                out.add(module)
    return out


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(f, known) - {m} for m, f in known.items()}


def test_imports_go_down_the_layers():
    upward = [f"{m} -> {i}" for m, found in graph().items() for i in found
              if layer(i) > layer(m)]  # fmt: skip
    assert upward == []


def test_no_import_circle():
    edges = graph()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(edges[module]):
            if nxt in path:
                circles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    # a package's __init__ importing its own modules is its public face, not a circle
    real = [c for c in circles if not any(a.startswith(f"{b}.") for a, b in zip(c, c[1:]))]
    assert real == []


def test_the_top_folder_holds_at_most_16_entries():
    entries = [p.name for p in ROOT.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 16, sorted(entries)
    assert {p.split(".")[0] for p in entries} <= set(LAYERS)


def test_moved_modules_keep_their_old_paths_with_a_warning():
    import importlib
    import sys

    import pytest

    for old, new in medmerge.MOVED.items():
        sys.modules.pop(f"medmerge.{old}", None)
        with pytest.warns(DeprecationWarning, match=f"medmerge.{old} is now medmerge.{new}"):
            moved = importlib.import_module(f"medmerge.{old}")
        assert moved is importlib.import_module(f"medmerge.{new}")
