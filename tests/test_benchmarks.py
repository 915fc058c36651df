"""Every ``normdino`` import in the benchmarks and CI scripts resolves, so a moved module cannot rot them silently.

The scripts import most of normdino inside functions (they only run by hand or in CI), so nothing else notices
when a module moves; here each file is parsed (never run) and every ``from normdino... import NAME`` and
``import normdino...`` at any depth is checked against the importable package.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob(".ci/*.py")])


def normdino_imports(source: str) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for each normdino import anywhere in ``source``; name None for ``import module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "normdino":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "normdino"]
    return found


def unresolved(module: str, name: str | None) -> str | None:
    """Why ``from module import name`` (or ``import module``) would fail, or None when it resolves."""
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        return f"module {module} does not import ({error})"
    if name is None or name == "*" or hasattr(imported, name):
        return None
    if hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None:
        return None  # a submodule of a package
    return f"{module} has no {name}"


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_metrics.py", "check_wheel.py"} <= names


def test_the_parser_sees_imports_at_any_depth():
    source = (
        "import os\nfrom normdino import AnomalyDetector\n"
        "def f():\n    if True:\n        from normdino.methods.memory_bank import MemoryBank as M, Coreset\n"
        "class C:\n    def g(self):\n        import normdino.io.nifti as nifti\n"
        "from . import sibling\nfrom normdinox import y\n"
    )
    assert sorted(normdino_imports(source)) == [
        (2, "normdino", "AnomalyDetector"),
        (5, "normdino.methods.memory_bank", "Coreset"),
        (5, "normdino.methods.memory_bank", "MemoryBank"),
        (8, "normdino.io.nifti", None),
    ]


def test_unresolved_names_what_is_wrong():
    assert unresolved("normdino.methods.memory_bank", "MemoryBank") is None
    assert unresolved("normdino.methods", "memory_bank") is None  # a submodule, whether imported yet or not
    assert unresolved("normdino.io.nifti", None) is None
    assert unresolved("normdino.methods.baselines", "MemoryBank").startswith("module normdino.methods.baselines does not import")
    assert unresolved("normdino.methods.memory_bank", "NoSuchThing") == "normdino.methods.memory_bank has no NoSuchThing"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_normdino_import_resolves(script: Path):
    problems = [f"{script.relative_to(ROOT)}:{line}: {why}"
                for line, module, name in normdino_imports(script.read_text(encoding="utf-8"))
                if (why := unresolved(module, name))]
    assert not problems, "\n".join(problems)
