"""Registers, spills and shared memory of the decode-attention kernels for CUDA, without a
GPU: NVRTC (the compiler mlx's cuda_kernel uses; the nvidia-cuda-nvrtc wheel of the test
extra) compiles each kernel for sm_90a with ptxas' report (-Xptxas -v), as built on the GPU
(tests/python/nvrtc.py assembles the source as mlx does). ``--min-blocks N`` also compiles
each with ``__launch_bounds__(128, N)`` (by redefining ``__global__`` ahead of the source):
what capping the registers for N threadgroups per multiprocessor would cost in spills.

    python bench/kernel_registers.py [--min-blocks 3,4]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))

import nvrtc  # noqa: E402

from turboquant import metal  # noqa: E402

# (kernel, C, template arguments, SCRATCH) at head_dim 128, GQA 4, 3-bit keys and values:
# the shapes of bench/gpu_attention.py's sweep at 64-token tiles (R words per thread).
SHAPES = [
    ("attention_staged", 16, dict(TQ_TT=64, TQ_R=13), 1576 + 2 * 13 * 128),
    ("attention_staged", 8, dict(TQ_TT=32, TQ_R=7), 1576 + 2 * 7 * 128),
    ("attention_fast", 16, dict(TQ_U=1), 1576),
    ("attention_fast", 8, dict(TQ_U=2), 1576),
    # the tensor-core kernel: plain 3-bit, and the default recipe's key split (4- and 2-bit
    # halves, 49-byte rows), each with its copy ring of 3 stages (C: unused)
    ("attention_mma", 0, dict(TQ_NS=3), metal.mma_attention_scratch_floats(
        128, 4, 3, 3, None, 48, True, 3)),
    ("attention_mma", 0, dict(TQ_NS=3, TQ_SPLIT=1, TQ_KB0=4, TQ_KB1=2),
     metal.mma_attention_scratch_floats(128, 4, 4, 3, 2, 49, True, 3)),
]


def report(source: str) -> list[str]:
    lib = nvrtc.Nvrtc(nvrtc.library_path()).lib
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None)
    try:
        opts = [b"--device-as-default-execution-space", b"--gpu-architecture=sm_90a",
                b"-Xptxas", b"-v"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    lines = log.value.decode(errors="replace").splitlines()
    if rc != 0:
        return ["compile failed: " + " | ".join(lines[-3:])]
    return [ln.split(":", 1)[-1].strip() for ln in lines if "registers" in ln or "spill" in ln]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-blocks", default="", help="comma-separated threadgroups per SM")
    a = ap.parse_args(argv)
    if nvrtc.library_path() is None:
        ap.error("needs libnvrtc (pip install nvidia-cuda-nvrtc)")
    bounds = [None] + [int(x) for x in a.min_blocks.split(",") if x]
    for key, c, extra, scratch in SHAPES:
        args = dict(dict(TQ_D=128, TQ_GM=4, TQ_C=c, TQ_KB0=3, TQ_KB1=3, TQ_VB=3, TQ_SPLIT=0),
                    **extra)
        src = nvrtc.mlx_cuda_source([key], templates=args).replace(
            f"constexpr int SCRATCH = {nvrtc.CHECK_SCRATCH};", f"constexpr int SCRATCH = {scratch};")
        for mb in bounds:
            pre = "" if mb is None else metal.launch_bounds_header(mb)
            what = f"split={args['TQ_SPLIT']}" if key == "attention_mma" else f"C={c:2d}"
            print(f"{key:17s} {what} min_blocks={mb or '-'}: " + "; ".join(report(pre + src)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
