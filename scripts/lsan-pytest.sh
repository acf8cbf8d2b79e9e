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
libasan=$(${CXX:-c++} -print-file-name=libasan.so)
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86:verify_asan_link_order=0
export LSAN_OPTIONS=suppressions=$PWD/tests/sanitizers/lsan_python.supp:print_suppressions=0
export PYTHONMALLOC=malloc   # let ASan see every Python allocation too
# shellcheck disable=SC2086
PYTHONPATH="$pkg" $PY -m pytest -q -p no:cacheprovider ${TQ_LSAN_PYTEST_ARGS:-} \
  tests/python/test_reliability.py tests/python/test_kv_cache.py tests/python/test_quantizer.py \
  -k "not allocation_failure"
echo "pytest under ASan + LeakSanitizer: no leak, no memory error"
