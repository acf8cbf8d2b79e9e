"""Each GPU kernel is built with only the part of the kernel sources its body reaches
(turboquant.metal.prune_header: mlx copies a kernel's header and hashes its text at every
launch). The pruned header of every kernel must still compile: for Metal, checked here by
the emulator's C++ compiler over metal_compat.h; for CUDA, by NVRTC in test_cuda_kernels.py
(test_each_kernel_is_its_own_entry_point builds each kernel from metal.kernel_text)."""

import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

from mlx_kernel_emulator import EMU_FLAGS, _program  # noqa: E402

from turboquant import metal  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def syntax_check(program: str, tmp_path: Path, stem: str) -> subprocess.CompletedProcess:
    src = tmp_path / f"{stem}.cpp"
    src.write_text(program)
    return subprocess.run([CXX, "-std=c++20", "-fsyntax-only", "-w", *EMU_FLAGS,
                           f"-I{ROOT / 'metal'}", str(src)], capture_output=True, text=True)


def test_pruned_headers_are_smaller_and_keep_what_the_body_names():
    for key, spec in metal.KERNELS.items():
        full = metal.kernel_header("cuda", spec.files, compact=True)
        header, body = metal.kernel_text(key, "cuda")
        assert len(header) < len(full), key
        assert header.startswith(full[:full.index("#define TQ_SINGLE_SOURCE 1")]), key  # dialect
        entry = body.split("(", 1)[0].split()[-1]  # the body's *_body function
        assert f" {entry}(" in header, (key, entry)
    # The decode kernels carry less than half of their files (58 KB before pruning).
    for key in ("attention_fast", "attention_staged", "attention_reduce_rows"):
        full = metal.kernel_header("cuda", metal.KERNELS[key].files, compact=True)
        assert len(metal.kernel_text(key, "cuda")[0]) < 0.45 * len(full), key


def test_the_pruner_keeps_directives_and_reachable_definitions_only():
    header = ("// dialect\n#define TQ_SINGLE_SOURCE 1\n#define TWICE(x) tq_twice(x)\n"
              "struct TqUsed {\n  uint a;\n};\nstruct TqUnused { uint b; };\n"
              "inline uint tq_leaf(uint x) { return x + 1u; }\n"
              "inline uint tq_twice(uint x) {\n  return 2u * tq_leaf(x);\n}\n"
              "template <class T>\ninline T tq_unused(T x) {\n  return x;\n}\n"
              "inline uint tq_entry(TqUsed u) { return u.a; }\n"
              "inline uint tq_entry(uint x) { return x; }\n#endif\n")
    pruned = metal.prune_header(header, "tq_entry(x);")
    assert "TqUsed" in pruned and "tq_entry(TqUsed" in pruned and "tq_entry(uint" in pruned
    assert "tq_twice" in pruned and "tq_leaf" in pruned  # reached through a macro
    assert "TqUnused" not in pruned and "tq_unused" not in pruned
    assert pruned.startswith("// dialect\n") and pruned.endswith("#endif\n")


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("rounds", [2, 1])
@pytest.mark.parametrize("key", sorted(metal.KERNELS))
def test_each_pruned_metal_kernel_compiles(key, rounds, tmp_path):
    header, _ = metal.kernel_text(key, "metal", rounds)
    assert ("#define TQ_ROTATION_ROUNDS 1u" in header) == (rounds == 1)
    r = syntax_check(_program([key], header=header), tmp_path, f"{key}_{rounds}")
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_the_compile_check_can_fail(tmp_path):
    # A header pruned for another body lacks the attention kernel's functions.
    header = metal.prune_header(metal.kernel_header("metal", compact=True), "tq_rotate_body();")
    r = syntax_check(_program(["attention_staged"], header=header), tmp_path, "broken")
    assert r.returncode != 0 and "error" in r.stderr, r.stderr[-2000:]


def test_the_host_keeps_the_mma_kernels_angle_table_room():
    # mma_attention_scratch_floats sizes the split's angle table as the kernel lays it out
    text = (ROOT / "metal" / "attention_mma.metal").read_text(encoding="utf-8")
    assert f"#define TQ_MMA_ANGLE_FLOATS {metal.MMA_ANGLE_FLOATS}u\n" in text
    assert "? 512u" not in text  # the kernel names the define, not its value


def test_a_cuda_kernel_includes_its_header_by_path(monkeypatch, tmp_path):
    """On the CUDA path a kernel's header goes to a file named by the kernel (whose name
    carries the digest of the whole text) and the launch carries one #include line; the file
    is rewritten when it differs, and the header goes inline with TQ_GPU_HEADER_INLINE=1 or
    where the folder cannot be written."""
    import mlx.core as mx

    made = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: made.append(kw) or kw)
    monkeypatch.setenv("TQ_GPU_HEADER_DIR", str(tmp_path / "h"))
    header, source = metal.kernel_text("attention_mma", "cuda")
    name = metal.kernel_name(metal.KERNELS["attention_mma"].name, header, source)
    kw = metal.build_kernel("attention_mma", "cuda").kernel
    path = tmp_path / "h" / f"{name}.h"
    assert kw["name"] == name and kw["source"] == source
    assert kw["header"] == f'#include "{path.resolve()}"\n'
    assert path.read_text() == header
    path.write_text("// another text\n")  # a stale or damaged file is replaced
    metal.build_kernel("attention_mma", "cuda")
    assert path.read_text() == header
    monkeypatch.setenv("TQ_GPU_HEADER_INLINE", "1")
    assert metal.build_kernel("attention_mma", "cuda").kernel["header"] == header
    monkeypatch.delenv("TQ_GPU_HEADER_INLINE")
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("TQ_GPU_HEADER_DIR", str(blocked / "sub"))  # under a file: unwritable
    assert metal.build_kernel("attention_mma", "cuda").kernel["header"] == header
