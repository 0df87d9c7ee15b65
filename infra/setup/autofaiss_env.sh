#!/usr/bin/env bash
# The benchmark-only environment for autofaiss (criteo), kept apart from .venv: autofaiss pins
# numpy<2, which the project's stack (pyspark, transformers, torch) does not accept.
# With faiss-cpu 1.15 it also needs a pyarrow that still supports numpy 1 (25.x).
# benchmarks/vector_index.py runs it as a subprocess on the same vectors saved to disk.
set -euo pipefail
ENV_DIR=${1:-.bench-envs/autofaiss}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ -x "$ENV_DIR/bin/python" ] && "$ENV_DIR/bin/python" -c 'import autofaiss, faiss' 2>/dev/null; then
  echo "autofaiss env: ready in $ENV_DIR"
  exit 0
fi
"$PYTHON" -m venv "$ENV_DIR"
PIP="$ENV_DIR/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip
$PIP install -q "autofaiss==2.18.0" "faiss-cpu==1.15.1" "pyarrow>=25,<26" "numpy<2"
$PIP check
"$ENV_DIR/bin/python" -c 'import autofaiss, faiss, numpy; print("autofaiss env: faiss", faiss.__version__, "numpy", numpy.__version__)'
