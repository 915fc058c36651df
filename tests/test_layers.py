"""The package's import rule (see the docstring of src/normdino/__init__.py), checked on the source (issue 24).

Imports flow one way, io -> features -> methods -> detector -> evaluation / serving / workflows -> cli: a module
imports only from lower layers or from its own sub-package, there are no import circles, and no module uses
another module's private (``_name``) names. Imports under ``if TYPE_CHECKING:`` are annotations only and do
not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import normdino

ROOT = Path(normdino.__file__).parent

#: Rank of each sub-package and top-level module: an import must go to a strictly lower rank, or stay inside
#: one sub-package. Sub-packages of one layer (evaluation, serving, workflows) share a rank, so they never
#: import each other; the top-level helpers sit at the layer their imports put them in.
RANKS = {
    "errors": 0.0, "parallel": 0.1, "files": 0.2, "thresholds": 0.3,  # foundation: no normdino imports but these
    "io": 1.0,
    "features": 2.0,
    "distributed": 2.5,  # collectives over token sets; the methods' EM uses them
    "methods": 3.0,
    "detector_params": 4.0, "model_file": 4.1, "model_checks": 4.15, "detector": 4.2, "config": 4.3, "torchrun": 4.4,
    "evaluation": 5.0, "serving": 5.0, "workflows": 5.0,
    "demo": 6.0, "cli": 6.1, "__main__": 6.2,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _unit(module: str) -> str:
    """The sub-package or top-level module a module belongs to (``normdino.io.nifti`` -> ``io``)."""
    return module.split(".")[1]


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(module: str) -> set[str]:
    """The normdino modules ``module`` imports at run time (``from pkg import mod`` counts as mod)."""
    found = set()
    for node in _runtime_nodes(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("normdino"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("normdino")}
    found.discard("normdino")  # the root package only holds __version__ and lazy exports
    return {m for m in found if m != module}


GRAPH = {module: _imports(module) for module in MODULES if module != "normdino"}


def test_every_module_has_a_layer():
    assert {_unit(m) for m in GRAPH} <= set(RANKS), sorted({_unit(m) for m in GRAPH} - set(RANKS))


def test_imports_flow_one_way():
    wrong = [f"{a} imports {b}" for a, targets in GRAPH.items() for b in sorted(targets)
             if _unit(a) != _unit(b) and not RANKS[_unit(b)] < RANKS[_unit(a)]]
    assert not wrong, wrong


def test_there_are_no_import_circles():
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_no_module_uses_another_modules_private_names():
    """Neither ``from normdino.x import _name`` nor ``import normdino.x as m; m._name``."""
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normdino"):
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        offenders.append(f"{module}: from {node.module} import {alias.name}")
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("normdino") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                offenders.append(f"{module}: {aliases[node.value.id]}.{node.attr}")
    assert not offenders, offenders


def test_the_package_docstring_states_the_rule():
    assert "io -> features -> methods -> detector -> evaluation / serving / workflows -> cli" in normdino.__doc__


def test_the_checks_catch_a_violation(tmp_path):
    """The checks above can fail: a circle and an upward import are found in a made-up graph."""
    saved = dict(GRAPH)
    try:
        GRAPH["normdino.io.reading"] = saved["normdino.io.reading"] | {"normdino.detector"}
        GRAPH["normdino.detector"] = saved["normdino.detector"] | {"normdino.io.reading"}
        for check in (test_imports_flow_one_way, test_there_are_no_import_circles):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed a planted violation")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
