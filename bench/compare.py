"""Decode-attention benchmark vs NumPy fp32 and mlx fp16 / quantized KV, same run.

Same as ``python -m turboquant bench compare`` (python/turboquant/cli/bench_compare.py);
run from the repository root, e.g.
``PYTHONPATH=python python bench/compare.py --contexts 1024,16384``.
"""

import sys

from turboquant.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "compare", *sys.argv[1:]]))
