"""The layering rules of docs/architecture.md, checked on the source so that the document stays true."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "actors")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module an import statement names, absolute, including imports inside functions."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


SOURCES = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def resolve(name: str) -> str | None:
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {mod: {r for r in map(resolve, imports(path)) if r and r != mod} for mod, path in SOURCES.items()}


@pytest.mark.parametrize("mod", sorted(m for m in SOURCES if m.startswith("actors")))
def test_actors_use_only_the_core(mod):
    bad = sorted(t for t in GRAPH[mod] if t.startswith("engine") and not t.startswith("engine.core"))
    assert not bad, f"{mod} imports {bad}; actors may import engine.core only"


@pytest.mark.parametrize("mod", sorted(m for m in SOURCES if m.startswith("engine.core")))
def test_the_core_imports_no_stage_and_no_actor(mod):
    bad = sorted(t for t in GRAPH[mod] if not t.startswith("engine.core") and t != "engine")
    assert not bad, f"{mod} imports {bad}; the core may import only the core"


def test_no_import_loops():
    loops = sorted({tuple(sorted((a, b))) for a, targets in GRAPH.items() for b in targets
                    if a in GRAPH.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not loops, f"modules importing each other: {loops}"


def test_finetune_and_evaluation_do_not_reach_into_actors():
    for mod in SOURCES:
        if mod.startswith(("engine.finetune", "engine.evaluate")):
            assert not any(t.startswith("actors") for t in GRAPH[mod]), mod


@pytest.mark.parametrize("path", sorted(p for pkg in (*PACKAGES, "bench") for p in (REPO / pkg).rglob("*.py")),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_modules_stay_readable(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 420, f"{path.relative_to(REPO)} has {lines} lines; split it by responsibility"
