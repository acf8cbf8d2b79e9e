"""An emulated ``mx.fast.metal_kernel`` for the kernels of turboquant.metal.

Every kernel of ``metal.KERNELS`` is wrapped the way mx.fast.metal_kernel wraps it (header,
then a function whose body is the kernel's source; inputs ``const device T*``, outputs
``device T*``) and compiled once, as C++ through metal/metal_compat.h, into one program. A
call with mlx's arguments (inputs, output_shapes, output_dtypes, grid in threads,
threadgroup, template) writes the inputs to files, runs the program on the emulated GPU
(threadgroups of cooperative fibers with real barriers and 32-lane simd-group functions) and
returns the outputs as mlx arrays. Installed in place of ``metal._kernel`` (and with
``metal._require_gpu`` disabled), it lets the turboquant.metal host functions --
parameter blocks, grids, reshapes, dtype views -- run end to end on Linux: all that then
stays unverified is mx.fast.metal_kernel itself and the Metal compiler.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from turboquant import metal
from metal_args import ARG_TYPES

ROOT = Path(__file__).resolve().parents[2]
# The emulator's fibers use ucontext, which macOS gates behind _XOPEN_SOURCE.
EMU_FLAGS = ([] if sys.platform != "darwin" else
             ["-D_XOPEN_SOURCE=700", "-D_DARWIN_C_SOURCE", "-Wno-deprecated-declarations"])
SCRATCH_FLOATS = 16384  # the emulated threadgroup array of templated kernels (>= any SCRATCH)

# Output element types by kernel: "out" of the dequantize kernels may be fp16 bits.
_NP = {"float": np.float32, "uint8_t": np.uint8, "uint16_t": np.uint16, "uint32_t": np.uint32}
_MX_TO_NP = {mx.float32: np.float32, mx.uint8: np.uint8, mx.uint16: np.uint16,
             mx.uint32: np.uint32}


def _consts(spec, values: dict | None) -> str:
    """The compile-time template arguments of a kernel as mlx's CUDA back end declares them
    (``constexpr int NAME = value;`` at the top of the body): ``values``, else the spec's."""
    chosen = dict(spec.templates)
    chosen.update({k: v for k, v in (values or {}).items() if k != "SCRATCH"})
    return "".join(f"constexpr int {k} = {int(v)};\n" for k, v in chosen.items())


def _program(keys=None, values: dict | None = None, header: str | None = None) -> str:
    """The emulator's C++ program of ``keys`` (every kernel by default) over ``header``
    (default: every kernel file's, unpruned)."""
    lines = ['#include "metal_compat.h"', "#include <cstdio>", "#include <cstdlib>",
             "#include <fstream>", "#include <iterator>", "#include <string>", "#include <vector>",
             metal.kernel_header() if header is None else header,
             "static std::vector<char> load(const char* p) { std::ifstream f(p, std::ios::binary);"
             " return {std::istreambuf_iterator<char>(f), {}}; }",
             "static void save(const char* p, const std::vector<char>& v) {"
             " std::ofstream f(p, std::ios::binary);"
             " f.write(v.data(), static_cast<std::streamsize>(v.size())); }"]
    main = ["int main(int argc, char** argv) { (void)argc; const std::string name = argv[1];",
            "  const uint3 groups{uint(atoi(argv[2])), uint(atoi(argv[3])), uint(atoi(argv[4]))};",
            "  const uint tg = uint(atoi(argv[5])); int a = 6;"]
    for key in keys or metal.KERNELS:
        spec = metal.KERNELS[key]
        # "out" is declared as bytes: the dequantize kernels write fp32 or fp16 bits into it.
        types = dict(ARG_TYPES, out="uint8_t" if "dequantize" in key else "float")
        params = [f"const device {types[n]}* {n}" for n in spec.input_names]
        params += [f"device {types[n]}* {n}" for n in spec.output_names]
        params += ["uint3 threadgroup_position_in_grid", "uint thread_index_in_threadgroup",
                   "uint3 threads_per_threadgroup"]
        body = _consts(spec, values) + spec.source.replace("SCRATCH", str(SCRATCH_FLOATS))
        lines.append(f"static void emu_{key}({', '.join(params)}) {{\n{body}}}")
        names = spec.input_names + spec.output_names
        n_in, n_out = len(spec.input_names), len(spec.output_names)
        args = ", ".join(f"({'const ' if i < n_in else ''}{types[n]}*)buf[{i}].data()"
                         for i, n in enumerate(names))
        main.append(
            f"  if (name == \"{key}\") {{ std::vector<std::vector<char>> buf;"
            f" for (int i = 0; i < {n_in}; ++i) buf.push_back(load(argv[a++]));"
            f" std::vector<const char*> outs;"
            f" for (int i = 0; i < {n_out}; ++i) {{ buf.emplace_back(size_t(atol(argv[a])), char(0));"
            f" outs.push_back(argv[a + 1]); a += 2; }}"
            f" metal::emu::dispatch(groups, tg, [&](uint3 g, uint tid) {{ emu_{key}({args}, g, tid,"
            f" uint3{{tg, 1, 1}}); }});"
            f" for (int i = 0; i < {n_out}; ++i) save(outs[size_t(i)], buf[{n_in} + size_t(i)]);"
            f" return 0; }}")
    main.append('  std::fprintf(stderr, "unknown kernel %s\\n", name.c_str()); return 1; }')
    return "\n".join(lines + main) + "\n"


