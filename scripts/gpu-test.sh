#!/usr/bin/env bash
# The GPU path on a real GPU, in one command: on a machine where mlx has a GPU device (an
# NVIDIA GPU with mlx's CUDA back end, `pip install "mlx[cuda13]"`, or Apple silicon), it
#   1. installs turboquant (offline from $TQ_WHEELS when set: see scripts/gpu-wheels.sh),
#   2. refuses to go on unless the GPU kernel path is taken (build_info() says why not),
#   3. runs the GPU tests (pytest -m gpu, plus the path-selection and CUDA-compile checks),
#   4. runs the GPU benchmarks: decode attention on codes vs fp16 sdpa (bench/gpu_attention.py)
#      and end-to-end mlx-lm prefill/decode with random-weight Llama-3.1-8B and SmolLM2 shapes
#      (bench/gpu_e2e.py), writing JSON results (GPU, driver, mlx version inside) to
#      $TQ_GPU_OUT (default bench/results).
# Environment: PYTHON, TQ_WHEELS (folder of wheels to install from, no index), TQ_GPU_OUT,
# TQ_GPU_CONTEXTS (gpu_e2e contexts, default 8192,32768,131072), TQ_GPU_SKIP_BENCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${TQ_GPU_OUT:-bench/results}
source scripts/common.sh  # log

if [ -n "${TQ_WHEELS:-}" ]; then
  log "installing the carried wheels from $TQ_WHEELS"
  $PY -m pip install -q --no-index --no-deps --find-links "$TQ_WHEELS" "$TQ_WHEELS"/*.whl
fi
if ! $PY -c "import turboquant._core" 2>/dev/null; then
  log "building turboquant"
  if [ -n "${TQ_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-build-isolation .
  else
    $PY -m pip install -q ".[test,mlx]"
  fi
fi

log "GPU kernel path"
$PY - <<'PY'
import json, sys
import turboquant
info = turboquant.build_info()
print(json.dumps({k: info[k] for k in ("backends", "mlx_kernels", "mlx_kernels_reason")}, indent=1))
if info["mlx_kernels"] == "cpu":
    sys.exit("no GPU kernel path on this machine: " + info["mlx_kernels_reason"])
PY

log "GPU tests"
$PY -m pytest -q -ra tests/python/test_gpu.py tests/python/test_gpu_path.py \
  tests/python/test_cuda_kernels.py

if [ "${TQ_GPU_SKIP_BENCH:-0}" != "1" ]; then
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  cd bench
  log "decode attention: codes vs fp16 sdpa"
  $PY gpu_attention.py --out "$OUT/gpu_attention.json"
  log "end to end: Llama-3.1-8B shape"
  $PY gpu_e2e.py --shape llama-3.1-8b --contexts "${TQ_GPU_CONTEXTS:-8192,32768,131072}" \
    --out "$OUT/gpu_e2e_llama8b.json"
  log "end to end: SmolLM2-135M shape"
  $PY gpu_e2e.py --shape smollm2-135m --contexts "${TQ_GPU_CONTEXTS:-8192,32768,131072}" \
    --out "$OUT/gpu_e2e_smollm2.json"
fi
log "GPU tests and benchmarks done"
