"""turboquant.cuda_cache without a GPU: mlx's module names (libstdc++'s std::hash of the source
mlx generates), the generated source, the files written for mlx's disk cache (a real kernel
compiled to a cubin by NVRTC), when a launch writes them, and that the cache stays off where
it cannot be proven. What needs a CUDA device (test_gpu.py): that mlx loads these files."""

import importlib.util
import platform
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from turboquant import cuda_cache, metal  # noqa: E402

NVRTC_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"


def test_std_hash_is_libstdcxx():
    # std::hash<std::string> of g++ 11-13 (libstdc++, x86-64) for these strings
    known = {b"": 0x553e93901e462a6e, b"a": 0x454ddee488c1ed6b, b"hello": 0x26553298fdbe39c8,
             b"0123456789abcdef": 0x934b0d760642ed86,
             b'custom_kernel_x\n#include "a.h"\nnamespace mlx::core::cu {}\n':
                 0x6f8bf238a51d3533}
    for data, value in known.items():
        assert cuda_cache.std_hash(data) == value, data


def test_the_source_is_the_one_mlx_builds():
    """mlx 0.32's custom_kernel.cpp build_kernel, for two inputs, two outputs and two int
    template arguments."""
    got = cuda_cache.mlx_kernel_source(
        "custom_kernel_k_3_4", '#include "/h.h"\n', "out[0] = a[0];",
        [("a", "float"), ("p", "uint32_t")], [("out", "float"), ("n", "uint16_t")],
        [("S", 3), ("T", 4)])
    want = ('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>'
            '\n\n#include "/h.h"\nnamespace mlx::core::cu {\n\nnamespace cg = '
            'cooperative_groups;\n\n__global__ void custom_kernel_k_3_4(\n    const float* a,\n'
            '    const uint32_t* p,\n    float* out,\n    uint16_t* n) {\n  constexpr int S = 3;\n'
            '  constexpr int T = 4;\n\nout[0] = a[0];\n}\n\n} // namespace mlx::core::cu\n')
    assert got == want
    # bool and NumPy integer arguments as mlx takes them (its fmt prints true / false)
    flags = cuda_cache.mlx_kernel_source("f", "", "", [], [("out", "float")],
                                         [("A", np.int64(7)), ("B", True), ("C", False)])
    assert ("  constexpr int A = 7;\n  constexpr bool B = true;\n"
            "  constexpr bool C = false;\n") in flags
    assert cuda_cache._template_suffix([("A", np.int64(7)), ("B", True), ("C", False)]) == \
        "_7_t_f"
    assert cuda_cache._template_suffix([("T", mx.float16)]) is None
    name = cuda_cache.module_name("custom_kernel_k_3_4", got)
    assert name == f"custom_kernel_k_3_4_{cuda_cache.std_hash(got.encode()):x}"
    # a body naming an input's shape gets arguments this module does not build
    assert cuda_cache.mlx_kernel_source("f", "", "a_shape[0];", [("a", "float")],
                                        [("out", "float")]) is None


def test_long_module_names_become_folders(tmp_path):
    name = "m" * 600
    path = cuda_cache._module_path(tmp_path, name)
    assert path == tmp_path / ("m" * 245) / ("m" * 245) / ("m" * 110 + ".ptx")


@pytest.fixture
def nvrtc():
    path = cuda_cache.wheel_nvrtc_path()
    if path is None:
        assert not NVRTC_EXPECTED, "libnvrtc not found: pip install nvidia-cuda-nvrtc"
        pytest.skip("no NVRTC wheel for this platform")
    return cuda_cache.Nvrtc(path)


@pytest.fixture
def cache(monkeypatch, tmp_path, nvrtc):
    """A cache proven on (as the probe would on a CUDA device), writing under tmp_path."""
    c = cuda_cache._Cache()
    c.state, c.nvrtc, c.folder = "on", nvrtc, tmp_path
    monkeypatch.setattr(cuda_cache, "_CACHE", c)
    monkeypatch.setattr(cuda_cache, "_ARCH", "sm_90a")
    return c


class FakeKernel:
    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)
        return ["result"]


