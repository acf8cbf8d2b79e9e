#!/usr/bin/env python3
"""Runs pytest with turboquant's mlx Metal path switched on and emulated, on any machine.

    PYTHONPATH=python python scripts/pytest-emulated-metal.py tests/python/test_mlx_lm.py

turboquant.gpu_path.active_path() reports "metal", and every mx.fast.metal_kernel launch of
turboquant.metal runs on the emulated GPU of metal/metal_compat.h instead
(tests/python/mlx_kernel_emulator.py), so code that takes the Metal path -- the
MetalCodeStore, and mlx-lm's cache once it creates one -- runs end to end with the real
host functions and kernel sources. Slow (one process per kernel launch): for tiny models.
Prints how many launches of each kernel ran.
"""

import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import turboquant.metal as metal  # noqa: E402
from turboquant import gpu_path
from mlx_kernel_emulator import EmulatedKernels  # noqa: E402


def main() -> int:
    emu = EmulatedKernels(Path(tempfile.mkdtemp(prefix="tq-emu-")))
    metal._kernel = emu.kernel
    metal._require_metal = lambda: None
    gpu_path.active_path = lambda: "metal"
    rc = pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]])
    print("emulated Metal kernel launches:", dict(Counter(emu.launches)) or "none")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
