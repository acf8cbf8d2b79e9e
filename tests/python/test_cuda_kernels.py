"""The CUDA target of the kernel sources, checked without a GPU: every kernel of
turboquant.metal, wrapped as mx.fast.cuda_kernel wraps it, compiles with NVRTC (the compiler
mlx uses) for the H100/H200 (sm_90a) and for older GPUs (sm_80, sm_75) with no warning; and the
dialect header (metal/cuda_compat.h) is what makes it compile. What needs an NVIDIA GPU
(tests/python/test_gpu.py, scripts/gpu-test.sh): running them."""

import platform
import re
import sys

import pytest

pytest.importorskip("mlx.core")

from nvrtc import Nvrtc, library_path, mlx_cuda_source  # noqa: E402

from turboquant import metal  # noqa: E402

# The nvidia-cuda-nvrtc wheel (a test extra) exists for Linux x86-64: there the check must
# run; on other machines (a Mac) there is no NVRTC to run it with.
NVRTC_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture(scope="module")
def nvrtc():
    path = library_path()
    if path is None:
        assert not NVRTC_EXPECTED, ("libnvrtc not found: pip install nvidia-cuda-nvrtc (a test "
                                    "extra of turboquant on Linux x86-64)")
        pytest.skip("no NVRTC wheel for this platform")
    return Nvrtc(path)


# rounds: the rotation's Hadamard rounds, 2 ("hadamard") or 1 ("hadamard1").
@pytest.mark.parametrize("rounds", [2, 1])
@pytest.mark.parametrize("arch", ["compute_90a", "compute_80", "compute_75"])
def test_every_kernel_compiles_for_cuda(nvrtc, arch, rounds):
    ok, log, ptx = nvrtc.compile(mlx_cuda_source(rounds=rounds), arch)
    assert ok, log[-6000:]
    assert "warning" not in log.lower(), log[-6000:]
    assert ptx > 10_000


@pytest.mark.parametrize("rounds", [2, 1])
def test_each_kernel_is_its_own_entry_point(nvrtc, rounds):
    for key, spec in metal.KERNELS.items():
        ok, log, _ = nvrtc.compile(mlx_cuda_source([key], rounds=rounds))
        assert ok, (key, log[-3000:])


def test_one_round_kernels_drop_the_second_transform(nvrtc):
    # The one-round rotation is the compile-time constant of the header: its PTX is another
    # program, shorter by the second transform and D₂ (the encode kernel: one FWHT less).
    texts = {}
    for rounds in (2, 1):
        ptx: list = []
        ok, log, _ = nvrtc.compile(mlx_cuda_source(["encode_heads"], rounds=rounds),
                                   ptx_text=ptx)
        assert ok, log[-3000:]
        texts[rounds] = ptx[0]
    assert texts[1] != texts[2] and len(texts[1]) < len(texts[2])


def test_fp16_loads_use_the_hardware_conversion(nvrtc):
    # On CUDA, fp16 bits (norms, fp16 rows, the mma kernel's pairs) become floats by the
    # hardware's exact conversion, not the portable arithmetic with its subnormal loop.
    for key in ("attention_reduce_rows", "attention_mma", "attention_staged"):
        ptx: list = []
        ok, log, _ = nvrtc.compile(mlx_cuda_source([key]), ptx_text=ptx)
        assert ok, (key, log[-3000:])
        assert "cvt.f32.f16" in ptx[0], key
    # Without it (the portable definition), no such instruction in the reduce.
    portable = mlx_cuda_source(["attention_reduce_rows"]).replace(
        "#define TQ_NATIVE_HALF_TO_FLOAT 1", "")
    ptx = []
    ok, log, _ = nvrtc.compile(portable, ptx_text=ptx)
    assert ok, log[-3000:]
    assert "cvt.f32.f16" not in ptx[0]


def test_the_check_can_fail(nvrtc):
    # A body calling a kernel function with a wrong argument list is a compile error...
    broken = mlx_cuda_source(source_of=lambda spec: spec.source_for("cuda").replace(
        "tq_rotate_body(x, y, signs,", "tq_rotate_body(x, signs,"))
    assert broken != mlx_cuda_source()
    ok, log, _ = nvrtc.compile(broken)
    assert not ok and "tq_rotate_body" in log
    # ...and so are the Metal names without the dialect header.
    plain = mlx_cuda_source().replace(metal.kernel_header("cuda"), metal.kernel_header("metal"))
    ok, log, _ = nvrtc.compile(plain)
    assert not ok


def test_cuda_sources_are_the_metal_sources_plus_the_thread_indices():
    for spec in metal.KERNELS.values():
        metal_src, cuda_src = spec.source_for("metal"), spec.source_for("cuda")
        assert metal_src == spec.source and cuda_src.endswith(spec.source)
        prelude = cuda_src[: -len(spec.source)]
        assert set(re.findall(r"const \w+ (\w+) =", prelude)) == {
            "threadgroup_position_in_grid", "thread_index_in_threadgroup",
            "threads_per_threadgroup"}
    header = metal.kernel_header("cuda")
    assert header.startswith("// CUDA dialect") and header.endswith(metal.kernel_header("metal"))
    with pytest.raises(ValueError, match="target must be one of"):
        metal.kernel_header("vulkan")


