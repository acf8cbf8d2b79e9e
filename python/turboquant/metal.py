"""The GPU kernels for mlx arrays: Metal (Apple silicon) and CUDA (NVIDIA, mlx[cuda]).

The kernel bodies of ``metal/*.metal`` (the same ones the C++ Metal backend compiles, and
that the emulation tests check against the CPU reference on any machine) run through
``mx.fast.metal_kernel``, so mlx arrays never leave the GPU. Each mlx kernel's source is a
single call of a ``tq_*_body`` function; the header is the concatenated kernel files with
``TQ_NO_ENTRY_POINTS`` (no ``[[kernel]]`` wrappers) and ``TQ_PARAMS`` / ``TQ_TABLE`` set to
``const device`` (mlx passes every input as a device array). Runtime sizes travel in a
small uint32 ``params`` array laid out like the structs of ``common.metal``, so a kernel
is compiled once per (kernel, scratch size), not per call.

The key split (an outlier split of the keys over the two halves of the channels, the
mlx-lm cache's default) has its own kernels (``split.metal``), taken by ``encode_heads``,
``dequantize_heads`` and ``decode_attention_heads`` when the key tables are a
:class:`SplitHeadTables`.

One kernel source, three targets. The same bodies compile for Metal
(``mx.fast.metal_kernel``), for CUDA (``mx.fast.cuda_kernel``: :func:`kernel_header` with
``target="cuda"`` prepends ``metal/cuda_compat.h``, the CUDA dialect of the Metal names the
bodies use, and :meth:`KernelSpec.source_for` binds mlx's CUDA thread indices to the Metal
names), and as C++ for the emulator the tests run (``metal/metal_compat.h``). Both GPU
families reduce over 32-lane SIMD groups (warps); that is the one assumption they share.

Selection (:func:`candidate_path`): ``"metal"`` on macOS when mlx has a Metal device,
``"cuda"`` where ``mx.cuda.is_available()``, in both cases only when the kernel sources are
found; ``"cpu"`` (the C++ CPU core) everywhere else. The environment variable
``TURBOQUANT_MLX_KERNELS`` (``auto``, ``metal``, ``cuda`` or ``cpu``) narrows the choice.
The path the caches take, after the first-use self-test of the store built on these
kernels, is :func:`turboquant.gpu_path.active_path` (a module above this one and the store).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERNEL_FILES = ("common.metal", "encode.metal", "dequantize.metal", "attention.metal",
                "split.metal", "attention_fast.metal", "attention_mma.metal")
CUDA_DIALECT = "cuda_compat.h"  # the CUDA target's dialect header, beside the kernel files
TARGETS = ("metal", "cuda")
# The rotation kinds the kernels take, with their Hadamard rounds (TQ_ROTATION_ROUNDS).
ROTATION_ROUNDS = {"hadamard": 2, "hadamard1": 1}
MAX_GROUP = 16  # TQ_MAX_GROUP: query heads per KV head in one attention pass
# Threadgroup (shared) memory of one attention block, in floats: Metal guarantees 32 KB per
# threadgroup (CUDA 48 KB of static shared memory per block); passes over a GQA group are
# sized to stay within it (group_pass()).
MAX_SCRATCH_FLOATS = 8192
ATTENTION_THREADS = 128
DEFAULT_BLOCK_TOKENS = 64
# Decode attention launches at most about this many threadgroups (blocks × KV heads) before
# blocks take several tiles each (attention_blocks); REDUCE_CACHED_BLOCKS: attention.metal's
# TQ_REDUCE_CACHED_BLOCKS, the most blocks whose weights the reduce keeps in threadgroup memory.
ATTENTION_GROUPS = 1024
# On the CUDA path at most half as many: on an H100 at 128K tokens (8 KV heads, head_dim 128,
# 3-bit codes) a decode call with 512 took 107-110 us against 118-130 us with 1,024 (the
# mma kernel and the reduce, plain and split keys; bench/gpu_attention.py --sweep,
# bench/results/gpu_attention_sweep_h100_round15.log): blocks of more tiles, fewer to reduce.
ATTENTION_GROUPS_CUDA = 512
REDUCE_CACHED_BLOCKS = 1024
# Threads of a reduce threadgroup (one per query head): more than dim work in slices that sum
# their own runs of blocks and fp16 rows (attention.metal's tq_reduce_slices), so a launch of
# a few dozen threadgroups has more loads in flight. At most 1024 (TQ_REDUCE_SLICE_FLOATS);
# TQ_GPU_REDUCE_THREADS overrides it (a benchmark's sweep). Metal takes at most
# REDUCE_THREADS_METAL: a pipeline's threadgroup limit can be under 1024 there.
REDUCE_THREADS = 512
REDUCE_THREADS_METAL = 256
# Query heads per pass of the register-tiled decode kernel's instances (its GM template
# argument), and the tokens a stream of it loads at once (U).
FAST_GROUPS = (1, 2, 4, 8)
FAST_UNROLL = 1
# The staged variant: tiles of at most STAGE_MAX_TOKENS tokens whose codes and norms fit
# STAGE_MAX_WORDS 4-byte words (two such buffers in threadgroup memory).
STAGE_MAX_TOKENS = 64
STAGE_MAX_WORDS = 2048


def source_dir() -> Path | None:
    """The folder holding the .metal files: installed package data, or the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "metal", here.parents[1] / "metal"):
        if all((candidate / f).is_file() for f in KERNEL_FILES + (CUDA_DIALECT,)):
            return candidate
    return None


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"the GPU kernel target must be one of {TARGETS}, got {target!r}")


def _compact(text: str) -> str:
    """Source text without its comment-only and blank lines (what a compiler skips anyway)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.strip() and not line.lstrip().startswith("//"))


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_NAME = re.compile(r"^(?:template\s*<[^>]*>\s*)?(?:struct|class|union|enum(?:\s+class)?)\s+"
                        r"([A-Za-z_][A-Za-z0-9_]*)")
_FUNC_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\($")


def _top_level_items(text: str) -> list[tuple[str | None, str]]:
    """The text as (name, chunk) items at brace depth 0: each preprocessor line on its own
    (name None), each definition or declaration (a function, a struct, a constant) with the
    name it defines; a chunk whose name is not recognised also gets None."""
    items: list[tuple[str | None, str]] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("#"):  # a directive (with its continuation lines)
            chunk = [line]
            while chunk[-1].rstrip("\n").endswith("\\") and i + 1 < len(lines):
                i += 1
                chunk.append(lines[i])
            items.append((None, "".join(chunk)))
            i += 1
            continue
        chunk, depth, opened = [], 0, False
        while i < len(lines):
            ln = lines[i]
            chunk.append(ln)
            i += 1
            if not ln.lstrip().startswith("#"):
                code = ln.split("//", 1)[0]
                depth += code.count("{") - code.count("}")
                opened = opened or "{" in code
                end = code.rstrip()
                if depth == 0 and (opened or end.endswith(";")) and (
                        end.endswith("}") or end.endswith(";")):
                    break
        text_ = "".join(chunk)
        head = text_.split("{", 1)[0].split(";", 1)[0]
        m = _TYPE_NAME.match(head.strip())
        if m is None:
            m = _FUNC_NAME.search(head.split("(", 1)[0].rstrip() + "(")
        items.append((m.group(1) if m else None, text_))
    return items


def prune_header(header: str, body: str) -> str:
    """The part of a kernel header that the kernel ``body`` uses: after the line
    ``#define TQ_SINGLE_SOURCE 1`` (the CUDA dialect before it is kept whole), only the
    functions and types reachable from the body's identifiers (and from every directive:
    macros may name functions); directives stay in place. mlx copies a kernel's header and
    hashes its text at every launch, so a kernel should not carry the others' code."""
    mark = "#define TQ_SINGLE_SOURCE 1\n"
    cut = header.find(mark)
    if cut < 0:
        return header
    prefix, rest = header[:cut], header[cut:]
    items = _top_level_items(rest)
    by_name: dict[str, list[int]] = {}
    for k, (name, _) in enumerate(items):
        if name is not None:
            by_name.setdefault(name, []).append(k)
    keep = {k for k, (name, _) in enumerate(items) if name is None}
    todo = set(_IDENT.findall(body))
    for k in keep:
        todo |= set(_IDENT.findall(items[k][1]))
    seen: set[str] = set()
    while todo:
        ident = todo.pop()
        if ident in seen:
            continue
        seen.add(ident)
        for k in by_name.get(ident, ()):
            if k not in keep:
                keep.add(k)
                todo |= set(_IDENT.findall(items[k][1])) - seen
    return prefix + "".join(chunk for k, (_, chunk) in enumerate(items) if k in keep)


def kernel_text(which: str, target: str, rounds: int = 2) -> tuple[str, str]:
    """(header, body) of kernel ``which`` as it is built for ``target`` and a rotation of
    ``rounds`` Hadamard rounds: its files' header, compacted and pruned to what the body
    reaches (:func:`prune_header`)."""
    spec = KERNELS[which]
    source = spec.source_for(target)
    header = kernel_header(target, spec.files, compact=True, rounds=rounds)
    return prune_header(header, source), source


def rotation_rounds(rotation: str) -> int:
    """The kernels' TQ_ROTATION_ROUNDS for a quantizer's rotation kind: 2 for ``"hadamard"``
    (Π = H·D₂·H·D₁), 1 for ``"hadamard1"`` (Π = H·D₁); the kernels take no other."""
    rounds = ROTATION_ROUNDS.get(rotation)
    if rounds is None:
        raise ValueError("the GPU kernels support the hadamard and hadamard1 rotations, got "
                         f"{rotation!r}")
    return rounds


def kernel_header(target: str = "metal", files: tuple[str, ...] = KERNEL_FILES,
                  compact: bool = False, rounds: int = 2) -> str:
    """The mlx header: the kernel files (all, or ``files``, in KERNEL_FILES order) without
    the [[kernel]] entry points; for ``target="cuda"`` preceded by the CUDA dialect header
    (cuda_compat.h). ``compact``: without comment-only and blank lines, as the kernels are
    built (mlx copies and hashes the header at every launch: a shorter one costs less).
    ``rounds``: the rotation's Hadamard rounds (:func:`rotation_rounds`), 2 (the files'
    default) or 1, defined as TQ_ROTATION_ROUNDS; a kernel's name carries its text's digest
    (:func:`kernel_name`), so the two never share a compiled kernel."""
    _check_target(target)
    if rounds not in (1, 2):
        raise ValueError(f"rounds must be 1 or 2, got {rounds!r}")
    unknown = set(files) - set(KERNEL_FILES)
    if unknown:
        raise ValueError(f"unknown kernel files {sorted(unknown)}")
    folder = source_dir()
    if folder is None:
        raise FileNotFoundError("turboquant GPU kernel sources (metal/*.metal, "
                                f"metal/{CUDA_DIALECT}) not found")
    parts = [(folder / CUDA_DIALECT).read_text(encoding="utf-8")] if target == "cuda" else []
    parts += [
        "#define TQ_SINGLE_SOURCE 1\n",
        "#define TQ_NO_ENTRY_POINTS 1\n",
        "#define TQ_PARAMS const device\n",
        "#define TQ_TABLE const device\n",
    ]
    if rounds != 2:
        parts.append(f"#define TQ_ROTATION_ROUNDS {int(rounds)}u\n")
    for name in KERNEL_FILES:
        if name in files:
            parts.append(f"// ---- {name} ----\n")
            parts.append((folder / name).read_text(encoding="utf-8"))
    text = "".join(parts)
    return _compact(text) if compact else text


# The CUDA target's binding of the Metal thread-position names the sources use: mlx's CUDA
# kernels get blockIdx / threadIdx / blockDim (mlx launches ceil(grid / threadgroup) blocks of
# the threadgroup's size, so one block is one Metal threadgroup; threadgroups are 1-D).
_CUDA_IDS = (
    "const uint3 threadgroup_position_in_grid = {blockIdx.x, blockIdx.y, blockIdx.z};\n"
    "const uint thread_index_in_threadgroup = threadIdx.x;\n"
    "const uint3 threads_per_threadgroup = {blockDim.x, blockDim.y, blockDim.z};\n"
)


@dataclass(frozen=True)
class KernelSpec:
    """One mlx GPU kernel: argument names (in order) and the body source, written once with
    Metal's thread-position names (mx.fast.metal_kernel passes only the attributes whose names
    appear in the source)."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    # Compile-time template arguments besides SCRATCH, with the values that the checks
    # without a GPU (NVRTC, the emulator) compile them with when no call gives others.
    templates: tuple[tuple[str, int], ...] = ()
    # The kernel files its body needs (kernel_header(files=...)); set from its name below.
    files: tuple[str, ...] = KERNEL_FILES

    def source_for(self, target: str) -> str:
        """The body for mx.fast.metal_kernel (``"metal"``) or mx.fast.cuda_kernel
        (``"cuda"``): the same source, with the CUDA thread indices bound to Metal's names."""
        _check_target(target)
        return self.source if target == "metal" else _CUDA_IDS + self.source


_IDS = "threadgroup_position_in_grid.x, thread_index_in_threadgroup, threads_per_threadgroup.x"

