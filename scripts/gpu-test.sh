#!/usr/bin/env bash
# The GPU path on a real GPU, in one command: on a machine where mlx has a GPU device (an
# NVIDIA GPU with mlx's CUDA back end, `pip install "mlx[cuda13]"`, or Apple silicon), it
#   1. installs turboquant (offline from $TQ_WHEELS when set: see scripts/gpu-wheels.sh),
#   2. refuses to go on unless mlx has a GPU device (build_info() says why not),
#   3. runs the GPU tests (pytest -m gpu, plus the path-selection and CUDA-compile checks),
#   4. runs the GPU benchmarks: decode attention on codes vs fp16 sdpa (bench/gpu_attention.py)
#      and end-to-end mlx-lm prefill/decode with random-weight Llama-3.1-8B and SmolLM2 shapes
#      (bench/gpu_e2e.py), where a decode step's time goes (bench/gpu_overhead.py), and a
#      fresh process's first use with and without the kernel cache (bench/gpu_first_use.py),
#      writing JSON results (GPU, driver, mlx version inside) to
#      $TQ_GPU_OUT (default bench/results).
# Environment: PYTHON, TQ_WHEELS (folder of wheels to install from, no index), TQ_GPU_OUT,
# TQ_GPU_CONTEXTS (gpu_e2e contexts, default 8192,32768,131072), TQ_GPU_ATTN_CONTEXTS,
# TQ_GPU_BENCH_TIMEOUT (seconds per benchmark), TQ_GPU_SKIP_BENCH=1, TQ_GPU_SWEEP (contexts
# at which gpu_attention.py also compares the register-tiled kernel's shapes, e.g. 32768,131072).
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
from turboquant import metal
if metal.candidate_path() == "cpu":
    sys.exit("no GPU device for the kernels on this machine: " + info["mlx_kernels_reason"])
if info["mlx_kernels"] == "cpu":  # the tests below show which kernel
    print("the GPU kernels failed their self-test: " + info["mlx_kernels_reason"], file=sys.stderr)
PY

log "GPU tests"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# A failing test does not stop the benchmarks (a GPU session is short): the status is kept and
# returned at the end. Each benchmark has a time limit (TQ_GPU_BENCH_TIMEOUT seconds).
status=0
set +e
$PY -m pytest -q -ra --junitxml="$OUT/gpu_tests.xml" tests/python/test_gpu.py \
  tests/python/test_gpu_path.py tests/python/test_cuda_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
log "GPU kernels against the core in full float32 (MLX_ENABLE_TF32=0)"
MLX_ENABLE_TF32=0 $PY -m pytest -q -ra tests/python/test_gpu.py -k "bit_exact or large_context" \
  2>&1 | tee "$OUT/gpu_tests_fp32.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
set -e

bench() {  # bench NAME ARGS...: one benchmark under the time limit, its log under $OUT
  local name=$1; shift
  log "$name"
  set +e
  PYTHONUNBUFFERED=1 timeout "${TQ_GPU_BENCH_TIMEOUT:-1800}" $PY "$@" 2>&1 | tee "$OUT/$name.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "$name failed or ran out of time" >&2; status=1; }
  set -e
}
if [ "${TQ_GPU_SKIP_BENCH:-0}" != "1" ]; then
  cd bench
  ctx=${TQ_GPU_CONTEXTS:-8192,32768,131072}
  bench gpu_attention gpu_attention.py --contexts "${TQ_GPU_ATTN_CONTEXTS:-4096,8192,16384,32768,65536,131072}" \
    ${TQ_GPU_SWEEP:+--sweep "$TQ_GPU_SWEEP"} --out "$OUT/gpu_attention.json"
  bench gpu_overhead gpu_overhead.py --profile --out "$OUT/gpu_overhead.json"
  bench gpu_first_use gpu_first_use.py --out "$OUT/gpu_first_use.json"
  bench gpu_e2e_smollm2 gpu_e2e.py --shape smollm2-135m --contexts "$ctx" \
    --out "$OUT/gpu_e2e_smollm2.json"
  bench gpu_e2e_llama8b gpu_e2e.py --shape llama-3.1-8b --contexts "$ctx" \
    --out "$OUT/gpu_e2e_llama8b.json"
fi
log "GPU tests and benchmarks done (status $status)"
exit $status
