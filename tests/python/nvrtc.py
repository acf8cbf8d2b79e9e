"""NVRTC, the CUDA runtime compiler that mlx's ``mx.fast.cuda_kernel`` uses, driven through
ctypes from the ``nvidia-cuda-nvrtc`` wheel (a test extra on Linux x86-64): it compiles CUDA
C++ to PTX without a GPU, so the CUDA target of the kernel sources is checked where CI runs.

:func:`mlx_cuda_source` assembles each kernel the way mlx's ``cuda_kernel`` does
(mlx/backend/cuda/custom_kernel.cpp ``build_kernel``: its default header, our header, then
``namespace mlx::core::cu { __global__ void custom_kernel_NAME(const T* in..., T* out...) {
constexpr template args; source } }``), with mlx's default header (utils.cuh, cooperative
groups) replaced by the few names the wrapper itself uses, and compiles it with the options
mlx passes (``--device-as-default-execution-space``, ``--gpu-architecture``).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

from metal_args import ARG_TYPES

from turboquant import metal

# What mlx's default header provides that the generated wrapper needs (utils.cuh brings the
# fixed-width integers; the wrapper opens a cooperative_groups alias).
_MLX_PRELUDE = (
    "typedef unsigned char uint8_t;\n"
    "typedef unsigned short uint16_t;\n"
    "typedef unsigned int uint32_t;\n"
    "namespace cooperative_groups {}\n"
)

# Scratch floats the templated attention kernels are compiled with here: the largest a
# cache asks for (head_dim 512, GQA 16, 64-token blocks, 8-bit codes: 9,728 floats, 38 KB,
# under CUDA's 48 KB of static shared memory per block).
CHECK_SCRATCH = 16 * 512 + 256 + 256 + 256 + 16 * 64


def library_path() -> str | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (CUDA 13 or 12 layout), or None."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for pattern in ("cu13/lib/libnvrtc.so.*", "cuda_nvrtc/lib/libnvrtc.so.*"):
            found = sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p)
            if found:
                return found[0]
    return None


def mlx_cuda_source(keys=None, source_of=None, templates: dict | None = None,
                    rounds: int = 2) -> str:
    """One translation unit holding every kernel of ``metal.KERNELS`` (or ``keys``) as mlx's
    cuda_kernel generates it; ``source_of(spec)`` may replace a kernel's body (tests),
    ``templates`` give template arguments other than the specs' defaults, ``rounds`` the
    rotation's Hadamard rounds (metal.kernel_header)."""
    keys = list(keys or metal.KERNELS)
    # One kernel: the header it is built with on the GPU (its files, compacted, pruned to
    # what its body reaches); several: every file.
    header = (metal.kernel_text(keys[0], "cuda", rounds)[0] if len(keys) == 1
              else metal.kernel_header("cuda", rounds=rounds))
    parts = [_MLX_PRELUDE, header,
             "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"]
    for key in keys:
        spec = metal.KERNELS[key]
        args = [f"    const {ARG_TYPES[n]}* {n}" for n in spec.input_names]
        args += [f"    {ARG_TYPES[n]}* {n}" for n in spec.output_names]
        templated = "SCRATCH" in spec.source
        consts = f"  constexpr int SCRATCH = {CHECK_SCRATCH};\n" if templated else ""
        chosen = dict(spec.templates)
        chosen.update({k: v for k, v in (templates or {}).items() if k in chosen})
        consts += "".join(f"  constexpr int {k} = {v};\n" for k, v in chosen.items())
        body = spec.source_for("cuda") if source_of is None else source_of(spec)
        parts.append(f"__global__ void custom_kernel_{spec.name}(\n" + ",\n".join(args)
                     + ") {\n" + consts + body + "\n}\n\n")
    parts.append("} // namespace mlx::core::cu\n")
    return "".join(parts)


class Nvrtc:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)

    def compile(self, source: str, arch: str = "compute_90a", ptx_text: list | None = None
                ) -> tuple[bool, str, int]:
        """(success, compiler log, PTX bytes) of one program; the PTX itself is appended to
        ``ptx_text`` when given."""
        lib = self.lib
        prog = ctypes.c_void_p()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"turboquant.cu", 0,
                                    None, None)
        if rc != 0:
            raise RuntimeError(f"nvrtcCreateProgram failed ({rc})")
        try:
            opts = [b"--device-as-default-execution-space", f"--gpu-architecture={arch}".encode()]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            ptx = 0
            if rc == 0:
                psize = ctypes.c_size_t()
                lib.nvrtcGetPTXSize(prog, ctypes.byref(psize))
                ptx = psize.value
                if ptx_text is not None:
                    buf = ctypes.create_string_buffer(ptx)
                    lib.nvrtcGetPTX(prog, buf)
                    ptx_text.append(buf.value.decode(errors="replace"))
            return rc == 0, log.value.decode(errors="replace"), ptx
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
