#!/usr/bin/env bash
# Runs pytest's C++ paths under AddressSanitizer + LeakSanitizer: the extension from
# build/asan-py (built with -DTURBOQUANT_SANITIZE=address, see scripts/test.sh) is put into a
# copy of the Python package and loaded into the ordinary interpreter with the ASan runtime
# preloaded. A leak, heap overflow or use-after-free in our code fails the run; CPython's
# and NumPy's own allocations that live until exit are suppressed (tests/sanitizers/).
# The RLIMIT_AS test is deselected: ASan reserves terabytes of address space.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
so=$(ls build/asan-py/_core*.so)
pkg=build/asan-py/pkg
rm -rf "$pkg"; mkdir -p "$pkg"
cp -r python/turboquant "$pkg/"
rm -f "$pkg"/turboquant/_core*.so
cp "$so" "$pkg/turboquant/"
# libstdc++ too: the interpreter does not link it, and ASan's __cxa_throw interceptor must
# find the real one when our extension throws.
libasan="$(${CXX:-c++} -print-file-name=libasan.so) $(${CXX:-c++} -print-file-name=libstdc++.so)"
PYBIN=$($PY -c 'import sys; print(sys.executable)')  # the interpreter itself, not a shell shim
# Reports go to files too: pytest redirects fd 2, and an exit-time leak report would be lost.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86:verify_asan_link_order=0:log_path=$PWD/build/asan-py/asan-report
export LSAN_OPTIONS=suppressions=$PWD/tests/sanitizers/lsan_python.supp:print_suppressions=0

# shellcheck disable=SC2086
PYTHONPATH="$pkg" LD_PRELOAD="$libasan" "$PYBIN" -m pytest -q -p no:cacheprovider ${TQ_LSAN_PYTEST_ARGS:-} \
  tests/python/test_reliability.py tests/python/test_kv_cache.py tests/python/test_quantizer.py \
  tests/python/test_file_format.py \
  -k "not allocation_failure"
echo "pytest under ASan + LeakSanitizer: no leak, no memory error (reports would be in build/asan-py/asan-report.*)"
