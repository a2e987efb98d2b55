"""The house rules of the code (docs/architecture.md), checked on the source text: no import cycle
among our modules (function-level imports included: a lazy import hides a dependency, it does not
remove it), the rooms depend in one direction, the records module is a leaf, and no module grows
past what one reader holds in mind."""
import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("cli", "dataflows", "operators", "models", "sinks")
MAX_LINES = 400
# what each room may import of ours (itself always): pure logic at the bottom, the command line on top
MAY_IMPORT = {
    "operators": {"operators"},
    "models": {"operators", "models"},
    "sinks": {"operators", "models", "sinks"},
    "dataflows": {"operators", "models", "sinks", "dataflows"},
    "cli": set(ROOMS),
}
LEAVES = ("operators.records",)


def _modules() -> dict[str, Path]:
    out = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(dotted: str) -> str | None:
    """The module of ours that ``dotted`` (a module, or a module's attribute) names."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ROOMS:
                mod = _resolve(target)
                if mod and mod != name:
                    found.add(mod)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_rooms_depend_in_one_direction():
    wrong = [f"{name} imports {dep}" for name, deps in sorted(GRAPH.items()) for dep in sorted(deps)
             if dep.split(".")[0] not in MAY_IMPORT[name.split(".")[0]]]
    assert wrong == []


@pytest.mark.parametrize("leaf", LEAVES)
def test_records_are_a_leaf(leaf):
    assert GRAPH[leaf] == set()


def test_no_module_over_the_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_each_module_says_what_it_holds():
    silent = [name for name, path in MODULES.items()
              if path.read_text().strip() and not ast.get_docstring(ast.parse(path.read_text()))]
    assert silent == []


def test_no_pointer_to_documents_outside_the_repository():
    """The design notes that matter are in docs/; a reader of the repository has no SPEC or DESIGN."""
    texts = {p: p.read_text() for p in [*MODULES.values(), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}
    pointing = collections.Counter(str(p.relative_to(ROOT)) for p, text in texts.items()
                                   for word in ("SPEC", "DESIGN") if f"{word} §" in text or f"{word}:" in text
                                   or f"({word}" in text or f"{word}.md" in text)
    assert dict(pointing) == {}