def _local_memory(ptx: str) -> list[str]:
    return re.findall(r"\.local\b[^\n]*", ptx)


def test_fast_attention_keeps_its_state_in_registers(nvrtc):
    # Every instance the host can pick (metal.fast_attention_shape) compiles, and its
    # per-lane arrays (queries, value sums, softmax state) are indexed at compile time only:
    # no local-memory array in the PTX (a dynamic index would put one there).
    for d in (64, 128, 256):
        for group in metal.FAST_GROUPS:
            # (keys' bits, inlier half's bits of split keys or None, values' bits)
            for kb, kb1, vb in ((1, None, 4), (2, None, 2), (3, None, 3), (4, None, 4),
                                (8, None, 5), (2, 4, 3), (3, 5, 4)):
                gm, c = metal.fast_attention_shape(d, group, kb, vb, kb1)
                args = dict(TQ_D=d, TQ_GM=gm, TQ_C=c, TQ_KB0=kb, TQ_KB1=kb1 or kb, TQ_VB=vb,
                            TQ_SPLIT=int(kb1 is not None), TQ_U=4 if gm <= 2 else 2)
                ptx = []
                ok, log, _ = nvrtc.compile(mlx_cuda_source(["attention_fast"], templates=args),
                                           ptx_text=ptx)
                assert ok, (args, log[-3000:])
                assert "warning" not in log.lower(), log[-3000:]
                assert not _local_memory(ptx[0]), (args, _local_memory(ptx[0])[:3])
                # The staged variant at the tile the host picks for these rows (fp16 norms).
                scratch = metal.fast_attention_scratch_floats(d, gm, kb, vb, kb1)
                kcb = (metal.code_bytes(d // 2, kb) + metal.code_bytes(d // 2, kb1) + 1
                       if kb1 else metal.code_bytes(d, kb))
                tile = metal.staged_attention_tile(kcb, metal.code_bytes(d, vb), True, 4096,
                                                   64, scratch)
                if tile is None:
                    continue
                args = {k: v for k, v in args.items() if k != "TQ_U"}
                args.update(TQ_TT=tile[0], TQ_R=tile[1])
                ptx = []
                ok, log, _ = nvrtc.compile(mlx_cuda_source(["attention_staged"],
                                                           templates=args), ptx_text=ptx)
                assert ok, (args, log[-3000:])
                assert "warning" not in log.lower(), log[-3000:]
                assert not _local_memory(ptx[0]), (args, _local_memory(ptx[0])[:3])


def test_the_reduce_with_rows_keeps_its_row_batch_in_registers(nvrtc):
    # attention_reduce_rows loads TQ_REDUCE_ROWS_BATCH value rows before their products: the
    # batch is indexed at compile time only, so it stays in registers (no local memory).
    ptx = []
    ok, log, _ = nvrtc.compile(mlx_cuda_source(["attention_reduce_rows"]), ptx_text=ptx)
    assert ok, log[-3000:]
    assert "warning" not in log.lower(), log[-3000:]
    assert not _local_memory(ptx[0]), _local_memory(ptx[0])[:3]


def test_the_dequantize_rows_kernels_keep_a_row_in_registers(nvrtc):
    # The rows form holds a row's 32·E coordinates as E registers per lane (E = 1..16, each
    # an instance of the switch): every index is a compile-time one, so no local memory.
    for key in ("dequantize_rows_heads", "dequantize_tile_heads", "split_dequantize_rows_heads",
                "split_dequantize_tile_heads"):
        for rounds in (2, 1):
            ptx = []
            ok, log, _ = nvrtc.compile(mlx_cuda_source([key], rounds=rounds), ptx_text=ptx)
            assert ok, (key, log[-3000:])
            assert "warning" not in log.lower(), log[-3000:]
            assert not _local_memory(ptx[0]), (key, rounds, _local_memory(ptx[0])[:3])


def test_the_register_check_can_fail(nvrtc):
    source = ("__global__ void probe(const float* x, float* y) {\n"
              "  float a[16];\n"
              "  for (int i = 0; i < 16; ++i) a[i] = x[i];\n"
              "  y[0] = a[threadIdx.x % 16];\n}\n")
    ptx = []
    ok, log, _ = nvrtc.compile(source, ptx_text=ptx)
    assert ok, log
    assert _local_memory(ptx[0])


def test_the_mma_kernel_compiles_with_launch_bounds(nvrtc):
    # TQ_GPU_MMA_MIN_BLOCKS: the header's redefinition of __global__ reaches the kernel mlx
    # declares after it (the PTX carries the bounds); without it there are none.
    src = mlx_cuda_source(["attention_mma"])
    bounded = src.replace("namespace mlx::core::cu {", metal.launch_bounds_header(4)
                          + "namespace mlx::core::cu {", 1)
    for text, want in ((src, False), (bounded, True)):
        ptx = []
        ok, log, _ = nvrtc.compile(text, ptx_text=ptx)
        assert ok, log[-3000:]
        assert ("minnctapersm 4" in ptx[0]) == want
