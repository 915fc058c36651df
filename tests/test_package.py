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
