#!/usr/bin/env bash
# Prepares the wheels an offline NVIDIA machine (Python 3.12, CUDA 13; no package index) needs
# to run scripts/gpu-test.sh: mlx + mlx-cuda-13, mlx-lm, and turboquant's build requirements,
# in parts small enough to carry (at most ~50 MB each, DIR/a and DIR/b; mlx-cuda-13 alone is
# ~90 MB and is split, its halves joined again there):
#   bash scripts/gpu-wheels.sh [DIR]          # default DIR: .dev (add /.dev/ to .git/info/exclude)
# Then, on the GPU machine, two calls in a row (the first parks part a in /tmp/keep):
#   1. carrying DIR/a:  mkdir -p /tmp/keep && cp .dev/a/* /tmp/keep/
#   2. carrying DIR/b:  cat /tmp/keep/mlx_cuda.part0 .dev/b/mlx_cuda.part1 > .dev/b/$(cat .dev/b/mlx_cuda.name)
#                       && rm .dev/b/mlx_cuda.part1 && python3 -m pip install -q --no-index --no-deps
#                       --target /tmp/site .dev/b/*.whl && export PYTHONPATH=/tmp/site
#                       && python3 -m pip install -q --no-index --no-deps --no-build-isolation
#                       --target /tmp/site . && TQ_GPU_OUT=$OUT bash scripts/gpu-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.dev}
MLX=${TQ_MLX_VERSION:-0.32.4}
rm -rf "$DIR/a" "$DIR/b" "$DIR/w"
mkdir -p "$DIR/a" "$DIR/b" "$DIR/w"
pip_dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR/w" "$@"
}
pip_dl "mlx==$MLX" "mlx-cuda-13==$MLX" mlx-lm cmeel cmeel-eigen "pybind11>=3" \
  "scikit-build-core>=0.10"
cuda=$(ls "$DIR"/w/mlx_cuda_13-*.whl)
basename "$cuda" > "$DIR/b/mlx_cuda.name"
split -b 46000000 -d -a 1 "$cuda" "$DIR/w/mlx_cuda.part"
mv "$DIR/w/mlx_cuda.part0" "$DIR/a/"
mv "$DIR/w/mlx_cuda.part1" "$DIR/b/"
rm "$cuda"
mv "$DIR"/w/*.whl "$DIR/b/"
rmdir "$DIR/w" 2>/dev/null || { echo "unexpected files left in $DIR/w" >&2; exit 1; }
du -sh "$DIR/a" "$DIR/b"