def cached_kernel(key, monkeypatch, tmp_path):
    monkeypatch.setenv("TQ_GPU_HEADER_DIR", str(tmp_path / "headers"))
    fake = FakeKernel()
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: fake)
    kernel = metal.build_kernel(key, "cuda")
    assert isinstance(kernel, cuda_cache.CachedKernel) and kernel.kernel is fake
    return kernel, fake


def modules(folder):
    return sorted(p.name for p in folder.glob("*.ptx"))


def test_a_launch_writes_its_module_once(cache, monkeypatch, tmp_path):
    """A real kernel (the reduce with fp16 rows) compiled to a cubin for sm_90a under mlx's
    module name, with its symbol; the same launch again, or a new process finding the files,
    compiles nothing; a new template argument is a new module; the call reaches the kernel
    unchanged."""
    kernel, fake = cached_kernel("attention_block", monkeypatch, tmp_path)
    x = mx.zeros((4,), mx.float32)
    inputs = [x, mx.zeros((4,), mx.uint8), mx.zeros((4,), mx.uint16), mx.zeros((4,), mx.uint8),
              mx.zeros((4,), mx.uint16), x, x, mx.zeros((4,), mx.uint32)]
    template = [("SCRATCH", 1024)]
    launch = dict(inputs=inputs, output_shapes=[(1,)] * 3, output_dtypes=[mx.float32] * 3,
                  grid=(32, 1, 1), threadgroup=(32, 1, 1), template=template)
    assert kernel(**launch) == ["result"] and fake.calls[-1] == launch
    (ptx,) = modules(cache.folder)
    function = f"custom_kernel_{kernel.function[len('custom_kernel_'):]}_1024"
    assert ptx.startswith(function + "_")
    binary = (cache.folder / ptx).read_bytes()
    assert binary[:4] == b"\x7fELF"  # a cubin, not PTX text
    name, symbol = (cache.folder / ptx).with_suffix(".txt").read_text().rstrip("\n").split("\t")
    assert name == "mlx::core::cu::" + function and symbol.startswith("_ZN3mlx4core2cu")
    # the name is mlx's: std::hash of the source mlx generates for these arrays
    header, source = kernel.header, kernel.source
    spec = metal.KERNELS["attention_block"]
    mlx_src = cuda_cache.mlx_kernel_source(
        function, header, source,
        list(zip(spec.input_names, ["float", "uint8_t", "uint16_t", "uint8_t", "uint16_t",
                                    "float", "float", "uint32_t"])),
        list(zip(spec.output_names, ["float"] * 3)), template)
    assert ptx == cuda_cache.module_name(function, mlx_src) + ".ptx"
    assert cache.written == 1
    kernel(**launch)
    kernel(**dict(launch, template=list(template)))  # equal, another object: checked, found
    assert cache.written == 1 and len(fake.calls) == 3
    again, _ = cached_kernel("attention_block", monkeypatch, tmp_path)  # a new process
    again(**launch)
    assert cache.written == 1 and cache.found >= 1
    kernel(**dict(launch, template=[("SCRATCH", 2048)]))
    assert cache.written == 2 and len(modules(cache.folder)) == 2


def test_the_default_decode_kernel_with_fp16_norms(cache, monkeypatch, tmp_path):
    """The mma block kernel as a decode step launches it with the default recipe: norms in
    float16 (mlx declares them ``const __half*``; the kernel reads them as bits)."""
    kernel, fake = cached_kernel("attention_mma", monkeypatch, tmp_path)
    spec = metal.KERNELS["attention_mma"]
    f32, u8, f16 = (mx.zeros((4,), t) for t in (mx.float32, mx.uint8, mx.float16))
    inputs = [f32, f32, u8, f16, u8, f16, f32, f32, f32, mx.zeros((4,), mx.uint32)]
    template = [("SCRATCH", 4096)] + list(spec.templates)
    kernel(inputs=inputs, output_shapes=[(1,)] * 3, output_dtypes=[mx.float32] * 3,
           grid=(128, 1, 1), threadgroup=(128, 1, 1), template=template)
    (ptx,) = modules(cache.folder)
    assert (cache.folder / ptx).read_bytes()[:4] == b"\x7fELF" and len(fake.calls) == 1
    types = ["float", "float", "uint8_t", "__half", "uint8_t", "__half", "float", "float",
             "float", "uint32_t"]
    function = kernel.function + "".join(f"_{v}" for _, v in template)
    mlx_src = cuda_cache.mlx_kernel_source(function, kernel.header, kernel.source,
                                           list(zip(spec.input_names, types)),
                                           list(zip(spec.output_names, ["float"] * 3)), template)
    assert "    const __half* k_norms,\n" in mlx_src
    assert ptx == cuda_cache.module_name(function, mlx_src) + ".ptx"


