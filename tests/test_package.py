import subprocess
import sys

import normdino


def test_every_export_resolves():
    for name in normdino.__all__:
        assert getattr(normdino, name) is not None


def test_importing_the_package_and_cli_does_not_import_torch():
    code = "import sys, normdino, normdino.cli; normdino.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_module_imports_another_modules_private_names():
    import ast
    from pathlib import Path

    root = Path(normdino.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normdino"):
                offenders += [f"{path.relative_to(root)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


def test_layout_shows_the_pipeline():
    from pathlib import Path

    root = Path(normdino.__file__).parent
    for package in ("io", "features", "methods", "evaluation", "serving"):
        assert (root / package / "__init__.py").is_file(), package
    for name in ("detector.py", "cli.py", "model_file.py", "config.py"):
        assert (root / name).is_file(), name
