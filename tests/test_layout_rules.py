"""The test tree mirrors the package: each test file sits at the top of ``tests/`` or in a folder
named after a ``wsi_cmaf`` subpackage (or ``cli``, ``benchmarks``), and no module under ``tests/``
imports a test module: shared code lives in ``tests/helpers`` or ``tests/conftest.py``."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "wsi_cmaf"
#: Test folders that mirror no subpackage: the command line as a whole and the GPU benchmark harness.
EXTRA_FOLDERS = {"cli", "benchmarks"}


def _is_test_module(dotted: str) -> bool:
    """Whether a dotted module name names a test module (``test_*``) or a conftest."""
    last = dotted.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def _resolve(path: Path, root: Path, node: ast.ImportFrom) -> str:
    """The absolute dotted module of a ``from ... import`` (relative ones resolved against ``path``)."""
    if not node.level:
        return node.module or ""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)[:-node.level]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of_test_modules(path: Path, root: Path) -> list[str]:
    """Imports in ``path`` (module level and inside functions) that name a test module or conftest."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, root, node)
            if _is_test_module(base):
                bad.append(f"{path.name}:{node.lineno} from {base} import ...")
            else:
                bad += [f"{path.name}:{node.lineno} from {base} import {a.name}" for a in node.names
                        if _is_test_module(a.name) and (root / Path(*base.split(".")[1:]) / f"{a.name}.py").is_file()]
    return bad


def misplaced_test_files(root: Path, package: Path) -> list[str]:
    """Test files not at the top of ``root`` nor one folder down in an allowed folder with an ``__init__.py``."""
    allowed = {p.parent.name for p in package.glob("*/__init__.py")} | EXTRA_FOLDERS
    bad = []
    for path in sorted(root.rglob("test_*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            continue
        folder = rel.parts[0]
        if len(rel.parts) > 2 or folder not in allowed:
            bad.append(f"{rel}: not in tests/ or tests/<one of {sorted(allowed)}>/")
        elif not (root / folder / "__init__.py").is_file():
            bad.append(f"{rel}: tests/{folder}/ has no __init__.py")
    return bad


def test_no_test_module_imports_another() -> None:
    offenders = [hit for path in sorted(TESTS.rglob("*.py")) for hit in imports_of_test_modules(path, TESTS)]
    assert offenders == [], "move shared code to tests/helpers/ or conftest.py: " + "; ".join(offenders)


def test_every_test_file_sits_in_a_package_folder() -> None:
    assert list(TESTS.glob("test_*.py")), "the top-level tests were not found"
    assert len(list(TESTS.rglob("test_*.py"))) > len(list(TESTS.glob("test_*.py")))
    assert misplaced_test_files(TESTS, PACKAGE) == []


def test_rules_catch_violations(tmp_path: Path) -> None:
    root = tmp_path / "tests"
    (root / "slide").mkdir(parents=True)
    (root / "nowhere").mkdir()
    (root / "slide" / "deep").mkdir()
    for p in (root / "__init__.py", root / "slide" / "__init__.py", root / "nowhere" / "__init__.py"):
        p.write_text("")
    (root / "slide" / "test_b.py").write_text("x = 1\n")
    (root / "helpers.py").write_text("")
    (root / "slide" / "test_a.py").write_text(
        "from tests.slide.test_b import x\n"
        "from . import test_b\n"
        "from .test_b import x as y\n"
        "from tests import helpers\n"          # a helpers module: allowed
        "def f():\n"
        "    import tests.conftest\n")
    (root / "nowhere" / "test_c.py").write_text("")
    (root / "slide" / "deep" / "test_d.py").write_text("")
    package = tmp_path / "pkg"
    (package / "slide").mkdir(parents=True)
    (package / "slide" / "__init__.py").write_text("")

    hits = imports_of_test_modules(root / "slide" / "test_a.py", root)
    assert hits == ["test_a.py:1 from tests.slide.test_b import ...", "test_a.py:2 from tests.slide import test_b",
                    "test_a.py:3 from tests.slide.test_b import ...", "test_a.py:6 import tests.conftest"]
    assert imports_of_test_modules(root / "slide" / "test_b.py", root) == []
    assert [m.split(":")[0] for m in misplaced_test_files(root, package)] == [
        "nowhere/test_c.py", "slide/deep/test_d.py"]
