"""Registers, spills and shared memory of the decode-attention kernels for CUDA, without a
GPU: NVRTC (the compiler mlx's cuda_kernel uses; the nvidia-cuda-nvrtc wheel of the test
extra) compiles each kernel for sm_90a with ptxas' report (-Xptxas -v), as built on the GPU
(tests/python/nvrtc.py assembles the source as mlx does). ``--min-blocks N`` also compiles
each with ``__launch_bounds__(128, N)`` (by redefining ``__global__`` ahead of the source):
what capping the registers for N threadgroups per multiprocessor would cost in spills.

    python bench/kernel_registers.py [--min-blocks 3,4] [--sass]

``--sass`` also disassembles each build (nvdisasm, from the ``nvidia-cuda-nvdisasm`` wheel or
the CUDA toolkit) and counts the instructions of its main loop: the innermost loop that holds
tensor-core products (HMMA) or, without them, the longest loop, as written (both arms of a
branch counted), with the HMMA, shared-memory loads (LDS) and global loads (LDG) in it.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import re
import shutil
import subprocess
import sys
import tempfile
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
    # its decode step's form (queries as fp16/bf16 words through a channel order)
    ("attention_mma_step", 0, dict(TQ_NS=3, TQ_SPLIT=1, TQ_KB0=4, TQ_KB1=2),
     metal.mma_attention_scratch_floats(128, 4, 4, 3, 2, 49, True, 3)),
]


def nvdisasm_path() -> str | None:
    """nvdisasm on PATH, or the one the nvidia-cuda-nvdisasm wheel installs."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    for root in map(Path, sys.path):
        for hit in sorted(root.glob("nvidia/cu*/bin/nvdisasm")):
            return str(hit)
    return None


def main_loop(sass: str) -> str:
    """'N instructions, H HMMA, L LDS, G LDG' of the main loop of a disassembly (see above)."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = len(ins)
            pending = []
            ins.append((addr, m.group(2).strip()))
    loops = []
    for i, (_, text) in enumerate(ins):
        b = re.search(r"BRA.*?(\.L_x_\d+)", text)
        if b and b.group(1) in labels and labels[b.group(1)] <= i:
            body = [t for _, t in ins[labels[b.group(1)]:i + 1]]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                                      for t in body)
            loops.append((ops["HMMA"] > 0, len(body), ops))
    if not loops:
        return "no loop"
    # the innermost loop that holds the products (the shortest with HMMA), else the longest
    with_mma = [x for x in loops if x[0]]
    _, n, ops = (min(with_mma, key=lambda x: x[1]) if with_mma
                 else max(loops, key=lambda x: x[1]))
    return f"main loop {n} instructions, {ops['HMMA']} HMMA, {ops['LDS']} LDS, {ops['LDG']} LDG"


def report(source: str, sass: bool = False) -> list[str]:
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
        loop = None
        if sass and rc == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            cubin = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, cubin)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(cubin.raw)
                f.flush()
                out = subprocess.run([nvdisasm_path(), "-c", f.name], capture_output=True,
                                     text=True, check=True).stdout
            loop = main_loop(out)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    lines = log.value.decode(errors="replace").splitlines()
    if rc != 0:
        return ["compile failed: " + " | ".join(lines[-3:])]
    kept = [ln.split(":", 1)[-1].strip() for ln in lines if "registers" in ln or "spill" in ln]
    return kept + ([loop] if loop else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-blocks", default="", help="comma-separated threadgroups per SM")
    ap.add_argument("--sass", action="store_true", help="count the main loop's instructions")
    a = ap.parse_args(argv)
    if nvrtc.library_path() is None:
        ap.error("needs libnvrtc (pip install nvidia-cuda-nvrtc)")
    if a.sass and nvdisasm_path() is None:
        ap.error("--sass needs nvdisasm (pip install nvidia-cuda-nvdisasm)")
    bounds = [None] + [int(x) for x in a.min_blocks.split(",") if x]
    for key, c, extra, scratch in SHAPES:
        args = dict(dict(TQ_D=128, TQ_GM=4, TQ_C=c, TQ_KB0=3, TQ_KB1=3, TQ_VB=3, TQ_SPLIT=0),
                    **extra)
        src = nvrtc.mlx_cuda_source([key], templates=args).replace(
            f"constexpr int SCRATCH = {nvrtc.CHECK_SCRATCH};",
            f"constexpr int SCRATCH = {scratch};")
        for mb in bounds:
            pre = "" if mb is None else metal.launch_bounds_header(mb)
            what = f"split={args['TQ_SPLIT']}" if key.startswith("attention_mma") else f"C={c:2d}"
            print(f"{key:17s} {what} min_blocks={mb or '-'}: "
                  + "; ".join(report(pre + src, a.sass)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
