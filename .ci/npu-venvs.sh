#!/usr/bin/env bash
# CI: the venvs the NPU targets' slow tests run in, keyed by the content of pyproject.toml.
#   .venv          + extras openvino, qnn (the OpenVINO runtime, onnxruntime-qnn: additions to the CPU build)
#   .venv-openvino   pyproject group `openvino` (optimum-intel, transformers 5.5): about 1.9 GB
# The pass venv is built once per pyproject.toml content under $PHI_VENV_CACHE (CI caches that folder,
# keyed the same way) and linked into the checkout; venvs are not relocatable, so it is built in place there.
# Without this script the NPU slow tests skip, naming the venv they need.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
key=$({ cat pyproject.toml; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
cache=${PHI_VENV_CACHE:-$HOME/.cache/phi-pipeline/venvs}
pass_venv="$cache/openvino-$key"
if [ ! -f "$pass_venv/.installed" ]; then
    rm -rf "$pass_venv"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$pass_venv"
    "$pass_venv/bin/python" -m pip install -q --upgrade pip
    "$pass_venv/bin/python" -m pip install -q "$(grep -m1 -o '"torch==[0-9.]*"' pyproject.toml | tr -d '"')"
    "$pass_venv/bin/python" -m pip install -q --group openvino
    "$pass_venv/bin/python" -m pip uninstall -q -y torchvision  # why: the Makefile's PASS_UNINSTALL
    touch "$pass_venv/.installed"
fi
rm -rf .venv-openvino
ln -s "$pass_venv" .venv-openvino
touch "$pass_venv/.installed"  # newer than this checkout's pyproject.toml, so make keeps it
# The main venv gains the two plugin extras (make's stamps skip what is installed already).
make venv TARGET=openvino PYTHON="$PYTHON"
make venv TARGET=qnn PYTHON="$PYTHON"