KERNELS: dict[str, KernelSpec] = {
    "encode": KernelSpec(
        "tq_mlx_encode",
        ("x", "signs", "boundaries", "centroids", "params"),
        ("codes", "norms"),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "TQ_THREADGROUP_ARRAY(uchar, tg_idx, 512);\n"
        "TQ_THREADGROUP_ARRAY(float, tg_red, 64);\n"
        "tq_encode_body(x, codes, (device uchar*)norms, signs, boundaries, centroids,\n"
        "               *(const device TqEncodeParams*)params, tg_v, tg_idx, tg_red,\n"
        f"               {_IDS});\n",
    ),
    "rotate": KernelSpec(
        "tq_mlx_rotate",
        ("x", "signs", "params"),
        ("y",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "tq_rotate_body(x, y, signs, *(const device TqRotateParams*)params, tg_v,\n"
        f"               {_IDS});\n",
    ),
    "permute": KernelSpec(
        "tq_mlx_permute",
        ("src", "order", "params"),
        ("dst",),
        "tq_permute_body(src, dst, order, *(const device TqPermuteParams*)params,\n"
        f"                {_IDS});\n",
    ),
    "centre": KernelSpec(
        "tq_mlx_centre",
        ("k_rows", "v_rows", "k_mean", "v_mean", "order", "params"),
        ("k_out", "v_out"),
        "tq_centre_body(k_rows, v_rows, k_mean, v_mean, order, k_out, v_out,\n"
        "               *(const device TqCentreParams*)params,\n"
        f"               {_IDS});\n",
    ),
    "dequantize": KernelSpec(
        "tq_mlx_dequantize",
        ("codes", "norms", "centroids", "signs", "params"),
        ("out",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "tq_dequantize_body(codes, (const device uchar*)norms, centroids, signs,\n"
        "                   (device uchar*)out,\n"
        "                   *(const device TqDequantParams*)params, tg_v,\n"
        f"                   {_IDS});\n",
    ),
    "attention_block": KernelSpec(
        "tq_mlx_attention_block",
        ("q", "k_codes", "k_norms", "v_codes", "v_norms", "k_centroids", "v_centroids", "params"),
        ("part_m", "part_l", "part_acc"),
        "TQ_THREADGROUP_ARRAY(float, tg, SCRATCH);\n"
        "tq_attention_block_body(q, k_codes, (const device uchar*)k_norms, v_codes,\n"
        "                        (const device uchar*)v_norms, k_centroids, v_centroids,\n"
        "                        part_m, part_l, part_acc,\n"
        "                        *(const device TqAttnParams*)params, tg,\n"
        "                        threadgroup_position_in_grid.x, threadgroup_position_in_grid.y,\n"
        "                        thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
    ),
    "attention_reduce": KernelSpec(
        "tq_mlx_attention_reduce",
        ("part_m", "part_l", "part_acc", "v_signs", "params"),
        ("out",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, TQ_REDUCE_GROUP_FLOATS);\n"
        "tq_attention_reduce_body(part_m, part_l, part_acc, v_signs, out,\n"
        "                         *(const device TqReduceParams*)params, tg_v,\n"
        "                         threadgroup_position_in_grid.x, threadgroup_position_in_grid.y,\n"
        "                         thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
    ),
}

# The register-tiled decode attention (attention_fast.metal), plain or split keys: raw
# queries in, rotated in the kernel (k_signs: one 2*dim row per head when the parameter word
# after TqSplitAttnParams is 1, else one row for all heads; `angles` the split's table or a
# placeholder), the partials of attention_block out. Its compile-time shape comes from
# fast_attention_shape(). attention_reduce_rows: the reduce merged with fp16 rows (two sets,
# k/v as fp16 bits), v_signs per head when the word after TqReduceRowsParams is 1.
_SHAPE_TEMPLATES = (("TQ_D", 128), ("TQ_GM", 4), ("TQ_C", 16), ("TQ_KB0", 3), ("TQ_KB1", 3),
                    ("TQ_VB", 3), ("TQ_SPLIT", 0))


def _register_tiled(key: str, body: str, extra: str, templates) -> KernelSpec:
    """The KernelSpec of a register-tiled decode-attention body (``body``<shape, ``extra``>):
    both take the same inputs and write the same partials."""
    return KernelSpec(
        f"tq_mlx_{key}",
        ("q", "k_signs", "k_codes", "k_norms", "v_codes", "v_norms", "k_centroids",
         "v_centroids", "angles", "params"),
        ("part_m", "part_l", "part_acc"),
        "TQ_THREADGROUP_ARRAY(float, tg, SCRATCH);\n"
        "const uint tq_head = threadgroup_position_in_grid.y;\n"
        f"{body}<TQ_D, TQ_GM, TQ_C, TQ_KB0, TQ_KB1, TQ_VB, TQ_SPLIT, {extra}>(\n"
        "    q, k_signs + (params[16] != 0u ? ulong(tq_head) * 2u * uint(TQ_D) : 0ul),\n"
        "    k_codes, (const device uchar*)k_norms, v_codes, (const device uchar*)v_norms,\n"
        "    k_centroids, v_centroids, angles, part_m, part_l, part_acc,\n"
        "    *(const device TqSplitAttnParams*)params, tg, threadgroup_position_in_grid.x,\n"
        "    tq_head, thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
        templates=_SHAPE_TEMPLATES + tuple(templates))


# The matrix-multiply decode attention (attention_mma.metal): the same inputs and partials; its
# compile-time shape is (D, KB0, KB1, VB, SPLIT) and its copy ring's stages NS, the scratch from
# mma_attention_scratch_floats.
_MMA_TEMPLATES = (("TQ_D", 128), ("TQ_KB0", 3), ("TQ_KB1", 3), ("TQ_VB", 3), ("TQ_SPLIT", 0),
                  ("TQ_NS", 3))

KERNELS.update({
    "attention_mma": KernelSpec(
        "tq_mlx_attention_mma",
        ("q", "k_signs", "k_codes", "k_norms", "v_codes", "v_norms", "k_centroids",
         "v_centroids", "angles", "params"),
        ("part_m", "part_l", "part_acc"),
        "TQ_THREADGROUP_ARRAY(float, tg, SCRATCH);\n"
        "const uint tq_head = threadgroup_position_in_grid.y;\n"
        "tq_attention_mma_block_body<TQ_D, TQ_KB0, TQ_KB1, TQ_VB, TQ_SPLIT, TQ_NS>(\n"
        "    q, k_signs + (params[16] != 0u ? ulong(tq_head) * 2u * uint(TQ_D) : 0ul),\n"
        "    k_codes, (const device uchar*)k_norms, v_codes, (const device uchar*)v_norms,\n"
        "    k_centroids, v_centroids, angles, part_m, part_l, part_acc,\n"
        "    *(const device TqSplitAttnParams*)params, tg, threadgroup_position_in_grid.x,\n"
        "    tq_head, thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
        templates=_MMA_TEMPLATES),
    # A decode step's form: the queries as the model gives them (q_rows: fp16 or bfloat16 words,
    # params[17]; in the key split's channel order `order` where params[18] is 1), kept as
    # float32 in that order (q_kept, by block 0) for attention_reduce_rows_step.
    "attention_mma_step": KernelSpec(
        "tq_mlx_attention_mma_step",
        ("q_rows", "order", "k_signs", "k_codes", "k_norms", "v_codes", "v_norms", "k_centroids",
         "v_centroids", "angles", "params"),
        ("part_m", "part_l", "part_acc", "q_kept"),
        "TQ_THREADGROUP_ARRAY(float, tg, SCRATCH);\n"
        "const uint tq_head = threadgroup_position_in_grid.y;\n"
        "TqQueryWords tq_q;\n"
        "tq_q.words = (const device ushort*)q_rows;\n"
        "tq_q.order = order;\n"
        "tq_q.kept = q_kept;\n"
        "tq_q.bf16 = params[17];\n"
        "tq_q.permute = params[18];\n"
        "tq_q.keep = threadgroup_position_in_grid.x == 0u ? 1u : 0u;\n"
        "tq_attention_mma_block_body<TQ_D, TQ_KB0, TQ_KB1, TQ_VB, TQ_SPLIT, TQ_NS>(\n"
        "    tq_q, k_signs + (params[16] != 0u ? ulong(tq_head) * 2u * uint(TQ_D) : 0ul),\n"
        "    k_codes, (const device uchar*)k_norms, v_codes, (const device uchar*)v_norms,\n"
        "    k_centroids, v_centroids, angles, part_m, part_l, part_acc,\n"
        "    *(const device TqSplitAttnParams*)params, tg, threadgroup_position_in_grid.x,\n"
        "    tq_head, thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
        templates=_MMA_TEMPLATES),
    "attention_fast": _register_tiled("attention_fast", "tq_attention_fast_block_body", "TQ_U",
                                      (("TQ_U", FAST_UNROLL),)),
    # The staged variant: the same, plus the tile TT it stages in threadgroup memory and the
    # words R each thread copies of it (staged_attention_tile()).
    "attention_staged": _register_tiled("attention_staged", "tq_attention_staged_block_body",
                                        "TQ_TT, TQ_R", (("TQ_TT", 64), ("TQ_R", 13))),
    "attention_reduce_rows": KernelSpec(
        "tq_mlx_attention_reduce_rows",
        ("part_m", "part_l", "part_acc", "v_signs", "q", "k_a", "v_a", "k_b", "v_b", "params"),
        ("out",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, TQ_REDUCE_ROWS_FLOATS);\n"
        "const device TqReduceRowsParams& tq_p = *(const device TqReduceRowsParams*)params;\n"
        "tq_attention_reduce_rows_body(\n"
        "    part_m, part_l, part_acc,\n"
        "    v_signs + (params[9] != 0u\n"
        "               ? ulong(threadgroup_position_in_grid.y) * 2u * tq_p.dim : 0ul),\n"
        "    q, (const device ushort*)k_a, (const device ushort*)v_a, (const device ushort*)k_b,\n"
        "    (const device ushort*)v_b, out, tq_p, tg_v, threadgroup_position_in_grid.x,\n"
        "    threadgroup_position_in_grid.y, thread_index_in_threadgroup,\n"
        "    threads_per_threadgroup.x);\n",
    ),
    # A decode step's form: the output as the model takes it (out_rows: fp16 or bfloat16 words,
    # params[10]), the value mean v_mean (kv_heads, dim) added first where params[11] is 1.
    "attention_reduce_rows_step": KernelSpec(
        "tq_mlx_attention_reduce_rows_step",
        ("part_m", "part_l", "part_acc", "v_signs", "q", "k_a", "v_a", "k_b", "v_b", "v_mean",
         "params"),
        ("out_rows",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, TQ_REDUCE_ROWS_FLOATS);\n"
        "const device TqReduceRowsParams& tq_p = *(const device TqReduceRowsParams*)params;\n"
        "TqOutWords tq_out;\n"
        "tq_out.words = (device ushort*)out_rows;\n"
        "tq_out.mean = v_mean;\n"
        "tq_out.bf16 = params[10];\n"
        "tq_out.with_mean = params[11];\n"
        "tq_attention_reduce_rows_body(\n"
        "    part_m, part_l, part_acc,\n"
        "    v_signs + (params[9] != 0u\n"
        "               ? ulong(threadgroup_position_in_grid.y) * 2u * tq_p.dim : 0ul),\n"
        "    q, (const device ushort*)k_a, (const device ushort*)v_a, (const device ushort*)k_b,\n"
        "    (const device ushort*)v_b, tq_out, tq_p, tg_v, threadgroup_position_in_grid.x,\n"
        "    threadgroup_position_in_grid.y, thread_index_in_threadgroup,\n"
        "    threads_per_threadgroup.x);\n",
    ),
})

# Per-head variants for caches whose KV heads have their own rotations (the C++ KVCache and
# the mlx-resident store of mlx_metal.py): `signs` holds one 2*dim row per head, and the
# parameter array carries one extra word after its struct, the rows per head, from which
# each threadgroup finds its head. The codebooks (centroids, boundaries) depend only on
# (dim, bits), so they stay shared. The attention block kernel needs no per-head table.
_HEAD = "threadgroup_position_in_grid.x / params[{word}]"
KERNELS.update({
    "encode_heads": KernelSpec(
        "tq_mlx_encode_heads",
        ("x", "signs", "boundaries", "centroids", "params"),
        ("codes", "norms"),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "TQ_THREADGROUP_ARRAY(uchar, tg_idx, 512);\n"
        "TQ_THREADGROUP_ARRAY(float, tg_red, 64);\n"
        "const device TqEncodeParams& tq_p = *(const device TqEncodeParams*)params;\n"
        f"const uint tq_head = {_HEAD.format(word=6)};\n"
        "tq_encode_body(x, codes, (device uchar*)norms, signs + ulong(tq_head) * 2u * tq_p.dim,\n"
        "               boundaries, centroids, tq_p, tg_v, tg_idx, tg_red,\n"
        f"               {_IDS});\n",
    ),
    "rotate_heads": KernelSpec(
        "tq_mlx_rotate_heads",
        ("x", "signs", "params"),
        ("y",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "const device TqRotateParams& tq_p = *(const device TqRotateParams*)params;\n"
        f"const uint tq_head = {_HEAD.format(word=2)};\n"
        "tq_rotate_body(x, y, signs + ulong(tq_head) * 2u * tq_p.dim, tq_p, tg_v,\n"
        f"               {_IDS});\n",
    ),
    "dequantize_heads": KernelSpec(
        "tq_mlx_dequantize_heads",
        ("codes", "norms", "centroids", "signs", "params"),
        ("out",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "const device TqDequantParams& tq_p = *(const device TqDequantParams*)params;\n"
        f"const uint tq_head = {_HEAD.format(word=7)};\n"
        "tq_dequantize_body(codes, (const device uchar*)norms, centroids,\n"
        "                   signs + ulong(tq_head) * 2u * tq_p.dim, (device uchar*)out,\n"
        "                   tq_p, tg_v,\n"
        f"                   {_IDS});\n",
    ),
    "dequantize_rows_heads": KernelSpec(
        "tq_mlx_dequantize_rows_heads",
        ("codes", "norms", "centroids", "signs", "params"),
        ("out",),
        "tq_dequantize_rows_body(codes, (const device uchar*)norms, centroids, signs,\n"
        "                        (device uchar*)out, *(const device TqDequantParams*)params,\n"
        "                        params[7],\n"
        f"                        {_IDS});\n",
    ),
    "dequantize_tile_heads": KernelSpec(
        "tq_mlx_dequantize_tile_heads",
        ("codes", "norms", "centroids", "signs", "before", "after", "params"),
        ("out",),
        "tq_dequantize_tile_body(codes, (const device uchar*)norms, centroids, signs, before,\n"
        "                        after, (device uchar*)out,\n"
        "                        *(const device TqDequantParams*)params, params[7], params[8],\n"
        "                        params[9],\n"
        f"                        {_IDS});\n",
    ),
    "attention_reduce_heads": KernelSpec(
        "tq_mlx_attention_reduce_heads",
        ("part_m", "part_l", "part_acc", "v_signs", "params"),
        ("out",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, TQ_REDUCE_GROUP_FLOATS);\n"
        "const device TqReduceParams& tq_p = *(const device TqReduceParams*)params;\n"
        "tq_attention_reduce_body(part_m, part_l, part_acc,\n"
        "                         v_signs\n"
        "                           + ulong(threadgroup_position_in_grid.y) * 2u * tq_p.dim,\n"
        "                         out, tq_p, tg_v,\n"
        "                         threadgroup_position_in_grid.x, threadgroup_position_in_grid.y,\n"
        "                         thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
    ),
})

# The key split (split.metal): keys of an outlier split over two equal halves of the channels
# (OutlierSplitQuantizer with outlier channels [0, d/2), both parts hadamard or both
# hadamard1), per-head signs (one 2*dim row per head: D₁ of both parts, then D₂, unused at
# one round) and the parts' codebooks
# concatenated (outlier part first); `angles` / `angle_bounds` are the angle code tables
# (split_angle_tables). The parameter word after TqSplitParams is the rows per head.
KERNELS.update({
    "split_encode_heads": KernelSpec(
        "tq_mlx_split_encode_heads",
        ("x", "signs", "boundaries", "centroids", "angles", "angle_bounds", "params"),
        ("codes", "norms"),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "TQ_THREADGROUP_ARRAY(uchar, tg_idx, 512);\n"
        "TQ_THREADGROUP_ARRAY(float, tg_red, 64);\n"
        "const device TqSplitParams& tq_p = *(const device TqSplitParams*)params;\n"
        f"const uint tq_head = {_HEAD.format(word=13)};\n"
        "tq_split_encode_body(x, codes, (device uchar*)norms,\n"
        "                     signs + ulong(tq_head) * 2u * tq_p.dim, boundaries, centroids,\n"
        "                     angles, angle_bounds, tq_p, tg_v, tg_idx, tg_red,\n"
        f"                     {_IDS});\n",
    ),
    "split_rotate_heads": KernelSpec(
        "tq_mlx_split_rotate_heads",
        ("x", "signs", "params"),
        ("y",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "const device TqSplitParams& tq_p = *(const device TqSplitParams*)params;\n"
        f"const uint tq_head = {_HEAD.format(word=13)};\n"
        "tq_split_rotate_body(x, y, signs + ulong(tq_head) * 2u * tq_p.dim, tq_p, tg_v,\n"
        f"                     {_IDS});\n",
    ),
    "split_dequantize_heads": KernelSpec(
        "tq_mlx_split_dequantize_heads",
        ("codes", "norms", "centroids", "signs", "angles", "params"),
        ("out",),
        "TQ_THREADGROUP_ARRAY(float, tg_v, 512);\n"
        "const device TqSplitParams& tq_p = *(const device TqSplitParams*)params;\n"
        f"const uint tq_head = {_HEAD.format(word=13)};\n"
        "tq_split_dequantize_body(codes, (const device uchar*)norms, centroids,\n"
        "                         signs + ulong(tq_head) * 2u * tq_p.dim, angles,\n"
        "                         (device uchar*)out, tq_p, tg_v,\n"
        f"                         {_IDS});\n",
    ),
    "split_dequantize_rows_heads": KernelSpec(
        "tq_mlx_split_dequantize_rows_heads",
        ("codes", "norms", "centroids", "signs", "angles", "params"),
        ("out",),
        "tq_split_dequantize_rows_body(codes, (const device uchar*)norms, centroids, signs,\n"
        "                              angles, (device uchar*)out,\n"
        "                              *(const device TqSplitParams*)params, params[13],\n"
        f"                              {_IDS});\n",
    ),
    "split_dequantize_tile_heads": KernelSpec(
        "tq_mlx_split_dequantize_tile_heads",
        ("codes", "norms", "centroids", "signs", "angles", "before", "after", "params"),
        ("out",),
        "tq_split_dequantize_tile_body(codes, (const device uchar*)norms, centroids, signs,\n"
        "                              angles, before, after, (device uchar*)out,\n"
        "                              *(const device TqSplitParams*)params, params[13],\n"
        "                              params[14], params[15],\n"
        f"                              {_IDS});\n",
    ),
    "split_attention_block": KernelSpec(
        "tq_mlx_split_attention_block",
        ("q", "k_codes", "k_norms", "v_codes", "v_norms", "k_centroids", "v_centroids", "angles",
         "params"),
        ("part_m", "part_l", "part_acc"),
        "TQ_THREADGROUP_ARRAY(float, tg, SCRATCH);\n"
        "tq_split_attention_block_body(q, k_codes, (const device uchar*)k_norms, v_codes,\n"
        "                              (const device uchar*)v_norms, k_centroids, v_centroids,\n"
        "                              angles, part_m, part_l, part_acc,\n"
        "                              *(const device TqSplitAttnParams*)params, tg,\n"
        "                              threadgroup_position_in_grid.x,\n"
        "                              threadgroup_position_in_grid.y,\n"
        "                              thread_index_in_threadgroup, threads_per_threadgroup.x);\n",
    ),
})


def _needed_files(key: str) -> tuple[str, ...]:
    """The kernel files the body of kernel ``key`` calls into (besides common.metal)."""
    if key.startswith(("encode", "rotate", "permute", "centre")):
        return ("common.metal", "encode.metal")
    if key.startswith("dequantize"):
        return ("common.metal", "dequantize.metal")
    if key in ("attention_fast", "attention_staged", "attention_reduce_rows",
               "attention_reduce_rows_step"):
        return ("common.metal", "attention.metal", "split.metal", "attention_fast.metal")
    if key in ("attention_mma", "attention_mma_step"):
        return ("common.metal", "attention.metal", "split.metal", "attention_fast.metal",
                "attention_mma.metal")
    if key.startswith("attention"):
        return ("common.metal", "attention.metal")
    return ("common.metal", "attention.metal", "split.metal")  # the key split's kernels


KERNELS = {key: dataclasses.replace(spec, files=_needed_files(key))
           for key, spec in KERNELS.items()}


def select_path(platform: str, mlx_metal: bool, sources: bool, env: str | None = None,
                mlx_cuda: bool = False) -> str:
    """The selection rule: "metal" on macOS with an mlx Metal device, "cuda" with an mlx
    CUDA device, only when the kernel sources are found; "cpu" otherwise. ``env`` (the value
    of TURBOQUANT_MLX_KERNELS) may narrow it to one path ("cpu" always holds)."""
    choice = "" if env is None else env.strip().lower()
    if choice not in ("", "auto", "metal", "cuda", "cpu"):
        raise ValueError(f"TURBOQUANT_MLX_KERNELS must be 'auto', 'metal', 'cuda' or 'cpu', got "
                         f"{env!r}")
    metal_ok = platform == "darwin" and mlx_metal and sources
    cuda_ok = mlx_cuda and sources
    if choice == "cpu":
        return "cpu"
    if choice == "metal":
        return "metal" if metal_ok else "cpu"
    if choice == "cuda":
        return "cuda" if cuda_ok else "cpu"
    return "metal" if metal_ok else "cuda" if cuda_ok else "cpu"


def _mlx_device_available(backend: str) -> bool:
    """mx.metal / mx.cuda .is_available(), False without mlx or without that module."""
    if importlib.util.find_spec("mlx") is None:
        return False
    try:
        import mlx.core as mx

        return bool(getattr(mx, backend).is_available())
    except Exception:  # an mlx build without that backend's module
        return False


# The benchmark settings (TQ_GPU_*) are read at every decode step of every layer. The
# os.environ mapping's get() runs several Python functions a read; its dict of encoded names
# and values (CPython's os.environ._data on POSIX, which every change of os.environ
# updates) answers the same question with one lookup.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def getenv(name: str, default: str | None = None) -> str | None:
    """os.environ.get(name, default), without the mapping's Python-level layers where the
    platform allows (POSIX)."""
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    key = _ENV_NAMES.get(name)
    if key is None:  # each name encoded once
        key = _ENV_NAMES[name] = os.fsencode(name)
    value = _ENV_DATA.get(key)
    return default if value is None else value.decode("utf-8", "surrogateescape")


_ENV_NAMES: dict[str, bytes] = {}


@functools.lru_cache(maxsize=None)
def candidate_path() -> str:
    """The path the selection rule picks on this machine, before the first-use self-test."""
    return select_path(
        sys.platform,
        sys.platform == "darwin" and _mlx_device_available("metal"),
        source_dir() is not None,
        os.environ.get("TURBOQUANT_MLX_KERNELS"),
        mlx_cuda=_mlx_device_available("cuda"),
    )


# --- Parameter blocks (uint32 words, layout of the structs in common.metal) ------------------


# A kernel's parameter words reach it as a small mlx array. On mlx's CUDA back end an array
# made from host data lives in unified (managed) memory, and mlx's buffer cache may hand it a
# device buffer to move there first, with a synchronous copy (mlx 0.32, CudaAllocator::malloc
# with no stream). A decode step made one per layer for the attention launch: on an H100 at
# 128K tokens that launch's Python function had ~75 us of own time per call and the block
# kernel reading the fresh array took 153 us; with the words made once and the token count
# added on the GPU the kernel took 127 us (bench/results/gpu_decode_parts_h100_round7_diag.log,
# gpu_decode_parts_h100_round7_after.log). So parameter words are made once per value
# (params_array), and the words a decode step changes, its counts, are added on the GPU from
# scalars (counted_params): mlx keeps arrays of up to 8 bytes in a unified pool, never moved.
@functools.lru_cache(maxsize=4096)
def _words_array(data: bytes, dtype: str):
    import mlx.core as mx

    return mx.array(np.frombuffer(data, dtype=np.dtype(dtype)))


def params_array(words: np.ndarray):
    """``words`` (a parameter block) as an mlx array, made once per value and reused (mlx
    arrays are immutable)."""
    w = np.ascontiguousarray(words)
    return _words_array(w.tobytes(), w.dtype.str)


@functools.lru_cache(maxsize=256)
def _unit_words(n: int, indices: tuple[int, ...]):
    import mlx.core as mx

    w = np.zeros(n, np.uint32)
    w[list(indices)] = 1
    return mx.array(w)


# counted_params' and counted_table's arrays by value (insertion order = age; the oldest go
# first), and the lock that keeps the order consistent where several threads build steps.
_COUNTED: collections.OrderedDict = collections.OrderedDict()
_COUNTED_MAX = 4096
_COUNTED_LOCK = threading.Lock()


def _spots(counts: dict) -> tuple:
    """``{index or tuple of indices: count}`` as ((indices...), count) pairs (hashable)."""
    return tuple(((k,) if isinstance(k, int) else tuple(k), int(c)) for k, c in counts.items())


def _kept(key, make):
    """The array kept by value under ``key`` (counted_params' and counted_table's blocks,
    oldest dropped first past _COUNTED_MAX), made by ``make()`` on a miss."""
    with _COUNTED_LOCK:
        hit = _COUNTED.get(key)
        if hit is not None:
            _COUNTED.move_to_end(key)
            return hit
    arr = make()
    with _COUNTED_LOCK:
        _COUNTED[key] = arr
        if len(_COUNTED) > _COUNTED_MAX:
            _COUNTED.popitem(last=False)
    return arr


def _with_counts(words: np.ndarray, spots: tuple, zero: bool = False) -> np.ndarray:
    """A uint32 copy of ``words`` with each spot's words set to its count (``zero``: to 0)."""
    w = np.array(words, dtype=np.uint32)
    for idx, c in spots:
        w[list(idx)] = 0 if zero else c
    return w


def counted_params(words: np.ndarray, counts: dict):
    """The uint32 parameter block ``words`` with counts set, ``{index or tuple of indices:
    count}`` (a decode step's token or row counts), as an mlx array, kept by value (the next
    step with the same counts reuses it). A new value on the CUDA path: the block with zeros
    there (:func:`params_array`) plus each count times its unit words, computed on the GPU
    from scalars; elsewhere a new array (cheap on Metal's unified memory)."""
    import mlx.core as mx

    spots = _spots(counts)

    def make():
        if candidate_path() != "cuda":
            return mx.array(_with_counts(words, spots))
        arr = params_array(_with_counts(words, spots, zero=True))
        for idx, c in spots:
            if c:
                arr = arr + _unit_words(len(words), idx) * mx.array(c, dtype=mx.uint32)
        return arr

    # a decode step's lookup: no array of the words made
    return _kept((words.tobytes(), spots), make)


def counted_table(words: np.ndarray, counts: dict, index: int, rows: int):
    """counted_params(words, counts) for every value 0..rows-1 of word ``index``, as one
    (rows, len(words)) uint32 array kept by value: a decode step whose count of word ``index``
    changes at every step (the fp16 window's rows) takes row n, a view, and launches no
    operation; a new table is made when ``words`` or ``counts`` change (on the CUDA path on
    the GPU, from the block of :func:`counted_params` and a column of counts)."""
    import mlx.core as mx

    spots = _spots(counts)

    def make():
        if candidate_path() != "cuda":
            table = np.repeat(_with_counts(words, spots)[None, :], rows, axis=0)
            table[:, index] = np.arange(rows, dtype=np.uint32)
            return mx.array(table)
        base = counted_params(_with_counts(words, (((int(index),), 0),)), counts)
        return (base[None, :] + mx.arange(rows, dtype=mx.uint32)[:, None]
                * _unit_words(len(words), (int(index),))[None, :])

    return _kept(("table", words.tobytes(), spots, int(index), int(rows)), make)


def code_bytes(dim: int, bits: int) -> int:
    return (dim * bits + 7) // 8


def encode_params(rows: int, dim: int, bits: int, norm_fp16: bool,
                  norm_correction: bool = False) -> np.ndarray:
    return np.array([rows, dim, bits, code_bytes(dim, bits), int(norm_fp16),
                     int(norm_correction)], dtype=np.uint32)


def rotate_params(rows: int, dim: int) -> np.ndarray:
    return np.array([rows, dim], dtype=np.uint32)


def dequant_params(rows: int, dim: int, bits: int, norm_fp16: bool, inverse_rotate: bool,
                   out_fp16: bool) -> np.ndarray:
    return np.array([rows, dim, bits, code_bytes(dim, bits), int(norm_fp16), int(inverse_rotate),
                     int(out_fp16)], dtype=np.uint32)


def attention_blocks(tokens: int, block_tokens: int, kv_heads: int) -> int:
    """Threadgroups per KV head of decode attention (TqAttnParams.num_blocks): one per tile of
    ``block_tokens`` tokens while the launch has at most ATTENTION_GROUPS threadgroups
    (ATTENTION_GROUPS_CUDA on the CUDA path), else
    fewer blocks of several tiles each (tq_tiles_per_block): the partials and the reduce stay
    small at long contexts. No block is left without a tile."""
    tiles = -(-tokens // block_tokens)
    groups = ATTENTION_GROUPS
    if candidate_path() == "cuda":
        groups = min(groups, ATTENTION_GROUPS_CUDA)
    env = getenv("TQ_GPU_ATTENTION_GROUPS", "")
    if env.isdigit():  # a benchmark's sweep
        groups = max(1, int(env))
    cap = max(1, min(REDUCE_CACHED_BLOCKS, -(-groups // max(1, kv_heads))))
    per = -(-tiles // cap)
    return -(-tiles // per)


def attention_params(dim: int, tokens: int, head_stride: int, block_tokens: int, group: int,
                     k_bits: int, v_bits: int, norm_fp16: bool, scale: float,
                     blocks: int | None = None) -> np.ndarray:
    blocks = -(-tokens // block_tokens) if blocks is None else int(blocks)
    words = [dim, tokens, head_stride, block_tokens, blocks, group, k_bits, v_bits,
             code_bytes(dim, k_bits), code_bytes(dim, v_bits), int(norm_fp16)]
    return np.concatenate([np.array(words, dtype=np.uint32),
                           np.array([scale], dtype=np.float32).view(np.uint32)])


def reduce_params(dim: int, blocks: int, group: int, inverse_rotate: bool) -> np.ndarray:
    return np.array([dim, blocks, group, int(inverse_rotate)], dtype=np.uint32)


def attention_scratch_floats(dim: int, group: int, block_tokens: int, k_bits: int,
                             v_bits: int) -> int:
    """tq_attention_scratch_floats() of attention.metal."""
    return 2 * group * dim + (1 << k_bits) + (1 << v_bits) + group * block_tokens + 3 * group


def group_pass(dim: int, k_bits: int, v_bits: int, block_tokens: int = DEFAULT_BLOCK_TOKENS,
               k_bits1: int | None = None) -> int:
    """Query heads of a GQA group one decode-attention pass takes: at most MAX_GROUP, and few
    enough that the block kernel's scratch fits MAX_SCRATCH_FLOATS (head_dim 512 with a group of
    16 would not). ``k_bits1``: the key split's second part (its centroids are in scratch too)."""
    tables = (1 << k_bits) + (1 << v_bits) + (0 if k_bits1 is None else 1 << k_bits1)
    fit = (MAX_SCRATCH_FLOATS - tables) // (2 * dim + block_tokens + 3)
    if fit < 1:
        raise ValueError(f"head_dim {dim} with {block_tokens}-token blocks does not fit the GPU's "
                         f"{MAX_SCRATCH_FLOATS * 4 // 1024} KB of threadgroup memory")
    return min(MAX_GROUP, fit)


def split_params(rows: int, dim: int, bits0: int, bits1: int, angle_bits: int, norm_fp16: bool,
                 norm_correction: bool = False, inverse_rotate: bool = True,
                 out_fp16: bool = False) -> np.ndarray:
    """TqSplitParams of split.metal (outlier part = channels [0, dim/2))."""
    pd = dim // 2
    ab = angle_bits // 8
    pb0, pb1 = code_bytes(pd, bits0), code_bytes(dim - pd, bits1)
    return np.array([rows, dim, pd, bits0, bits1, pb0, pb1, ab, ab + pb0 + pb1, int(norm_fp16),
                     int(norm_correction), int(inverse_rotate), int(out_fp16)], dtype=np.uint32)


def split_attention_params(dim: int, tokens: int, head_stride: int, block_tokens: int,
                           group: int, bits0: int, bits1: int, angle_bits: int, v_bits: int,
                           norm_fp16: bool, scale: float, blocks: int | None = None
                           ) -> np.ndarray:
    """TqSplitAttnParams of split.metal: TqAttnParams' words, then the split's."""
    pd, ab = dim // 2, angle_bits // 8
    words = attention_params(dim, tokens, head_stride, block_tokens, group, bits0, v_bits,
                             norm_fp16, scale, blocks)
    words[8] = ab + code_bytes(pd, bits0) + code_bytes(dim - pd, bits1)  # k_code_bytes
    return np.concatenate([words, np.array([pd, bits1, code_bytes(pd, bits0), ab], np.uint32)])


def split_attention_scratch_floats(dim: int, group: int, block_tokens: int, bits0: int,
                                   bits1: int, v_bits: int) -> int:
    """tq_split_attention_scratch_floats() of split.metal."""
    return attention_scratch_floats(dim, group, block_tokens, bits0, v_bits) + (1 << bits1)


@functools.lru_cache(maxsize=None)
def split_angle_tables(angle_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The key split's angle tables for split.metal, float32:
    ``angles`` (2^A, 2): (cos, sin) of each angle code, the C++ core's float table
    (quantizer_outlier.cpp angle_table: float(cos(k·(π/2)/top)) in double, exact ends), and
    ``bounds`` (top, 2): cos² t_j as hi + lo, t_j = (j + 1/2)·(π/2)/top the rounding boundary
    between codes j and j + 1 (top = 2^A - 1)."""
    if angle_bits not in (8, 16):
        raise ValueError(f"split_angle_bits must be 8 or 16, got {angle_bits!r}")
    top = (1 << angle_bits) - 1
    step = (math.pi / 2.0) / top  # kHalfPi / top, in double as the core
    cos, sin = math.cos, math.sin  # the C library's, as the core's std::cos / std::sin
    angles = np.empty((top + 1, 2), np.float64)
    for k in range(1, top):
        phi = k * step
        angles[k] = (cos(phi), sin(phi))
    angles[0], angles[top] = (1.0, 0.0), (0.0, 1.0)
    c2 = np.cos((np.arange(top, dtype=np.float64) + 0.5) * step) ** 2
    hi = c2.astype(np.float32)
    lo = (c2 - hi.astype(np.float64)).astype(np.float32)
    return angles.astype(np.float32), np.stack([hi, lo], axis=1)


def threads_for(dim: int) -> int:
    """Threads per group of the row kernels: a power of two dividing dim, at most 256."""
    return min(dim, 256)


# --- The mlx kernels (Apple only) -----------------------------------------------------------


def kernel_name(name: str, header: str, source: str) -> str:
    """``name`` with a digest of the kernel's text: mlx caches compiled kernels by name (on
    the CUDA path also on disk, written by :mod:`turboquant.cuda_cache`), so a name must
    change whenever the text does, or another version's kernel would run."""
    digest = hashlib.sha256((header + "\0" + source).encode("utf-8")).hexdigest()[:12]
    return f"{name}_{digest}"


@functools.lru_cache(maxsize=None)
def _kernel(which: str, rounds: int = 2):
    return build_kernel(which, candidate_path(), rounds=rounds)


@functools.lru_cache(maxsize=None)
def _bounded_kernel(which: str, min_blocks: int, rounds: int = 2):
    return build_kernel(which, "cuda", min_blocks, rounds)


def launch_bounds_header(min_blocks: int, threads: int = ATTENTION_THREADS) -> str:
    """A CUDA header prefix that gives the kernel after it ``__launch_bounds__(threads,
    min_blocks)``: registers capped so that ``min_blocks`` threadgroups fit a multiprocessor
    (mlx's cuda_kernel declares the kernel itself; this redefines its ``__global__``)."""
    return ("#undef __global__\n#define __global__ __location__(global) "
            f"__launch_bounds__({int(threads)}, {int(min_blocks)})\n")


def cuda_header_folder() -> Path:
    """Where :func:`cuda_header_file` keeps the CUDA kernels' headers: TQ_GPU_HEADER_DIR, else
    ``$XDG_CACHE_HOME/turboquant/cuda-headers`` (``~/.cache`` without XDG_CACHE_HOME)."""
    env = getenv("TQ_GPU_HEADER_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "turboquant" / "cuda-headers"


def cuda_header_file(name: str, header: str) -> Path | None:
    """The file ``<name>.h`` holding ``header`` (``name`` carries the digest of the kernel's
    text, :func:`kernel_name`), written atomically if it is absent or differs; None where it
    cannot be written, or with TQ_GPU_HEADER_INLINE=1 (then the header goes inline).

    mx.fast.cuda_kernel copies the header and source into a new string at every launch; a
    header included by path makes that a line: on an H100 the block kernel's launch took
    4.9 us instead of 6.5 with its 30,114-character header, the reduce's 2.3 instead of 3.7,
    same outputs (bench/results/gpu_launch_cost_h100_round14.log). NVRTC reads the file only
    when it compiles the kernel."""
    if getenv("TQ_GPU_HEADER_INLINE") == "1":
        return None
    path = cuda_header_folder() / f"{name}.h"
    if '"' in str(path) or "\n" in str(path):  # not a path an #include line can name
        return None
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == header:
            return path.resolve()
        from turboquant._atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(header)
        return path.resolve() if path.read_text(encoding="utf-8") == header else None
    except (OSError, UnicodeError):
        return None


def build_kernel(which: str, target: str, min_blocks: int = 0, rounds: int = 2):
    """The mlx kernel ``which`` of :data:`KERNELS` for ``target``: mx.fast.metal_kernel or
    mx.fast.cuda_kernel over the same body and header (its call signature is the same).
    ``min_blocks`` (CUDA only): launch bounds for that many threadgroups per multiprocessor.
    ``rounds``: the rotation's Hadamard rounds (:func:`rotation_rounds`)."""
    import inspect

    import mlx.core as mx

    _check_target(target)
    spec = KERNELS[which]
    header, source = kernel_text(which, target, rounds)
    if min_blocks:
        if target != "cuda":
            raise ValueError("launch bounds are a CUDA setting")
        header += launch_bounds_header(min_blocks)
    name = kernel_name(spec.name, header, source)
    if target == "cuda":  # the compiled module is for this GPU's architecture only
        from turboquant import cuda_cache

        name += cuda_cache.arch_suffix()
    common = dict(name=name, input_names=list(spec.input_names),
                  output_names=list(spec.output_names), source=source, header=header)
    if target == "cuda":  # NVRTC without fast math: IEEE division and square root
        path = cuda_header_file(name, header)
        if path is not None:  # the launch copies one line instead of the header's text
            common["header"] = f'#include "{path}"\n'
        # compiled once per machine: the module goes to mlx's disk cache
        return cuda_cache.CachedKernel(mx.fast.cuda_kernel(**common), name, common["header"],
                                       source, spec.input_names, spec.output_names)
    kwargs = {}
    if "compile_options" in inspect.signature(mx.fast.metal_kernel).parameters:
        kwargs["compile_options"] = {"math_mode": "safe"}  # IEEE: bit-exact codes
    return mx.fast.metal_kernel(**common, **kwargs)


def _require_gpu() -> None:
    if candidate_path() == "cpu":
        raise RuntimeError("no GPU kernel path on this platform (the mlx kernels need macOS "
                           "with an mlx Metal device, or mlx with a CUDA device)")


def _quantizer_tables(quantizer):
    import mlx.core as mx

    if quantizer.method != "turboquant_mse" or quantizer.rotation != "hadamard":
        raise ValueError("the mlx Metal kernels support turboquant_mse with the hadamard "
                         f"rotation, got {quantizer.method!r} / {quantizer.rotation!r}")
    cb = quantizer.codebook
    return (mx.array(np.asarray(quantizer.rotation_parameters(), dtype=np.float32).ravel()),
            mx.array(np.asarray(cb.centroids, dtype=np.float32)),
            mx.array(np.asarray(cb.boundaries, dtype=np.float32)))


def encode(quantizer, x):
    """(codes uint8 (n, code_bytes), norms (n,) float16 or float32) of mlx rows x (n, dim)."""
    import mlx.core as mx

    _require_gpu()
    signs, cents, bounds = _quantizer_tables(quantizer)
    n, dim = x.shape
    fp16 = np.dtype(quantizer.norm_dtype) == np.float16
    codes, norms = _kernel("encode")(
        inputs=[x.astype(mx.float32), signs, bounds, cents,
                params_array(encode_params(n, dim, quantizer.bits, fp16,
                                           bool(quantizer.norm_correction)))],
        output_shapes=[(n, quantizer.code_bytes), (n,)],
        output_dtypes=[mx.uint8, mx.uint16 if fp16 else mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    return codes, (norms.view(mx.float16) if fp16 else norms)


def rotate(quantizer, x):
    """Π x for mlx rows x (n, dim): the query state of decode attention."""
    import mlx.core as mx

    _require_gpu()
    signs, _, _ = _quantizer_tables(quantizer)
    n, dim = x.shape
    (y,) = _kernel("rotate")(
        inputs=[x.astype(mx.float32), signs, params_array(rotate_params(n, dim))],
        output_shapes=[(n, dim)], output_dtypes=[mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    return y


PERMUTE_THREADS = 256


def permute_params(rows: int, dim: int, width: int, rows_per_head: int) -> np.ndarray:
    return np.array([rows, dim, width, rows_per_head], dtype=np.uint32)


def permute_channels(x, order):
    """x (H, T, d), an mlx array of float16, bfloat16 or float32, with the channels of row
    block h in the order ``order[h]`` (an mlx uint32 array (H, d)): y[h, t, c] =
    x[h, t, order[h, c]], bit for bit, in x's dtype (the key split's channel order, applied
    to a chunk's keys and queries on the GPU)."""
    import mlx.core as mx

    _require_gpu()
    H, T, d = x.shape
    if x.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise ValueError(f"permute_channels takes float16, bfloat16 or float32, got {x.dtype}")
    if tuple(order.shape) != (H, d) or order.dtype != mx.uint32:
        raise ValueError(f"order must be uint32 of shape {(H, d)}, got {order.dtype} "
                         f"{tuple(order.shape)}")
    width = 2 if x.dtype == mx.float32 else 1
    words = H * T * d * width
    if words >= 1 << 32:
        raise ValueError(f"permute_channels: {words} words is over the kernel's 32-bit index")
    (y,) = _kernel("permute")(
        inputs=[x.reshape(H * T, d).view(mx.uint16), order,
                params_array(permute_params(H * T, d, width, T))],
        output_shapes=[(H * T, d * width)], output_dtypes=[mx.uint16],
        grid=(-(-words // PERMUTE_THREADS) * PERMUTE_THREADS, 1, 1),
        threadgroup=(PERMUTE_THREADS, 1, 1))
    return y.view(x.dtype).reshape(H, T, d)


def centre_params(rows: int, dim: int, rows_per_head: int, bf16: bool,
                  permute: bool) -> np.ndarray:
    return np.array([rows, dim, rows_per_head, int(bf16), int(permute)], dtype=np.uint32)


def centre_rows(k, v, k_mean, v_mean, order=None, check: bool = True):
    """The new K/V rows (H, T, d) of float16 or bfloat16 as the GPU store's fp16 window keeps
    them, in one launch: ``((k[..., order] as float32 - k_mean) as float16, (v as float32 -
    v_mean) as float16)``, bit for bit, where k_mean and v_mean are float32 (H, 1, d) means
    (k_mean already in the channel order) and ``order`` an mlx uint32 array (H, d) or None
    (no channel order). The mlx cache's centring of a decode step's token, which passes
    ``check=False`` (its arrays are its own, their dtype checked once a step)."""
    import mlx.core as mx

    if check:
        _require_gpu()
        H, T, d = k.shape
        if tuple(v.shape) != (H, T, d) or k.dtype != v.dtype or k.dtype not in (
                mx.float16, mx.bfloat16):
            raise ValueError(f"centre_rows takes keys and values of one shape and dtype, "
                             f"float16 or bfloat16, got {k.dtype} {tuple(k.shape)} and "
                             f"{v.dtype} {tuple(v.shape)}")
        for name, m in (("k_mean", k_mean), ("v_mean", v_mean)):
            if tuple(m.shape) != (H, 1, d) or m.dtype != mx.float32:
                raise ValueError(f"{name} must be float32 of shape {(H, 1, d)}, got {m.dtype} "
                                 f"{tuple(m.shape)}")
        if order is not None and (tuple(order.shape) != (H, d) or order.dtype != mx.uint32):
            raise ValueError(f"order must be uint32 of shape {(H, d)}, got {order.dtype} "
                             f"{tuple(order.shape)}")
        if 2 * H * T * d >= 1 << 32:
            raise ValueError(f"centre_rows: {2 * H * T * d} elements is over the kernel's "
                             "32-bit index")
    shape = k.shape
    key = (shape, k.dtype == mx.bfloat16, order is None)
    plan = _CENTRE_PLANS.get(key)
    if plan is None:  # per shape: the parameter block and the launch (a step asks each layer)
        if len(_CENTRE_PLANS) >= 1024:  # bounded: head counts x token counts in use
            _CENTRE_PLANS.clear()
        H, T, d = shape
        n = 2 * H * T * d
        plan = _CENTRE_PLANS[key] = (
            params_array(centre_params(H * T, d, T, key[1], order is not None)),
            dict(output_shapes=[shape, shape], output_dtypes=[mx.uint16, mx.uint16],
                 grid=(-(-n // PERMUTE_THREADS) * PERMUTE_THREADS, 1, 1),
                 threadgroup=(PERMUTE_THREADS, 1, 1)))
    u16 = mx.uint16
    k_out, v_out = _kernel("centre")(
        inputs=[k.view(u16), v.view(u16), k_mean, v_mean, _no_order() if order is None else order,
                plan[0]], **plan[1])
    return k_out.view(mx.float16), v_out.view(mx.float16)


_CENTRE_PLANS: dict = {}


def _no_order():
    """A one-word placeholder for an absent channel order (never read)."""
    return _placeholder("uint32")


def dequantize(quantizer, codes, norms, inverse_rotate=True, out_dtype=None):
    """Decoded rows (inverse_rotate) or the rotated-domain tile ‖x‖·c[idx], (n, dim)."""
    import mlx.core as mx

    _require_gpu()
    signs, cents, _ = _quantizer_tables(quantizer)
    n, dim = codes.shape[0], quantizer.dim
    fp16_out = out_dtype is not None and out_dtype == mx.float16
    fp16_norm = norms.dtype == mx.float16
    (out,) = _kernel("dequantize")(
        inputs=[codes, norms.view(mx.uint16) if fp16_norm else norms, cents, signs,
                params_array(dequant_params(n, dim, quantizer.bits, fp16_norm, inverse_rotate,
                                            fp16_out))],
        output_shapes=[(n, dim)], output_dtypes=[mx.uint16 if fp16_out else mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    return out.view(mx.float16) if fp16_out else out


def decode_attention(keys, values, queries, k_codes, k_norms, v_codes, v_norms, tokens, scale,
                     block_tokens=DEFAULT_BLOCK_TOKENS):
    """Attention of queries (kv_heads, group, dim) over the first `tokens` cached rows of
    k_codes/v_codes (kv_heads, head_stride, code_bytes) and norms (kv_heads, head_stride).
    Returns (kv_heads, group, dim) float32, in the original domain."""
    import mlx.core as mx

    kv_heads, group, dim = _attention_shape(queries, k_codes, tokens)
    k_signs, k_cents, _ = _quantizer_tables(keys)
    v_signs, v_cents, _ = _quantizer_tables(values)
    q = queries.reshape(kv_heads * group, dim).astype(mx.float32)
    shape = fast_attention_shape(dim, group, keys.bits, values.bits)
    if shape is not None:
        parts = _fast_partials(q, k_signs, False, k_codes, k_norms, v_codes, v_norms, k_cents,
                               v_cents, keys.bits, values.bits, group, tokens, scale,
                               block_tokens, shape)
    else:
        parts = _block_partials(rotate(keys, q), k_codes, k_norms, v_codes, v_norms, k_cents,
                                v_cents, keys.bits, values.bits, group, tokens, scale,
                                block_tokens)
    return _finish_attention(parts, v_signs, False, group, dim, q, scale)


def _attention_shape(queries, k_codes, tokens):
    """(kv_heads, group, dim) of a decode-attention call, after checking it can run."""
    _require_gpu()
    kv_heads, group, dim = queries.shape
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"GQA group must be in [1, {MAX_GROUP}], got {group}")
    head_stride = k_codes.shape[1]
    if not 1 <= tokens <= head_stride:
        raise ValueError(f"need 1 <= tokens <= head_stride ({head_stride}), got {tokens}")
    return kv_heads, group, dim


ATTENTION_KERNELS = ("mma", "staged", "fast", "generic")
_FORCED_ATTENTION: list[str] = []  # the innermost forced_attention() block's kernel


@contextlib.contextmanager
def forced_attention(kernel: str):
    """Within this block decode attention prefers ``kernel`` (one of ATTENTION_KERNELS)
    whatever the default or TQ_GPU_ATTENTION says: the first-use self-test runs each block
    kernel this way, the benchmarks compare them."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    _FORCED_ATTENTION.append(kernel)
    try:
        yield
    finally:
        _FORCED_ATTENTION.pop()


def generic_attention():
    """forced_attention("generic"): the generic block kernel (attention_block after a
    query-rotation launch) even where the register-tiled one could run."""
    return forced_attention("generic")


def fast_attention_shape(dim: int, group: int, k_bits: int, v_bits: int,
                         k_bits1: int | None = None) -> tuple[int, int] | None:
    """(GM, C) of the register-tiled decode-attention kernel (attention_fast.metal) for this
    problem: GM query heads per pass (the group rounded up to a power of two, at most 8), C
    coordinates per lane (16 while GM <= 4 and every width is at most 4 bits, else 8: a lane's
    registers hold 2·GM·C floats and its indices one 64-bit word); or None where the generic
    block kernel runs (head_dim not 64/128/256, a width over 8 bits, a group over 8, or the
    environment variable TQ_GPU_ATTENTION=generic). ``k_bits1``: the inlier half's width of
    split keys (``k_bits`` the outlier half's)."""
    if attention_kernel() == "generic":
        return None
    coords = getenv("TQ_GPU_FAST_COORDS")
    return _fast_shape(dim, group, k_bits, v_bits, k_bits1,
                       int(coords) if coords in ("8", "16") else None)


@functools.lru_cache(maxsize=1024)
def _fast_shape(dim: int, group: int, k_bits: int, v_bits: int, k_bits1: int | None,
                coords: int | None) -> tuple[int, int] | None:
    """fast_attention_shape() once the kernel choice and TQ_GPU_FAST_COORDS are read."""
    widths = (k_bits, v_bits) + (() if k_bits1 is None else (k_bits1,))
    if dim not in (64, 128, 256) or not all(1 <= b <= 8 for b in widths):
        return None
    gm = next((g for g in FAST_GROUPS if group <= g), None)
    if gm is None:
        return None
    c = 16 if gm <= 4 and max(widths) <= 4 else 8
    if coords is not None:  # a benchmark's sweep
        c = min(c, coords)
    lanes = dim // c
    if lanes > 32 or (k_bits1 is not None and lanes % 2):
        return None
    return gm, c


def attention_kernel() -> str:
    """The decode-attention block kernel the host prefers: ``"mma"`` (the products on tensor
    cores, attention_mma.metal), ``"fast"`` (register-tiled, codes loaded by each lane),
    ``"staged"`` (the same, with each tile's codes copied through threadgroup memory by the
    whole threadgroup, the next tile's copy in flight), or ``"generic"``; environment variable
    TQ_GPU_ATTENTION, or a :func:`forced_attention` block, else :func:`default_attention`.
    Where the preferred one cannot take a shape, the staged one, then the register-tiled one,
    then the generic one runs."""
    if _FORCED_ATTENTION:
        return _FORCED_ATTENTION[-1]
    default = default_attention()
    k = getenv("TQ_GPU_ATTENTION", default)
    return k if k in ATTENTION_KERNELS else default


def default_attention() -> str:
    """The block kernel a decode step takes by default: ``"mma"`` on the CUDA path of a GPU
    with tensor-core mma.sync (compute capability 8.0 and later), ``"staged"`` elsewhere (on
    Metal, older NVIDIA GPUs and in the emulator the mma kernel's products are a simd-group
    exchange: correct but slow)."""
    return "mma" if candidate_path() == "cuda" and _cuda_capability() >= 8 else DEFAULT_ATTENTION


@functools.lru_cache(maxsize=None)
def _cuda_capability() -> int:
    """The CUDA device's compute capability (major), from mlx's device_info (8 when mlx does
    not say: the GPUs mlx's CUDA back end is built for)."""
    try:
        import mlx.core as mx

        return int(mx.device_info().get("compute_capability_major", 8))
    except Exception:  # noqa: BLE001 - an mlx without device_info
        return 8


# The staged kernel by default on Metal (on CUDA: default_attention()): on an H100 at 128K
# tokens (8 KV heads, GQA 4, d = 128, 3-bit) Nsight Compute timed it at 298 us against the
# register-tiled kernel's 423 us, and pipelined decode calls at 435 / 490 us (plain / key
# split) against 510 / 598 us; at 32K they tie (bench/results/gpu_attention_sweep_h100.json,
# gpu_ncu_h100.txt).
DEFAULT_ATTENTION = "staged"


def staged_attention_tile(k_code_bytes: int, v_code_bytes: int, norm_fp16: bool,
                          head_stride: int, block_tokens: int, scratch_floats: int,
                          threads: int = ATTENTION_THREADS) -> tuple[int, int] | None:
    """(TT, R) of the staged kernel: the largest tile TT (a multiple of 4 dividing
    ``block_tokens`` and ``head_stride``, at most STAGE_MAX_TOKENS) whose key rows, value rows
    and norms fit STAGE_MAX_WORDS words and, doubled, the threadgroup memory beside the
    register-tiled kernel's ``scratch_floats``; R the words each of ``threads`` threads
    copies. None where no tile fits (the register-tiled kernel then runs)."""
    nb = 2 if norm_fp16 else 4
    tt = STAGE_MAX_TOKENS
    if os.environ.get("TQ_GPU_STAGE_TOKENS") in ("4", "8", "16", "32", "64"):  # a sweep's
        tt = int(os.environ["TQ_GPU_STAGE_TOKENS"])
    while tt >= 4:
        if block_tokens % tt == 0 and head_stride % tt == 0:
            words = tt * (k_code_bytes + v_code_bytes + 2 * nb) // 4
            r = -(-words // threads)
            if words <= STAGE_MAX_WORDS and scratch_floats + 2 * r * threads <= MAX_SCRATCH_FLOATS:
                return tt, r
        tt //= 2
    return None


# The mma kernel's threadgroup memory: CUDA gives a block 48 KB of static shared memory, Metal
# guarantees a threadgroup 32 KB (MAX_SCRATCH_FLOATS); its copy ring's stages per simd-group.
MMA_MAX_SCRATCH_FLOATS = 12288
MMA_STAGES = 3


def mma_stages() -> int:
    """Stages of the mma kernel's copy ring (tiles in flight per simd-group: one fewer):
    MMA_STAGES, or TQ_GPU_MMA_STAGES (1 to 4) for a benchmark's sweep."""
    n = getenv("TQ_GPU_MMA_STAGES")
    return int(n) if n in ("1", "2", "3", "4") else MMA_STAGES


def mma_min_blocks() -> int:
    """Threadgroups per multiprocessor the mma kernel's registers are capped for on CUDA
    (``__launch_bounds__``; 0: no cap, the default): TQ_GPU_MMA_MIN_BLOCKS (2 to 6) for a
    benchmark's sweep. NVRTC for sm_90 (``python bench/kernel_registers.py --min-blocks 4,5``):
    128 registers uncapped (4 threadgroups), 96 without spills at 5."""
    n = getenv("TQ_GPU_MMA_MIN_BLOCKS")
    return int(n) if n in ("2", "3", "4", "5", "6") else 0


def mma_attention_ok(dim: int, group: int, k_bits: int, v_bits: int, k_bits1: int | None,
                     head_stride: int, k_code_bytes: int, norm_fp16: bool = True,
                     stages: int = MMA_STAGES) -> bool:
    """Whether the matrix-multiply kernel (attention_mma.metal) takes this problem: head_dim
    64, 128 or 256, at most 8 query heads per KV head, every width 1 to 4 bits (its pair tables
    hold 2^(2·bits) words), a scratch within the target's threadgroup memory, and a head stride
    of whole 16-token tiles (a simd-group copies the 16-byte chunks that hold its rows, so each
    head's rows must start on one)."""
    widths = (k_bits, v_bits) + (() if k_bits1 is None else (k_bits1,))
    if dim not in (64, 128, 256) or not 1 <= group <= 8 or not all(1 <= b <= 4 for b in widths):
        return False
    if head_stride % 16:  # each head's rows start on a 16-byte chunk
        return False
    limit = MAX_SCRATCH_FLOATS if candidate_path() == "metal" else MMA_MAX_SCRATCH_FLOATS
    return mma_attention_scratch_floats(dim, group, k_bits, v_bits, k_bits1, k_code_bytes,
                                        norm_fp16, stages) <= limit


def mma_attention_stages(dim: int, group: int, k_bits: int, v_bits: int, k_bits1: int | None,
                         head_stride: int, k_code_bytes: int, norm_fp16: bool,
                         stages: int) -> int:
    """The most copy-ring stages (at most ``stages``) with which the mma kernel takes this
    problem (:func:`mma_attention_ok`), 0 where it takes none."""
    for n in range(stages, 0, -1):
        if mma_attention_ok(dim, group, k_bits, v_bits, k_bits1, head_stride, k_code_bytes,
                            norm_fp16, n):
            return n
    return 0


# Floats the mma kernel keeps of the split's angle table: (cos, sin) of the 256 one-byte angle
# codes in threadgroup memory (two-byte codes read theirs from device memory; the room is kept
# either way). attention_mma.metal's TQ_MMA_ANGLE_FLOATS.
MMA_ANGLE_FLOATS = 512


def _mma_table_words(bits: int) -> int:
    pairs = 4 ** bits
    return pairs * 32 if pairs <= 64 else pairs


def mma_attention_scratch_floats(dim: int, group: int, k_bits: int, v_bits: int,
                                 k_bits1: int | None, k_code_bytes: int, norm_fp16: bool,
                                 stages: int = MMA_STAGES,
                                 threads: int = ATTENTION_THREADS) -> int:
    """tq_attention_mma_scratch_floats() of attention_mma.metal: the pair tables (one copy per
    lane of those of at most 64 pairs) and, for split keys, the angle table (MMA_ANGLE_FLOATS),
    then the larger of the queries, the simd-groups' copy rings and their merge."""
    tables = (_mma_table_words(k_bits) + _mma_table_words(v_bits)
              + (0 if k_bits1 is None else _mma_table_words(k_bits1) + MMA_ANGLE_FLOATS))
    run = lambda n: (n + 30) // 16 * 4  # noqa: E731 - tq_run_words
    nb = 2 if norm_fp16 else 4
    stage = run(16 * k_code_bytes) + run(16 * code_bytes(dim, v_bits)) + 2 * run(16 * nb)
    warps = threads // 32
    region = max(group * dim, warps * stages * stage)
    return max(tables + region, warps * group * (dim + 2))


def fast_attention_unroll() -> int:
    """Tokens a stream of the register-tiled kernel loads at once (its U template argument):
    FAST_UNROLL, or TQ_GPU_FAST_UNROLL (1, 2 or 4) for a benchmark's sweep."""
    u = getenv("TQ_GPU_FAST_UNROLL")
    return int(u) if u in ("1", "2", "4") else FAST_UNROLL


def fast_attention_scratch_floats(dim: int, gm: int, k_bits: int, v_bits: int,
                                  k_bits1: int | None = None,
                                  threads: int = ATTENTION_THREADS) -> int:
    """tq_attention_fast_scratch_floats() of attention_fast.metal."""
    tables = (1 << k_bits) + (1 << v_bits) + (0 if k_bits1 is None else 1 << k_bits1)
    return tables + max(gm * dim, (threads // 32 - 1) * gm * (dim + 2))


@functools.lru_cache(maxsize=1024)
def _partial_outputs(kv_heads, blocks, group, dim):
    import mlx.core as mx

    return dict(output_shapes=[(kv_heads, blocks, group), (kv_heads, blocks, group),
                               (kv_heads, blocks, group, dim)],
                output_dtypes=[mx.float32, mx.float32, mx.float32],
                grid=(blocks * ATTENTION_THREADS, kv_heads, 1),
                threadgroup=(ATTENTION_THREADS, 1, 1))


@functools.lru_cache(maxsize=None)
def _no_angles():
    import mlx.core as mx

    return mx.zeros((2,), mx.float32)


@functools.lru_cache(maxsize=1024)
def _fast_launch(dim: int, shape: tuple[int, int], kv_heads: int, head_stride: int,
                 k_code_bytes: int, group: int, k_bits: int, split: tuple[int, int] | None,
                 v_bits: int, fp16: bool, scale: float, block_tokens: int, blocks: int,
                 per_head: bool, kernel: str, unroll: int, stage_env: str | None,
                 mma_stages: int = MMA_STAGES):
    """What a register-tiled (or staged) decode launch needs besides its arrays and the token
    count, computed once per shape (a decode step only changes the count): the kernel, its
    template arguments, the launch geometry, and the parameter words with the token count
    (word 1) left to fill. ``stage_env``: TQ_GPU_STAGE_TOKENS, part of the key."""
    del stage_env  # read by staged_attention_tile; here it only keys the cache
    gm, c = shape
    if split is None:
        k_bits1 = k_bits
        words = attention_params(dim, 0, head_stride, block_tokens, group, k_bits, v_bits,
                                 fp16, scale, blocks)
        words = np.concatenate([words, np.array([dim, k_bits, code_bytes(dim, k_bits), 0],
                                                np.uint32)])
    else:
        k_bits1, angle_bits = split
        words = split_attention_params(dim, 0, head_stride, block_tokens, group, k_bits,
                                       k_bits1, angle_bits, v_bits, fp16, scale, blocks)
    words = np.concatenate([words, np.array([int(per_head)], np.uint32)])
    words.setflags(write=False)
    scratch = fast_attention_scratch_floats(dim, gm, k_bits, v_bits,
                                            None if split is None else k_bits1)
    template = [("TQ_D", dim), ("TQ_GM", gm), ("TQ_C", c), ("TQ_KB0", k_bits),
                ("TQ_KB1", k_bits1), ("TQ_VB", v_bits), ("TQ_SPLIT", int(split is not None))]
    kb1 = None if split is None else k_bits1
    stages = (mma_attention_stages(dim, group, k_bits, v_bits, kb1, head_stride, k_code_bytes,
                                   fp16, mma_stages) if kernel == "mma" else 0)
    if stages:
        mma = [("SCRATCH", mma_attention_scratch_floats(dim, group, k_bits, v_bits, kb1,
                                                        k_code_bytes, fp16, stages)),
               ("TQ_D", dim), ("TQ_KB0", k_bits), ("TQ_KB1", k_bits1), ("TQ_VB", v_bits),
               ("TQ_SPLIT", 0 if split is None else split[1] // 8), ("TQ_NS", stages)]
        return "attention_mma", mma, words, _partial_outputs(kv_heads, blocks, group, dim)
    tile = (staged_attention_tile(k_code_bytes, code_bytes(dim, v_bits), fp16, head_stride,
                                  block_tokens, scratch) if kernel in ("staged", "mma") else None)
    if tile is not None:
        tt, r = tile
        which = "attention_staged"
        template = [("SCRATCH", scratch + 2 * r * ATTENTION_THREADS), *template,
                    ("TQ_TT", tt), ("TQ_R", r)]
    else:
        which = "attention_fast"
        template = [("SCRATCH", scratch), *template, ("TQ_U", unroll)]
    return which, template, words, _partial_outputs(kv_heads, blocks, group, dim)


def _fast_partials(q, k_signs, per_head, k_codes, k_norms, v_codes, v_norms, k_cents, v_cents,
                   k_bits, v_bits, group, tokens, scale, block_tokens, shape, split=None,
                   rounds=2):
    """The register-tiled block kernel on raw queries q (kv_heads * group, dim): the
    per-(block, KV head) partial softmax and value sums, as attention_block writes them.
    ``split``: (k_bits1, angle_bits, angles) of split keys (``k_bits`` the outlier half's);
    ``rounds``: the key rotation's Hadamard rounds."""
    import mlx.core as mx

    kv_heads, head_stride = int(k_codes.shape[0]), int(k_codes.shape[1])
    fp16 = k_norms.dtype == mx.float16
    blocks = attention_blocks(tokens, block_tokens, kv_heads)
    which, template, words, launch = _fast_launch(
        int(q.shape[-1]), tuple(shape), kv_heads, head_stride, int(k_codes.shape[2]), group,
        k_bits, None if split is None else (split[0], split[1]), v_bits, fp16, float(scale),
        block_tokens, blocks, bool(per_head), attention_kernel(), fast_attention_unroll(),
        getenv("TQ_GPU_STAGE_TOKENS"), mma_stages())
    angles = _no_angles() if split is None else split[2]
    kernel = _block_kernel(which, rounds)
    # The norms as they are (fp16 or float32): the kernels read them as bytes (the words'
    # fp16 flag says which), so a decode step makes no view of them.
    return kernel(
        inputs=[q, k_signs, k_codes, k_norms, v_codes, v_norms, k_cents, v_cents, angles,
                _token_params(words, tokens)],
        template=template, **launch)


def _block_kernel(which: str, rounds: int):
    """The block kernel ``which`` of _fast_launch, with the mma kernel's register cap on the
    CUDA path (mma_min_blocks) where one is set."""
    bound = (mma_min_blocks() if which in ("attention_mma", "attention_mma_step")
             and candidate_path() == "cuda" else 0)
    return _bounded_kernel(which, bound, rounds) if bound else _kernel(which, rounds)


# counted_params(words, {1: tokens}) of _fast_launch's words (one object per launch shape)
# by (the words' identity, tokens): a decode step's lookup, without building the counts' key.
_TOKEN_PARAMS: dict = {}


def _token_params(words: np.ndarray, tokens: int):
    key = (id(words), tokens)
    hit = _TOKEN_PARAMS.get(key)
    if hit is not None and hit[0] is words:
        return hit[1]
    if len(_TOKEN_PARAMS) >= 4096:  # bounded: launch shapes x token counts in use
        _TOKEN_PARAMS.clear()
    arr = counted_params(words, {1: tokens})
    _TOKEN_PARAMS[key] = (words, arr)
    return arr


def _block_partials(q_rot, k_codes, k_norms, v_codes, v_norms, k_cents, v_cents, k_bits, v_bits,
                    group, tokens, scale, block_tokens):
    """The generic block kernel (attention_block) on rotated queries q_rot
    (kv_heads * group, dim): per-(block, KV head) partial softmax and value sums."""
    import mlx.core as mx

    kv_heads, head_stride = k_codes.shape[0], k_codes.shape[1]
    dim = q_rot.shape[-1]
    fp16 = k_norms.dtype == mx.float16
    blocks = attention_blocks(tokens, block_tokens, kv_heads)
    scratch = attention_scratch_floats(dim, group, block_tokens, k_bits, v_bits)
    as_bits = (lambda a: a.view(mx.uint16)) if fp16 else (lambda a: a)
    return _kernel("attention_block")(
        inputs=[q_rot, k_codes, as_bits(k_norms), v_codes, as_bits(v_norms), k_cents, v_cents,
                counted_params(attention_params(dim, 0, head_stride, block_tokens, group,
                                                k_bits, v_bits, fp16, scale, blocks), {1: tokens})],
        template=[("SCRATCH", scratch)], **_partial_outputs(kv_heads, blocks, group, dim))


def _rows_input(rows, kv_heads, dim):
    """The two fp16 row sets of attention_reduce_rows: [(k, v, count, stride)] * 2, a set
    that is absent as a one-element placeholder with count 0. A set is (k, v), all their
    rows, or (k, v, n), their first n rows (a buffer with room after them: the stride is
    the buffer's rows)."""
    import mlx.core as mx

    rows = [r for r in (rows or ()) if r is not None]
    if len(rows) > 2:
        raise ValueError(f"at most two sets of fp16 rows (sinks, window), got {len(rows)}")
    out = []
    for r in rows:
        k, v = r[0], r[1]
        if tuple(k.shape) != tuple(v.shape) or k.shape[0] != kv_heads or k.shape[2] != dim:
            raise ValueError(f"fp16 rows of shape {tuple(k.shape)} / {tuple(v.shape)} do not "
                             f"match {kv_heads} KV heads of dim {dim}")
        stride = int(k.shape[1])
        n = int(r[2]) if len(r) > 2 else stride
        if not 0 <= n <= stride:
            raise ValueError(f"{n} fp16 rows asked of a buffer of {stride}")
        half = [a if a.dtype == mx.float16 else a.astype(mx.float16) for a in (k, v)]
        out.append((half[0], half[1], n, stride))
    while len(out) < 2:
        out.append((_no_rows(), _no_rows(), 0, 0))
    return out


@functools.lru_cache(maxsize=None)
def _placeholder(dtype: str):
    """A one-element array of mlx dtype ``dtype`` standing in for an absent kernel input."""
    import mlx.core as mx

    return mx.zeros((1,), getattr(mx, dtype))


def _no_rows():
    return _placeholder("float16")


def _no_row_bits():
    return _placeholder("uint16")


def reduce_threads(dim: int) -> int:
    """Threads per reduce threadgroup: REDUCE_THREADS on the CUDA path, REDUCE_THREADS_METAL
    elsewhere (or TQ_GPU_REDUCE_THREADS), a power of two from 32 to 1024; below dim, a power
    of two dividing it (one slice). A dim under 32 keeps threads_for(dim), one slice: the
    inverse rotation's simd-group shuffles take whole rows, and a simd-group holding
    coordinates of two slices would diverge in them."""
    if dim < 32:
        return threads_for(dim)
    n = (_reduce_threads_setting(getenv("TQ_GPU_REDUCE_THREADS", ""))
         or (REDUCE_THREADS if candidate_path() == "cuda" else REDUCE_THREADS_METAL))
    return n if n >= dim else min(n, threads_for(dim))


@functools.lru_cache(maxsize=16)
def _reduce_threads_setting(env: str) -> int:
    """TQ_GPU_REDUCE_THREADS's value as a thread count (0: unset), checked once per value."""
    if not env:
        return 0
    if not env.isdigit() or int(env) not in (32, 64, 128, 256, 512, 1024):
        raise ValueError(f"TQ_GPU_REDUCE_THREADS={env!r}: expected a power of two from 32 "
                         "to 1024")
    return int(env)


@functools.lru_cache(maxsize=256)
def _reduce_launch(kv_heads: int, group: int, dim: int, threads: int) -> dict:
    import mlx.core as mx

    return dict(output_shapes=[(kv_heads, group, dim)], output_dtypes=[mx.float32],
                grid=(group * threads, kv_heads, 1), threadgroup=(threads, 1, 1))


# The reduce launches' parameter words: made once per value (they change only when the block
# count or the fp16 row counts do, not at every decode step).
@functools.lru_cache(maxsize=1024)
def _reduce_rows_words(dim: int, blocks: int, group: int, scale: float, per_head: bool,
                       extra: tuple = ()):
    """TqReduceRowsParams with the row counts and strides zero (made once per value), then
    the per-head flag and ``extra`` words (attention_reduce_rows_step's dtype flags)."""
    words = np.array([dim, blocks, group, 1, 0, 0, 0, 0, 0, int(per_head), *extra], np.uint32)
    words[8] = np.array([scale], np.float32).view(np.uint32)[0]
    words.setflags(write=False)
    return words


@functools.lru_cache(maxsize=4096)  # by value: a decode step's lookup (the block is never written)
def _reduce_rows_params(dim: int, blocks: int, group: int, na: int, sa: int, nb: int, sb: int,
                        scale: float, per_head: bool, extra: tuple = ()):
    words = _reduce_rows_words(dim, blocks, group, scale, per_head, extra)
    counts = {(4, 5): na} if na == sa else {4: na, 5: sa}  # own rows: count = stride
    if nb == sb:
        counts[(6, 7)] = nb
        return counted_params(words, counts)
    # The window's buffer (stride sb): its row count changes at every decode step, so the
    # blocks for every count are made at once and a step takes its row.
    counts[7] = sb
    return counted_table(words, counts, 6, sb + 1)[nb:nb + 1].reshape(-1)  # a view


def _finish_attention(parts, v_signs, per_head, group, dim, q, scale, rows=None, with_lse=False,
                      rounds=2):
    """The second launch of split-K attention: merge the blocks, apply Π_Vᵀ (a rotation of
    ``rounds`` Hadamard rounds), and with
    ``rows`` (up to two (k, v) sets of (kv_heads, n, dim) fp16 rows: sinks, window) fold the
    rows in under the same softmax (attention_reduce_rows, q the raw queries
    (kv_heads * group, dim)); with_lse, also the log-sum-exp of the codes' scaled scores."""
    import mlx.core as mx

    part_m, part_l, part_acc = parts
    kv_heads, blocks = int(part_m.shape[0]), int(part_m.shape[1])
    launch = _reduce_launch(kv_heads, group, dim, reduce_threads(dim))
    if rows:
        if with_lse:
            raise ValueError("with_lse and fp16 rows exclude each other (the rows are merged "
                             "in the kernel)")
        (ka, va, na, sa), (kb, vb, nb, sb) = _rows_input(rows, kv_heads, dim)
        (out,) = _kernel("attention_reduce_rows", rounds)(
            inputs=[part_m, part_l, part_acc, v_signs, q, ka, va, kb, vb,
                    _reduce_rows_params(dim, blocks, group, na, sa, nb, sb, float(scale),
                                        bool(per_head))],
            **launch)
        return out
    (out,) = _kernel("attention_reduce_heads" if per_head else "attention_reduce", rounds)(
        inputs=[part_m, part_l, part_acc, v_signs,
                params_array(reduce_params(dim, blocks, group, True))],
        **launch)
    if with_lse:  # log Σ_b l_b e^(m_b): the blocks merged as the reduce kernel merges them
        top = part_m.max(axis=1)
        lse = top + mx.log((part_l * mx.exp(part_m - top[:, None])).sum(axis=1))
        return out, lse
    return out


# --- Per-head tables and kernels (caches whose KV heads have their own rotations) ------------


class HeadTables:
    """The kernel tables of one role (keys or values) of a cache: one ``turboquant_mse``
    quantizer with the hadamard or hadamard1 rotation per KV head (same dim, bits, rotation
    and norm dtype), their rotation signs stacked as (n_heads, 2*dim) (hadamard1: D₁ and
    unused ones in D₂'s place), and the shared codebook. ``rounds``: the rotation's Hadamard
    rounds, the kernels' TQ_ROTATION_ROUNDS. The mlx arrays are
    built at first use, so the tables also serve the NumPy reference kernels
    (``turboquant.mlx_metal.ReferenceKernels``), which use only ``quantizers``."""

    def __init__(self, quantizers):
        quantizers = tuple(quantizers)
        if not quantizers:
            raise ValueError("HeadTables needs one quantizer per KV head, got none")
        first = quantizers[0]
        for q in quantizers:
            if q.method != "turboquant_mse" or q.rotation not in ROTATION_ROUNDS:
                raise ValueError("the Metal kernels support turboquant_mse with the hadamard "
                                 f"or hadamard1 rotation, got {q.method!r} / {q.rotation!r}")
            if ((q.dim, q.bits, q.rotation, np.dtype(q.norm_dtype), bool(q.norm_correction))
                    != (first.dim, first.bits, first.rotation, np.dtype(first.norm_dtype),
                        bool(first.norm_correction))):
                raise ValueError("all heads of one role need the same dim, bits, rotation, "
                                 "norm dtype and norm correction")
        self.quantizers = quantizers
        self.rotation = first.rotation
        self.rounds = rotation_rounds(first.rotation)
        self.dim, self.bits = first.dim, first.bits
        self.code_bytes = first.code_bytes
        self.norm_fp16 = np.dtype(first.norm_dtype) == np.float16
        # Encode stores ‖x‖/‖ỹ‖ (QuantizerConfig::norm_correction), computed in the kernel.
        self.norm_correction = bool(first.norm_correction)
        self._mx = None

    @property
    def n_heads(self) -> int:
        return len(self.quantizers)

    def signs_numpy(self) -> np.ndarray:
        """(n_heads, 2*dim) float32: D₁ then D₂ of each head's rotation (hadamard1: D₁, then
        ones that the one-round kernels never read)."""
        return np.stack([_two_rounds_of_signs(q.rotation_parameters(), self.dim, self.rounds)
                         for q in self.quantizers])

    def state_bytes(self) -> int:
        """Bytes of the per-head rotation state (what the C++ cache counts as quantizer state):
        the rotation's signs, 2*dim (hadamard) or dim (hadamard1) floats per head."""
        return self.n_heads * self.rounds * self.dim * 4

    def mx_tables(self):
        """(signs (n_heads*2*dim,), centroids, boundaries) as mlx float32 arrays, cached."""
        if self._mx is None:
            import mlx.core as mx

            cb = self.quantizers[0].codebook
            self._mx = (mx.array(self.signs_numpy().ravel()),
                        mx.array(np.asarray(cb.centroids, np.float32)),
                        mx.array(np.asarray(cb.boundaries, np.float32)))
        return self._mx


def _two_rounds_of_signs(params, dim: int, rounds: int) -> np.ndarray:
    """A rotation's signs as the kernels' table row of 2*dim: D₁ then D₂, or for one round
    (hadamard1, ``dim`` parameters) D₁ then ones in D₂'s place."""
    signs = np.asarray(params, np.float32).ravel()
    if signs.size != rounds * dim:
        raise ValueError(f"a {rounds}-round rotation of dim {dim} has {rounds * dim} signs, "
                         f"got {signs.size}")
    return signs if rounds == 2 else np.concatenate([signs, np.ones(dim, np.float32)])


def _with_rows_per_head(words: np.ndarray, rows_per_head: int) -> np.ndarray:
    return np.concatenate([words, np.array([rows_per_head], np.uint32)])


def encode_heads(tables: HeadTables, x):
    """Encode mlx rows x (n_heads, T, dim), head h with its own rotation: (codes uint8
    (n_heads, T, code_bytes), norms (n_heads, T) float16 or float32). Split keys
    (:class:`SplitHeadTables`) go to the split.metal kernel."""
    import mlx.core as mx

    if isinstance(tables, SplitHeadTables):
        return split_encode_heads(tables, x)
    _require_gpu()
    H, T, dim = x.shape
    if H != tables.n_heads or dim != tables.dim:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match {tables.n_heads} heads of "
                         f"dim {tables.dim}")
    signs, cents, bounds = tables.mx_tables()
    n = H * T
    fp16 = tables.norm_fp16
    codes, norms = _kernel("encode_heads", tables.rounds)(
        inputs=[x.reshape(n, dim).astype(mx.float32), signs, bounds, cents,
                params_array(_with_rows_per_head(encode_params(n, dim, tables.bits, fp16,
                                                               tables.norm_correction), T))],
        output_shapes=[(n, tables.code_bytes), (n,)],
        output_dtypes=[mx.uint8, mx.uint16 if fp16 else mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    norms = norms.view(mx.float16) if fp16 else norms
    return codes.reshape(H, T, tables.code_bytes), norms.reshape(H, T)


def rotate_heads(tables: HeadTables, x):
    """Π_h x for mlx rows x (n_heads, R, dim) (the query state of decode attention)."""
    import mlx.core as mx

    _require_gpu()
    H, R, dim = x.shape
    signs, _, _ = tables.mx_tables()
    n = H * R
    (y,) = _kernel("rotate_heads", tables.rounds)(
        inputs=[x.reshape(n, dim).astype(mx.float32), signs,
                params_array(_with_rows_per_head(rotate_params(n, dim), R))],
        output_shapes=[(n, dim)], output_dtypes=[mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    return y.reshape(H, R, dim)


DEQUANTIZE_ROWS_PER_GROUP = 8  # rows (simd-groups) per threadgroup of the rows kernels


def dequantize_kernel() -> str:
    """How the dequantize kernels map rows to threads: ``"rows"`` (default: a simd-group per
    row, the row in registers, several rows per threadgroup; for head_dim = 32·2^k up to 512)
    or ``"group"`` (a threadgroup per row, the transform in threadgroup memory), from
    TQ_GPU_DEQUANTIZE. Both give the same values, bit for bit."""
    choice = getenv("TQ_GPU_DEQUANTIZE", "rows").strip().lower() or "rows"
    if choice not in ("rows", "group"):
        raise ValueError(f"TQ_GPU_DEQUANTIZE must be 'rows' or 'group', got {choice!r}")
    return choice


def _rows_launch(rows: int) -> dict:
    """The grid of a rows-form launch over ``rows`` rows (a simd-group each)."""
    group = DEQUANTIZE_ROWS_PER_GROUP * 32
    return dict(grid=(-(-rows // DEQUANTIZE_ROWS_PER_GROUP) * group, 1, 1),
                threadgroup=(group, 1, 1))


def _dequantize_launch(which: str, rows: int, dim: int, min_lanes: int) -> tuple[str, dict]:
    """The kernel (``which`` or its ``_rows`` form) and the grid of a dequantize of ``rows``
    rows of ``dim`` coordinates; ``min_lanes``: the fewest elements per lane the rows form
    takes (2 for split keys, whose halves must each span the 32 lanes)."""
    per_lane = dim // 32
    if (dequantize_kernel() == "rows" and dim % 32 == 0
            and per_lane in (1, 2, 4, 8, 16) and per_lane >= min_lanes):
        return which.replace("dequantize", "dequantize_rows"), _rows_launch(rows)
    return which, dict(grid=(rows * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))


def _dequantize_inputs(tables: HeadTables, codes, norms, inverse_rotate: bool, out_fp16: bool):
    """What every dequantize launch of codes (n_heads, n, code_bytes) and norms (n_heads, n)
    takes: (the group form's kernel name, its inputs before the parameter block, the
    parameter words ending with the rows per head), for plain or split keys."""
    import mlx.core as mx

    H, n, _ = codes.shape
    rows = H * n
    fp16_norm = norms.dtype == mx.float16
    head = [codes.reshape(rows, tables.code_bytes),
            (norms.view(mx.uint16) if fp16_norm else norms).reshape(rows)]
    if isinstance(tables, SplitHeadTables):
        signs, cents, _, angles, _ = tables.mx_tables()
        words = split_params(rows, tables.dim, tables.bits0, tables.bits1, tables.angle_bits,
                             fp16_norm, inverse_rotate=inverse_rotate, out_fp16=out_fp16)
        return "split_dequantize_heads", head + [cents, signs, angles], \
            _with_rows_per_head(words, n)
    signs, cents, _ = tables.mx_tables()
    words = dequant_params(rows, tables.dim, tables.bits, fp16_norm, inverse_rotate, out_fp16)
    return "dequantize_heads", head + [cents, signs], _with_rows_per_head(words, n)


def _dequantize(tables: HeadTables, codes, norms, inverse_rotate, out_dtype):
    """dequantize_heads() / split_dequantize_heads(): one launch of the rows or group form."""
    import mlx.core as mx

    _require_gpu()
    H, n, _ = codes.shape
    dim = tables.dim
    fp16_out = out_dtype is not None and out_dtype == mx.float16
    base, inputs, words = _dequantize_inputs(tables, codes, norms, inverse_rotate, fp16_out)
    split = isinstance(tables, SplitHeadTables)
    which, launch = _dequantize_launch(base, H * n, dim, 2 if split else 1)
    (out,) = _kernel(which, tables.rounds)(
        inputs=inputs + [params_array(words)], output_shapes=[(H * n, dim)],
        output_dtypes=[mx.uint16 if fp16_out else mx.float32], **launch)
    out = out.view(mx.float16) if fp16_out else out
    return out.reshape(H, n, dim)


def dequantize_heads(tables: HeadTables, codes, norms, inverse_rotate=True, out_dtype=None):
    """Decoded rows (n_heads, n, dim) of codes (n_heads, n, code_bytes) and norms (n_heads, n)
    (inverse_rotate), or the rotated-domain tile; float32, or float16 with out_dtype. Split
    keys (:class:`SplitHeadTables`) go to the split.metal kernel."""
    return _dequantize(tables, codes, norms, inverse_rotate, out_dtype)


def dequantize_tile_heads(tables: HeadTables, codes, norms, before=None, after=None):
    """The float16 prefill tile (n_heads, nb + n + na, dim) of codes (n_heads, n, code_bytes)
    and norms (n_heads, n): per head the float16 rows ``before`` (n_heads, nb, dim; the fp16
    sinks), the codes decoded (dequantize_heads' rows as float16), then ``after``
    (n_heads, na, dim; the fp16 window); ``before`` / ``after`` None for none. One launch
    of the rows form, which also copies the fp16 rows (no concatenation after it); the
    group form (:func:`dequantize_kernel`, head dims outside the rows form) decodes, then
    concatenates."""
    import mlx.core as mx

    H, n, _ = codes.shape
    dim = tables.dim
    counts = []
    for name, r in (("before", before), ("after", after)):
        if r is not None and (r.dtype != mx.float16 or r.ndim != 3 or r.shape[0] != H
                              or r.shape[2] != dim):
            raise ValueError(f"{name} rows must be float16 of shape ({H}, rows, {dim}), got "
                             f"{r.dtype} {tuple(r.shape)}")
        counts.append(0 if r is None else int(r.shape[1]))
    split = isinstance(tables, SplitHeadTables)
    base = "split_dequantize_heads" if split else "dequantize_heads"
    which, _ = _dequantize_launch(base, H * n, dim, 2 if split else 1)
    if n == 0 or which == base:  # the group form: decode, then concatenate
        parts = [before, dequantize_heads(tables, codes, norms, out_dtype=mx.float16), after]
        parts = [p for p in parts if p is not None]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    _require_gpu()
    _, inputs, words = _dequantize_inputs(tables, codes, norms, True, True)
    rows_in = [_no_row_bits() if r is None else r.view(mx.uint16) for r in (before, after)]
    total = H * (counts[0] + n + counts[1])
    (out,) = _kernel(base.replace("_heads", "_tile_heads"), tables.rounds)(
        inputs=inputs + rows_in + [params_array(np.concatenate([words,
                                                                np.array(counts, np.uint32)]))],
        output_shapes=[(total, dim)], output_dtypes=[mx.uint16], **_rows_launch(total))
    return out.view(mx.float16).reshape(H, total // H, dim)


def decode_attention_heads(keys: HeadTables, values: HeadTables, queries, k_codes, k_norms,
                           v_codes, v_norms, tokens, scale, block_tokens=DEFAULT_BLOCK_TOKENS,
                           with_lse=False, rows=None):
    """decode_attention() for per-head rotations: queries (kv_heads, group, dim), codes
    (kv_heads, head_stride, code_bytes), norms (kv_heads, head_stride), the first `tokens`
    rows attended. Returns (kv_heads, group, dim) float32 in the original domain; with_lse,
    also the log-sum-exp of the scaled scores, (kv_heads, group) float32 (from the blocks'
    softmax statistics), to merge this softmax with attention over other tokens. ``rows``:
    up to two (k, v) sets of fp16 rows (kv_heads, n, dim) (sinks, window) attended under the
    same softmax, merged by the reduce launch. Split keys (``keys`` a
    :class:`SplitHeadTables`) run the split.metal block kernel; plain keys the register-tiled
    kernel where :func:`fast_attention_shape` allows, else the generic one."""
    import mlx.core as mx

    if isinstance(keys, SplitHeadTables):
        return _split_key_attention(keys, values, queries, k_codes, k_norms, v_codes, v_norms,
                                    tokens, scale, block_tokens, with_lse, rows)
    kv_heads, group, dim = _attention_shape(queries, k_codes, tokens)
    k_signs, k_cents, _ = keys.mx_tables()
    v_signs, v_cents, _ = values.mx_tables()
    q = queries.reshape(kv_heads * group, dim).astype(mx.float32)
    shape = fast_attention_shape(dim, group, keys.bits, values.bits)
    if shape is not None:
        parts = _fast_partials(q, k_signs, True, k_codes, k_norms, v_codes, v_norms, k_cents,
                               v_cents, keys.bits, values.bits, group, tokens, scale,
                               block_tokens, shape, rounds=keys.rounds)
    else:
        q_rot = rotate_heads(keys, queries).reshape(kv_heads * group, dim)
        parts = _block_partials(q_rot, k_codes, k_norms, v_codes, v_norms, k_cents, v_cents,
                                keys.bits, values.bits, group, tokens, scale, block_tokens)
    return _finish_attention(parts, v_signs, True, group, dim, q, scale, rows, with_lse,
                             values.rounds)


# --- A model's decode step, as a kept plan -----------------------------------------------------
# decode_attention_heads() with the fp16 sinks and window works out, at every call, the same
# kernels, launch geometry, tables and parameter words from values that stay put between window
# flushes (the codes' count, the buffers' strides, the scale, the settings). A decode step is
# built tens of times a token on the host, so it takes them from a plan made once per such
# value instead: the same launches with the same inputs, so the same bits.

# The environment settings a plan depends on (the benchmarks' overrides, see their readers).
_PLAN_ENV = ("TQ_GPU_ATTENTION", "TQ_GPU_FAST_COORDS", "TQ_GPU_FAST_UNROLL",
             "TQ_GPU_STAGE_TOKENS", "TQ_GPU_MMA_STAGES", "TQ_GPU_MMA_MIN_BLOCKS",
             "TQ_GPU_ATTENTION_GROUPS", "TQ_GPU_REDUCE_THREADS")
_PLAN_ENV_KEYS = tuple(os.fsencode(n) for n in _PLAN_ENV)
_DECODE_PLANS: dict = {}


def _plan_settings() -> tuple:
    """What a decode plan reads of the environment and of forced_attention(), as one key."""
    forced = _FORCED_ATTENTION[-1] if _FORCED_ATTENTION else None
    if _ENV_DATA is None:
        return (forced, *map(os.environ.get, _PLAN_ENV))
    return (forced, *map(_ENV_DATA.get, _PLAN_ENV_KEYS))


class _DecodePlan:
    """The two launches of a decode step over ``tokens`` codes with fp16 rows (decode_step_heads):
    the block kernel with its template, geometry and token count, the reduce with its geometry
    and, per window row count, its parameter words; with the mma block kernel, the same for
    the step's form that takes the queries and gives the output as the model has them
    (decode_step_words)."""

    __slots__ = ("keys", "values", "block", "block_args", "tables", "reduce", "reduce_launch",
                 "words", "params", "shape", "which", "launch_words", "tokens",
                 "step_block", "step_reduce", "step_args", "step_launch", "step_params")

    def __init__(self, keys, values, kv_heads, group, dim, head_stride, k_code_bytes, fp16,
                 tokens, scale, block_tokens):
        split = isinstance(keys, SplitHeadTables)
        k_bits = keys.bits0 if split else keys.bits
        k_bits1 = keys.bits1 if split else None
        shape = fast_attention_shape(dim, group, k_bits, values.bits, k_bits1)
        if shape is None:
            raise _NoPlan  # the generic block kernel: decode_attention_heads() runs it
        kt = keys.mx_tables()
        v_signs, v_cents, _ = values.mx_tables()
        blocks = attention_blocks(tokens, block_tokens, kv_heads)
        which, template, words, launch = _fast_launch(
            dim, tuple(shape), kv_heads, head_stride, k_code_bytes, group, k_bits,
            None if not split else (k_bits1, keys.angle_bits), values.bits, fp16, float(scale),
            block_tokens, blocks, True, attention_kernel(), fast_attention_unroll(),
            getenv("TQ_GPU_STAGE_TOKENS"), mma_stages())
        self.keys, self.values = keys, values
        self.which, self.launch_words, self.tokens = which, words, tokens
        self.block = _block_kernel(which, keys.rounds)
        self.block_args = dict(template=template, **launch)
        # the block kernel's inputs besides the queries and the codes: signs, centroids, angles
        self.tables = (kt[0], kt[1], v_cents, kt[3] if split else _no_angles(),
                       _token_params(words, tokens), v_signs)
        self.reduce = _kernel("attention_reduce_rows", values.rounds)
        self.reduce_launch = _reduce_launch(kv_heads, group, dim, reduce_threads(dim))
        self.words = (dim, blocks, group, float(scale))
        self.params: dict = {}  # (row counts and strides) -> the reduce's parameter words
        self.shape = (kv_heads * group, dim)
        self.step_block = self.step_reduce = self.step_args = self.step_launch = None
        self.step_params: dict = {}  # (dtype flags) -> the step form's block parameter words

    def reduce_params(self, n_a: int, s_a: int, n_b: int, s_b: int, extra: tuple = ()):
        key = (n_a, s_a, n_b, s_b, extra)
        p = self.params.get(key)
        if p is None:
            if len(self.params) > 4096:
                self.params.clear()
            dim, blocks, group, scale = self.words
            p = self.params[key] = _reduce_rows_params(dim, blocks, group, n_a, s_a, n_b, s_b,
                                                       scale, True, extra)
        return p

    def step_form(self, bf16: bool, permute: bool):
        """The step form's kernels are made at its first use; its block parameter words are
        the block kernel's plus the queries' dtype and channel-order flags."""
        if self.step_block is None:
            import mlx.core as mx

            self.step_block = _block_kernel("attention_mma_step", self.keys.rounds)
            self.step_reduce = _kernel("attention_reduce_rows_step", self.values.rounds)
            args = dict(self.block_args)
            args["output_shapes"] = [*args["output_shapes"], self.shape]
            args["output_dtypes"] = [*args["output_dtypes"], mx.float32]
            self.step_args = args
            self.step_launch = dict(self.reduce_launch, output_dtypes=[mx.uint16])
        key = (bool(bf16), bool(permute))
        p = self.step_params.get(key)
        if p is None:
            words = np.concatenate([self.launch_words, np.array(key, np.uint32)])
            words.setflags(write=False)
            p = self.step_params[key] = _token_params(words, self.tokens)
        return p


class _NoPlan(Exception):
    pass


def _decode_plan(keys, values, kv_heads, group, dim, k_codes, k_norms, tokens, scale, sinks,
                 window, block_tokens):
    """The kept plan of a decode step (decode_step_heads), made at its first use; None where
    the step is not one a plan serves (decode_attention_heads() runs it)."""
    head_stride = int(k_codes.shape[1])
    sink_n = 0 if sinks is None else int(sinks[0].shape[1])
    win_stride = 0 if window is None else int(window[0].shape[1])
    key = (id(keys), id(values), kv_heads, group, dim, head_stride, int(k_codes.shape[2]),
           k_norms.dtype, tokens, scale, sink_n, win_stride, block_tokens, _plan_settings())
    plan = _DECODE_PLANS.get(key)
    if plan is None or plan.keys is not keys or plan.values is not values:
        _require_gpu()
        if not 1 <= tokens <= head_stride or not 1 <= group <= MAX_GROUP:
            return None
        try:
            import mlx.core as mx

            plan = _DecodePlan(keys, values, kv_heads, group, dim, head_stride,
                               int(k_codes.shape[2]), k_norms.dtype == mx.float16, tokens,
                               scale, block_tokens)
        except _NoPlan:
            return None
        if len(_DECODE_PLANS) >= 1024:  # bounded: layers x flush points in use
            _DECODE_PLANS.clear()
        _DECODE_PLANS[key] = plan
    return plan


def _step_rows(sinks, window):
    """The reduce's two row sets of a decode step as _rows_input() orders them: the sinks,
    then the window; an absent one last, as an empty placeholder. ((k_a, v_a), n_a, s_a,
    (k_b, v_b), n_b, s_b), or None where there are no rows."""
    if window is None:
        win = None
    else:
        stride = int(window[0].shape[1])
        win = ((window[0], window[1]), int(window[2]) if len(window) > 2 else stride, stride)
    if sinks is not None:
        n = int(sinks[0].shape[1])
        a = (tuple(sinks[:2]), n, n)
        b = win
    elif win is not None:
        a, b = win, None
    else:
        return None
    if b is None:
        b = ((_no_rows(), _no_rows()), 0, 0)
    return (*a, *b)


def decode_step_heads(keys, values, queries, k_codes, k_norms, v_codes, v_norms, tokens, scale,
                      sinks=None, window=None, block_tokens=DEFAULT_BLOCK_TOKENS):
    """decode_attention_heads(keys, values, queries, ..., tokens, scale, rows=rows) of a
    model's decode step, where ``rows`` are ``sinks`` ((k, v) fp16 rows, or None) then
    ``window`` ((k, v) or (k_buffer, v_buffer, n): the first n rows of buffers, or None), at
    least one of them present: the same two launches with the same inputs, their kernels,
    geometry, tables and parameter words taken from a plan kept per value of what a step does
    not change (tokens, head stride, row strides, scale, settings). The queries (kv_heads,
    group, dim) are taken as they come (float32). Falls back to decode_attention_heads()
    where it would not run the register-tiled or mma block kernel."""
    kv_heads, group, dim = queries.shape
    rows = _step_rows(sinks, window)
    plan = None if rows is None else _decode_plan(keys, values, kv_heads, group, dim, k_codes,
                                                  k_norms, tokens, scale, sinks, window,
                                                  block_tokens)
    if plan is None:
        return decode_attention_heads(keys, values, queries, k_codes, k_norms, v_codes, v_norms,
                                      tokens, scale, block_tokens,
                                      rows=[r for r in (sinks, window) if r is not None])
    k_signs, k_cents, v_cents, angles, tparams, v_signs = plan.tables
    q = queries.reshape(plan.shape)
    parts = plan.block(inputs=[q, k_signs, k_codes, k_norms, v_codes, v_norms, k_cents, v_cents,
                               angles, tparams], **plan.block_args)
    (ka, va), n_a, s_a, (kb, vb), n_b, s_b = rows
    (out,) = plan.reduce(inputs=[parts[0], parts[1], parts[2], v_signs, q, ka, va, kb, vb,
                                 plan.reduce_params(n_a, s_a, n_b, s_b)],
                         **plan.reduce_launch)
    return out


def decode_step_words(keys, values, q_rows, order, k_codes, k_norms, v_codes, v_norms, tokens,
                      scale, sinks=None, window=None, v_mean=None,
                      block_tokens=DEFAULT_BLOCK_TOKENS):
    """decode_step_heads() of a model's decode step with its queries and output as the model
    has them: ``q_rows`` (kv_heads, group, dim) fp16 or bfloat16 queries in the model's
    channel order, taken in the key split's order ``order`` ((kv_heads, dim) uint32; None:
    as they are); the output (kv_heads * group, dim) in the queries' dtype, the value mean
    ``v_mean`` (float32 (kv_heads, dim), or (kv_heads, 1, dim) as the mlx cache keeps it;
    None: none) added. The same bits as mlx's gather and
    float32 cast of the queries, decode_step_heads(), then ``(out + v_mean).astype(dtype)``,
    in the same two launches (the mma block kernel reads the queries' words through the
    order and keeps them as float32 for the reduce, which adds the mean and rounds): three
    GPU operations fewer. None where the step's plan does not run the mma kernel (the caller
    takes the longer form)."""
    import mlx.core as mx

    kv_heads, group, dim = q_rows.shape
    if q_rows.dtype not in (mx.float16, mx.bfloat16):
        return None
    rows = _step_rows(sinks, window)
    plan = None if rows is None else _decode_plan(keys, values, kv_heads, group, dim, k_codes,
                                                  k_norms, tokens, scale, sinks, window,
                                                  block_tokens)
    if plan is None or plan.which != "attention_mma":
        return None
    bf16 = q_rows.dtype == mx.bfloat16
    tparams = plan.step_form(bf16, order is not None)
    k_signs, k_cents, v_cents, angles, _, v_signs = plan.tables
    parts = plan.step_block(
        inputs=[q_rows.reshape(plan.shape).view(mx.uint16),
                _no_order() if order is None else order, k_signs, k_codes, k_norms, v_codes,
                v_norms, k_cents, v_cents, angles, tparams], **plan.step_args)
    (ka, va), n_a, s_a, (kb, vb), n_b, s_b = rows
    (out,) = plan.step_reduce(
        inputs=[parts[0], parts[1], parts[2], v_signs, parts[3], ka, va, kb, vb,
                _placeholder("float32") if v_mean is None else v_mean,
                plan.reduce_params(n_a, s_a, n_b, s_b, (int(bf16), int(v_mean is not None)))],
        **plan.step_launch)
    return out.view(q_rows.dtype)


# --- The key split (split.metal) --------------------------------------------------------------


def split_support(quantizer) -> str | None:
    """None when the split.metal kernels can run this quantizer (an outlier split of
    ``turboquant_mse`` over channels [0, d/2) and [d/2, d), both parts with the hadamard
    or hadamard1 rotation: the mlx-lm key split), else why not."""
    d = quantizer.dim
    chans = list(quantizer.outlier_channels)
    if quantizer.method != "turboquant_mse":
        return f"the split kernels need turboquant_mse, got {quantizer.method!r}"
    if d < 32 or d > 512 or d & (d - 1):
        return f"the split kernels need a power-of-two head_dim in [32, 512], got {d}"
    if chans != list(range(d // 2)):
        return ("the split kernels need the outlier channels to be the first half "
                f"[0, {d // 2}) (the mlx-lm key split's channel order), got {len(chans)} others")
    rotations = {quantizer.part(p).rotation for p in (0, 1)}
    if len(rotations) != 1 or not rotations <= set(ROTATION_ROUNDS):
        return ("the split kernels need both parts rotated by hadamard or both by hadamard1, "
                f"got {sorted(rotations)}")
    if quantizer.jl_dim not in (0, d):
        return "the split kernels do not support a QJL dimension"
    return None


class SplitHeadTables:
    """The kernel tables of split keys (split.metal), one outlier-split quantizer per KV head
    (``turboquant_mse``, outlier channels [0, d/2), hadamard or hadamard1 parts; see
    :func:`split_support`):
    per-head signs (n_heads, 2*dim) = D₁ of both parts then D₂ of both parts, the two parts'
    codebooks concatenated (outlier part first), and the angle tables of the split's
    ``split_angle_bits``. Same interface as :class:`HeadTables` (``quantizers``, ``dim``,
    ``code_bytes``, ``norm_fp16``, ``norm_correction``, ``n_heads``, ``state_bytes``,
    ``mx_tables``), so the reference kernels of turboquant.mlx_metal serve it unchanged."""

    def __init__(self, quantizers):
        quantizers = tuple(quantizers)
        if not quantizers:
            raise ValueError("SplitHeadTables needs one quantizer per KV head, got none")
        first = quantizers[0]
        for q in quantizers:
            why = split_support(q)
            if why:
                raise ValueError(why)
            if ((q.dim, q.outlier_bits, q.part(1).bits, q.split_angle_bits, q.part(0).rotation,
                 np.dtype(q.norm_dtype), bool(q.norm_correction))
                    != (first.dim, first.outlier_bits, first.part(1).bits,
                        first.split_angle_bits, first.part(0).rotation,
                        np.dtype(first.norm_dtype), bool(first.norm_correction))):
                raise ValueError("all heads of one role need the same dim, bits, angle bits, "
                                 "rotation, norm dtype and norm correction")
        self.quantizers = quantizers
        self.rotation = first.part(0).rotation
        self.rounds = rotation_rounds(self.rotation)
        self.dim, self.part_dim = first.dim, first.dim // 2
        self.bits0, self.bits1 = first.outlier_bits, first.part(1).bits
        self.bits = self.bits1
        self.angle_bits = first.split_angle_bits
        self.code_bytes = first.code_bytes
        self.norm_fp16 = np.dtype(first.norm_dtype) == np.float16
        self.norm_correction = bool(first.norm_correction)
        self._mx = None

    @property
    def n_heads(self) -> int:
        return len(self.quantizers)

    def signs_numpy(self) -> np.ndarray:
        """(n_heads, 2*dim) float32: D₁ of the outlier and inlier parts, then their D₂
        (hadamard1: ones that the one-round kernels never read)."""
        rows = []
        for q in self.quantizers:
            p0, p1 = (_two_rounds_of_signs(q.part(p).rotation_parameters(), self.part_dim,
                                           self.rounds).reshape(2, -1) for p in (0, 1))
            rows.append(np.concatenate([p0[0], p1[0], p0[1], p1[1]]))
        return np.stack(rows)

    def state_bytes(self) -> int:
        """Bytes of the quantizers' state, as the C++ cache counts it."""
        return sum(int(q.state_bytes()) for q in self.quantizers)

    def codebooks_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(centroids, boundaries) of both parts, the outlier part's first."""
        c0, c1 = self.quantizers[0].part(0).codebook, self.quantizers[0].part(1).codebook
        return (np.concatenate([np.asarray(c0.centroids, np.float32),
                                np.asarray(c1.centroids, np.float32)]),
                np.concatenate([np.asarray(c0.boundaries, np.float32),
                                np.asarray(c1.boundaries, np.float32)]))

    def mx_tables(self):
        """(signs, centroids, boundaries, angles, angle_bounds) as mlx float32 arrays, cached."""
        if self._mx is None:
            import mlx.core as mx

            cents, bounds = self.codebooks_numpy()
            angles, angle_bounds = split_angle_tables(self.angle_bits)
            self._mx = (mx.array(self.signs_numpy().ravel()), mx.array(cents), mx.array(bounds),
                        mx.array(angles.ravel()), mx.array(angle_bounds.ravel()))
        return self._mx


def _split_params(t: SplitHeadTables, rows: int, rows_per_head: int, **kw) -> np.ndarray:
    return _with_rows_per_head(split_params(rows, t.dim, t.bits0, t.bits1, t.angle_bits,
                                            t.norm_fp16, **kw), rows_per_head)


def split_encode_heads(tables: SplitHeadTables, x):
    """encode_heads() for split keys: (codes (n_heads, T, code_bytes), norms (n_heads, T))."""
    import mlx.core as mx

    _require_gpu()
    H, T, dim = x.shape
    if H != tables.n_heads or dim != tables.dim:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match {tables.n_heads} heads of "
                         f"dim {tables.dim}")
    signs, cents, bounds, angles, angle_bounds = tables.mx_tables()
    n = H * T
    fp16 = tables.norm_fp16
    codes, norms = _kernel("split_encode_heads", tables.rounds)(
        inputs=[x.reshape(n, dim).astype(mx.float32), signs, bounds, cents, angles, angle_bounds,
                params_array(_split_params(tables, n, T,
                                           norm_correction=tables.norm_correction))],
        output_shapes=[(n, tables.code_bytes), (n,)],
        output_dtypes=[mx.uint8, mx.uint16 if fp16 else mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    norms = norms.view(mx.float16) if fp16 else norms
    return codes.reshape(H, T, tables.code_bytes), norms.reshape(H, T)


def split_rotate_heads(tables: SplitHeadTables, x):
    """diag(Π_O, Π_I)_h x for mlx rows x (n_heads, R, dim): split keys' query state."""
    import mlx.core as mx

    _require_gpu()
    H, R, dim = x.shape
    signs = tables.mx_tables()[0]
    n = H * R
    (y,) = _kernel("split_rotate_heads", tables.rounds)(
        inputs=[x.reshape(n, dim).astype(mx.float32), signs,
                params_array(_split_params(tables, n, R))],
        output_shapes=[(n, dim)], output_dtypes=[mx.float32],
        grid=(n * threads_for(dim), 1, 1), threadgroup=(threads_for(dim), 1, 1))
    return y.reshape(H, R, dim)


def split_dequantize_heads(tables: SplitHeadTables, codes, norms, inverse_rotate=True,
                           out_dtype=None):
    """dequantize_heads() for split keys (decoded rows bit-identical to Quantizer.decode)."""
    return _dequantize(tables, codes, norms, inverse_rotate, out_dtype)


def _split_key_attention(keys: SplitHeadTables, values: HeadTables, queries, k_codes, k_norms,
                         v_codes, v_norms, tokens, scale, block_tokens, with_lse, rows=None):
    """decode_attention_heads() with split keys: the split block kernel, then the same
    reduce as plain keys (values are plain)."""
    import mlx.core as mx

    kv_heads, group, dim = _attention_shape(queries, k_codes, tokens)
    k_signs, k_cents, _, angles, _ = keys.mx_tables()
    v_signs, v_cents, _ = values.mx_tables()
    q = queries.reshape(kv_heads * group, dim).astype(mx.float32)
    shape = fast_attention_shape(dim, group, keys.bits0, values.bits, keys.bits1)
    if shape is not None:
        parts = _fast_partials(q, k_signs, True, k_codes, k_norms, v_codes, v_norms, k_cents,
                               v_cents, keys.bits0, values.bits, group, tokens, scale,
                               block_tokens, shape, (keys.bits1, keys.angle_bits, angles),
                               keys.rounds)
        return _finish_attention(parts, v_signs, True, group, dim, q, scale, rows, with_lse,
                                 values.rounds)
    q_rot = split_rotate_heads(keys, queries).reshape(kv_heads * group, dim)
    head_stride = k_codes.shape[1]
    fp16 = k_norms.dtype == mx.float16
    blocks = attention_blocks(tokens, block_tokens, kv_heads)
    scratch = split_attention_scratch_floats(dim, group, block_tokens, keys.bits0, keys.bits1,
                                             values.bits)
    as_bits = (lambda a: a.view(mx.uint16)) if fp16 else (lambda a: a)
    parts = _kernel("split_attention_block")(
        inputs=[q_rot, k_codes, as_bits(k_norms), v_codes, as_bits(v_norms), k_cents, v_cents,
                angles,
                counted_params(split_attention_params(dim, 0, head_stride, block_tokens, group,
                                                      keys.bits0, keys.bits1, keys.angle_bits,
                                                      values.bits, fp16, scale, blocks),
                               {1: tokens})],
        template=[("SCRATCH", scratch)], **_partial_outputs(kv_heads, blocks, group, dim))
    return _finish_attention(parts, v_signs, True, group, dim, q, scale, rows, with_lse,
                             values.rounds)
