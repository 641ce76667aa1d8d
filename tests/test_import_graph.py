"""The package's import graph runs down the dataflow: read every module with ``ast`` and check it.

Counted: ``import`` and ``from ... import`` statements anywhere in a module (at module level and
inside functions, relative ones resolved) and ``importlib.import_module("...")`` with a literal
name. Not counted: imports under ``if TYPE_CHECKING:``, which never run, and the implicit import
of a module's parent packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_cmaf"
#: layers below inference that must not import it
BELOW_INFER = ("wsi_cmaf.models", "wsi_cmaf.train")

def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` (packages by their ``__init__``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, source: str, is_package: bool) -> set[str]:
    """Absolute names ``module`` imports (a ``from X import Y`` gives ``X.Y``; resolve with :func:`resolve`)."""
    names = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == "import_module" and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` lives in (a name imported from a module resolves to that module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself and outside modules left out)."""
    modules = module_files(package)
    graph = {}
    for module, path in modules.items():
        names = imported_names(module, path.read_text(encoding="utf-8"), path.name == "__init__.py")
        targets = {resolve(n, modules) for n in names if n.split(".")[0] == package.name}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_reader_sees_function_level_relative_and_dynamic_imports(tmp_path) -> None:
    pkg = tmp_path / "wsi_cmaf"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from . import b\n")
    (pkg / "a" / "b.py").write_text("def f():\n    from wsi_cmaf.c import thing\n")
    (pkg / "a" / "d.py").write_text("import importlib\nimportlib.import_module('wsi_cmaf.c')\nfrom .b import f\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wsi_cmaf.a import b\n"
                              "import numpy\n")
    assert import_graph(pkg) == {"wsi_cmaf": set(), "wsi_cmaf.a": {"wsi_cmaf.a.b"}, "wsi_cmaf.a.b": {"wsi_cmaf.c"},
                                 "wsi_cmaf.a.d": {"wsi_cmaf.c", "wsi_cmaf.a.b"}, "wsi_cmaf.c": set()}


def test_cycle_finder_on_a_hand_made_graph() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(g) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_graph_holds_known_arrows(graph) -> None:
    # the reader works on the real package: arrows that must be there are found
    assert "wsi_cmaf.infer.runner" in graph["wsi_cmaf.infer.pipeline"]
    assert "wsi_cmaf.device" in graph["wsi_cmaf.train.engine.trainer"]
    assert "wsi_cmaf.preprocess" in graph["wsi_cmaf.train.data.setup"]
    assert "wsi_cmaf.slide.grid" in graph["wsi_cmaf.slide.reads"]


def test_models_and_train_do_not_import_infer(graph) -> None:
    upward = sorted((m, t) for m, targets in graph.items() if m.startswith(BELOW_INFER)
                    for t in targets if t == "wsi_cmaf.infer" or t.startswith("wsi_cmaf.infer."))
    assert upward == []


def test_slide_reads_run_down_to_geometry(graph) -> None:
    assert "wsi_cmaf.slide.reads" not in graph["wsi_cmaf.slide.grid"] | graph["wsi_cmaf.slide.level0"]
    assert "wsi_cmaf.slide.grid" not in graph["wsi_cmaf.slide.level0"]


def test_no_module_reaches_a_private_name_of_the_store_or_the_pipeline(graph) -> None:
    for module, path in module_files().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("wsi_cmaf.output.store", "wsi_cmaf.infer.pipeline"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports {private} from {node.module}"


def test_no_import_cycles(graph) -> None:
    assert cycles(graph) == []


def test_the_reader_does_not_import_slide_qc(graph) -> None:
    # the µm/px estimate reads tissue through a reader: it is applied one layer above it
    assert not {t for t in graph["wsi_cmaf.slide.reader"] if t.startswith("wsi_cmaf.qc")}
    assert "wsi_cmaf.qc.mpp_estimate" in graph["wsi_cmaf.slide.opener"]
