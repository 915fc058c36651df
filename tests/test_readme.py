"""The README's commands work in order on a fresh machine, and CI runs exactly what the README says (issue 11)."""

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _extras(command: str) -> set[str]:
    match = re.search(r"""pip install (?:-q )?-e ["']?\.\[([^\]]*)\]""", command)
    assert match, f"no editable install in {command!r}"
    return {e.strip() for e in match.group(1).split(",")}


def test_the_setup_command_installs_what_the_test_command_needs():
    setup = _bash_blocks(_section("Install and run the demo"))[0].strip()
    extras = _extras(setup)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = {re.split(r"[<>=\[ ]", req)[0].lower() for extra in extras for req in optional[extra]}
    assert "pytest" in installed  # the test command is `python -m pytest`
    assert {"nibabel", "pydicom"} <= installed  # the medical formats the tests cover


def test_ci_runs_the_readme_test_command_literally_after_the_same_install():
    test_command = _bash_blocks(_section("Run the tests"))[0].strip()
    assert test_command.startswith(". .venv/bin/activate && ")  # works in a new shell, not only the setup's
    assert test_command in CI.splitlines()
    setup = _bash_blocks(_section("Install and run the demo"))[0].strip()
    ci_install = next(line for line in CI.splitlines() if "-e " in line and "pip install" in line)
    assert _extras(ci_install) == _extras(setup)


def test_examples_never_write_two_predicts_into_one_results_folder():
    """Within the README and within each documentation page, every `normdino predict` writes its own folder."""
    for text in [README, *(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))]:
        _check_predict_outputs(text)
    assert len([line for block in _bash_blocks(README) for line in block.splitlines()
                if line.strip().startswith("normdino predict ")]) >= 2


def _check_predict_outputs(text: str) -> None:
    outputs = []
    for block in _bash_blocks(text):
        for line in block.splitlines():
            if line.strip().startswith("normdino predict "):
                words = shlex.split(line, comments=True)
                outputs.append(words[words.index("-o") + 1].rstrip("/"))
    assert len(set(outputs)) == len(outputs), outputs


def test_readme_is_a_front_page_that_links_every_documentation_page():
    """The README stays short (issue 24) and every page of the site's navigation is one click away from it."""
    import yaml

    assert len(README.encode()) < 8 * 1024
    links = set(re.findall(r"\]\((docs/[^)#]+)", README))
    for link in links:
        assert (ROOT / link).is_file(), link
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    assert {f"docs/{page}" for page in pages(config["nav"])} <= links


def test_the_getting_started_page_gives_the_readme_commands_unchanged():
    page = (ROOT / "docs" / "getting-started.md").read_text()
    for title in ("Install and run the demo", "Run the tests"):
        assert _bash_blocks(_section(title))[0] in page
