"""The Metal backend as seen from a machine without it, and the mlx kernel sources.

On Linux: the backend list is ["cpu"], asking for "metal" fails clearly, the mlx path is
"cpu". Everywhere: the mlx kernel strings (python/turboquant/metal.py) are built from the
same metal/*.metal files as the C++ backend, their parameter blocks match the structs of
common.metal, and each mlx kernel, wrapped the way mx.fast.metal_kernel wraps it, compiles
as C++ through metal/metal_compat.h (the kernels' behaviour is tested by
tests/cpp/test_metal_emulation.cpp on the emulated GPU).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import turboquant
from turboquant import gpu_path
from turboquant import _core, metal
from metal_args import ARG_TYPES

ROOT = Path(__file__).resolve().parents[2]
NOT_MAC = sys.platform != "darwin"
# The emulator's fibers use ucontext, which macOS gates behind _XOPEN_SOURCE.
EMU_FLAGS = [] if NOT_MAC else ["-D_XOPEN_SOURCE=700", "-D_DARWIN_C_SOURCE",
                                 "-Wno-deprecated-declarations"]


@pytest.mark.skipif(not NOT_MAC, reason="the Linux/Windows behaviour; a Mac may have Metal")
def test_backends_without_metal(monkeypatch):
    monkeypatch.delenv("TURBOQUANT_BACKEND", raising=False)
    assert turboquant.backends() == ["cpu"]
    assert _core.resolve_backend("auto") == "cpu"
    assert _core.resolve_backend("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="Metal is not available on this platform"):
        _core.resolve_backend("metal")
    monkeypatch.setenv("TURBOQUANT_BACKEND", "metal")
    with pytest.raises(RuntimeError, match="Metal is not available on this platform"):
        _core.resolve_backend("auto")
    with pytest.raises(ValueError, match="backend must be 'auto', 'cpu' or 'metal'"):
        _core.resolve_backend("cuda")


def test_build_info_reports_the_mlx_path():
    info = turboquant.build_info()
    assert info["mlx_kernels"] in ("cpu", "metal")
    assert info["mlx_kernels"] == gpu_path.active_path()
    if NOT_MAC:
        assert info["mlx_kernels"] == "cpu"
        assert "metal" not in info["backends"]


def test_selection_rule():
    assert metal.select_path("darwin", True, True) == "metal"
    assert metal.select_path("darwin", True, True, "auto") == "metal"
    assert metal.select_path("darwin", True, True, "cpu") == "cpu"
    assert metal.select_path("darwin", False, True) == "cpu"
    assert metal.select_path("darwin", True, False) == "cpu"
    assert metal.select_path("linux", True, True) == "cpu"
    with pytest.raises(ValueError, match="TURBOQUANT_MLX_KERNELS"):
        metal.select_path("darwin", True, True, "gpu")


@pytest.mark.skipif(not NOT_MAC, reason="checks the refusal where Metal is absent")
def test_mlx_kernels_refuse_without_a_gpu():
    q = turboquant.Quantizer("turboquant_mse", 64, 3, 0, rotation="hadamard")
    with pytest.raises(RuntimeError, match="no GPU kernel path on this platform"):
        metal.encode(q, np.zeros((1, 64), np.float32))


def test_header_is_the_kernel_files_in_order():
    header = metal.kernel_header()
    assert metal.source_dir() == ROOT / "metal" or (metal.source_dir() / "common.metal").is_file()
    last = -1
    for name in metal.KERNEL_FILES:
        text = (metal.source_dir() / name).read_text(encoding="utf-8")
        at = header.find(text)
        assert at > last, name
        last = at
    for define in ("TQ_SINGLE_SOURCE", "TQ_NO_ENTRY_POINTS"):
        assert f"#define {define} 1" in header
    assert "#define TQ_PARAMS const device" in header and "#define TQ_TABLE const device" in header


def _struct_fields(header, name):
    body = re.search(r"struct %s \{(.*?)\};" % name, header, re.S).group(1)
    return re.findall(r"^\s*(uint|float) (\w+);", body, re.M)


def test_parameter_blocks_match_the_metal_structs():
    header = metal.kernel_header()
    blocks = {
        "TqEncodeParams": metal.encode_params(3, 128, 3, True),
        "TqRotateParams": metal.rotate_params(3, 128),
        "TqPermuteParams": metal.permute_params(3, 128, 1, 3),
        "TqCentreParams": metal.centre_params(3, 128, 1, False, True),
        "TqDequantParams": metal.dequant_params(3, 128, 3, True, True, False),
        "TqAttnParams": metal.attention_params(128, 100, 120, 64, 4, 3, 4, True, 0.125),
        "TqReduceParams": metal.reduce_params(128, 2, 4, True),
    }
    for struct, words in blocks.items():
        fields = _struct_fields(header, struct)
        assert words.dtype == np.uint32 and len(words) == len(fields), struct
    attn = dict(zip([f for _, f in _struct_fields(header, "TqAttnParams")],
                    metal.attention_params(128, 100, 120, 64, 4, 3, 4, True, 0.125)))
    assert attn["num_blocks"] == 2 and attn["k_code_bytes"] == 48 and attn["v_code_bytes"] == 64
    assert np.array([attn["scale"]], np.uint32).view(np.float32)[0] == np.float32(0.125)
    assert metal.attention_scratch_floats(128, 7, 64, 3, 4) == 2 * 7 * 128 + 8 + 16 + 7 * 64 + 3 * 7


@pytest.mark.parametrize("path", ["metal", "cuda"])
def test_attention_blocks_cover_every_tile_and_cap_long_contexts(monkeypatch, path):
    monkeypatch.setattr(metal, "candidate_path", lambda: path)
    groups = metal.ATTENTION_GROUPS_CUDA if path == "cuda" else metal.ATTENTION_GROUPS
    assert metal.attention_blocks(1 << 20, 64, 8) == min(metal.REDUCE_CACHED_BLOCKS, groups // 8)
    for kv_heads in (1, 3, 8, 32):
        cap = max(1, min(metal.REDUCE_CACHED_BLOCKS, -(-groups // kv_heads)))
        for tokens in (1, 63, 64, 65, 4096, 32768, 131072, 1 << 20):
            tiles = -(-tokens // 64)
            nb = metal.attention_blocks(tokens, 64, kv_heads)
            per = -(-tiles // nb)  # tq_tiles_per_block
            assert 1 <= nb <= min(tiles, cap)
            assert nb * per >= tiles and (nb - 1) * per < tiles  # all covered, none empty
            if tiles <= cap:
                assert nb == tiles  # one tile per block below the cap


def mlx_style_translation_unit() -> str:
    """Each mlx kernel as mx.fast.metal_kernel assembles it (header, then a function whose
    body is the source), compiled here as C++ through metal_compat.h."""
    lines = ['#include "metal_compat.h"', metal.kernel_header()]
    for spec in metal.KERNELS.values():
        params = [f"const device {ARG_TYPES[n]}* {n}" for n in spec.input_names]
        params += [f"device {ARG_TYPES[n]}* {n}" for n in spec.output_names]
        params += ["uint3 threadgroup_position_in_grid", "uint thread_index_in_threadgroup",
                   "uint3 threads_per_threadgroup"]
        # Template arguments as mx.fast.metal_kernel declares them (template <int ...>).
        names = (["SCRATCH"] if "SCRATCH" in spec.source else []) + [k for k, _ in spec.templates]
        values = ([1024] if "SCRATCH" in spec.source else []) + [v for _, v in spec.templates]
        decl = ", ".join(f"int {n}" for n in names)
        lines.append((f"template <{decl}>\n" if names else "")
                     + f"void {spec.name}({', '.join(params)}) {{\n{spec.source}}}")
        if names:
            args = ", ".join(map(str, values))
            lines.append(f"template void {spec.name}<{args}>({', '.join(params)});")
    return "\n".join(lines) + "\n"


def test_mlx_kernel_sources_compile_against_the_bodies(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed to check the kernel sources"
    src = tmp_path / "mlx_kernels.cpp"
    src.write_text(mlx_style_translation_unit())
    flags = ["-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *EMU_FLAGS,
             f"-I{ROOT / 'metal'}"]
    r = subprocess.run([cxx, *flags, str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    # The check can fail: a source calling a body with a wrong argument does not compile.
    broken = mlx_style_translation_unit().replace("tq_rotate_body(x, y, signs,",
                                                  "tq_rotate_body(x, signs,")
    src.write_text(broken)
    r = subprocess.run([cxx, *flags, str(src)], capture_output=True, text=True)
    assert r.returncode != 0


# --- The mlx kernels, run on the emulated GPU -----------------------------------------------
# Each mlx kernel is wrapped as mx.fast.metal_kernel wraps it and launched with mlx's grid
# semantics (grid = threads, not threadgroups) on the emulator of metal_compat.h, with the
# very parameter arrays metal.py builds: this checks the wiring of the mlx path (argument
# order, parameter blocks, thread ids) end to end against the CPU core.

_NP_TYPES = {np.float32: "float", np.uint8: "uint8_t", np.uint16: "uint16_t", np.uint32: "uint32_t"}


def _emulated_program(kernels):
    """C++ program: `prog NAME in0 .. inK out0 .. outM` runs kernel NAME on files."""
    lines = ['#include "metal_compat.h"', "#include <cstdio>", "#include <fstream>",
             "#include <iterator>", "#include <string>", "#include <vector>", metal.kernel_header()]
    lines.append("static std::vector<char> load(const char* p) {"
                 " std::ifstream f(p, std::ios::binary);"
                 " return {std::istreambuf_iterator<char>(f), {}}; }")
    lines.append("static void save(const char* p, const std::vector<char>& v) {"
                 " std::ofstream f(p, std::ios::binary);"
                 " f.write(v.data(), static_cast<std::streamsize>(v.size())); }")
    body_lines = ["int main(int argc, char** argv) { (void)argc; const std::string name = argv[1];"]
    for k in kernels:
        spec = metal.KERNELS[k["kernel"]]
        n_in, n_out = len(spec.input_names), len(spec.output_names)
        params = [f"const device {k['types'][n]}* {n}" for n in spec.input_names]
        params += [f"device {k['types'][n]}* {n}" for n in spec.output_names]
        params += ["uint3 threadgroup_position_in_grid", "uint thread_index_in_threadgroup",
                   "uint3 threads_per_threadgroup"]
        fn = f"{spec.name}_{k['id']}"
        templ = k.get("template", {})
        body = spec.source
        for t, v in templ.items():
            body = body.replace(t, str(v))
        lines.append(f"static void {fn}({', '.join(params)}) {{\n{body}}}")
        grid, tg = k["grid"], k["threadgroup"]
        groups = [grid[i] // tg[i] for i in range(3)]
        args = [f"({'const ' if i < n_in else ''}{k['types'][n]}*)buf[{i}].data()"
                for i, n in enumerate(spec.input_names + spec.output_names)]
        sizes = ", ".join(str(s) for s in k["out_bytes"])
        body_lines.append(
            f"  if (name == \"{k['id']}\") {{ std::vector<std::vector<char>> buf;"
            f" for (int i = 0; i < {n_in}; ++i) buf.push_back(load(argv[2 + i]));"
            f" for (size_t s : {{{sizes}}}) buf.emplace_back(s, char(0));"
            f" metal::emu::dispatch({{{groups[0]}, {groups[1]}, {groups[2]}}}, {tg[0]},"
            f" [&](uint3 g, uint tid) {{ {fn}({', '.join(args)}, g, tid,"
            f" uint3{{{tg[0]}, 1, 1}}); }});"
            f" for (int i = 0; i < {n_out}; ++i) save(argv[2 + {n_in} + i], buf[{n_in} + i]); }}")
    body_lines.append("  return 0; }")
    return "\n".join(lines + body_lines) + "\n"


def _run(exe, tmp_path, kid, inputs, n_out):
    paths = []
    for i, a in enumerate(inputs):
        p = tmp_path / f"{kid}_in{i}.bin"
        p.write_bytes(np.ascontiguousarray(a).tobytes())
        paths.append(str(p))
    outs = [str(tmp_path / f"{kid}_out{i}.bin") for i in range(n_out)]
    r = subprocess.run([str(exe), kid, *paths, *outs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return [Path(p).read_bytes() for p in outs]


def test_mlx_kernels_on_the_emulated_gpu(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed to run the kernel sources"
    rng = np.random.default_rng(0)
    dim, kv_heads, group, tokens, stride, bt = 64, 2, 4, 75, 80, 32
    kq = turboquant.Quantizer("turboquant_mse", dim, 3, 1, rotation="hadamard")
    vq = turboquant.Quantizer("turboquant_mse", dim, 4, 2, rotation="hadamard")
    keys = rng.standard_normal((kv_heads * stride, dim)).astype(np.float32)
    values = rng.standard_normal((kv_heads * stride, dim)).astype(np.float32)
    queries = rng.standard_normal((kv_heads * group, dim)).astype(np.float32)
    kc, kn = kq.encode(keys)
    vc, vn = vq.encode(values)
    f32 = lambda a: np.asarray(a, np.float32).ravel()  # noqa: E731
    k_signs, v_signs = f32(kq.rotation_parameters()), f32(vq.rotation_parameters())
    k_cents, v_cents = f32(kq.codebook.centroids), f32(vq.codebook.centroids)
    t = metal.threads_for(dim)
    blocks = -(-tokens // bt)
    scratch = metal.attention_scratch_floats(dim, group, bt, 3, 4)
    rows = kv_heads * stride
    kernels = [
        {"id": "encode", "kernel": "encode", "types": ARG_TYPES, "grid": (rows * t, 1, 1),
         "threadgroup": (t, 1, 1), "out_bytes": [rows * kq.code_bytes, rows * 2]},
        {"id": "rotate", "kernel": "rotate", "types": ARG_TYPES, "grid": (kv_heads * group * t, 1, 1),
         "threadgroup": (t, 1, 1), "out_bytes": [kv_heads * group * dim * 4]},
        {"id": "block", "kernel": "attention_block", "types": ARG_TYPES,
         "template": {"SCRATCH": scratch},
         "grid": (blocks * metal.ATTENTION_THREADS, kv_heads, 1),
         "threadgroup": (metal.ATTENTION_THREADS, 1, 1),
         "out_bytes": [kv_heads * blocks * group * 4] * 2 + [kv_heads * blocks * group * dim * 4]},
        {"id": "reduce", "kernel": "attention_reduce", "types": ARG_TYPES,
         "grid": (group * t, kv_heads, 1),
         "threadgroup": (t, 1, 1), "out_bytes": [kv_heads * group * dim * 4]},
    ]
    src = tmp_path / "mlx_emulated.cpp"
    src.write_text(_emulated_program(kernels))
    exe = tmp_path / "mlx_emulated"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-w", *EMU_FLAGS, f"-I{ROOT / 'metal'}", str(src),
                        "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]

    # encode: bit-exact codes and fp16 norms
    codes, norms = _run(exe, tmp_path, "encode",
                        [keys, k_signs, f32(kq.codebook.boundaries), k_cents,
                         metal.encode_params(rows, dim, 3, True)], 2)
    assert np.array_equal(np.frombuffer(codes, np.uint8).reshape(kc.shape), kc)
    assert np.array_equal(np.frombuffer(norms, np.uint16), kn.view(np.uint16))

    # decode attention: rotate, blocks, reduce, against attention on the decoded cache
    (q_rot,) = _run(exe, tmp_path, "rotate",
                    [queries, k_signs, metal.rotate_params(kv_heads * group, dim)], 1)
    scale = 1.0 / np.sqrt(dim)
    parts = _run(exe, tmp_path, "block",
                 [np.frombuffer(q_rot, np.float32), kc, kn.view(np.uint16), vc,
                  vn.view(np.uint16), k_cents, v_cents,
                  metal.attention_params(dim, tokens, stride, bt, group, 3, 4, True, scale)], 3)
    (out,) = _run(exe, tmp_path, "reduce",
                  [np.frombuffer(parts[0], np.float32), np.frombuffer(parts[1], np.float32),
                   np.frombuffer(parts[2], np.float32), v_signs,
                   metal.reduce_params(dim, blocks, group, True)], 1)
    out = np.frombuffer(out, np.float32).reshape(kv_heads, group, dim)
    k_dec = kq.decode(kc, kn).astype(np.float64).reshape(kv_heads, stride, dim)[:, :tokens]
    v_dec = vq.decode(vc, vn).astype(np.float64).reshape(kv_heads, stride, dim)[:, :tokens]
    qs = queries.astype(np.float64).reshape(kv_heads, group, dim)
    s = np.einsum("hgd,htd->hgt", qs, k_dec) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("hgt,htd->hgd", p / p.sum(-1, keepdims=True), v_dec)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_kernel_names_change_with_the_kernel_text():
    # mlx caches compiled kernels by name (CUDA: on disk across processes): a changed kernel
    # must not meet another version's compiled code under the same name.
    a = metal.kernel_name("tq_mlx_rotate", "header", "body")
    assert a.startswith("tq_mlx_rotate_") and a == metal.kernel_name("tq_mlx_rotate", "header",
                                                                     "body")
    assert a != metal.kernel_name("tq_mlx_rotate", "header", "body ")
    assert a != metal.kernel_name("tq_mlx_rotate", "header2", "body")
