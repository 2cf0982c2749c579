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


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(a shortest cycle `[a, b, …, a]`, the modules of its strongly connected component) for every component of
    more than one module, of any length.

    The edges are what running an import runs: `import a.b.c` first runs the packages `a` and `a.b`, so an edge to
    a module is also an edge to each package above it. Edges from a module to its own packages are left out, as
    the two-module check always did: those packages are already being imported when the module runs.
    """
    edges = {mod: sorted({pkg for t in targets for pkg in (".".join(t.split(".")[:i]) for i in range(1, t.count(".") + 2))
                          if pkg in graph and pkg != mod and not mod.startswith(pkg + ".")})
             for mod, targets in graph.items()}

    def reached_from(start: str) -> dict[str, str]:
        """Breadth-first: every module reachable from `start`, mapped to the module it was first reached from."""
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier:
            following = []
            for node in frontier:
                for child in edges[node]:
                    if child not in parent:
                        parent[child] = node
                        following.append(child)
            frontier = following
        return parent

    reach = {mod: reached_from(mod) for mod in edges}
    found, seen = [], set()
    for mod in sorted(edges):
        if mod in seen or mod not in reach[mod]:
            continue
        component = sorted(n for n in reach[mod] if mod in reach[n])
        seen.update(component)
        back = [reach[mod][mod]]  # the module the shortest way round re-enters `mod` from, then its way back
        while back[-1] != mod:
            back.append(reach[mod][back[-1]])
        found.append(([mod, *reversed(back[:-1]), mod], component))
    return found


def test_no_import_loops():
    cycles = import_cycles(GRAPH)
    assert not cycles, "import loops (break each by moving the shared piece into the lower module):\n" + "\n".join(
        f"{' -> '.join(cycle)}  (component: {', '.join(component)})" for cycle, component in cycles)


def test_finetune_and_evaluation_do_not_reach_into_actors():
    for mod in SOURCES:
        if mod.startswith(("engine.finetune", "engine.evaluate")):
            assert not any(t.startswith("actors") for t in GRAPH[mod]), mod


@pytest.mark.parametrize("path", sorted(p for pkg in (*PACKAGES, "bench") for p in (REPO / pkg).rglob("*.py")),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_modules_stay_readable(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 420, f"{path.relative_to(REPO)} has {lines} lines; split it by responsibility"