class EmulatedKernels:
    """``kernel(which)`` returns a callable with mx.fast.metal_kernel's call signature."""

    def __init__(self, workdir: Path):
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if not cxx:
            raise RuntimeError("a C++ compiler is needed to emulate the Metal kernels")
        self.cxx = cxx
        self.dir = Path(workdir)
        self.exe = self._compile(_program(), "mlx_kernels_emulated")
        # Programs of one kernel at other template arguments or rotation rounds, by (kernel,
        # rounds, values).
        self.instances: dict[tuple, Path] = {}
        self.launches: list[str] = []
        self.rounds_seen: set[int] = set()  # the rotation rounds of the kernels asked for

    def _compile(self, program: str, stem: str) -> Path:
        src = self.dir / f"{stem}.cpp"
        src.write_text(program)
        exe = self.dir / stem
        r = subprocess.run([self.cxx, "-std=c++20", "-O1", "-w", *EMU_FLAGS,
                            f"-I{ROOT / 'metal'}", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-4000:])
        return exe

    def _exe_for(self, which: str, values: dict, rounds: int = 2) -> Path:
        """The program that runs ``which`` with these template arguments and rotation rounds
        (metal.kernel_header's TQ_ROTATION_ROUNDS): the one with every kernel at its default
        arguments and two rounds, or one compiled for this instance (cached)."""
        spec = metal.KERNELS[which]
        chosen = {k: v for k, v in values.items() if k != "SCRATCH"}
        if rounds == 2 and all(dict(spec.templates).get(k) == v for k, v in chosen.items()):
            return self.exe
        key = (which, int(rounds), tuple(sorted(chosen.items())))
        if key not in self.instances:
            stem = ("emu_" + which + f"_r{int(rounds)}_"
                    + "_".join(f"{k}{v}" for k, v in key[2]))
            self.instances[key] = self._compile(
                _program([which], chosen, metal.kernel_header(rounds=rounds)), stem)
        return self.instances[key]

    def kernel(self, which: str, rounds: int = 2):
        spec = metal.KERNELS[which]
        self.rounds_seen.add(int(rounds))

        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=None):
            assert len(inputs) == len(spec.input_names)
            values = dict(template or ())
            assert set(values) <= {"SCRATCH"} | {k for k, _ in spec.templates}, values
            if "SCRATCH" in values:  # the emulated scratch array must hold what the GPU would get
                assert values["SCRATCH"] <= SCRATCH_FLOATS
                # ... and no more than a GPU's threadgroup memory holds (the mma kernel, the
                # CUDA path's default, may use a CUDA block's 48 KB)
                limit = (metal.MMA_MAX_SCRATCH_FLOATS if which == "attention_mma"
                         else metal.MAX_SCRATCH_FLOATS)
                assert values["SCRATCH"] <= limit, (which, values)
            groups = [g // t for g, t in zip(grid, threadgroup)]
            assert all(g * t == gg for g, t, gg in zip(groups, threadgroup, grid)), (grid, threadgroup)
            assert threadgroup[1] == threadgroup[2] == 1
            n = len(self.launches)
            self.launches.append(which)
            argv = [str(self._exe_for(which, values, rounds)), which, *map(str, groups),
                    str(threadgroup[0])]
            for i, a in enumerate(inputs):
                p = self.dir / f"k{n}_in{i}.bin"
                p.write_bytes(np.ascontiguousarray(np.array(a)).tobytes())
                argv.append(str(p))
            outs = []
            for i, (shape, dt) in enumerate(zip(output_shapes, output_dtypes)):
                nbytes = int(np.prod(shape)) * np.dtype(_MX_TO_NP[dt]).itemsize
                p = self.dir / f"k{n}_out{i}.bin"
                argv += [str(nbytes), str(p)]
                outs.append((p, shape, dt))
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"emulated kernel {which} failed: {r.stderr[-2000:]}")
            return [mx.array(np.frombuffer(p.read_bytes(), _MX_TO_NP[dt]).reshape(shape))
                    for p, shape, dt in outs]

        return launch

    def install(self, monkeypatch) -> None:
        """Route turboquant.metal's kernels here (and let them run off a Mac)."""
        monkeypatch.setattr(metal, "_kernel", self.kernel)
        monkeypatch.setattr(metal, "_require_gpu", lambda: None)
