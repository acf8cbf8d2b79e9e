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
from turboquant import _core, metal

ROOT = Path(__file__).resolve().parents[2]
NOT_MAC = sys.platform != "darwin"


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
    assert info["mlx_kernels"] == metal.active_path()
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
def test_mlx_kernels_refuse_without_metal():
    q = turboquant.Quantizer("turboquant_mse", 64, 3, 0, rotation="hadamard")
    with pytest.raises(RuntimeError, match="Metal is not available on this platform"):
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
    assert metal.attention_scratch_floats(128, 7, 64, 3, 4) == 7 * 128 + 8 + 16 + 7 * 64


# Element types mx.fast.metal_kernel gives each argument (from the arrays metal.py passes).
ARG_TYPES = {
    "x": "float", "signs": "float", "boundaries": "float", "params": "uint32_t",
    "codes": "uint8_t", "norms": "uint16_t", "y": "float", "centroids": "float", "out": "float",
    "q": "float", "k_codes": "uint8_t", "k_norms": "uint16_t", "v_codes": "uint8_t",
    "v_norms": "uint16_t", "k_centroids": "float", "v_centroids": "float", "part_m": "float",
    "part_l": "float", "part_acc": "float", "v_signs": "float",
}


def mlx_style_translation_unit() -> str:
    """Each mlx kernel as mx.fast.metal_kernel assembles it (header, then a function whose
    body is the source), compiled here as C++ through metal_compat.h."""
    lines = ['#include "metal_compat.h"', metal.kernel_header()]
    for spec in metal.KERNELS.values():
        params = [f"const device {ARG_TYPES[n]}* {n}" for n in spec.input_names]
        params += [f"device {ARG_TYPES[n]}* {n}" for n in spec.output_names]
        params += ["uint3 threadgroup_position_in_grid", "uint thread_index_in_threadgroup",
                   "uint3 threads_per_threadgroup"]
        templated = "SCRATCH" in spec.source
        lines.append(("template <int SCRATCH>\n" if templated else "")
                     + f"void {spec.name}({', '.join(params)}) {{\n{spec.source}}}")
        if templated:
            lines.append(f"template void {spec.name}<1024>({', '.join(params)});")
    return "\n".join(lines) + "\n"


def test_mlx_kernel_sources_compile_against_the_bodies(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed to check the kernel sources"
    src = tmp_path / "mlx_kernels.cpp"
    src.write_text(mlx_style_translation_unit())
    flags = ["-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'metal'}"]
    r = subprocess.run([cxx, *flags, str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    # The check can fail: a source calling a body with a wrong argument does not compile.
    broken = mlx_style_translation_unit().replace("tq_rotate_body(x, y, signs,", "tq_rotate_body(x, signs,")
    src.write_text(broken)
    r = subprocess.run([cxx, *flags, str(src)], capture_output=True, text=True)
    assert r.returncode != 0
