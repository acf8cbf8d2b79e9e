#!/usr/bin/env bash
# The C++ core and its GoogleTest suite for 64-bit ARM (the NEON kernels, which Apple
# silicon runs): cross-compiled with g++-aarch64-linux-gnu (warnings as errors; GoogleTest
# built from /usr/src/googletest by the same compiler) and run under qemu-user, with the
# kernel dispatch forced to NEON (the suite less four slow statistical tests) and to the
# scalar reference (the kernel, attention and cache tests). Speed under qemu means nothing:
# this checks that the AArch64 build compiles cleanly and that NEON gives the scalar results
# (tests/cpp/test_kernels.cpp compares every usable kernel set with the scalar one and fails
# if NEON is missing).
# Called by scripts/test.sh on x86-64 Linux; runs alone too:
#   scripts/test-aarch64.sh
# Environment: TQ_JOBS (build jobs and parallel test shards; default nproc),
# TQ_AARCH64_NEON_FILTER / TQ_AARCH64_SCALAR_FILTER (gtest filters of the two runs),
# TQ_AARCH64_BUILD (build folder, default build/aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${TQ_JOBS:-$(nproc)}
BUILD=${TQ_AARCH64_BUILD:-build/aarch64}
SYSROOT=/usr/aarch64-linux-gnu

source scripts/common.sh  # log, SAN_OPT

# System packages: the cross compiler, qemu-user, GoogleTest's sources (libgtest-dev).
APT_PACKAGES=(g++-aarch64-linux-gnu qemu-user libgtest-dev libeigen3-dev ninja-build)
source scripts/apt-packages.sh
ensure_apt_packages "${APT_PACKAGES[@]}"

log "cross-building the C++ test suite for aarch64 (warnings as errors)"
cmake -S . -B "$BUILD" -G Ninja -Wno-deprecated -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
  -DCMAKE_BUILD_TYPE=Release -DTURBOQUANT_PYTHON=OFF -DTURBOQUANT_TESTS=ON -DTURBOQUANT_BENCH=OFF \
  -DTURBOQUANT_METAL=OFF -DTURBOQUANT_WERROR=ON -DTURBOQUANT_GTEST_SOURCE_DIR=/usr/src/googletest >/dev/null
cmake --build "$BUILD" -j "$JOBS" --target turboquant_tests

bin="$BUILD/turboquant_tests"
# ELF e_machine 183: AArch64 (not a host binary by mistake).
[ "$(od -An -tu2 -j18 -N2 "$bin" | tr -d ' ')" = 183 ] || { echo "$bin is not an aarch64 binary" >&2; exit 1; }

# One qemu process per gtest shard, JOBS shards at once; a failing shard's log is printed.
run_suite() {
  local target=$1 filter=$2 pids=() rc=0 i
  for ((i = 0; i < JOBS; i++)); do
    TURBOQUANT_SIMD=$target GTEST_TOTAL_SHARDS=$JOBS GTEST_SHARD_INDEX=$i \
      qemu-aarch64 -L "$SYSROOT" "$bin" --gtest_brief=1 --gtest_filter="$filter" \
      >"$BUILD/tests-$target-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      grep -E '^\[==========\]|^\[  PASSED  \]' "$BUILD/tests-$target-$i.log" | sed "s/^/shard $i: /"
    else
      rc=1
      cat "$BUILD/tests-$target-$i.log"
    fi
  done
  return $rc
}

# NEON: the whole suite but four statistical / large-data tests that compare no kernel sets
# and take about 40% of the suite's time under qemu (TQ_AARCH64_NEON_FILTER='*' runs them).
SLOW="MseQuantizer.DistortionMatchesCodebook:Rotation.CoordinatesFollowTheLaw:Codebook.WithinPaperBounds"
SLOW="$SLOW:ReliabilityCpp.OneMillionTokensOneHeadIndexArithmetic"
# The Metal emulation suites run threadgroups as fibers: portable code, slow under qemu, and
# the x86-64 run covers them.
SLOW="$SLOW:Metal*:*/MetalEncode.*:*/MetalAttention.*"
log "turboquant_tests under qemu-aarch64, TURBOQUANT_SIMD=neon"
run_suite neon "${TQ_AARCH64_NEON_FILTER:--$SLOW}"
log "turboquant_tests under qemu-aarch64, TURBOQUANT_SIMD=scalar"
run_suite scalar "${TQ_AARCH64_SCALAR_FILTER:-Kernels.*:Attention.*:KV*:Serialize.*}"
