#!/usr/bin/env bash
# The project's whole test suite, from a fresh machine:
#   1. installs missing system packages (apt) and the Python package with its test extras,
#      then builds the documentation site with `mkdocs build --strict` (scripts/docs.sh),
#   2. builds the GoogleTest suite with warnings as errors and runs it through ctest,
#   3. builds it again under AddressSanitizer + UndefinedBehaviorSanitizer and runs it,
#   4. runs pytest (the slow real-model tests included, they are marked `slow`).
#   5. fuzzing (tests/fuzz): every libFuzzer target (clang, ASan+UBSan) for TQ_FUZZ_SECONDS
#      (30) from its committed seed corpus, then atheris on the Python entry points,
#   6. sanitizers beyond step 3: the concurrency tests under ThreadSanitizer, and the
#      pytest suite's C++ paths under AddressSanitizer + LeakSanitizer.
#   On x86-64 Linux, after step 2: the suite cross-built for AArch64 (NEON kernels) and run
#   under qemu-user (scripts/test-aarch64.sh).
# Environment: TQ_SKIP_SANITIZERS=1 skips steps 3 and 6, TQ_SKIP_FUZZ=1 skips step 5,
# TQ_SAN_OPT sets the sanitizer builds' optimisation flags (default -O1 -g1),
# TQ_SKIP_AARCH64=1 skips the AArch64 step,
# TQ_PYTEST_ARGS adds pytest arguments, TQ_PYTEST_WORKERS sets pytest's worker processes
# (pytest-xdist; default: the cores, at most 4; 0 runs in one process), TQ_PYTEST_PRELOAD
# overrides the BLAS library preloaded for pytest (empty: none).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
JOBS=${TQ_JOBS:-$(nproc)}

source scripts/common.sh  # log, SAN_OPT, PY, pip_install, ensure_cmake

# --- 1. dependencies -------------------------------------------------------------------
APT_PACKAGES=(g++ clang libclang-rt-14-dev libgtest-dev libgmock-dev libbenchmark-dev libeigen3-dev ninja-build
              libopenblas0-pthread)
source scripts/apt-packages.sh
ensure_apt_packages "${APT_PACKAGES[@]}"
ensure_cmake

log "installing turboquant with its test and mlx extras"
EXTRAS="test"
case "$(uname -s)" in Linux|Darwin) EXTRAS="test,mlx" ;; esac
pip_install ".[${EXTRAS}]" || { echo "turboquant failed to install" >&2; exit 1; }
"$PY" -c "import turboquant" || { echo "turboquant failed to install" >&2; exit 1; }

# --- 1b. documentation (mkdocs --strict: a broken link or docstring fails) -------------
scripts/docs.sh

# --- 2. GoogleTest ---------------------------------------------------------------------
log "building the C++ test suite (warnings as errors)"
cmake -S . -B build/test -G Ninja -DCMAKE_BUILD_TYPE=Release -DTURBOQUANT_PYTHON=OFF \
  -DTURBOQUANT_TESTS=ON -DTURBOQUANT_BENCH=ON -DTURBOQUANT_WERROR=ON >/dev/null
cmake --build build/test -j "$JOBS"
log "ctest"
ctest --test-dir build/test --output-on-failure -j "$JOBS"

# --- 2b. AArch64 (NEON kernels): cross build, tests under qemu-user ----------------------
if [ "${TQ_SKIP_AARCH64:-0}" != "1" ] && [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
  TQ_JOBS="$JOBS" scripts/test-aarch64.sh
fi

# --- 3. sanitizers ---------------------------------------------------------------------
if [ "${TQ_SKIP_SANITIZERS:-0}" != "1" ]; then
  log "building the C++ test suite with ASan + UBSan"
  cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$SAN_OPT" -DTURBOQUANT_PYTHON=OFF \
    -DTURBOQUANT_TESTS=ON -DTURBOQUANT_WERROR=ON -DTURBOQUANT_SANITIZE=address,undefined >/dev/null
  cmake --build build/asan -j "$JOBS"
  log "ctest under ASan + UBSan"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build/asan --output-on-failure -j "$JOBS"
fi

# --- 4. pytest -------------------------------------------------------------------------
log "pytest"
cd "$ROOT"
# mlx[cpu]'s Linux wheel links the netlib reference BLAS (bench/mlx_cpu_matmul.py: about
# 1.6 GFLOP/s for a float32 matmul against NumPy's 21), which made the two real-model tests
# take 4 of pytest's 5 minutes; with Debian's OpenBLAS preloaded they take 20 s. Speed only:
# the tests' bounds hold with either library (TQ_PYTEST_PRELOAD= turns it off).
preload=${TQ_PYTEST_PRELOAD-$(ls /usr/lib/"$(uname -m)"-linux-gnu/openblas-pthread/libopenblas.so.0 2>/dev/null || true)}
[ -n "$preload" ] && echo "pytest with LD_PRELOAD=$preload (mlx's CPU matmuls)"
# Worker processes (pytest-xdist): most tests are single-threaded (the kernel emulator's
# compiles, the state machines, the models' token loops), so two workers on two cores take
# pytest from 19 to 11 minutes (`--durations` in both, 2-core VM).
workers=${TQ_PYTEST_WORKERS:-$(( JOBS < 4 ? JOBS : 4 ))}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers")
# shellcheck disable=SC2086
LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}" "$PY" -m pytest -q -ra ${parallel[@]+"${parallel[@]}"} \
  ${TQ_PYTEST_ARGS:-} tests/python

# --- 5-6. fuzzing, TSan, LSan (scripts/reliability.sh) -------------------------------
PYTHON="$PY" JOBS="$JOBS" scripts/reliability.sh
log "every step passed"
