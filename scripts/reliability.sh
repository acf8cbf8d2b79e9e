#!/usr/bin/env bash
# Reliability steps of the test suite (run by scripts/test.sh after pytest; runnable alone
# against an installed package, or a dev build with PYTHONPATH=python):
#   5. every libFuzzer target in tests/fuzz (clang, ASan+UBSan) for TQ_FUZZ_SECONDS (30)
#      from its committed seed corpus, then atheris on the Python entry points;
#   6. the concurrency tests under ThreadSanitizer, and pytest's C++ paths under
#      AddressSanitizer + LeakSanitizer (scripts/lsan-pytest.sh).
# TQ_SKIP_FUZZ=1 skips 5, TQ_SKIP_SANITIZERS=1 skips 6.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-${TQ_JOBS:-$(nproc)}}
source scripts/common.sh  # log, SAN_OPT, PY, pip_install, ensure_cmake

# What these builds need when the script runs alone (scripts/test.sh installed them already).
APT_PACKAGES=(g++ clang libclang-rt-14-dev libgtest-dev libgmock-dev libeigen3-dev ninja-build)
source scripts/apt-packages.sh
ensure_apt_packages "${APT_PACKAGES[@]}"
ensure_cmake

# --- 5. fuzzing ------------------------------------------------------------------------
if [ "${TQ_SKIP_FUZZ:-0}" != "1" ]; then
  FUZZ_SECONDS=${TQ_FUZZ_SECONDS:-30}
  log "building the libFuzzer targets (clang, ASan + UBSan)"
  CC=${TQ_FUZZ_CC:-clang-14} CXX=${TQ_FUZZ_CXX:-clang++-14} cmake -S . -B build/fuzz -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$SAN_OPT" -DTURBOQUANT_PYTHON=OFF -DTURBOQUANT_FUZZ=ON \
    -DTURBOQUANT_SANITIZE=address,undefined -DTURBOQUANT_WERROR=ON >/dev/null
  cmake --build build/fuzz -j "$JOBS"
  for src in tests/fuzz/*.cpp; do
    t=$(basename "$src" .cpp)
    work="build/fuzz/corpus-$t"; rm -rf "$work"; mkdir -p "$work"
    log "fuzzing $t for ${FUZZ_SECONDS}s"
    # The seed corpus is read-only input; new inputs go to a scratch directory.
    timeout $((FUZZ_SECONDS + 120)) "build/fuzz/$t" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="build/fuzz/$t-" \
      "$work" "tests/fuzz/corpus/$t" >"build/fuzz/$t.log" 2>&1 \
      || { tail -50 "build/fuzz/$t.log"; echo "fuzz target $t found a problem (build/fuzz/$t-*)" >&2; exit 1; }
    runs=$(awk '/stat::number_of_executed_units/ {print $2}' "build/fuzz/$t.log")
    echo "fuzz $t: $runs executions, no finding"
  done
  log "atheris on the Python entry points"
  # atheris is a fuzzing tool, not a dependency of the package: installed here, on first use.
  "$PY" -c "import atheris" 2>/dev/null || pip_install "atheris>=2.3" \
    || { echo "atheris failed to install (pip install atheris)" >&2; exit 1; }
  timeout $((FUZZ_SECONDS + 120)) "$PY" tests/fuzz/atheris_entry_points.py -runs="${TQ_ATHERIS_RUNS:-20000}" \
    -max_total_time="$FUZZ_SECONDS" >build/fuzz/atheris.log 2>&1 \
    || { tail -50 build/fuzz/atheris.log; echo "atheris found a problem" >&2; exit 1; }
  echo "atheris: $(grep -oE 'Done [0-9]+ runs' build/fuzz/atheris.log | awk '{print $2}') executions, no finding"
fi

# --- 6. ThreadSanitizer and LeakSanitizer ----------------------------------------------
if [ "${TQ_SKIP_SANITIZERS:-0}" != "1" ]; then
  log "building the concurrency tests (reliability, thread pool, split-K) with ThreadSanitizer"
  cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$SAN_OPT" -DTURBOQUANT_PYTHON=OFF \
    -DTURBOQUANT_TESTS=ON -DTURBOQUANT_WERROR=ON -DTURBOQUANT_SANITIZE=thread \
    -DTURBOQUANT_TEST_FILES="test_reliability.cpp;test_thread_pool.cpp;test_attention_split.cpp" >/dev/null
  cmake --build build/tsan -j "$JOBS"
  log "concurrency, thread-pool and split-K tests under TSan"
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 build/tsan/turboquant_tests \
    --gtest_filter='ReliabilityCpp.Concurrent*:ReliabilityCpp.Mutation*:ReliabilityCpp.WriterAndReaders*:ThreadPool.*:SplitDecode.*'

  # The extension built with ASan, loaded into the ordinary interpreter by preloading the
  # ASan runtime; LeakSanitizer reports leaks at exit (CPython's own intentional
  # allocations are suppressed in tests/sanitizers/lsan_python.supp, ours are not). The
  # script builds it too, after installing the build requirements it needs outside pip's
  # build isolation.
  scripts/lsan-pytest.sh
fi