def test_launches_it_cannot_name_are_left_to_mlx(cache, monkeypatch, tmp_path):
    """complex64 arrays (a type the prelude does not declare), a body that does not compile
    with the arrays' types, and a cache that is off write nothing; the call still runs."""
    kernel, fake = cached_kernel("permute", monkeypatch, tmp_path)
    launch = dict(inputs=[mx.zeros((4,), mx.complex64), mx.zeros((4,), mx.uint32),
                          mx.zeros((4,), mx.uint32)],
                  output_shapes=[(4,)], output_dtypes=[mx.uint16], grid=(256, 1, 1),
                  threadgroup=(256, 1, 1))
    kernel(**launch)
    assert modules(cache.folder) == [] and len(fake.calls) == 1
    halves, fake_h = cached_kernel("permute", monkeypatch, tmp_path)  # the body takes ushort*
    halves(**dict(launch, inputs=[mx.zeros((4,), mx.float16)] + launch["inputs"][1:]))
    assert modules(cache.folder) == [] and len(fake_h.calls) == 1
    bits = dict(launch, inputs=[mx.zeros((4,), mx.uint16)] + launch["inputs"][1:])
    cache.state = "off (TQ_CUDA_KERNEL_CACHE=0)"
    off, fake_off = cached_kernel("permute", monkeypatch, tmp_path)
    off(**bits)
    assert modules(cache.folder) == [] and len(fake_off.calls) == 1
    cache.state = "on"
    on, fake_on = cached_kernel("permute", monkeypatch, tmp_path)
    on(**bits)
    assert len(modules(cache.folder)) == 1 and len(fake_on.calls) == 1


def test_a_process_that_compiles_says_so_once(cache, monkeypatch, tmp_path, capfd):
    """The first compile of a process prints one line on stderr (the first generation waits
    for NVRTC); a second module, or one found in the folder, adds none; with
    TQ_CUDA_KERNEL_CACHE_QUIET=1 there is none."""
    x = mx.zeros((4,), mx.float32)
    inputs = [x, mx.zeros((4,), mx.uint8), mx.zeros((4,), mx.uint16), mx.zeros((4,), mx.uint8),
              mx.zeros((4,), mx.uint16), x, x, mx.zeros((4,), mx.uint32)]
    launch = dict(inputs=inputs, output_shapes=[(1,)] * 3, output_dtypes=[mx.float32] * 3,
                  grid=(32, 1, 1), threadgroup=(32, 1, 1), template=[("SCRATCH", 1024)])
    monkeypatch.delenv("TQ_CUDA_KERNEL_CACHE_QUIET", raising=False)
    kernel, _ = cached_kernel("attention_block", monkeypatch, tmp_path)
    kernel(**launch)
    kernel(**dict(launch, template=[("SCRATCH", 2048)]))  # another module, compiled too
    assert cache.written == 2
    err = capfd.readouterr().err
    assert err.count("turboquant: compiling CUDA kernels for sm_90a") == 1, err
    assert str(cache.folder) in err
    fresh = cuda_cache._Cache()  # a new process: the modules are found, nothing compiled
    fresh.state, fresh.nvrtc, fresh.folder = "on", cache.nvrtc, cache.folder
    monkeypatch.setattr(cuda_cache, "_CACHE", fresh)
    again, _ = cached_kernel("attention_block", monkeypatch, tmp_path)
    again(**launch)
    assert fresh.found == 1 and fresh.written == 0 and capfd.readouterr().err == ""
    monkeypatch.setenv("TQ_CUDA_KERNEL_CACHE_QUIET", "1")
    quiet, _ = cached_kernel("attention_block", monkeypatch, tmp_path)
    quiet(**dict(launch, template=[("SCRATCH", 4096)]))
    assert fresh.written == 1 and capfd.readouterr().err == ""


