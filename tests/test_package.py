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
    for name in ("detector.py", "cli/__init__.py", "model_file.py", "config.py"):
        assert (root / name).is_file(), name


def test_the_wheel_ships_the_viewer_the_data_files_and_the_licence(tmp_path):
    """A release wheel holds every package data file (the viewer of `normdino serve`) and LICENSE/NOTICE."""
    import shutil
    import zipfile
    from pathlib import Path

    import pytest

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    tree = tmp_path / "src-tree"  # a copy: building writes build/ and *.egg-info next to the sources
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(repo / name, tree / name)
    shutil.copytree(repo / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("normdino-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = repo / "src" / "normdino"
    data_files = {f"normdino/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert {"normdino/serving/static/index.html", "normdino/serving/static/viewer.js"} <= data_files
    assert data_files <= names, sorted(data_files - names)
    licences = {n.rsplit("/", 1)[-1] for n in names if ".dist-info/licenses/" in n}
    assert {"LICENSE", "NOTICE"} <= licences
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
