#!/usr/bin/env bash
# CI: the package as a user installs a release. Build the wheel (`pip wheel --no-deps`), install it (not
# editable) with its [serve] extra into a fresh venv, then .ci/check_wheel.py starts `normdino serve` on a tiny
# random-weight model and fetches the viewer, its assets and a prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel -q --no-deps -w "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0   # the CPU build; a plain `torch` would pull CUDA
wheel=$(ls "$work"/dist/normdino-*.whl)
"$work/venv/bin/python" -m pip install -q "${wheel}[serve]"
# Run from the temp folder: with the source tree off sys.path, only the installed wheel can be imported.
repo=$PWD
(cd "$work" && env -u PYTHONPATH HF_HUB_OFFLINE=1 "$work/venv/bin/python" "$repo/.ci/check_wheel.py")