def test_a_kernel_that_does_not_compile_writes_nothing(cache):
    function = "custom_kernel_broken"
    mlx_src = cuda_cache.mlx_kernel_source(function, "", "out[0] = nope;", [("x", "float")],
                                           [("out", "float")])
    own = cuda_cache.mlx_kernel_source(function, "", "out[0] = nope;", [("x", "float")],
                                       [("out", "float")], prelude=cuda_cache._PRELUDE)
    assert cache.write(function, mlx_src, own) is False
    assert list(cache.folder.iterdir()) == []


def test_the_cache_is_off_where_it_cannot_be_proven(monkeypatch):
    """No mlx CUDA device here (or the switch off): the probe says why, nothing is written,
    and build_info has no cache entry off the CUDA path."""
    import turboquant

    for env, why in (("1", "no mlx CUDA device"), ("0", "TQ_CUDA_KERNEL_CACHE=0")):
        monkeypatch.setattr(cuda_cache, "_CACHE", cuda_cache._Cache())
        monkeypatch.setenv("TQ_CUDA_KERNEL_CACHE", env)
        if env == "1" and mx.cuda.is_available():
            pytest.skip("a CUDA device is here: test_gpu.py proves the cache on it")
        assert cuda_cache.probe() == f"off ({why})"
        assert not cuda_cache.enabled()
        assert cuda_cache.status()["state"] == f"off ({why})"
    if metal.candidate_path() != "cuda":
        assert "cuda_kernel_cache" not in turboquant.build_info()


def test_kernel_names_carry_the_architecture(monkeypatch, tmp_path):
    """mlx's module names carry no GPU architecture: the CUDA path's kernel names do, so a
    cache folder that held another GPU's cubins is never read for this one; without a CUDA
    device (here) the names are as before."""
    monkeypatch.setattr(cuda_cache, "_ARCH", "sm_90a")
    h100, _ = cached_kernel("permute", monkeypatch, tmp_path)
    monkeypatch.setattr(cuda_cache, "_ARCH", "sm_80")
    a100, _ = cached_kernel("permute", monkeypatch, tmp_path)
    assert h100.function.endswith("_sm90a") and a100.function.endswith("_sm80")
    assert h100.function[:-len("_sm90a")] == a100.function[:-len("_sm80")]
    monkeypatch.setattr(cuda_cache, "_ARCH", None)
    if not mx.cuda.is_available():
        assert cuda_cache.device_arch() == "" and cuda_cache.arch_suffix() == ""
        plain, _ = cached_kernel("permute", monkeypatch, tmp_path)
        assert plain.function == h100.function[:-len("_sm90a")]


MLX_HEADERS = Path(__file__).resolve().parents[1] / "data" / "mlx_cuda_headers"


def cuda_headers():
    """The CUDA runtime's and CCCL's headers from the nvidia-cuda-runtime and
    nvidia-cuda-cccl wheels (test extras on Linux x86-64), as mlx compiles with them."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        inc = Path(root) / "cu13" / "include"
        if (inc / "cuda_fp16.h").is_file() and (inc / "cccl" / "cuda" / "std" / "array").is_file():
            return [inc, inc / "cccl"]
    return None


def elf_sections(data: bytes) -> dict:
    """{name: bytes} of an ELF64 file (a cubin); NOBITS sections are empty."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    table = heads[names][4]
    out = {}
    for h in heads:
        name = data[table + h[0]:data.index(b"\0", table + h[0])].decode()
        out[name] = b"" if h[1] == 8 else data[h[4]:h[4] + h[5]]
    return out


def symbol_names(sections: dict) -> list[str]:
    """The names of a cubin's symbols, by index (.symtab entries of 24 bytes)."""
    table, names = sections[".symtab"], sections[".strtab"]
    out = []
    for i in range(0, len(table), 24):
        at, = struct.unpack_from("<I", table, i)
        out.append(names[at:names.index(b"\0", at)].decode())
    return out


