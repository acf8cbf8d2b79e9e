#!/usr/bin/env bash
# Runs pytest's C++ paths under AddressSanitizer + LeakSanitizer: the extension is built
# with -DTURBOQUANT_SANITIZE=address into build/asan-py, put into a copy of the Python
# package and loaded into the ordinary interpreter with the ASan runtime preloaded. A leak,
# heap overflow or use-after-free in our code fails the run; CPython's and NumPy's own
# allocations that live until exit are suppressed (tests/sanitizers/).
# The RLIMIT_AS test is deselected: ASan reserves terabytes of address space.
# Called by scripts/reliability.sh; runs alone too, in any environment (a fresh venv
# included): it installs what it needs into $PYTHON (default python3), since this build
# runs outside pip's build isolation (pybind11, cmeel-eigen: the build requirements) and
# pytest runs the copy, not an installed package (numpy, pytest: dependencies, test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-${TQ_JOBS:-$(nproc)}}
source scripts/common.sh  # log, SAN_OPT, PY, pip_install_groups, ensure_cmake

APT_PACKAGES=(g++ ninja-build)
source scripts/apt-packages.sh
ensure_apt_packages "${APT_PACKAGES[@]}"
log "installing the build requirements, dependencies and test extra for the ASan build"
pip_install_groups build deps test
ensure_cmake

# (No -Werror here: GCC 12 reports a false -Wmaybe-uninitialized inside pybind11's
# argument loader when instrumenting with ASan; the other builds keep warnings as errors.)
log "building the extension with AddressSanitizer (build/asan-py)"
cmake -S . -B build/asan-py -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$SAN_OPT" -DTURBOQUANT_PYTHON=ON \
  -DTURBOQUANT_TESTS=OFF -DTURBOQUANT_WERROR=OFF -DTURBOQUANT_SANITIZE=address \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build build/asan-py -j "$JOBS"

log "pytest's C++ paths under ASan + LeakSanitizer"
so=$(ls build/asan-py/_core*.so)
pkg=build/asan-py/pkg
rm -rf "$pkg"; mkdir -p "$pkg"
cp -r python/turboquant "$pkg/"
rm -f "$pkg"/turboquant/_core*.so
cp "$so" "$pkg/turboquant/"
# libstdc++ too: the interpreter does not link it, and ASan's __cxa_throw interceptor must
# find the real one when our extension throws.
libasan="$(${CXX:-c++} -print-file-name=libasan.so) $(${CXX:-c++} -print-file-name=libstdc++.so)"
PYBIN=$("$PY" -c 'import sys; print(sys.executable)')  # the interpreter itself, not a shell shim
# Reports go to files too: pytest redirects fd 2, and an exit-time leak report would be lost.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86:verify_asan_link_order=0:log_path=$PWD/build/asan-py/asan-report
export LSAN_OPTIONS=suppressions=$PWD/tests/sanitizers/lsan_python.supp:print_suppressions=0

# shellcheck disable=SC2086
PYTHONPATH="$pkg" LD_PRELOAD="$libasan" "$PYBIN" -m pytest -q -p no:cacheprovider ${TQ_LSAN_PYTEST_ARGS:-} \
  tests/python/test_reliability.py tests/python/test_kv_cache.py tests/python/test_quantizer.py \
  tests/python/test_file_format.py \
  -k "not allocation_failure"
echo "pytest under ASan + LeakSanitizer: no leak, no memory error (reports would be in build/asan-py/asan-report.*)"
