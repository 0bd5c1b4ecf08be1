"""The package layout's rules (docs/architecture.md), checked on the source: imports run one way."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "cfcd").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the cfcd modules it imports at run time, function-local imports included."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never imported at run time
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.startswith("cfcd"):
                    targets = {resolve(f"{base}.{a.name}") for a in node.names}
                else:
                    continue
            elif isinstance(node, ast.Import):
                targets = {resolve(a.name) for a in node.names if a.name.startswith("cfcd")}
            else:
                continue
            graph[module] |= {t for t in targets if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_outside_models():
    found = [c for c in cycles(import_graph()) if not all(m.startswith("cfcd.models") for m in c)]
    assert found == []


def test_nothing_below_the_command_line_imports_it():
    offenders = {m: sorted(t for t in targets if t.startswith("cfcd.cli"))
                 for m, targets in import_graph().items()
                 if not m.startswith("cfcd.cli") and m != "cfcd.__main__"}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_store_imports_nothing_above_it():
    allowed = ("cfcd.store", "cfcd.utils", "cfcd.errors", "cfcd")
    graph = import_graph()
    above = {m: sorted(t for t in graph[m] if not t.startswith(allowed[:3]) and t != "cfcd")
             for m in graph if m.startswith("cfcd.store")}
    assert {m: t for m, t in above.items() if t} == {}


def test_the_checker_sees_a_cycle_and_a_function_local_import():
    """The checker itself: a cycle made only of function-local imports is found."""
    graph = {"cfcd.a": {"cfcd.b"}, "cfcd.b": {"cfcd.a"}, "cfcd.c": {"cfcd.a"}}
    assert cycles(graph) == [["cfcd.a", "cfcd.b"]]
    assert "cfcd.store.format" in import_graph()["cfcd.store.ops"]
    assert "cfcd.store.meta" in import_graph()["cfcd.store.writer"]


# Lowest first (docs/architecture.md): a module imports its own layer or lower ones. The descriptor side
# (store, index, post-processing) needs no model; extraction needs models and writes stores.
LAYERS = ["cfcd", "cfcd.errors", "cfcd.utils", "cfcd.runtime", "cfcd.data", "cfcd.store", "cfcd.index",
          "cfcd.postprocess", "cfcd.models", "cfcd.losses", "cfcd.extract", "cfcd.evaluation", "cfcd.train",
          "cfcd.serve", "cfcd.demo", "cfcd.cli", "cfcd.__main__"]


def _layer(module: str) -> int:
    return max(i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".") or p == "cfcd")


def test_imports_follow_the_layers():
    upward = sorted((m, t) for m, targets in import_graph().items() for t in targets if _layer(t) > _layer(m))
    assert upward == []
