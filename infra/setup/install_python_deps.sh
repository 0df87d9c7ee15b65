#!/usr/bin/env bash
# Create the virtual environment and install the locked dependencies.
# torch goes first and is pinned by constraints.txt for everything after it: any other torch
# (or an unpinned one pulled by a dependency) would download gigabytes of CUDA packages.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip setuptools wheel
echo "setup: installing torch 2.13.0 (CPU), then requirements.lock"
$PIP install -q torch==2.13.0
# DeepSpeed ships as an sdist: DS_BUILD_OPS=0 builds a pure-Python wheel (ops compile on first use).
DS_BUILD_OPS=0 $PIP install -q -c constraints.txt -r requirements.lock
$PIP install -q --no-deps --no-build-isolation -e .
$PIP check
echo "setup: environment ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
