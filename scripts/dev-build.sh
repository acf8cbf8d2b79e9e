#!/usr/bin/env bash
# Incremental developer build, no pip: compiles the extension and the C++ tests into
# build/dev and links the extension into python/turboquant/, so that
#   PYTHONPATH=python python -m pytest tests/python
# runs against the working tree. (The README's commands install for real.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DTURBOQUANT_TESTS=ON \
  -DTURBOQUANT_WERROR=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >/dev/null
cmake --build build/dev -j "${TQ_JOBS:-2}"
so=$(ls build/dev/_core*.so)
ln -sf "../../$so" "python/turboquant/$(basename "$so")"
echo "built: $so -> python/turboquant/; run: PYTHONPATH=python $PY -m pytest tests/python"
