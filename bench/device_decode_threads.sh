#!/usr/bin/env bash
# Decode-thread benchmark (BM_KVCacheDecodeThreads) of two builds side by side on one
# machine, interleaved: "a" is the tree as it is, "b" the same tree with B_FILES
# ("path=replacement ..." pairs, relative to the root) and B_SED ("file:sed-expression")
# applied. Dependencies from $DEPS (a copy of Eigen, google-benchmark and GoogleTest's
# sources under one prefix) when the machine has none installed.
#   B_SED='cpp/include/turboquant/attention.h:s/kSplitChunkTokens = 256/kSplitChunkTokens = 128/' \
#     bash bench/device_decode_threads.sh [reps]
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-2}; D=$(pwd)/${DEPS:-.devdeps}
export LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
cfg() {
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTURBOQUANT_PYTHON=OFF -DTURBOQUANT_TESTS=OFF \
    -DTURBOQUANT_BENCH=ON -Dbenchmark_DIR=$D/usr/lib/x86_64-linux-gnu/cmake/benchmark \
    -DEigen3_DIR=$D/usr/share/eigen3/cmake >/dev/null
  cmake --build "$2" -j "$(nproc)" --target turboquant_bench >/dev/null
}
B=/tmp/tq_b; rm -rf $B && mkdir -p $B
tar --exclude=./build --exclude=./.devdeps --exclude=./.models --exclude=./.git -cf - . | tar -xf - -C $B
for pair in ${B_FILES:-}; do cp "${pair#*=}" "$B/${pair%%=*}"; done
[ -n "${B_SED:-}" ] && sed -i "${B_SED#*:}" "$B/${B_SED%%:*}"
cfg . build/dt_a & cfg $B $B/build & wait
for r in $(seq "$REPS"); do
  for v in a b; do
    bin=build/dt_a/turboquant_bench; [ $v = b ] && bin=$B/build/turboquant_bench
    echo "== rep $r build $v"
    $bin --benchmark_filter="${FILTER:-DecodeThreads}" --benchmark_repetitions=5 \
      --benchmark_report_aggregates_only=true 2>&1 | grep median
  done
done
