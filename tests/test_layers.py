"""fxslim's layers import one way: no import cycle between its modules, no import against the order.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of an
fxslim module, at module level and inside functions alike (a late import is still a dependency).
Imports under ``if TYPE_CHECKING:`` are left out: they never run, they only name types.
``from package import name`` counts as an import of ``package.name`` when that is a module.

``LAYERS`` is the allowed order as data, bottom first: a module may import its own layer and the
layers below it. The next step of issue 19 tightens it (e.g. adapters, app/ as one folder).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxslim"

# bottom first; names are the part after "fxslim." ("" is the package facade fxslim/__init__.py)
LAYERS: list[tuple[str, ...]] = [
    ("ir", "inplace", "export_parts", "run_state", "propagate", "tensor_attributes", "capture", "config", "policy", "warn", "hooks", "modes", "generators",
     "progress"),
    ("runtime",),
    ("passes",),
    ("cost_model",),
    ("api", "backend", "backend_entry", "bn_statistics"),
    ("app", ""),
]
# reference models: for benchmarks, tests and the app layer only; they build on ir and runtime
MODELS = "models"
MODELS_USERS = set(LAYERS[-1]) | {MODELS}
MODELS_USE = set(LAYERS[0]) | set(LAYERS[1]) | {MODELS}
# imports forbidden even where the order would allow them (the wording, kept explicit)
FORBIDDEN = [("passes", "cost_model"), ("cost_model", "passes")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in ``tree``, function bodies included, ``if TYPE_CHECKING:`` excluded."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    submodules = {f"{source}.{a.name}" for a in node.names} & known
    # ``from pkg import sub`` imports the submodule; any other name comes from ``pkg`` itself
    return submodules | ({source} if len(submodules) < len(node.names) else set())


def import_graph() -> dict[str, set[str]]:
    """fxslim module -> the fxslim modules it imports (self-imports dropped)."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= {t for t in _targets(node, name, path.name == "__init__.py", known)
                      if t == "fxslim" or t.startswith("fxslim.")}
        graph[name] = edges - {name}
    return graph


def _part(module: str) -> str:
    """The top-level part of an fxslim module: fxslim.passes.haste -> passes, fxslim -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"fxslim.{part} is in no layer of LAYERS; add it where it belongs")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_reads_late_imports():
    graph = import_graph()
    assert "fxslim.cost_model.estimate" in graph["fxslim"]
    assert "fxslim.passes.base" in graph["fxslim.passes.haste"]


def test_modules_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_subpackages_no_import_cycle():
    """The same at the level of LAYERS' names: fxslim.passes.* and fxslim.cost_model.* each one node."""
    collapsed: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        collapsed.setdefault(_part(module), set()).update(_part(t) for t in targets)
    assert _cycles({k: v - {k} for k, v in collapsed.items()}) == []


def test_cycles_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_imports_go_down_only():
    wrong = []
    for module, targets in import_graph().items():
        part = _part(module)
        if part == MODELS:
            continue
        for target in sorted(targets):
            other = _part(target)
            if other == MODELS:
                continue
            if _rank(other) > _rank(part):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_layers_models_only_for_app():
    wrong = [f"{m} -> {t}" for m, ts in import_graph().items() for t in sorted(ts)
             if _part(t) == MODELS and _part(m) not in MODELS_USERS]
    assert wrong == []


def test_layers_models_build_on_ir_and_runtime_only():
    wrong = [f"{m} -> {t}" for m, ts in import_graph().items() for t in sorted(ts)
             if _part(m) == MODELS and _part(t) not in MODELS_USE]
    assert wrong == []


@pytest.mark.parametrize(("low", "high"), FORBIDDEN)
def test_layers_forbidden_pairs(low, high):
    wrong = [f"{m} -> {t}" for m, ts in import_graph().items() for t in sorted(ts)
             if _part(m) == low and _part(t) == high]
    assert wrong == []


METHODS = ("haste", "httm", "prom")
METHOD_PLACES = ("passes/{m}.py", "runtime/{m}.py", "runtime/{m}_reference.py", "cost_model/formulas/{m}.py")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lives_in_the_same_four_places(method):
    """The pass, the ops, the ops' oracles and the cost formulas: one file each, named alike."""
    missing = [place.format(m=method) for place in METHOD_PLACES if not (PACKAGE / place.format(m=method)).is_file()]
    assert missing == []


@pytest.mark.parametrize("method", METHODS)
def test_oracles_are_for_tests_only(method):
    """Nothing in the package runs a method's reference module: it is the tests' yardstick."""
    oracle = f"fxslim.runtime.{method}_reference"
    users = sorted(m for m, ts in import_graph().items() if oracle in ts)
    assert users == []
