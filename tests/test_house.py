"""House rules: no import cycle among labelling modules, full module names, short files."""

from __future__ import annotations

import ast
from pathlib import Path

import labelling

PACKAGE = Path(labelling.__file__).parent
CONVENTIONAL = {"np", "pd", "plt"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The labelling module a dotted name points at (a module, or the module defining an attribute)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Edges module -> labelling modules it imports, counting every import statement in the file."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                found = _resolve(target, mods)
                if found and found != mod and not (mod.startswith(found + ".") and found == "labelling"):
                    graph[mod].add(found)
    # a package's __init__ is imported by every submodule import; only count explicit edges into it
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_late_imports(tmp_path):
    graph = import_graph()
    assert "labelling.errors" in graph["labelling.registry"]  # a top-level import
    assert graph["labelling.cli"], "cli imports labelling modules, also inside functions"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_short_aliases():
    root = PACKAGE.parent
    bad = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.asname and len(alias.asname) <= 2 and alias.asname not in CONVENTIONAL:
                        bad.append(f"{path.relative_to(root)}:{node.lineno} {alias.name} as {alias.asname}")
    assert not bad, "short import aliases:\n" + "\n".join(bad)


def test_files_are_short():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


# --------------------------------------------------------------------------- the layer table
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
MAX_TOP_LEVEL = 8


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer name, module patterns) from docs/architecture.md, top to bottom."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers, top to bottom", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and "`labelling" in cells[1]:
            rows.append((cells[0], [p.strip().strip("`") for p in cells[1].split(",")]))
    return rows


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """Index of the layer whose most specific pattern names `module` (``x.*`` matches x and below)."""
    best, best_len = None, -1
    for index, (_, patterns) in enumerate(table):
        for pattern in patterns:
            base = pattern.removesuffix(".*")
            hit = module == base or (pattern.endswith(".*") and module.startswith(base + "."))
            if hit and len(base) > best_len:
                best, best_len = index, len(base)
    return best


def test_layer_table_parses_and_orders_known_modules():
    table = layer_table()
    assert len(table) >= 10
    assert layer_of("labelling.cli", table) < layer_of("labelling.runs.train", table) < layer_of(
        "labelling.inference.predict", table) < layer_of("labelling.analysis.drift", table)
    # the most specific pattern wins: normalization sits below the rest of data/
    assert layer_of("labelling.data.normalization", table) > layer_of("labelling.data.datamodule", table)
    assert layer_of("labelling.studies.training", table) < layer_of("labelling.studies", table)


def test_every_module_has_a_layer_and_no_import_points_up():
    table = layer_table()
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m, table) is None)
    assert not unplaced, f"modules the layer table in docs/architecture.md does not place: {unplaced}"
    upward = sorted(f"{m} ({table[layer_of(m, table)][0]}) -> {t} ({table[layer_of(t, table)][0]})"
                    for m, targets in graph.items() for t in targets if layer_of(t, table) < layer_of(m, table))
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_the_layer_check_would_catch_an_upward_import():
    table = layer_table()
    graph = {"labelling.analysis.drift": {"labelling.inference.predict"}}
    assert any(layer_of(t, table) < layer_of(m, table) for m, ts in graph.items() for t in ts)


def test_at_most_eight_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} top-level modules: {top}"


def _calls(tree: ast.AST, name: str) -> list[ast.AST]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def test_only_one_function_accumulates_blended_tiles():
    """The blend window is built in one place, and only the tiler's accumulating function uses it."""
    users = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            if func.name != "blend_window" and _calls(func, "blend_window"):
                users.append(f"{path.relative_to(PACKAGE.parent)}:{func.name}")
    assert users == ["labelling/inference/tiling.py:tile_rows"], users


IO_CALLS = {"open", "savefig", "to_csv", "write_text", "write_bytes", "read_text", "read_bytes", "imwrite", "imread",
            "mkdir", "save", "savez", "load", "safe_load", "safe_dump", "dump", "to_parquet", "unlink"}


def test_analysis_does_no_file_io():
    found = [f"{path.name}:{node.lineno} {getattr(node.func, 'id', None) or node.func.attr}"
             for path in (PACKAGE / "analysis").glob("*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
             and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) in IO_CALLS]
    assert not found, f"file I/O in labelling/analysis (move it to reporting/ or studies/): {found}"
