#!/usr/bin/env bash
# The GPU checks of one short device call (under ~9 minutes; scripts/gpu-test.sh runs longer),
# most telling first, each under its own time limit, results in $OUT (default bench/results):
#   1. the decode-attention sweep (bench/gpu_attention.py --sweep: register-tiled vs staged
#      kernels and their shapes at 32K and 128K tokens, then the main table at those contexts),
#   2. the GPU tests (tests/python/test_gpu.py, TF32 on),
#   3. Nsight Compute on one call of each decode kernel (bench/gpu_probe.py; when ncu exists),
#   4. a PyTorch-profiler trace of the process's CUDA activity and a decode step's host time
#      (bench/gpu_probe.py --trace; when torch exists),
#   5. end to end, SmolLM2 shape at 8K and 32K (bench/gpu_e2e.py).
# On an offline machine with the carried wheels (scripts/gpu-wheels.sh: part a parked in
# /tmp/keep by a first call), TQ_JOIN_WHEELS=1 joins and installs them into /tmp/site first.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
if [ "${TQ_JOIN_WHEELS:-0}" = 1 ]; then
  cat /tmp/keep/mlx_cuda.part0 .dev/b/mlx_cuda.part1 > ".dev/b/$(cat .dev/b/mlx_cuda.name)" \
    && rm .dev/b/mlx_cuda.part1
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/b/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  step "building turboquant"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation --target /tmp/site . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
python3 -c "import turboquant as t; i=t.build_info(); print(i['mlx_kernels'], i['mlx_kernels_reason'])"
status=0
run() {  # run SECONDS LOG CMD...: one step under its limit, its output in $OUT/LOG
  local limit=$1 log=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$log" 2>&1 || { echo "$log: failed or out of time"; status=1; }
  tail -"${TAIL:-12}" "$OUT/$log"
}
cd bench
step "decode-attention sweep"
TAIL=40 run 140 sweep.log python3 gpu_attention.py --sweep 32768,131072 --contexts 32768,131072 \
  --dims 128 --bits 3 --iters 20 --out "$OUT/gpu_attention_sweep.json"
step "GPU tests"
cd ..
run 100 gpu_tests.log python3 -m pytest -q -ra -p no:cacheprovider tests/python/test_gpu.py
cd bench
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  step "Nsight Compute ($NCU)"
  TAIL=5 run 70 ncu.txt "$NCU" --clock-control none -k regex:attention -c 24 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis python3 gpu_probe.py
fi
if python3 -c "import torch" 2>/dev/null; then
  step "CUDA trace"
  TAIL=3 run 60 trace.txt python3 gpu_probe.py --trace
fi
step "end to end, SmolLM2 shape"
run 100 gpu_e2e.log python3 gpu_e2e.py --shape smollm2-135m --contexts 8192,32768 \
  --out "$OUT/gpu_e2e_smollm2.json"
step "done"
exit $status