def kernel_info(sections: dict, symbol: str) -> list:
    """The records of the kernel's .nv.info section (its registers, parameters, barriers...)
    with a symbol index (the parameter bank's, EIATTR_PARAM_CBANK) replaced by the symbol's
    name: the index depends on what else the file holds."""
    data, names = sections[".nv.info." + symbol], symbol_names(sections)
    out, i = [], 0
    while i < len(data):
        fmt, attr = data[i], data[i + 1]
        size = struct.unpack_from("<H", data, i + 2)[0] if fmt == 4 else 2
        value = data[i + 4:i + 4 + size] if fmt == 4 else data[i + 2:i + 4]
        if attr == 0x0A:  # EIATTR_PARAM_CBANK: symbol index, offset, size
            value = (names[struct.unpack_from("<I", value)[0]], value[4:])
        out.append((fmt, attr, value))
        i += 4 + size if fmt == 4 else 4
    return out


# Launches as the store makes them: the default recipe's norms and the sinks/window rows are
# float16 arrays (mlx declares them __half), the rest as metal_args.ARG_TYPES says.
LAUNCHES = [
    ("attention_mma", {"k_norms": "__half", "v_norms": "__half"}),
    ("attention_reduce_rows", {"k_a": "__half", "v_a": "__half", "k_b": "__half",
                               "v_b": "__half"}),
    ("encode_heads", {}),
    ("permute", {}),
    ("centre", {}),
    ("attention_mma_step", {"k_norms": "__half", "v_norms": "__half"}),
    ("attention_reduce_rows_step", {"k_a": "__half", "v_a": "__half", "k_b": "__half",
                                    "v_b": "__half"}),
]


def test_cached_modules_hold_the_code_mlx_compiles(nvrtc):
    """For real launches, the source mlx builds (its device headers, CUDA's fp16/bf16 and
    CCCL headers) and the one this module compiles (a small prelude instead) give the same
    kernel: the same symbol, and the same machine code, resource info and shared memory for
    sm_90a, section by section (a symbol named by its index, by its name: the indices
    depend on what mlx's headers add for themselves, which is all that differs)."""
    from metal_args import ARG_TYPES
    from nvrtc import CHECK_SCRATCH

    inc = cuda_headers()
    if inc is None:
        assert not NVRTC_EXPECTED, ("CUDA headers not found: pip install nvidia-cuda-runtime "
                                    "nvidia-cuda-cccl (test extras of turboquant)")
        pytest.skip("no CUDA header wheels for this platform")
    options = [f"-I{MLX_HEADERS}", *(f"-I{p}" for p in inc)]
    for key, types in LAUNCHES:
        spec = metal.KERNELS[key]
        header, _ = metal.kernel_text(key, "cuda")
        source = spec.source_for("cuda")
        template = ([("SCRATCH", CHECK_SCRATCH)] if "SCRATCH" in source else []) + \
            list(spec.templates)
        ins = [(n, types.get(n, ARG_TYPES[n])) for n in spec.input_names]
        outs = [(n, types.get(n, ARG_TYPES[n])) for n in spec.output_names]
        function = "custom_kernel_" + spec.name + cuda_cache._template_suffix(template)
        full = "mlx::core::cu::" + function
        theirs = cuda_cache.mlx_kernel_source(function, header, source, ins, outs, template)
        ours = cuda_cache.mlx_kernel_source(function, header, source, ins, outs, template,
                                            prelude=cuda_cache._PRELUDE)
        ok, log, mlx_bin, mlx_names = nvrtc.compile(theirs, "sm_90a", [full], cubin=True,
                                                    options=options)
        assert ok, log[-3000:]
        ok, log, own_bin, own_names = nvrtc.compile(ours, "sm_90a", [full], cubin=True)
        assert ok, log[-3000:]
        symbol = mlx_names[full]
        assert own_names[full] == symbol, key
        a, b = elf_sections(mlx_bin), elf_sections(own_bin)
        kernel = [n for n in a if n.endswith("." + symbol)]
        assert f".text.{symbol}" in kernel and f".nv.info.{symbol}" in kernel, (key, kernel)
        for name in kernel:
            if name.startswith(".nv.info."):
                assert kernel_info(a, symbol) == kernel_info(b, symbol), key
            else:
                assert a[name] == b.get(name), (key, name)
