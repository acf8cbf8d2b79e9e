#!/usr/bin/env bash
# Type-checks the Metal host code (cpp/src/backend/metal/*.cpp) on a machine without
# Apple's SDK: clang -fsyntax-only against a metal-cpp checkout, with tiny stand-ins for
# the few OS headers metal-cpp includes (scripts/metal-host-stubs/: Objective-C runtime,
# CoreFoundation types, TargetConditionals). This checks names, signatures and types of
# every metal-cpp call; it does not link or run anything.
#   scripts/check-metal-host.sh /path/to/metal-cpp        (the folder holding Metal/Metal.hpp)
set -euo pipefail
cd "$(dirname "$0")/.."
METAL_CPP=${1:?usage: scripts/check-metal-host.sh /path/to/metal-cpp}
[ -f "$METAL_CPP/Metal/Metal.hpp" ] || { echo "no Metal/Metal.hpp under $METAL_CPP" >&2; exit 2; }
CXX=${CXX:-$(command -v clang++ || command -v clang++-14)}
for src in cpp/src/backend/metal/*.cpp; do
  "$CXX" -std=c++20 -fsyntax-only -fblocks -Wall -Wextra -Wpedantic -Wshadow -Wconversion \
    -Wno-sign-conversion -Wno-deprecated-declarations -Werror \
    -isystem scripts/metal-host-stubs -isystem "$METAL_CPP" -Icpp/include -Icpp/src "$src"
  echo "ok: $src"
done
"$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DTURBOQUANT_HAS_METAL -Icpp/include -Icpp/src cpp/src/backend.cpp
echo "ok: cpp/src/backend.cpp (TURBOQUANT_HAS_METAL)"
