# Cross build for 64-bit ARM Linux with the Debian cross toolchain (g++-aarch64-linux-gnu);
# the tests run under qemu-user (qemu-aarch64), which CMake uses as the emulator for
# gtest_discover_tests and ctest. See scripts/test-aarch64.sh.
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -DTURBOQUANT_PYTHON=OFF -DTURBOQUANT_TESTS=ON -DTURBOQUANT_GTEST_SOURCE_DIR=/usr/src/googletest
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(TQ_AARCH64_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${TQ_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${TQ_AARCH64_TRIPLE}-g++)
set(CMAKE_FIND_ROOT_PATH /usr/${TQ_AARCH64_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Packages: the target's first, then the host's (Eigen is header-only, so the host's
# config package serves; libraries such as GoogleTest are built from source instead).
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/${TQ_AARCH64_TRIPLE})
# GCC notes that the AArch64 passing of some std::pair arguments changed in GCC 10.1: this
# build links nothing compiled by an older GCC.
set(CMAKE_CXX_FLAGS_INIT "-Wno-psabi")
