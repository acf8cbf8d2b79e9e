#!/usr/bin/env bash
# The GPU checks of one short device call (under ~9 minutes; scripts/gpu-test.sh runs longer),
# most telling first, each under its own time limit and all within TQ_QUICK_BUDGET seconds
# (default 540) of the start, results in $OUT (default bench/results):
#   1. the decode-attention sweep (bench/gpu_attention.py --sweep: the block kernels and their
#      settings, per-call and pipelined timing), then the main table,
#   2. Nsight Compute on the first TQ_NCU_COUNT (2) launches of the kernels matching
#      TQ_NCU_KERNELS (attention_mma) at 128K (bench/gpu_probe.py inside a profiler range;
#      when ncu exists),
#   3. the GPU tests (tests/python/test_gpu.py, TF32 on),
#   4. where a decode step's time goes (bench/gpu_overhead.py --profile: per-call host and
#      GPU cost of each piece, cProfile of a model decode step; the model's steps again
#      without mlx's CUDA graphs), and Nsight Systems over model decode steps (when nsys
#      exists), in the time left.
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
  python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .dev/b/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  step "building turboquant"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --upgrade --no-index --no-deps \
    --no-build-isolation --target /tmp/site . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
python3 -c "import turboquant as t; i=t.build_info(); print(i['mlx_kernels'], i['mlx_kernels_reason'])"
status=0
BUDGET=${TQ_QUICK_BUDGET:-540}
run() {  # run SECONDS LOG CMD...: one step under its limit (and the budget), output in $OUT/LOG
  local limit=$1 log=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then echo "$log: skipped (out of budget)"; status=1; return; fi
  timeout "$limit" "$@" > "$OUT/$log" 2>&1 || { echo "$log: failed or out of time"; status=1; }
  tail -"${TAIL:-12}" "$OUT/$log"
}
cd bench
step "decode-attention sweep"
TAIL=40 run 150 sweep.log python3 gpu_attention.py --sweep 131072 --contexts 32768,131072 \
  --dims 128 --bits 3 --iters 20 --out "$OUT/gpu_attention_sweep.json"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  step "Nsight Compute ($NCU)"
  TAIL=5 run 150 ncu.txt "$NCU" --profile-from-start off --clock-control none \
    -k "regex:${TQ_NCU_KERNELS:-attention_mma}" -c "${TQ_NCU_COUNT:-2}" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis python3 gpu_probe.py
fi
step "GPU tests"
cd ..
run 200 gpu_tests.log python3 -m pytest -q -ra -p no:cacheprovider tests/python/test_gpu.py
cd bench
step "where a decode step's time goes"
TAIL=30 run 130 overhead.log python3 gpu_overhead.py --profile --out "$OUT/gpu_overhead.json"
step "model decode steps without CUDA graphs (MLX_USE_CUDA_GRAPHS=0)"
TAIL=4 MLX_USE_CUDA_GRAPHS=0 run 60 overhead_nographs.log python3 gpu_overhead.py --model-only
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys \
  /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
  step "Nsight Systems ($NSYS)"
  TAIL=3 run 80 nsys_run.log "$NSYS" profile -t cuda,nvtx -s none --cpuctxsw=none -f true \
    -o "$OUT/decode" python3 gpu_overhead.py --model-only
  TAIL=40 run 45 nsys_stats.txt "$NSYS" stats -q --report cuda_api_sum \
    --report cuda_gpu_kern_sum --report nvtx_sum --report cuda_gpu_mem_time_sum \
    "$OUT/decode.nsys-rep"
  rm -f "$OUT/decode.nsys-rep" "$OUT/decode.sqlite"
fi
cd ..
step "done"
exit $status
