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


# The layers of docs/architecture.md ("What each layer may import"): a module belongs to the longest prefix that
# names it; "engine" (the package's docstring) only by itself. A new top-level module must be placed here and there.
LAYERS = {
    "engine": "core", "engine.core": "core",
    "actors": "actors",
    "engine.scoring": "scoring",
    "engine.selection": "selection", "engine.weighting": "selection",
    "engine.merge": "merge",
    "engine.finetune": "finetune", "engine.evaluate": "finetune",
    **{f"engine.{top}": "top" for top in ("run", "run_config", "report", "analysis", "checkpoints", "checkpoint_arm",
                                          "merge_choice", "freeze", "cli", "commands", "api")},
}
STAGES = ("scoring", "selection", "merge", "finetune")
# Each layer may import the core and itself; the scoring stage also `actors/` (to launch actors and validate backend
# options); the top anything. Nothing else: a stage never imports another stage, so each can change alone.
MAY_IMPORT = {
    "core": {"core"},
    "actors": {"core", "actors"},
    **{stage: {"core", stage} for stage in STAGES},
    "scoring": {"core", "scoring", "actors"},
    "top": {"core", "actors", *STAGES, "top"},
}


def layer_of(mod: str) -> str | None:
    matches = [p for p in LAYERS if mod == p or (p != "engine" and mod.startswith(p + "."))]
    return LAYERS[max(matches, key=len)] if matches else None


def import_sites(path: Path) -> list[tuple[int, str, str]]:
    """(line, the name as written, the engine/actors module it resolves to) of every import in `path`, including
    imports inside functions, so a lazy import cannot hide a broken rule."""
    sites = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in imports_of(node, path):
                target = resolve(name)
                if target:
                    sites.append((node.lineno, name, target))
    return sorted(set(sites))


def imports_of(node: ast.Import | ast.ImportFrom, path: Path) -> set[str]:
    """The names one import statement imports (as `imports` reads them), relative imports made absolute."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    base = node.module or ""
    if node.level:
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
    names = {base} | {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("mod", sorted(SOURCES))
def test_every_module_has_a_layer(mod):
    assert layer_of(mod), f"{mod} is in no layer: add it to LAYERS here and to docs/architecture.md's table"


@pytest.mark.parametrize("mod", sorted(SOURCES))
def test_layers_import_only_what_the_document_allows(mod):
    layer, path = layer_of(mod), SOURCES[mod]
    allowed = MAY_IMPORT.get(layer, set())  # a module in no layer may import nothing (and fails the test above)
    bad = sorted({f"{path.relative_to(REPO)}:{line} imports {target} (layer {layer_of(target)})"
                  for line, _, target in import_sites(path) if target != mod and layer_of(target) not in allowed})
    assert not bad, f"{mod} is in layer {layer}, which may import only {sorted(allowed)}: " + "; ".join(bad)


def doc_layer_table() -> dict[str, tuple[set[str], set[str]]]:
    """docs/architecture.md's "What each layer may import" table: layer -> (its modules, the layers it may import)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## What each layer may import", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "") or set(cells[0]) <= set("-: "):
            continue
        layer = cells[0].strip("`* ")
        paths = {p.removesuffix("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                 for p in cells[1].split("`")[1::2]}
        may = {w.strip("`* ") for w in cells[2].replace(" and ", ",").split(",")}
        table[layer] = (paths, may)
    return table


def test_the_document_states_the_same_layers_and_rules():
    table = doc_layer_table()
    doc_layers = {prefix: layer for layer, (paths, _) in table.items() for prefix in paths}
    assert doc_layers == LAYERS, "docs/architecture.md's layer table and LAYERS here place modules differently"
    assert {layer: may for layer, (_, may) in table.items()} == MAY_IMPORT, \
        "docs/architecture.md's layer table and MAY_IMPORT here state different rules"


@pytest.mark.parametrize("mod", sorted(m for m in SOURCES if SOURCES[m].name != "__init__.py"))
def test_every_module_is_named_in_the_document(mod):
    rel = SOURCES[mod].relative_to(REPO).as_posix()
    assert f"`{rel}`" in (REPO / "docs" / "architecture.md").read_text(), \
        f"{rel} is not named (as `{rel}`) in docs/architecture.md"


SCORES_MODULE = REPO / "engine" / "core" / "scores.py"
SCAN = sorted(p for pkg in (*PACKAGES, "bench") for p in (REPO / pkg).rglob("*.py") if p != SCORES_MODULE)
SCORE_COLUMNS = {"donor", "loss", "token_accuracy", "n_examples", "n_tokens", "status", "error", "sample_id", "kind",
                 "round", "path", "meta", "revision", "donor_sha256", "backend", "seconds", "alignment"}


def test_the_base_rows_name_is_defined_once():
    bad = [f"{p.relative_to(REPO)}:{n.lineno}" for p in SCAN for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.Constant) and n.value == "__base__"]
    assert not bad, f"'__base__' written out in {bad}: import BASE_ROW from engine/core/scores.py"


def test_the_score_rows_schema_and_builder_are_in_the_core_only():
    """One schema (`pa.schema(`) and one row builder: elsewhere a row is made by `score_row` and edited by
    `set_fields`, never as a dict literal of score columns or by assigning a column by name."""
    bad = []
    for p in SCAN:
        text = p.read_text()
        where = p.relative_to(REPO)
        bad += [f"{where}: pa.schema(" for _ in range(text.count("pa.schema(") + text.count("pyarrow.schema("))]
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.Dict):
                keys = {k.value for k in n.keys if isinstance(k, ast.Constant)}
                if "donor" in keys and len(keys & SCORE_COLUMNS) >= 4:
                    bad.append(f"{where}:{n.lineno}: a score row built as a dict literal")
            elif isinstance(n, ast.Assign):
                for t in n.targets:
                    if (isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                            and t.slice.value in SCORE_COLUMNS - {"path", "meta", "error", "donor"}
                            and isinstance(t.value, ast.Name) and t.value.id == "row"):
                        bad.append(f"{where}:{n.lineno}: row[{t.slice.value!r}] = … (use set_fields)")
    assert not bad, "score rows outside engine/core/scores.py: " + "; ".join(bad)
