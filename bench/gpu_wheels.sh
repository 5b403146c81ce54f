#!/usr/bin/env bash
# The HTTP stack's wheels that `bench/gpu.sh --server` needs on a GPU machine without network access (its
# image has torch and transformers, not the server's web stack), downloaded at this checkout's venv
# versions for the device image's Python into .whl/ (git-ignored). The device tool carries .whl/ over;
# there, `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site.
#
#   bench/gpu_wheels.sh                     # Python 3.12, manylinux x86_64, into .whl/
#   DEVICE_PYTHON=3.11 DEST=/tmp/w bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
  typing-inspection typing-extensions uvicorn python-multipart opentelemetry-api uvloop httptools llguidance)
mapfile -t pinned < <("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import importlib.metadata
import sys

for name in sys.argv[1:]:
    print(f"{name}=={importlib.metadata.version(name)}")
PY
)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux1_x86_64 --dest "${DEST:-.whl}" "${pinned[@]}"
ls "${DEST:-.whl}"
