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

from metal_args import ARG_TYPES

from turboquant import cuda_cache, metal

# What mlx's default header provides that the generated wrapper needs (utils.cuh brings the
# fixed-width integers; the wrapper opens a cooperative_groups alias).
_MLX_PRELUDE = cuda_cache._PRELUDE

# Scratch floats the templated attention kernels are compiled with here: the largest a
# cache asks for (head_dim 512, GQA 16, 64-token blocks, 8-bit codes: 9,728 floats, 38 KB,
# under CUDA's 48 KB of static shared memory per block).
CHECK_SCRATCH = 16 * 512 + 256 + 256 + 256 + 16 * 64


def library_path() -> str | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (CUDA 13 or 12 layout), or None."""
    return cuda_cache.wheel_nvrtc_path()


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


class Nvrtc(cuda_cache.Nvrtc):
    def compile(self, source: str, arch: str = "compute_90a", ptx_text: list | None = None
                ) -> tuple[bool, str, int]:
        """(success, compiler log, PTX bytes) of one program; the PTX itself is appended to
        ``ptx_text`` when given."""
        ok, log, ptx, _ = super().compile(source, arch)
        if ok and ptx_text is not None:
            ptx_text.append(ptx.decode(errors="replace"))
        return ok, log, len(ptx) if ok else 0
