"""The mlx-resident code store: a KV cache whose codes and norms are mlx arrays.

:class:`MetalCodeStore` keeps one layer's K/V as TurboQuant codes + fp16 norms in mlx arrays
of shape (n_kv_heads, capacity, code_bytes) / (n_kv_heads, capacity), growing by pages of
``block_tokens`` tokens (no fp16 copy of the coded tokens is kept). New tokens are encoded by
the ``encode_heads`` kernel (with norm correction when configured), decode steps (one query
position) run split-K attention on the codes (``decode_attention_heads``), and prefill
(several query positions) dequantizes the visible tokens to an fp32 tile
(``dequantize_heads``) and runs ``mx.fast.scaled_dot_product_attention`` with a causal /
sliding-window mask. With ``fp16_sinks`` / ``fp16_window`` (the C++ cache's semantics) the
first and the most recent tokens are fp16 mlx arrays; a decode step merges the codes' split-K
softmax (its log-sum-exp, from the blocks' statistics) with the fp16 tokens' exactly. On a Mac with mlx's Metal device the kernels are the
``turboquant.metal`` functions (``mx.fast.metal_kernel`` over metal/*.metal), so mlx arrays
never leave the GPU.

With the key split (``n_outlier_channels`` / ``outlier_channels`` = the first half of the
channels, ``outlier_bits``, ``outlier_roles="keys"``, ``split_angle_bits``: the mlx-lm cache's
default) the keys are ``OutlierSplitQuantizer`` codes, encoded, rotated, dequantized and
attended by the split.metal kernels (``turboquant.metal.SplitHeadTables``), bit-identical to
the C++ core's; values are unchanged.

Per-KV-head widths (``key_head_bits`` / ``value_head_bits`` / ``outlier_head_bits``, the
core's lists of n_kv_heads or n_layers × n_kv_heads entries: a calibrated profile) group the
KV heads by their (key, value) widths; each width group has its own tables and code pages
and is encoded and attended by the kernels of its widths (one launch set per group, on the
group's KV heads and the query heads of each), the groups' outputs put back in head order.
Codes, norms, memory and files are the core's, byte for byte.

Importance-routed mixed precision (``mixed_group_blocks``, ``mixed_keep_blocks``,
``decay_bits``: the core's rules, cache/mixed_precision.cpp) rates the fp16 window tokens by the
squared softmax weights of every attention call and flushes the window in groups, each KV
head keeping its most important tokens at full width; the kept tokens' codes live in the
width group's full-width pages, the others' in low-width pages, and attention merges both
sets (each through the split-K kernels with its log-sum-exp) with the fp16 rows. Masks,
code order, codes and memory are the core's; the importance is computed here in fp32
(within rounding of the core's), the one part of a file that is not the core's bytes.

It has the methods and semantics that ``turboquant.mlx_lm`` uses on ``_core.KVCache``
(``append``, ``attend``, ``size``, ``trim``, ``memory_bytes``, ``fp16_bytes``, ``to_bytes`` /
``from_bytes``), taking and returning mlx arrays of shape (heads, T, d). The quantizers are
those of the C++ cache (``turboquant_mse``, hadamard or hadamard1 rotation, the same seed
and per-(layer, KV head, role) streams), so the codes are bit-identical to
``_core.KVCache``'s, and
``to_bytes`` writes the C++ cache file format (through ``_core.KVCache.append_encoded``):
a file saved by either loads in the other.

The kernels are injected (``kernels=``): any object with ``encode_heads``,
``dequantize_heads`` and ``decode_attention_heads`` (including its ``with_lse`` and ``rows``
keywords) of
the signatures in ``turboquant.metal``. The default is the ``turboquant.metal`` module itself,
which runs on macOS with an mlx Metal device or with mlx's CUDA back end on an NVIDIA GPU
(elsewhere it raises "no GPU kernel path on this platform"). :class:`ReferenceKernels`
implements the same three functions with the C++ quantizers and NumPy/mlx ops; the tests run
the store on it on Linux. What runs only on a GPU: the ``turboquant.metal`` kernels themselves (their sources
are checked without one by the emulation tests of tests/python/test_metal.py and
test_mlx_metal.py, and compiled for CUDA by NVRTC in test_cuda_kernels.py).

:func:`self_test` is the first use of a GPU path (``turboquant.gpu_path.active_path``): the
store on the real kernels against the C++ core, on a small cache that launches every kernel.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Sequence

import numpy as np

from turboquant import _core, metal
from turboquant.kv_cache import CompressedKVCache, _is_mlx, _is_mlx_dtype, _mlx_dtype, _numpy_dtype
from turboquant.metal import HeadTables, SplitHeadTables
from turboquant.observers import Event

__all__ = ["MetalCodeStore", "MetalKVCache", "MetalCompressedKVCache", "ReferenceKernels",
           "kv_stream_id", "self_test", "store_supports", "METAL_KERNELS"]

METAL_KERNELS = metal  # the real kernel set (an mlx Metal or CUDA device only)


_DEFAULT_OUTLIER_ROLES = "both"  # _core.KVCache's outlier_roles when there is no split


def kv_stream_id(layer: int, kv_head: int, role: int) -> int:
    """cache/quantizer_table.h kv_stream_id(): make_stream_id(0, layer, 2*kv_head + role), role 0 = key."""
    return ((int(layer) & 0xFFFFFF) << 24) | ((2 * int(kv_head) + int(role)) & 0xFFFFFF)


def store_supports(head_dim: int, key_method: str = "turboquant_mse",
                   value_method: str = "turboquant_mse", rotation: str = "auto") -> str | None:
    """None when a MetalCodeStore can hold this configuration, else the reason it cannot."""
    if key_method != "turboquant_mse" or value_method != "turboquant_mse":
        return (f"the Metal kernels support turboquant_mse keys and values, got {key_method!r} / "
                f"{value_method!r}")
    if rotation not in ("auto", "hadamard", "hadamard1"):
        return f"the Metal kernels need the hadamard or hadamard1 rotation, got {rotation!r}"
    d = int(head_dim)
    if not 16 <= d <= 512 or d & (d - 1):
        return f"the Metal kernels need a power-of-two head_dim in [16, 512], got {d}"
    return None


def _mx():
    import mlx.core as mx

    return mx


def _as_mx(x: Any, what: str):
    mx = _mx()
    if not isinstance(x, mx.array):
        a = np.asarray(x)
        if a.dtype not in (np.float32, np.float16):
            if a.dtype.kind != "f":
                raise TypeError(f"{what} must be float32 or float16, got {a.dtype}")
            a = a.astype(np.float32)
        x = mx.array(a)
    elif x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {x.dtype}")
    return x


def _heads_tokens(x, heads: int, dim: int, what: str, heads_name: str):
    """(heads, T, dim) view of a (T, d) | (H, T, d) | (1, H, T, d) array (and (d,) if allowed)."""
    shape = tuple(x.shape)
    if not shape or shape[-1] != dim:
        raise ValueError(f"{what} must end in head_dim={dim}, got shape {shape}")
    if len(shape) == 2:
        x = x.reshape(1, shape[0], dim)
    elif len(shape) == 4:
        if shape[0] != 1:
            raise ValueError(f"{what} batch size must be 1 (one cache per sequence), got "
                             f"shape {shape}")
        x = x.reshape(shape[1:])
    elif len(shape) != 3:
        raise ValueError(f"{what} must be (T, d), (H, T, d) or (1, H, T, d), got shape {shape}")
    if x.shape[0] != heads:
        raise ValueError(f"{what} has {x.shape[0]} heads (shape {shape}) but the cache has "
                         f"{heads_name}={heads}" + (" (pass (H, T, d))" if len(shape) == 2 else ""))
    return x


class ReferenceKernels:
    """The kernel set of turboquant.metal (``encode_heads``, ``dequantize_heads``,
    ``decode_attention_heads``), same signatures and outputs, computed on the CPU with the
    C++ quantizers (``_core.Quantizer.encode`` / ``decode``) and NumPy. Codes and norms are
    bit-identical to the Metal kernels' (the emulation tests check those against the same
    quantizers); attention agrees within fp32 rounding. Runs anywhere; used by the tests and
    usable as a CPU fallback of the store."""

    name = "reference"

    @staticmethod
    def permute_channels(x, order):
        """turboquant.metal.permute_channels: y[h, t, c] = x[h, t, order[h, c]]."""
        mx = _mx()
        return mx.take_along_axis(x, order.astype(mx.int32)[:, None, :], axis=2)

    @staticmethod
    def centre_rows(k, v, k_mean, v_mean, order=None, check=True):
        """turboquant.metal.centre_rows: the rows centred in float32, rounded to float16."""
        mx = _mx()
        if order is not None:
            k = mx.take_along_axis(k, order.astype(mx.int32)[:, None, :], axis=2)
        return ((k.astype(mx.float32) - k_mean).astype(mx.float16),
                (v.astype(mx.float32) - v_mean).astype(mx.float16))

    @staticmethod
    def encode_heads(tables: HeadTables, x):
        mx = _mx()
        xs = np.asarray(x.astype(mx.float32))
        H, T, _ = xs.shape
        if H != tables.n_heads or xs.shape[2] != tables.dim:
            raise ValueError(f"x of shape {xs.shape} does not match {tables.n_heads} heads of "
                             f"dim {tables.dim}")
        codes = np.empty((H, T, tables.code_bytes), np.uint8)
        norms = np.empty((H, T), np.float16 if tables.norm_fp16 else np.float32)
        for h, q in enumerate(tables.quantizers):
            codes[h], norms[h] = q.encode(np.ascontiguousarray(xs[h]))
        return mx.array(codes), mx.array(norms)

    @staticmethod
    def dequantize_heads(tables: HeadTables, codes, norms, inverse_rotate=True, out_dtype=None):
        mx = _mx()
        c, n = np.asarray(codes), np.asarray(norms)
        out = np.empty(c.shape[:2] + (tables.dim,), np.float32)
        for h, q in enumerate(tables.quantizers):
            out[h] = q.decode(np.ascontiguousarray(c[h]), np.ascontiguousarray(n[h]))
            if not inverse_rotate:  # the rotated-domain tile ‖x‖·c[idx] = Π x̂
                out[h] = out[h] @ np.asarray(q.rotation_matrix(), np.float32).T
        res = mx.array(out)
        return res.astype(out_dtype) if out_dtype is not None else res

    @staticmethod
    def dequantize_tile_heads(tables: HeadTables, codes, norms, before=None, after=None):
        """turboquant.metal.dequantize_tile_heads: fp16 rows ``before``, the decoded codes
        as float16, fp16 rows ``after``, per head."""
        mx = _mx()
        parts = [before, ReferenceKernels.dequantize_heads(tables, codes, norms,
                                                           out_dtype=mx.float16), after]
        return mx.concatenate([p for p in parts if p is not None], axis=1)

    @staticmethod
    def decode_attention_heads(keys: HeadTables, values: HeadTables, queries, k_codes, k_norms,
                               v_codes, v_norms, tokens, scale,
                               block_tokens=metal.DEFAULT_BLOCK_TOKENS, with_lse=False,
                               rows=None):
        mx = _mx()
        kv_heads, group, dim = queries.shape
        if not 1 <= group <= metal.MAX_GROUP:
            raise ValueError(f"GQA group must be in [1, {metal.MAX_GROUP}], got {group}")
        if not 1 <= tokens <= k_codes.shape[1]:
            raise ValueError(f"need 1 <= tokens <= head_stride ({k_codes.shape[1]}), got {tokens}")
        q = np.asarray(queries.astype(mx.float32))
        k = np.asarray(ReferenceKernels.dequantize_heads(keys, k_codes[:, :tokens],
                                                         k_norms[:, :tokens]))
        v = np.asarray(ReferenceKernels.dequantize_heads(values, v_codes[:, :tokens],
                                                         v_norms[:, :tokens]))
        if rows:  # fp16 rows (sinks, window) under the same softmax
            if with_lse:
                raise ValueError("with_lse and fp16 rows exclude each other")
            n = [r[2] if len(r) > 2 else r[0].shape[1] for r in rows]  # (k, v[, rows used])
            k = np.concatenate([k] + [np.asarray(r[0][:, :m].astype(mx.float32))
                                      for r, m in zip(rows, n)], axis=1)
            v = np.concatenate([v] + [np.asarray(r[1][:, :m].astype(mx.float32))
                                      for r, m in zip(rows, n)], axis=1)
        s = np.einsum("hgd,htd->hgt", q, k) * np.float32(scale)
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        out = mx.array(np.einsum("hgt,htd->hgd", p / p.sum(-1, keepdims=True), v)
                       .astype(np.float32))
        if with_lse:
            return out, mx.array((m[..., 0] + np.log(p.sum(-1))).astype(np.float32))
        return out


def _head_bits(bits, name: str, n_kv_heads: int, layer: int, lowest: int):
    """A per-KV-head width list as the core takes it (None: uniform), checked: n_kv_heads
    entries, or n_kv_heads per layer of a cache of which the store holds layer ``layer``;
    each in [lowest, 8] (outlier_head_bits: 0 means that head's key bits + 1)."""
    if bits is None:
        return None
    bits = list(bits)
    if not bits:
        return None
    H = int(n_kv_heads)
    if len(bits) != H and (len(bits) % H or len(bits) // H <= layer):
        raise ValueError(f"{name} must have one entry per KV head (n_kv_heads = {H}) or one per "
                         f"layer and KV head (n_layers * {H}, covering layer {layer}), got "
                         f"{len(bits)} entries")
    for i, b in enumerate(bits):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) \
                or not lowest <= int(b) <= 8:
            raise ValueError(f"{name}[{i}] must be an integer in [{lowest}, 8], got {b!r}")
    return tuple(int(b) for b in bits)


def _pick(bits, n_kv_heads: int, layer: int, kv_head: int, otherwise: int) -> int:
    """KVCacheConfig::pick(): the width of one (layer, KV head) from a per-head list."""
    if bits is None:
        return int(otherwise)
    return bits[kv_head] if len(bits) == n_kv_heads else bits[layer * n_kv_heads + kv_head]


# The code pages grow by 1/GROWTH_DIVISOR of their rows (whole pages) when full.
GROWTH_DIVISOR = 8
# The page arrays hold a multiple of ALLOC_ROWS rows as well as whole pages: the tensor-core
# decode kernel copies 16-byte chunks, so each head's rows must start on one
# (turboquant.metal.mma_attention_ok).
ALLOC_ROWS = 16


def _alloc_rows(rows: int, block_tokens: int) -> int:
    """``rows`` rounded up to whole pages of ``block_tokens`` and a multiple of ALLOC_ROWS."""
    unit = math.lcm(block_tokens, ALLOC_ROWS)
    return -(-rows // unit) * unit

# Scores per chunk of query rows in a mixed-precision store's prefill (float32: 64 MiB).
_SCORE_CHUNK = 1 << 24


def _decay_reference_bits(head_dim: int, bits: int, n_outliers: int, outlier_bits: int) -> int:
    """kv_cache.h decay_reference_bits(): a split stream's nominal bits, rounded down."""
    if n_outliers <= 0:
        return bits
    ob = outlier_bits if outlier_bits else min(bits + 1, 8)
    return (n_outliers * ob + (head_dim - n_outliers) * bits) // head_dim


def _decayed_split_bits(head_dim: int, bits: int, n_outliers: int, outlier_bits: int,
                        low: int) -> tuple[int, int]:
    """kv_cache.h decayed_split_bits(): (inlier, outlier) bits of a split at ``low`` bits."""
    ob = outlier_bits if outlier_bits else min(bits + 1, 8)
    drop = _decay_reference_bits(head_dim, bits, n_outliers, outlier_bits) - low
    return max(1, bits - drop), max(1, ob - drop)


def _vector_grow(cap: int, size: int, added: int) -> int:
    """The capacity of a std::vector of ``size`` elements and capacity ``cap`` after
    ``added`` more are inserted (libstdc++: size + max(size, added) when it must grow)."""
    return cap if size + added <= cap else size + max(size, added)


class _WidthGroup:
    """The KV heads of a store that share one key width and one value width: their kernel
    tables and their code pages, (heads, capacity, code_bytes) uint8 and (heads, capacity)
    float16 per role (None while empty)."""

    def __init__(self, heads: Sequence[int], key_tables, value_tables, n_kv_heads: int):
        self.heads = tuple(int(h) for h in heads)
        self.key_tables, self.value_tables = key_tables, value_tables
        # None: every KV head of the store, in order (no gather).
        self.index = (None if self.heads == tuple(range(n_kv_heads))
                      else _mx().array(np.asarray(self.heads, np.int32)))
        self.k_codes = self.k_norms = self.v_codes = self.v_norms = None
        self.low: _WidthGroup | None = None  # mixed precision: the low-width tables and pages

    def take(self, x):
        """The group's heads of an (n_kv_heads, ...) array."""
        return x if self.index is None else _mx().take(x, self.index, axis=0)

    def arrays(self) -> tuple:
        return self.k_codes, self.k_norms, self.v_codes, self.v_norms

    def row_bytes(self) -> int:
        """Bytes of one token of every head of the group: codes and fp16 norms, both roles."""
        return len(self.heads) * (self.key_tables.code_bytes + self.value_tables.code_bytes + 4)

    def grow(self, old_cap: int, cap: int) -> None:
        mx = _mx()
        n = len(self.heads)

        def grow(a, tail, dtype):
            pad = mx.zeros((n, cap - old_cap) + tail, dtype=dtype)
            return pad if a is None else mx.concatenate([a, pad], axis=1)

        self.k_codes = grow(self.k_codes, (self.key_tables.code_bytes,), mx.uint8)
        self.v_codes = grow(self.v_codes, (self.value_tables.code_bytes,), mx.uint8)
        self.k_norms = grow(self.k_norms, (), mx.float16)
        self.v_norms = grow(self.v_norms, (), mx.float16)

    def copy(self) -> _WidthGroup:
        """The same heads and tables, with page arrays of its own (see MetalCodeStore.copy)."""
        new = _WidthGroup.__new__(_WidthGroup)
        new.__dict__.update(self.__dict__)
        new.k_codes, new.k_norms, new.v_codes, new.v_norms = (
            None if a is None else _mx().array(a) for a in self.arrays())
        new.low = None if self.low is None else self.low.copy()
        return new

    def shrink(self, cap: int) -> None:
        if cap == 0:
            self.k_codes = self.k_norms = self.v_codes = self.v_norms = None
            return
        mx = _mx()
        self.k_codes, self.k_norms, self.v_codes, self.v_norms = (
            mx.contiguous(a[:, :cap]) for a in self.arrays())


class MetalCodeStore:
    """One layer's compressed K/V as mlx arrays (see the module docstring).

    Constructor arguments mirror ``_core.KVCache`` (``n_layers`` must be 1); ``layer`` is the
    layer index of the random streams (0 for a one-layer cache, as mlx_lm uses),
    ``kv_head_offset`` the model's number of KV head 0 (head h has the streams of model head
    ``kv_head_offset + h``, as in the core: a tensor-parallel rank's slice), ``kernels``
    the kernel set (default: ``turboquant.metal``, Apple only), ``check_inputs`` whether
    append/attend refuse NaN/Inf (one GPU→CPU sync of a few bytes per call).

    ``norm_correction``, ``fp16_sinks`` and ``fp16_window`` have the semantics of
    ``_core.KVCache``'s: the stored norm is ‖x‖/‖ỹ‖ (computed by the encode kernel); the
    first ``fp16_sinks`` tokens and the most recent ones are kept as fp16 mlx arrays, the
    window holding between ``fp16_window`` and ``fp16_window + block_tokens`` tokens once
    flushed (its oldest ``block_tokens`` tokens are encoded, from their fp16 values, whenever
    it holds more: the sink fills, flushes and trims are the core's ``_core.SegmentPlan``
    answers, not restated here). Attention merges the fp16 part and the codes under one softmax.

    ``key_head_bits`` / ``value_head_bits`` / ``outlier_head_bits`` (per-KV-head widths) and
    ``mixed_group_blocks`` / ``mixed_keep_blocks`` / ``decay_bits`` (importance-routed mixed
    precision) are the core's options too (see the module docstring)."""

    def __init__(self, head_dim: int, n_layers: int = 1, n_q_heads: int = 1, n_kv_heads: int = 1,
                 key_method: str = "turboquant_mse", key_bits: int = 3,
                 value_method: str = "turboquant_mse", value_bits: int = 3, seed: int = 0,
                 rotation: str = "auto", block_tokens: int = 256, *, layer: int = 0,
                 norm_correction: bool = False, fp16_window: int = 0, fp16_sinks: int = 0,
                 kernels: Any = None, check_inputs: bool = True, n_outlier_channels: int = 0,
                 outlier_bits: int = 0, outlier_channels: Sequence[int] | None = None,
                 outlier_roles: str = "keys", split_angle_bits: int = 8,
                 kv_head_offset: int = 0, key_head_bits: Sequence[int] | None = None,
                 value_head_bits: Sequence[int] | None = None,
                 outlier_head_bits: Sequence[int] | None = None, mixed_group_blocks: int = 0,
                 mixed_keep_blocks: int = 0, decay_bits: int = 0):
        if n_layers != 1:
            raise ValueError(f"a MetalCodeStore holds one layer (n_layers=1), got {n_layers}; "
                             "use MetalKVCache for several")
        why = store_supports(head_dim, key_method, value_method, rotation)
        if why:
            raise ValueError(why)
        for name, b in (("key_bits", key_bits), ("value_bits", value_bits)):
            if not isinstance(b, (int, np.integer)) or not 1 <= int(b) <= 8:
                raise ValueError(f"{name} must be an integer in [1, 8], got {b!r}")
        if not 1 <= int(n_kv_heads) or int(n_q_heads) % int(n_kv_heads):
            raise ValueError(f"n_q_heads ({n_q_heads}) must be a multiple of n_kv_heads "
                             f"({n_kv_heads})")
        if int(block_tokens) < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        for name, v in (("fp16_window", fp16_window), ("fp16_sinks", fp16_sinks)):
            if not isinstance(v, (int, np.integer)) or int(v) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(kv_head_offset, bool) or not isinstance(kv_head_offset, (int, np.integer)) \
                or not 0 <= int(kv_head_offset) <= 65536 - int(n_kv_heads):
            raise ValueError(f"kv_head_offset must be in [0, 65536 - n_kv_heads = "
                             f"{65536 - int(n_kv_heads)}] (the model's KV head numbers "
                             f"kv_head_offset .. kv_head_offset + n_kv_heads - 1 stay below "
                             f"65536), got {kv_head_offset!r}")
        self.kv_head_offset = int(kv_head_offset)
        self.head_dim, self.n_layers = int(head_dim), 1
        self.n_q_heads, self.n_kv_heads = int(n_q_heads), int(n_kv_heads)
        self.key_method = self.value_method = "turboquant_mse"
        self.key_bits, self.value_bits = int(key_bits), int(value_bits)
        # The kernels' rotation: "auto" is "hadamard" at the power-of-two head_dims they take.
        self.seed = int(seed)
        self.rotation = "hadamard1" if rotation == "hadamard1" else "hadamard"
        # The configured rotation, as a split cache's file header records it ("auto" or
        # "hadamard": the same hadamard halves either way; "hadamard1": hadamard1 halves).
        self._configured_rotation = str(rotation)
        self.block_tokens, self.layer = int(block_tokens), int(layer)
        self.norm_correction = bool(norm_correction)
        self.fp16_window, self.fp16_sinks = int(fp16_window), int(fp16_sinks)
        self.kernels = METAL_KERNELS if kernels is None else kernels
        self.check_inputs = bool(check_inputs)
        self._split = _split_config(self.head_dim, self.key_bits, n_outlier_channels,
                                    outlier_bits, outlier_channels, outlier_roles,
                                    split_angle_bits)
        self.split_angle_bits = int(split_angle_bits)

        H = self.n_kv_heads
        # Per-KV-head widths as configured (the core's lists: n_kv_heads entries, or those of
        # every layer of a cache whose layer `layer` this store holds), None when uniform.
        self.key_head_bits = _head_bits(key_head_bits, "key_head_bits", H, self.layer, 1)
        self.value_head_bits = _head_bits(value_head_bits, "value_head_bits", H, self.layer, 1)
        self.outlier_head_bits = _head_bits(outlier_head_bits, "outlier_head_bits", H,
                                            self.layer, 0)
        if self.outlier_head_bits is not None and not self._split:
            raise ValueError("outlier_head_bits needs the key split (n_outlier_channels or "
                             "outlier_channels)")

        self._check_mixed(mixed_group_blocks, mixed_keep_blocks, decay_bits)
        # The core's segment rules (cache/segment_plan.h): which tokens go to the sinks,
        # which window tokens flush into codes and what a trim keeps are its plans' answers.
        self._plan = _core.SegmentPlan(
            fp16_sinks=self.fp16_sinks, fp16_window=self.fp16_window,
            block_tokens=self.block_tokens, mixed_group_blocks=self.mixed_group_blocks,
            mixed_keep_blocks=self.mixed_keep_blocks)

        def quantizer(role: int, h: int, low: bool = False):
            bits = _pick(self.key_head_bits if role == 0 else self.value_head_bits, H,
                         self.layer, h, self.key_bits if role == 0 else self.value_bits)
            split = {}
            if role == 0 and self._split:
                split = dict(self._split, outlier_bits=_pick(
                    self.outlier_head_bits, H, self.layer, h, self._split["outlier_bits"]))
            if low:  # the low width of mixed precision: same stream, so the same rotation
                if split:
                    bits, split["outlier_bits"] = _decayed_split_bits(
                        self.head_dim, bits, len(split["outlier_channels"]),
                        split["outlier_bits"], self.decay_bits)
                else:
                    bits = self.decay_bits
            return _core.Quantizer("turboquant_mse", self.head_dim, bits, self.seed,
                                   rotation=self.rotation, norm_dtype="float16",
                                   norm_correction=self.norm_correction,
                                   stream=kv_stream_id(self.layer, self.kv_head_offset + h, role),
                                   **split)

        # KV heads grouped by their (key, value) widths: one set of tables and pages per
        # group, each encoded and attended by the kernels of one width (the per-width
        # kernels are those of a uniform cache); heads in the order of their first member.
        keys = [quantizer(0, h) for h in range(H)]
        values = [quantizer(1, h) for h in range(H)]
        members: dict[tuple, list[int]] = {}
        for h in range(H):
            kq = keys[h]
            width = (kq.bits, kq.outlier_bits if self._split else 0, values[h].bits)
            members.setdefault(width, []).append(h)
        self._groups = []
        for heads in members.values():
            kq = [keys[h] for h in heads]
            # the key split (outlier split of the keys): split.metal kernels
            kt = SplitHeadTables(kq) if self._split else HeadTables(kq)
            self._groups.append(_WidthGroup(heads, kt, HeadTables([values[h] for h in heads]),
                                            H))
            if self.mixed_group_blocks:  # the group's low-width tables and pages
                kq = [quantizer(0, h, True) for h in heads]
                self._groups[-1].low = _WidthGroup(
                    heads, SplitHeadTables(kq) if self._split else HeadTables(kq),
                    HeadTables([quantizer(1, h, True) for h in heads]), H)
        # KV head h is row _slots[h][1] of group _slots[h][0]; _inverse puts the groups'
        # rows (concatenated) back into KV head order.
        self._slots = [(0, 0)] * H
        for i, g in enumerate(self._groups):
            for j, h in enumerate(g.heads):
                self._slots[h] = (i, j)
        order = [h for g in self._groups for h in g.heads]
        self._inverse = (None if len(self._groups) == 1 else
                         _mx().array(np.argsort(order).astype(np.int32)))
        self._n = 0       # tokens held
        self._coded = 0   # tokens not in the fp16 window: the sinks, then the codes
        self._nc = 0      # tokens held as codes (code index 0 = token _ns)
        self._cap = 0     # code capacity (whole pages of block_tokens), every group's
        # Rows the page arrays hold (>= _cap): they grow by an eighth at a time (whole pages),
        # not a page at a time, so a long decode copies a layer's codes rarely; the memory
        # counted as the core counts it is _cap's (allocated_bytes() tells both apart).
        self._alloc = self._lo_alloc = 0
        # fp16 sinks and window: (H, rows, d) float16 mlx arrays per role; None while empty.
        self._k_sink = self._v_sink = self._k_win = self._v_win = None
        # The window's buffers (k, v, the view of k the window is), (H, cap, d) float16: the
        # window is their first rows while decode steps append to it in place (mlx's slice
        # update) rather than concatenating it every token; None: the window is its own array.
        self._wbuf: tuple | None = None
        # Rows of fp16 storage held per stream (the C++ cache's vector capacities).
        self._sink_cap = self._win_cap = 0
        # Mixed precision: of the _nc codes, _nlo are in the low-width pages (every group's
        # pages: the first _nc - _nlo of a group's full-width pages); the window tokens'
        # importance, (H, window tokens) float32 mlx (None while the window is empty); the
        # tokens rated by attention calls; per KV head the groups' kept-token masks,
        # (H, groups * words) uint64; the capacities of the core's importance and mask
        # vectors (memory_bytes).
        self._nlo = self._lo_cap = 0
        self._imp = None
        self._rated = 0
        self._masks = np.zeros((H, 0), np.uint64)
        self._imp_cap = self._mask_cap = 0

    @property
    def width_groups(self) -> list[tuple[int, ...]]:
        """The KV heads of each width group (heads sharing one key and one value width),
        one group unless per-head widths differ."""
        return [g.heads for g in self._groups]

    @property
    def key_tables(self):
        """The key tables of a store whose KV heads share one width (see ``width_groups``)."""
        return self._uniform().key_tables

    @property
    def value_tables(self):
        """The value tables of a store whose KV heads share one width."""
        return self._uniform().value_tables

    def _uniform(self) -> _WidthGroup:
        if len(self._groups) != 1:
            raise ValueError(f"the KV heads of this store have {len(self._groups)} different "
                             "widths (per-head bits): its tables are per width group "
                             "(width_groups)")
        return self._groups[0]

    def code_arrays(self) -> list:
        """Every mlx array of the code pages (codes and norms of both roles, every group)."""
        return [a for g in self._groups for p in (g, g.low) if p is not None
                for a in p.arrays() if a is not None]

    def _quantizer(self, kv_head: int, role: str):
        g, j = self._slots[kv_head]
        g = self._groups[g]
        return (g.key_tables if role == "key" else g.value_tables).quantizers[j]

    def _merge(self, parts):
        """One (n_kv_heads, ...) array from the groups' (heads of the group, ...) parts."""
        if len(parts) == 1:
            return parts[0]
        return _mx().take(_mx().concatenate(parts, axis=0), self._inverse, axis=0)

    def _check_mixed(self, group_blocks, keep_blocks, decay_bits) -> None:
        """KVCacheConfig::validate() for mixed precision (the store has no temporal decay)."""
        for name, v in (("mixed_group_blocks", group_blocks), ("mixed_keep_blocks", keep_blocks),
                        ("decay_bits", decay_bits)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        R, K, low = int(group_blocks), int(keep_blocks), int(decay_bits)
        self.mixed_group_blocks, self.mixed_keep_blocks, self.decay_bits = R, K, low
        if not R:
            if K:
                raise ValueError(f"mixed_keep_blocks ({K}) is set but mixed_group_blocks is 0 "
                                 "(mixed precision off)")
            if low:
                raise ValueError("the GPU store has no temporal decay (decay_bits needs "
                                 "mixed_group_blocks)")
            return
        if not 1 <= K < R:
            raise ValueError(f"mixed_keep_blocks must be in [1, mixed_group_blocks - 1 = {R - 1}],"
                             f" got {K}")
        if R * self.block_tokens > 4096:
            raise ValueError(f"a mixed-precision flush group (mixed_group_blocks × block_tokens) "
                             f"must hold at most 4096 tokens, got {R} × {self.block_tokens}")
        if self.fp16_window <= 0:
            raise ValueError("mixed precision (mixed_group_blocks) needs an fp16 window "
                             "(fp16_window > 0): token importance is measured while tokens are "
                             "fp16")
        H, n_o = self.n_kv_heads, len(self._split.get("outlier_channels", ()))
        least = 9
        for h in range(H):
            for role in (0, 1):
                b = _pick(self.key_head_bits if role == 0 else self.value_head_bits, H,
                          self.layer, h, self.key_bits if role == 0 else self.value_bits)
                if role == 0 and self._split:
                    b = _decay_reference_bits(self.head_dim, b, n_o, _pick(
                        self.outlier_head_bits, H, self.layer, h, self._split["outlier_bits"]))
                least = min(least, b)
        if not 1 <= low < least:
            raise ValueError(f"decay_bits must be in [1, {least - 1}] (fewer than the streams' "
                             f"bits per coordinate, at least {least}), got {low}")

    @property
    def mixed(self) -> bool:
        """True with importance-routed mixed precision (mixed_group_blocks > 0)."""
        return self.mixed_group_blocks > 0

    @property
    def key_split(self) -> bool:
        """True when the keys are an outlier split over two halves (the mlx-lm key split)."""
        return bool(self._split)

    @property
    def n_outlier_channels(self) -> int:
        return int(self._split.get("n_outlier_channels", 0))

    @property
    def outlier_channels(self) -> list[int]:
        return list(self._split.get("outlier_channels", ()))

    @property
    def outlier_bits(self) -> int:
        """As configured (0: key_bits + 1), as ``_core.KVCache.outlier_bits``."""
        return int(self._split.get("outlier_bits", 0))

    @property
    def outlier_roles(self) -> str:
        return "keys" if self._split else _DEFAULT_OUTLIER_ROLES

    @property
    def windowed(self) -> bool:
        """True when tokens can be held in fp16 (sinks or a recent window)."""
        return self.fp16_window > 0 or self.fp16_sinks > 0

    @property
    def _ns(self) -> int:
        return 0 if self._k_sink is None else int(self._k_sink.shape[1])

    def copy(self) -> MetalCodeStore:
        """An independent copy, made on the device: the same settings, kernels and
        ``check_inputs``, its own page arrays (new mlx arrays of the same values: a write to
        either store's pages leaves the other's as they were). No host round trip, unlike
        ``from_bytes(to_bytes())``, which gives the same codes."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._groups = [g.copy() for g in self._groups]
        new._masks = self._masks.copy()
        new._wbuf = None  # the buffers stay the original's (a write in place would be seen)
        return new

    # --- sizes ------------------------------------------------------------------------------
    def size(self, layer: int = 0) -> int:
        self._check_layer(layer)
        return self._n

    def __len__(self) -> int:
        return self._n

    def sink_tokens(self, layer: int = 0) -> int:
        self._check_layer(layer)
        return self._ns

    def coded_tokens(self, layer: int = 0) -> int:
        """Tokens not in the fp16 window (sinks + codes), as ``_core.KVCache.coded_tokens``."""
        self._check_layer(layer)
        return self._coded

    def code_tokens(self, layer: int = 0) -> int:
        self._check_layer(layer)
        return self._nc

    def window_tokens(self, layer: int = 0) -> int:
        self._check_layer(layer)
        return self._n - self._coded

    def _sizes(self):
        """The segment sizes as the core's plans take them (``_core.SegmentSizes``)."""
        return _core.SegmentSizes(sinks=self._ns, codes=self._nc, window=self._n - self._coded,
                                  rated=self._rated)

    def memory_bytes(self) -> int:
        """Bytes held: the code and norm pages, the fp16 sink and window rows and the
        per-head rotation signs (the same count as ``_core.KVCache.memory_bytes``)."""
        H = self.n_kv_heads
        fp16_rows = 2 * H * (self._sink_cap + self._win_cap) * self.head_dim * 2
        # Mixed precision: low-width pages (their quantizers share the full-width rotations),
        # the groups' masks and the window's importance floats.
        low = sum(self._lo_cap * g.low.row_bytes() for g in self._groups if g.low is not None)
        mixed = H * (self._mask_cap * 8 + self._imp_cap * 4)
        return sum(g.key_tables.state_bytes() + g.value_tables.state_bytes()
                   + self._cap * g.row_bytes() for g in self._groups) + fp16_rows + low + mixed

    def allocated_bytes(self) -> int:
        """Bytes of device memory the store's arrays take: memory_bytes() with the code pages
        counted at the rows allocated (they grow by an eighth at a time, so up to ~1/8 more
        than the pages in use) and the fp16 rows, importance and masks as held."""
        ahead_low = sum((self._lo_alloc - self._lo_cap) * g.low.row_bytes()
                        for g in self._groups if g.low is not None)
        return (self.memory_bytes() + (self._alloc - self._cap) * self.bytes_per_token()
                + ahead_low)

    def fp16_bytes(self) -> int:
        return self._n * self.n_kv_heads * 2 * self.head_dim * 2

    def bytes_per_token(self) -> int:
        return sum(g.row_bytes() for g in self._groups)

    # --- append ----------------------------------------------------------------------------
    def append(self, keys, values, layer: int = 0) -> None:
        """Append T tokens of every KV head: keys/values (H_kv, T, d) | (1, H_kv, T, d) |
        (T, d) for one head; mlx arrays (or NumPy, converted). Validated before any change."""
        self._check_layer(layer)
        mx = _mx()
        if (type(keys) is mx.array and type(values) is mx.array and self.windowed
                and not self.mixed and not self.check_inputs and keys.dtype == mx.float16
                and values.dtype == mx.float16
                and keys.shape == values.shape == (self.n_kv_heads, 1, self.head_dim)):
            # The plan's run of quiet one-token appends (no sink, no flush), asked once per
            # state of the other segments: the window grows by one token a step in between.
            w = self._n - self._coded
            base = (self._ns, self._nc, self._coded, self._rated)
            quiet = getattr(self, "_quiet", None)
            if quiet is None or quiet[0] != base:
                quiet = self._quiet = (base, w + self._plan.quiet_tokens(self._sizes()),
                                       self._plan.window_rows)
            if w < quiet[1]:  # a decode step's token to the window
                self._k_win, self._v_win = self._window_extend(keys, values)
                self._win_cap = quiet[2]
                self._n += 1
                return
        k = _heads_tokens(_as_mx(keys, "keys"), self.n_kv_heads, self.head_dim, "keys",
                          "n_kv_heads")
        v = _heads_tokens(_as_mx(values, "values"), self.n_kv_heads, self.head_dim, "values",
                          "n_kv_heads")
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"keys shape {tuple(keys.shape)} differs from values shape "
                             f"{tuple(values.shape)}")
        T = int(k.shape[1])
        if T == 0:
            return
        if self.windowed:
            self._append_windowed(k, v, T)
            return
        self._write(self._encode(k, v))
        self._n += T
        self._coded = self._n

    def _encode(self, k, v, low: bool = False) -> list:
        """Codes of (H, T, d) keys and values: per width group (kc, kn, vc, vn); ``low``: at
        the groups' low widths (mixed precision)."""
        parts = []
        for g in (g.low if low else g for g in self._groups):
            kc, kn = self.kernels.encode_heads(g.key_tables, g.take(k))
            vc, vn = self.kernels.encode_heads(g.value_tables, g.take(v))
            parts.append((kc, kn, vc, vn))
        self._check_norms([x for p in parts for x in (p[1], p[3])])
        return parts

    def _check_norms(self, norms) -> None:
        if self.check_inputs:
            mx = _mx()
            ok = mx.all(mx.isfinite(norms[0]))
            for n in norms[1:]:
                ok = ok & mx.all(mx.isfinite(n))
            if not ok.item():
                raise ValueError("keys or values contain NaN or Inf, or a vector whose norm is "
                                 "above the fp16 norm range (65504); the cache is unchanged")

    def _append_windowed(self, k, v, T: int) -> None:
        """kv_cache_segments.cpp append_windowed() by the core's plan (``_core.SegmentPlan``):
        fp16 rows to the sinks (until fp16_sinks are held), then to the window, then the
        window's due flushes (whole blocks, oldest first) into codes."""
        mx = _mx()
        k16, v16 = k.astype(mx.float16), v.astype(mx.float16)
        if self.check_inputs and not (mx.all(mx.isfinite(k16)) & mx.all(mx.isfinite(v16))).item():
            raise ValueError("keys or values contain a value that is not finite in fp16 (NaN, "
                             "Inf or beyond 65504); the cache is unchanged")
        plan = self._plan.append(self._sizes(), T)
        old, ks = self._n, plan.sinks
        cat = (lambda a, b: b if a is None else mx.concatenate([a, b], axis=1))  # noqa: E731
        k_sink, v_sink = self._k_sink, self._v_sink
        if ks > 0:  # rows of their own: a view of the chunk would keep all of it alive, and
            # the decode kernels, which take row-contiguous inputs, would copy it every step
            k_sink = mx.contiguous(cat(k_sink, k16[:, :ks]))
            v_sink = mx.contiguous(cat(v_sink, v16[:, :ks]))
        k_win, v_win = self._k_win, self._v_win
        if T > ks and self.mixed:  # its window is reordered by importance: rows of their own
            k_win, v_win = cat(k_win, k16[:, ks:]), cat(v_win, v16[:, ks:])
        elif T > ks:
            k_win, v_win = self._window_extend(k16[:, ks:], v16[:, ks:])
        coded = self._coded + ks
        if self.mixed:
            self._append_mixed(k_sink, v_sink, k_win, v_win, old, T, ks, plan.flushes)
            return
        flush = plan.flushed  # whole blocks, oldest first
        if flush:
            self._write(self._encode(k_win[:, :flush].astype(mx.float32),
                                     v_win[:, :flush].astype(mx.float32)))
            k_win, v_win = k_win[:, flush:], v_win[:, flush:]
            if int(k_win.shape[1]):
                k_win, v_win = self._window_buffers([k_win], [v_win], int(k_win.shape[1]))
            coded += flush
        if ks > 0:
            self._sink_cap = self.fp16_sinks
        if old + T > coded:
            self._win_cap = self._plan.window_rows
        else:
            k_win = v_win = self._wbuf = None
        self._k_sink, self._v_sink, self._k_win, self._v_win = k_sink, v_sink, k_win, v_win
        self._n, self._coded = old + T, coded
        if T > 1:  # a prefill chunk: start on it now. Not per decode token: each evaluation
            # launches the pending graph, which split a model step into one launch per layer
            # (the attention of the step reads the window and evaluates it anyway).
            mx.async_eval(*[a for a in (k_sink, v_sink, k_win, v_win) if a is not None])

    def _window_extend(self, k, v):
        """The window rows followed by k, v (H, t, d) float16, as views of the window buffers
        (``_wbuf``): written in place where the buffers have room after the window (one
        slice update per role, no copy of the window while mlx can donate the buffer), else
        in new buffers. Nothing of the store changes here but ``_wbuf``: the caller sets
        ``_k_win``/``_v_win``."""
        w = 0 if self._k_win is None else int(self._k_win.shape[1])
        t = int(k.shape[1])
        buf = self._wbuf
        if buf is None or buf[2] is not self._k_win or w + t > int(buf[0].shape[1]):
            ks, vs = ([self._k_win, k], [self._v_win, v]) if w else ([k], [v])
            return self._window_buffers(ks, vs, w + t)
        kb, vb = buf[0], buf[1]
        kb[:, w:w + t] = k
        vb[:, w:w + t] = v
        kw = kb[:, :w + t]
        self._wbuf = (kb, vb, kw)
        return kw, vb[:, :w + t]

    def _window_buffers(self, ks, vs, w: int):
        """New window buffers of the window's full size (``window_rows``, or ``w`` if more)
        that start with the w rows of ``ks`` / ``vs`` (lists of (H, ·, d) float16 arrays,
        concatenated); returns the views of their first w rows. Also after a flush, so that
        no view keeps a larger buffer (a prefill chunk's rows) alive."""
        mx = _mx()
        H, d = int(ks[0].shape[0]), int(ks[0].shape[2])
        cap = max(int(self._plan.window_rows), w)
        pad = [mx.zeros((H, cap - w, d), mx.float16)] if cap > w else []
        kb, vb = mx.concatenate(ks + pad, axis=1), mx.concatenate(vs + pad, axis=1)
        kw = kb[:, :w]
        self._wbuf = (kb, vb, kw)
        return kw, vb[:, :w]

    def _window_rows(self):
        """The window for the reduce launch: (k, v, rows) where it is the first rows of its
        buffers (the launch reads them with the buffers' row stride), else (k, v)."""
        buf = self._wbuf
        if buf is not None and buf[2] is self._k_win:
            return buf[0], buf[1], int(self._k_win.shape[1])
        return self._k_win, self._v_win

    def _append_mixed(self, k_sink, v_sink, k_win, v_win, old: int, T: int, ks: int,
                      due: int) -> None:
        """append_windowed() / flush_window() of mixed precision: the window flushes the
        plan's ``due`` groups of F = mixed_group_blocks × block_tokens tokens, oldest
        first (once attention calls have rated a group and fp16_window newer tokens follow
        it, or unrated beyond the core's bound: _core.SegmentPlan); per KV head the
        mixed_keep_blocks × block_tokens most important tokens (ties: the older) are encoded
        at full width, the others at the low width. Every group is encoded before anything
        changes."""
        mx = _mx()
        bt, H = self.block_tokens, self.n_kv_heads
        F, Kt = self.mixed_group_blocks * bt, self.mixed_keep_blocks * bt
        n, coded, keep_new = old + T, self._coded + ks, T - ks
        w_old = old - self._coded if old > self._coded else 0
        imp = self._imp
        if keep_new:
            zeros = mx.zeros((H, keep_new), dtype=mx.float32)
            imp = zeros if imp is None else mx.concatenate([imp, zeros], axis=1)
        flushes = []  # (full-width parts, low-width parts, masks) per group
        base = (np.arange(H) * F)[:, None]

        def rows_of(x, idx):  # per KV head, the window rows idx (H, m) of the oldest group
            flat = x[:, :F].reshape(H * F, self.head_dim)
            picked = mx.take(flat, mx.array((base + idx).ravel().astype(np.int32)), axis=0)
            return picked.reshape(H, idx.shape[1], self.head_dim).astype(mx.float32)

        for _ in range(due):
            weights = np.array(imp[:, :F])
            order = np.argsort(-weights, axis=1, kind="stable")
            kept, others = np.sort(order[:, :Kt], axis=1), np.sort(order[:, Kt:], axis=1)
            masks = np.zeros((H, (F + 63) // 64), np.uint64)
            rows = np.repeat(np.arange(H), Kt)
            np.bitwise_or.at(masks, (rows, kept.ravel() // 64),
                             np.left_shift(np.uint64(1), (kept.ravel() % 64).astype(np.uint64)))
            flushes.append((self._encode(rows_of(k_win, kept), rows_of(v_win, kept)),
                            self._encode(rows_of(k_win, others), rows_of(v_win, others),
                                         low=True), masks))
            k_win, v_win, imp = k_win[:, F:], v_win[:, F:], imp[:, F:]
            coded += F
        words = (F + 63) // 64
        for full, low, masks in flushes:
            self._write(full)
            self._write(low, low=True)
            self._mask_cap = _vector_grow(self._mask_cap, self._masks.shape[1], words)
            self._masks = np.concatenate([self._masks, masks], axis=1)
        if ks > 0:
            self._sink_cap = self.fp16_sinks
        # The core's vector capacities (memory_bytes; std::vector growth is the allocator's,
        # not a plan's, so it stays mirrored): window rows and importance grow as inserts
        # do, then fit the plan's window_rows (N + F) when they hold no more.
        self._win_cap = _vector_grow(self._win_cap, w_old, keep_new)
        self._imp_cap = _vector_grow(self._imp_cap, w_old, keep_new)
        w, rows = n - coded, self._plan.window_rows
        if 0 < w <= rows:
            self._win_cap = rows
        if w <= rows:
            self._imp_cap = rows
        if w == 0:
            k_win = v_win = imp = None
        self._k_sink, self._v_sink, self._k_win, self._v_win = k_sink, v_sink, k_win, v_win
        self._imp = imp
        self._n, self._coded = n, coded
        if T > 1:
            mx.async_eval(*[a for a in (k_sink, v_sink, k_win, v_win) if a is not None])

    def flush_rated(self, layer: int = 0) -> None:
        """``_core.KVCache.flush_rated``: mixed precision flushes the window groups that
        attention calls have rated since the last append (every window token counted as
        that append's, so unrated groups stay); a no-op without mixed precision."""
        self._check_layer(layer)
        if not self.mixed or self._n == self._coded:
            return
        due = self._plan.due_flushes(self._sizes(), self._n - self._coded)
        if due:
            self._append_mixed(self._k_sink, self._v_sink, self._k_win, self._v_win,
                               self._n, 0, 0, due)

    def _write(self, parts, low: bool = False) -> None:
        """Append codes to the full-width pages (``low``: the low-width ones), growing them:
        per width group (kc, kn, vc, vn), (heads of the group, T, ·)."""
        mx = _mx()
        T = int(parts[0][0].shape[1])
        old = self._nlo if low else self._nc - self._nlo
        bt = self.block_tokens
        cap = -(-(old + T) // bt) * bt
        pages = [g.low if low else g for g in self._groups]
        have = self._lo_cap if low else self._cap
        if cap > have:
            alloc = self._lo_alloc if low else self._alloc
            if cap > alloc:
                new = _alloc_rows(max(cap, alloc + alloc // GROWTH_DIVISOR), bt)
                for p in pages:
                    p.grow(alloc, new)
                if low:
                    self._lo_alloc = new
                else:
                    self._alloc = new
            if low:
                self._lo_cap = cap
            else:
                self._cap = cap
        for p, (kc, kn, vc, vn) in zip(pages, parts):
            p.k_codes[:, old:old + T] = kc
            p.k_norms[:, old:old + T] = kn
            p.v_codes[:, old:old + T] = vc
            p.v_norms[:, old:old + T] = vn
        self._nc += T
        if low:
            self._nlo += T
        # Start computing the codes now without waiting for them: keeps the graph of
        # successive appends short when nothing reads the cache in between
        # (TQ_GPU_WRITE_ASYNC_EVAL=0 leaves it to the caller's evaluation: a benchmark's A/B).
        if metal.getenv("TQ_GPU_WRITE_ASYNC_EVAL", "1") != "0":
            mx.async_eval(*self.code_arrays())

    # --- trim ------------------------------------------------------------------------------
    def trim(self, n: int) -> int:
        """Remove the last n tokens (fewer if shorter); frees pages no longer needed. The
        core's cut (``_core.SegmentPlan.cut``): a cut inside the window shortens it; a cut
        below it empties the window and keeps the codes (and sinks) of the tokens left,
        later tokens going to the window; a cut back into the sinks (or to empty) gives the
        window's capacity back, also when the layer held no codes."""
        if int(n) < 0:
            raise ValueError(f"trim needs n >= 0, got {n}")
        removed = min(int(n), self._n)
        sizes = self._sizes()
        # A cut that splits a mixed-precision flush group is refused before any change.
        self._plan.check_cut(sizes, self._n - removed, self.layer)
        cut = self._plan.cut(sizes, self._n - removed)
        after = cut.after
        if self.mixed:
            self._trim_mixed(cut)
        if cut.window_freed:
            self._win_cap = 0
        self._wbuf = None  # the window is now its own array (a later append copies it)
        if after.window == 0:
            self._k_win = self._v_win = None
        elif self._k_win is not None:
            self._k_win, self._v_win = (self._k_win[:, :after.window],
                                        self._v_win[:, :after.window])
        if cut.sinks_freed:
            self._k_sink = self._v_sink = None
            self._sink_cap = 0
        elif cut.sinks_released:
            self._k_sink, self._v_sink = (self._k_sink[:, :after.sinks],
                                          self._v_sink[:, :after.sinks])
        if after.coded < self._coded:
            self._release_codes(after.codes)
        self._n, self._coded = after.size, after.coded
        return removed

    def _trim_mixed(self, cut) -> None:
        """shrink_layer()'s mixed-precision part (MixedPrecisionFlush::cut): the rated count,
        the window's importance and the groups' masks follow the plan's cut."""
        after, F = cut.after, self._plan.flush_tokens
        self._rated = after.rated
        keep = after.window
        self._imp = self._imp[:, :keep] if keep and self._imp is not None else None
        if after.coded < self._coded:
            self._masks = self._masks[:, :after.codes // F * ((F + 63) // 64)]

    def _release_codes(self, nc: int) -> None:
        bt = self.block_tokens
        # Mixed precision: whole flush groups (trim checks the cut), the plan's low part.
        nlo = self._plan.low_codes(nc)
        self._nc, self._nlo = nc, nlo
        cap = -(-(nc - nlo) // bt) * bt
        # The arrays shrink once the pages in use fill less than 3/4 of them (a trim of a few
        # tokens, as speculative decoding makes each step, keeps them: no copy).
        if cap < self._cap:
            alloc = _alloc_rows(cap, bt)
            if cap < self._alloc * 3 // 4 and alloc < self._alloc:
                for g in self._groups:
                    g.shrink(alloc)
                if cap:
                    _mx().eval(*self.code_arrays())
                self._alloc = alloc
            self._cap = cap
        if nlo < self._lo_cap:
            alloc = _alloc_rows(nlo, bt)
            if nlo < self._lo_alloc * 3 // 4 and alloc < self._lo_alloc:
                for g in self._groups:
                    g.low.shrink(alloc)
                if nlo:
                    _mx().eval(*self.code_arrays())
                self._lo_alloc = alloc
            self._lo_cap = nlo

    # --- compaction ------------------------------------------------------------------------
    def compact_window(self, layer: int = 0) -> int:
        """``_core.KVCache.compact_window``: move the whole fp16 window into codes, its last
        block partial, and give the window's memory back (a prompt parked in a prompt-cache
        store); the fp16 sinks stay. The core's plan (``_core.SegmentPlan.compact``) decides
        and the flush's encode writes the codes, so they are the core's bit for bit and
        ``memory_bytes()`` drops as the core's does. Returns the tokens moved. Later appends
        go to a new window whose flushes fill the codes on from where they end; trims,
        attention and saving work as on any store. A mixed-precision store (codes stored by
        importance in whole groups) keeps its window: 0, nothing changes. On an error (a
        norm beyond fp16) the store is unchanged."""
        self._check_layer(layer)
        plan = self._plan.compact(self._sizes())
        if not plan.window_freed:
            return 0
        mx = _mx()
        moved = int(plan.tokens)
        if moved:
            self._write(self._encode(self._k_win[:, :moved].astype(mx.float32),
                                     self._v_win[:, :moved].astype(mx.float32)))
            # computed now, not at the next read: until then the codes' graph keeps the
            # window rows alive (a parked prompt may wait long for its next read)
            mx.async_eval(*self.code_arrays())
        self._k_win = self._v_win = self._wbuf = None
        self._win_cap = 0
        self._coded = self._n
        return moved

    # --- attention -------------------------------------------------------------------------
    def attend(self, queries, layer: int = 0, causal: bool = True, scale: float | None = None,
               window: int | None = None, sparse_v: float = 0.0, dtype=None):
        """Attention of queries (H_q, T_q, d) | (1, H_q, T_q, d) | (T_q, d) | (d,) (one query
        head) over the layer, the queries being its LAST T_q positions (``_core.KVCache``
        semantics: causal query t sees keys [0, n - T_q + t], the last ``window`` of them with
        a window). Returns float32 mlx of the queries' shape. T_q == 1 runs the decode kernel
        on the codes (merged with the fp16 sinks / window by their log-sum-exp); T_q > 1
        dequantizes the visible codes to a tile, joins the fp16 rows, for mx attention.
        ``dtype`` (mx.float16 or mx.bfloat16): a prefill (T_q > 1) decodes its tile to fp16
        and attends in that precision, returning that dtype (a model's own precision: half
        the tile's bytes, the GPU's half-precision attention); decode steps are unchanged."""
        self._check_layer(layer)
        mx = _mx()
        q_in = _as_mx(queries, "queries")
        shape = tuple(q_in.shape)
        if len(shape) == 1:
            if self.n_q_heads != 1:
                raise ValueError(f"a single (d,) query needs n_q_heads=1; the cache has "
                                 f"n_q_heads={self.n_q_heads} (pass (H_q, T_q, d))")
            q_in = q_in.reshape(1, shape[0])
        q = _heads_tokens(q_in, self.n_q_heads, self.head_dim, "queries", "n_q_heads")
        q = q.astype(mx.float32)
        n, Tq = self._n, int(q.shape[1])
        if Tq < 1:
            raise ValueError("attend needs at least one query")
        if n == 0:
            raise ValueError(f"attend on an empty cache: layer {self.layer} holds no tokens "
                             "(append keys and values first)")
        if Tq > n:
            raise ValueError(f"attend got {Tq} queries per head but layer {self.layer} holds "
                             f"only {n} tokens (queries are the last positions of the cache)")
        if window is not None and int(window) < 1:
            raise ValueError("window must be >= 1")
        if sparse_v:
            raise ValueError("sparse_v is not supported by the mlx-resident store (the Metal "
                             "decode kernel is dense); use sparse_v=0")
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        if self.check_inputs and not mx.all(mx.isfinite(q)).item():
            raise ValueError("queries contain NaN or Inf")
        if self.mixed:
            return self._attend_mixed(q, scale, causal, window).reshape(shape)
        if Tq == 1:
            out = self._decode(q, scale, window)
        else:
            half = dtype if dtype is not None and dtype in (mx.float16, mx.bfloat16) else None
            if dtype is not None and half is None and dtype != mx.float32:
                raise ValueError(f"dtype must be mx.float16, mx.bfloat16 or mx.float32, got "
                                 f"{dtype}")
            out = self._prefill(q, scale, causal, window, half)
        return out.reshape(shape)

    def _step_state(self, q):
        """(width group, group size, sinks, window) of a decode step of q (n_q_heads, 1, d)
        where the layer is in a decode step's usual state (one width group, codes, not mixed,
        a GQA group of one pass, no input checks); the sinks, then the window's buffers, as
        _decode takes them. None otherwise."""
        if self.mixed or self._nc == 0 or len(self._groups) != 1 or self.check_inputs:
            return None
        G = self.n_q_heads // self.n_kv_heads
        g = self._groups[0]
        if self._group_pass(g) < G or tuple(q.shape) != (self.n_q_heads, 1, self.head_dim):
            return None
        sinks = (self._k_sink, self._v_sink) if self._ns else None
        window = (self._window_rows() if self._k_win is not None and int(self._k_win.shape[1])
                  else None)
        return g, G, sinks, window

    def decode_step(self, q, scale: float):
        """attend(q, causal=True, scale=scale) of one query per head, q (n_q_heads, 1, d),
        as a model's decode step asks it: the same kernels and bits, without attend()'s
        input checks and general dispatch where the layer is in a decode step's usual state
        (_step_state); else attend() itself."""
        state = self._step_state(q)
        if state is None:
            return self.attend(q, causal=True, scale=scale)
        g, G, sinks, window = state
        d, H = self.head_dim, self.n_kv_heads
        kt, vt = g.key_tables, g.value_tables
        qg = q.astype(_mx().float32).reshape(H, G, d)
        step = getattr(self.kernels, "decode_step_heads", None)
        if step is not None and (sinks is not None or window is not None):
            out = step(kt, vt, qg, *g.arrays(), self._nc, scale, sinks, window)
        else:
            rows = [r for r in (sinks, window) if r is not None]
            out = self.kernels.decode_attention_heads(kt, vt, qg, *g.arrays(), self._nc, scale,
                                                      rows=rows or None)
        return out.reshape(self.n_q_heads, 1, d)

    def decode_step_words(self, q, order, v_mean, scale: float):
        """decode_step() of queries as a model has them: q (n_q_heads, 1, d) fp16 or bfloat16
        in the model's channel order, read in ``order`` (the key split's (n_kv_heads, d)
        uint32 channel order; None: as they are); the output in q's dtype with the value mean
        ``v_mean`` ((n_kv_heads, d) or (n_kv_heads, 1, d) float32, or None) added. The kernel set's
        decode_step_words (the same bits as the gather, cast, decode_step(), mean and cast,
        in the same two launches); None where the layer's state or the kernels do not take
        that form (the caller takes the longer one)."""
        step = getattr(self.kernels, "decode_step_words", None)
        state = None if step is None else self._step_state(q)
        if state is None:
            return None
        g, G, sinks, window = state
        out = step(g.key_tables, g.value_tables, q.reshape(self.n_kv_heads, G, self.head_dim),
                   order, *g.arrays(), self._nc, scale, sinks, window, v_mean)
        return None if out is None else out.reshape(q.shape)

    def _attend_mixed(self, q, scale: float, causal: bool, window: int | None):
        """Attention of a mixed-precision store (kv_cache.cpp attend() / attend_windowed()):
        its codes are stored by importance, not position, so every query sees all of them
        (a sliding window or causal queries older than a coded token are refused, as by the
        core); the full- and low-width codes, the fp16 sinks and the window merged under one
        softmax. The window tokens' importance grows by the squared softmax weights the
        query rows of their KV head gave them; the layer is rated up to its size."""
        mx = _mx()
        n, Tq, c, ns = self._n, int(q.shape[1]), self._coded, self._ns
        if window is not None and int(window) < n:
            raise RuntimeError(f"a sliding window ({int(window)}) over a mixed-precision cache "
                               "(its codes are not in position order); use mixed precision on "
                               "full-attention layers")
        if causal and c > ns and n - Tq + 1 < c:
            raise RuntimeError(f"causal queries at positions from {n - Tq} see only part of the "
                               f"{c} coded tokens of layer {self.layer} (mixed precision stores "
                               "them by importance); attend after each append with its queries")
        H, d = self.n_kv_heads, self.head_dim
        G = self.n_q_heads // H
        qg = q.reshape(H, G, Tq, d)
        nw = n - c
        f32 = (lambda a: a.astype(mx.float32))  # noqa: E731
        # fp16 rows: the sinks, then the window (the last nw columns)
        fk = [f32(a) for a in (self._k_sink, self._k_win) if a is not None]
        fv = [f32(a) for a in (self._v_sink, self._v_win) if a is not None]
        nlo, nhi = self._nlo, self._nc - self._nlo
        if Tq == 1:  # decode: the codes by the split-K kernels, each set with its lse
            parts = []
            q1 = qg.reshape(H, G, d)
            if nhi:
                parts.append(self._code_attention(q1, 0, nhi, scale, True))
            if nlo:
                parts.append(self._code_attention(q1, 0, nlo, scale, True, low=True))
            outs = [o.reshape(H, G, 1, d) for o, _ in parts]
            lses = [lse.reshape(H, G, 1) for _, lse in parts]
            ks, vs = fk, fv
        else:  # prefill: the codes dequantized into the tile beside the fp16 rows
            outs, lses = [], []
            ks, vs = [], []
            for low, count in ((False, nhi), (True, nlo)):
                if count:
                    sets = [g.low if low else g for g in self._groups]
                    ks.append(self._merge([self.kernels.dequantize_heads(
                        p.key_tables, p.k_codes[:, :count], p.k_norms[:, :count]) for p in sets]))
                    vs.append(self._merge([self.kernels.dequantize_heads(
                        p.value_tables, p.v_codes[:, :count], p.v_norms[:, :count])
                        for p in sets]))
            ks, vs = ks + fk, vs + fv
        imp = None
        if ks:
            k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=1)
            v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=1)
            nt = int(k.shape[1])
            kt, vb = k[:, None].transpose(0, 1, 3, 2), v[:, None]
            # Column positions for the causal mask: the codes (seen by every query), then the
            # sinks [0, ns) and the window [c, n).
            pos = mx.concatenate([mx.full((nt - ns - nw,), -1), mx.arange(ns), mx.arange(c, n)])
            rows = max(1, _SCORE_CHUNK // max(1, H * G * nt))  # query rows per chunk
            o_parts, l_parts = [], []
            for t0 in range(0, Tq, rows):
                t1 = min(Tq, t0 + rows)
                if Tq == 1:  # decode: the scores in float32 (no TF32 matmul), as the core's
                    s = (qg[:, :, :, None, :] * k[:, None, None]).sum(axis=-1) * scale
                else:
                    s = (qg[:, :, t0:t1] @ kt) * scale  # (H, G, rows, nt)
                if causal and Tq > 1:  # fp16 rows after a query's position: hidden from it
                    s = mx.where(pos[None, :] > mx.arange(n - Tq + t0, n - Tq + t1)[:, None],
                                 -mx.inf, s)
                m = s.max(axis=-1)
                e = mx.exp(s - m[..., None])
                z = e.sum(axis=-1)
                o_parts.append((e @ vb) / z[..., None])
                l_parts.append(m + mx.log(z))
                if nw and Tq > 1:  # the tile holds every token: its lse is the total
                    p = mx.exp(s[..., nt - nw:] - l_parts[-1][..., None])
                    part = (p * p).sum(axis=(1, 2))
                    imp = part if imp is None else imp + part
            cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=2))  # noqa: E731
            outs.append(cat(o_parts))
            lses.append(cat(l_parts))
        lse = lses[0]
        for x in lses[1:]:
            lse = mx.logaddexp(lse, x)
        out = sum(mx.exp(x - lse)[..., None] * o for o, x in zip(outs, lses))
        if nw and Tq == 1:  # the window tokens' weights under the codes' softmax too
            p = mx.exp(s[..., nt - nw:] - lse[..., None])
            imp = (p * p).sum(axis=(1, 2))
        if imp is not None:
            self._imp = imp if self._imp is None else self._imp + imp
        self._rated = max(self._rated, n)
        return out.reshape(self.n_q_heads, Tq, d)

    def _pieces(self, lo: int):
        """The tokens [lo, n) by storage: (fp16 sink rows [lo, ns) as (k, v) or None, code
        indices [a, b), fp16 window rows from max(lo, coded) as (k, v) or None)."""
        ns, c = self._ns, self._coded
        part = (lambda x, a: x if a == 0 else x[:, a:])  # noqa: E731 - whole: no slice op
        sinks = (part(self._k_sink, lo), part(self._v_sink, lo)) if lo < ns else None
        a, b = max(lo, ns) - ns, self._nc
        w0 = max(lo, c) - c
        win = ((part(self._k_win, w0), part(self._v_win, w0))
               if self._k_win is not None and w0 < int(self._k_win.shape[1]) else None)
        return sinks, (a, b), win

    def _code_attention(self, qg, a: int, b: int, scale: float, with_lse: bool, rows=None,
                        low: bool = False):
        """Split-K decode attention of qg (H, G, d) over code indices [a, b): (H, G, d)
        and, with_lse, the log-sum-exp of the scaled scores (H, G); ``rows``: fp16 (k, v)
        row sets (sinks, window) attended under the same softmax by the reduce launch.
        One launch set per width group, on its KV heads (and their query rows); ``low``:
        the low-width pages of mixed precision (indices into them)."""
        outs, lses = [], []
        for g in (g.low if low else g for g in self._groups):
            o, lse = self._group_attention(
                g, g.take(qg), a, b, scale, with_lse,
                [(g.take(r[0]), g.take(r[1]), *r[2:]) for r in rows] if rows else None)
            outs.append(o)
            lses.append(lse)
        return self._merge(outs), (self._merge(lses) if with_lse else None)

    def _group_pass(self, g: _WidthGroup) -> int:
        """Query heads of a GQA group one decode-attention pass of width group g takes."""
        kt, vt = g.key_tables, g.value_tables
        if self._split:
            return metal.group_pass(self.head_dim, kt.bits0, vt.bits, k_bits1=kt.bits1)
        return metal.group_pass(self.head_dim, kt.bits, vt.bits)

    def _group_attention(self, g: _WidthGroup, qg, a: int, b: int, scale: float,
                         with_lse: bool, rows):
        mx = _mx()
        if a == 0:  # the stored arrays as they are: head_stride = capacity, no copy
            kc, kn, vc, vn = g.arrays()
        else:
            kc, kn = g.k_codes[:, a:b], g.k_norms[:, a:b]
            vc, vn = g.v_codes[:, a:b], g.v_norms[:, a:b]
        outs, lses = [], []
        G = int(qg.shape[1])
        kt, vt = g.key_tables, g.value_tables
        step = self._group_pass(g)
        for g0 in range(0, G, step):  # large GQA groups (or head_dim): several passes
            part = qg if step >= G else qg[:, g0:g0 + step]  # no slice op for one pass
            args = (kt, vt, part, kc, kn, vc, vn, b - a, scale)
            if with_lse:
                o, lse = self.kernels.decode_attention_heads(*args, with_lse=True)
                lses.append(lse)
            elif rows:
                o = self.kernels.decode_attention_heads(*args, rows=rows)
            else:
                o = self.kernels.decode_attention_heads(*args)
            outs.append(o)
        cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=1))  # noqa: E731
        return cat(outs), (cat(lses) if with_lse else None)

    def _decode(self, q, scale: float, window: int | None):
        mx = _mx()
        n, H = self._n, self.n_kv_heads
        G = self.n_q_heads // H
        lo = max(0, n - int(window)) if window is not None else 0
        qg = q.reshape(H, G, self.head_dim)
        sinks, (a, b), win = self._pieces(lo)
        fp16 = [p for p in (sinks, win) if p is not None]
        if b > a:  # the codes, with the fp16 rows merged in by the reduce launch
            if win is not None and lo <= self._coded:  # the whole window: its buffers
                fp16[-1] = self._window_rows()
            out, _ = self._code_attention(qg, a, b, scale, False, rows=fp16 or None)
            return out.reshape(self.n_q_heads, 1, self.head_dim)
        kf = mx.concatenate([k for k, _ in fp16], axis=1).astype(mx.float32)
        vf = mx.concatenate([v for _, v in fp16], axis=1).astype(mx.float32)
        s = (qg @ kf.transpose(0, 2, 1)) * scale  # (H, G, nf)
        e = mx.exp(s - s.max(axis=-1, keepdims=True))
        out = (e @ vf) / e.sum(axis=-1, keepdims=True)
        return out.reshape(self.n_q_heads, 1, self.head_dim)

    def _prefill(self, q, scale: float, causal: bool, window: int | None, half=None):
        mx = _mx()
        ft = mx.float32 if half is None else half  # the tile's and attention's precision
        tile = None if half is None else mx.float16  # the dequantize kernels write fp16
        n, Tq = self._n, int(q.shape[1])
        first_q = n - Tq  # position of query 0
        if window is None:
            lo = 0
        elif causal:
            lo = max(0, first_q - int(window) + 1)
        else:
            lo = max(0, n - int(window))
        sinks, (a, b), win = self._pieces(lo)
        tiled = getattr(self.kernels, "dequantize_tile_heads", None)
        if b > a and ft == mx.float16 and len(self._groups) == 1 and tiled:
            # one launch per role writes the whole fp16 tile, sinks and window rows included
            g = self._groups[0]
            k, v = (tiled(t, c[:, a:b], nm[:, a:b], before=None if sinks is None else sinks[i],
                          after=None if win is None else win[i])
                    for i, (t, c, nm) in enumerate(((g.key_tables, g.k_codes, g.k_norms),
                                                    (g.value_tables, g.v_codes, g.v_norms))))
            return self._tile_attention(q, k, v, scale, causal, window, first_q, lo, n, ft)
        ks, vs = [], []  # the visible tokens [lo, n) in position order
        if sinks is not None:
            ks.append(sinks[0].astype(ft))
            vs.append(sinks[1].astype(ft))
        if b > a:
            def decoded(parts):  # the codes [a, b) of every width group, in head order
                rows = self._merge([self.kernels.dequantize_heads(t, c[:, a:b], nm[:, a:b],
                                                                  out_dtype=tile)
                                    for t, c, nm in parts])
                return rows if rows.dtype == ft else rows.astype(ft)
            ks.append(decoded([(g.key_tables, g.k_codes, g.k_norms) for g in self._groups]))
            vs.append(decoded([(g.value_tables, g.v_codes, g.v_norms) for g in self._groups]))
        if win is not None:
            ks.append(win[0].astype(ft))
            vs.append(win[1].astype(ft))
        k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=1)
        v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=1)
        return self._tile_attention(q, k, v, scale, causal, window, first_q, lo, n, ft)

    def _tile_attention(self, q, k, v, scale: float, causal: bool, window: int | None,
                        first_q: int, lo: int, n: int, ft):
        """mx attention of the queries q (Hq, Tq, d) at positions [first_q, n) over the tile
        k, v (H, n - lo, d) of the tokens [lo, n)."""
        mx = _mx()
        mask = None
        if causal and window is None:
            # The queries are the last Tq of the n keys: mlx's "causal" mask (aligned to the
            # bottom right), which its fused kernels take (cuDNN on CUDA, the full-attention
            # kernel on Metal); an array mask sends sdpa to its unfused fallback, which
            # materializes every query head's scores (GBs per layer at long contexts).
            mask = "causal"
        elif causal:
            qpos = mx.arange(first_q, n)[:, None]
            kpos = mx.arange(lo, n)[None, :]
            mask = (kpos <= qpos) & (kpos > qpos - int(window))
        out = mx.fast.scaled_dot_product_attention(q[None].astype(ft), k[None], v[None],
                                                   scale=scale, mask=mask)
        return out[0].astype(ft)

    # --- codes out / in, files -------------------------------------------------------------
    def encoded(self, layer: int = 0, kv_head: int = 0, role: str = "key", start: int = 0,
                count: int | None = None):
        """(codes (n, code_bytes) uint8, norms (n,) float16) of one stream, as NumPy: code
        indices [start, start + count) (the coded tokens; fp16 sinks and window excluded)."""
        self._check_layer(layer)
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        if not 0 <= kv_head < self.n_kv_heads:
            raise ValueError(f"kv_head must be in [0, {self.n_kv_heads}), got {kv_head}")
        count = self._nc - start if count is None else int(count)
        if not 0 <= start <= self._nc or not 0 <= count <= self._nc - start:
            raise ValueError(f"tokens [{start}, {start + count}) beyond the layer's {self._nc} "
                             "coded tokens")
        if self.mixed:
            return self._mixed_encoded(kv_head, role, start, count)
        i, j = self._slots[kv_head]
        g = self._groups[i]
        codes, norms = (g.k_codes, g.k_norms) if role == "key" else (g.v_codes, g.v_norms)
        if codes is None or count == 0:
            cb = self._quantizer(kv_head, role).code_bytes
            return np.zeros((0, cb), np.uint8), np.zeros((0,), np.float16)
        return (np.array(codes[j, start:start + count]),
                np.array(norms[j, start:start + count]))

    def _mixed_codes(self, kv_head: int, role: str):
        """Mixed precision: one stream's codes in code index order, as the core stores them
        (per flush group g, the kept tokens' full-width rows then the others' low-width rows,
        the other way round for odd g): (packed rows (bytes,) uint8, row widths (nc,), norms
        (nc,) float16) as NumPy."""
        i, j = self._slots[kv_head]
        full, low = self._groups[i], self._groups[i].low
        nhi, nlo = self._nc - self._nlo, self._nlo
        pick = ((lambda p: (p.k_codes, p.k_norms)) if role == "key"  # noqa: E731
                else (lambda p: (p.v_codes, p.v_norms)))
        hc, hn = (np.array(a[j, :nhi]) for a in pick(full)) if nhi else (None, None)
        lc, ln = (np.array(a[j, :nlo]) for a in pick(low)) if nlo else (None, None)
        bt = self.block_tokens
        F, Kt = self.mixed_group_blocks * bt, self.mixed_keep_blocks * bt
        Lt = F - Kt
        rows, widths, norms = [], [], []
        for g in range(self._nc // F):
            parts = [(hc[g * Kt:(g + 1) * Kt], hn[g * Kt:(g + 1) * Kt]),
                     (lc[g * Lt:(g + 1) * Lt], ln[g * Lt:(g + 1) * Lt])]
            for c, x in (parts if g % 2 == 0 else parts[::-1]):
                rows.append(c.ravel())
                widths.append(np.full(len(x), c.shape[1], np.int64))
                norms.append(x)
        if not rows:
            return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.float16)
        return np.concatenate(rows), np.concatenate(widths), np.concatenate(norms)

    def _mixed_encoded(self, kv_head: int, role: str, start: int, count: int):
        """encoded() of a mixed-precision store: as ``_core.KVCache.encoded``, the rows of
        code indices [start, start + count) packed at their blocks' widths from the front of
        a (count, full-width code_bytes) array (the rest zero), and their norms."""
        packed, widths, norms = self._mixed_codes(kv_head, role)
        offsets = np.concatenate([[0], np.cumsum(widths)])
        cb = self._quantizer(kv_head, role).code_bytes
        out = np.zeros((count, cb), np.uint8)
        chunk = packed[offsets[start]:offsets[start + count]]
        out.ravel()[:len(chunk)] = chunk
        return out, norms[start:start + count].copy()

    def mixed_masks(self, layer: int = 0, kv_head: int = 0) -> np.ndarray:
        """Mixed precision: the kept-token masks of one KV head's flush groups, as
        ``_core.KVCache.mixed_masks`` (uint64 words; bit o of group g: token
        fp16_sinks + g·F + o kept its full width)."""
        self._check_layer(layer)
        return self._masks[kv_head].copy()

    def window_importance(self, layer: int = 0, kv_head: int = 0) -> np.ndarray:
        """Mixed precision: the window tokens' importance (sum of squared softmax weights)."""
        self._check_layer(layer)
        if not self.mixed or self._imp is None:
            return np.zeros(0, np.float32)
        return np.array(self._imp[kv_head])

    def rated_tokens(self, layer: int = 0) -> int:
        self._check_layer(layer)
        return self._rated

    def fp16_rows(self, role: str = "key", part: str = "window"):
        """The fp16 sink or window rows of one role, (n_kv_heads, rows, d) float16 NumPy."""
        if role not in ("key", "value") or part not in ("sinks", "window"):
            raise ValueError(f"role must be 'key' or 'value' and part 'sinks' or 'window', got "
                             f"{role!r} / {part!r}")
        a = {("key", "sinks"): self._k_sink, ("value", "sinks"): self._v_sink,
             ("key", "window"): self._k_win, ("value", "window"): self._v_win}[(role, part)]
        if a is None:
            return np.zeros((self.n_kv_heads, 0, self.head_dim), np.float16)
        return np.array(a)

    def decode(self, layer: int = 0, kv_head: int = 0, role: str = "key", start: int = 0,
               count: int | None = None):
        """The keys or values of one head at token positions [start, start + count),
        (count, d) float32 NumPy: codes decoded, fp16 sinks and window as stored."""
        self._check_layer(layer)
        count = self._n - start if count is None else int(count)
        if not 0 <= start <= self._n or not 0 <= count <= self._n - start:
            raise ValueError(f"tokens [{start}, {start + count}) beyond the layer's {self._n}")
        if self.mixed:
            decoded = self._mixed_decoded(kv_head, role)
        else:
            codes, norms = self.encoded(layer, kv_head, role)
            decoded = self._quantizer(kv_head, role).decode(codes, norms)
        rows = np.concatenate([self.fp16_rows(role, "sinks")[kv_head].astype(np.float32),
                               decoded,
                               self.fp16_rows(role, "window")[kv_head].astype(np.float32)])
        return rows[start:start + count]

    def mixed_positions(self, layer: int = 0, kv_head: int = 0) -> np.ndarray:
        """The position of every code index of one KV head (``_core.KVCache.mixed_positions``):
        by position, or with mixed precision per flush group the kept tokens, then the others
        (the other way round in odd groups), each in position order."""
        self._check_layer(layer)
        ns = self._ns
        if not self.mixed:
            return np.arange(ns, ns + self._nc, dtype=np.int64)
        F = self.mixed_group_blocks * self.block_tokens
        words = (F + 63) // 64
        out = []
        for g in range(self._nc // F):
            m = self._masks[kv_head, g * words:(g + 1) * words]
            bits = np.unpackbits(m.view(np.uint8), bitorder="little")[:F].astype(bool)
            o = np.arange(F)
            kept, others = o[bits], o[~bits]
            for part in ((kept, others) if g % 2 == 0 else (others, kept)):
                out.append(ns + g * F + part)
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def _mixed_decoded(self, kv_head: int, role: str) -> np.ndarray:
        """The coded tokens of one stream decoded at their widths, in position order."""
        packed, widths, norms = self._mixed_codes(kv_head, role)
        i, j = self._slots[kv_head]
        full, low = self._groups[i], self._groups[i].low
        pick = (lambda p: (p.key_tables if role == "key" else p.value_tables).quantizers[j])  # noqa: E731
        cb = pick(full).code_bytes
        out = np.empty((len(norms), self.head_dim), np.float32)
        at = 0
        for t in range(len(norms)):  # runs of one width decode together
            if t and widths[t] == widths[t - 1] and t % self.block_tokens:
                continue
            end = t + 1
            while end < len(norms) and widths[end] == widths[t] and end % self.block_tokens:
                end += 1
            q = pick(full) if widths[t] == cb else pick(low)
            rows = packed[at:at + (end - t) * widths[t]].reshape(end - t, widths[t])
            out[t:end] = q.decode(np.ascontiguousarray(rows), np.ascontiguousarray(norms[t:end]))
            at += (end - t) * widths[t]
        order = np.argsort(self.mixed_positions(0, kv_head), kind="stable")
        return out[order]

    def _all_encoded(self):
        """The codes of both roles as ``_core.KVCache.append_encoded`` takes them: (H, nc, cb)
        codes and (H, nc) norms NumPy arrays per role, or (per-head widths) per role lists
        of each KV head's (nc, cb) codes and (nc,) norms."""
        n, H = self._nc, self.n_kv_heads
        if len(self._groups) == 1:
            g = self._groups[0]
            if n == 0:
                return (np.zeros((H, 0, g.key_tables.code_bytes), np.uint8),
                        np.zeros((H, 0), np.float16),
                        np.zeros((H, 0, g.value_tables.code_bytes), np.uint8),
                        np.zeros((H, 0), np.float16))
            return tuple(np.ascontiguousarray(np.array(a[:, :n])) for a in g.arrays())
        per_head = [[self.encoded(0, h, role) for h in range(H)] for role in ("key", "value")]
        return ([c for c, _ in per_head[0]], [x for _, x in per_head[0]],
                [c for c, _ in per_head[1]], [x for _, x in per_head[1]])

    def _low_blocks(self) -> np.ndarray:
        """Mixed precision: 1 for every code block at the low width (cache/mixed_precision.cpp
        mixed_low_block: the last blocks of even groups, the first of odd ones)."""
        return self._low_blocks_for(self._nc)

    def _mixed_to_core(self, core, layer: int) -> None:
        """The codes (packed at their blocks' widths, with the groups' masks and block flags),
        the window rows with their importance and the rated count into ``core``'s layer."""
        H = self.n_kv_heads
        rows = {role: [self._mixed_codes(h, role) for h in range(H)] for role in ("key", "value")}
        flags = self._low_blocks()
        core.append_encoded([r[0] for r in rows["key"]], [r[2] for r in rows["key"]],
                            [r[0] for r in rows["value"]], [r[2] for r in rows["value"]], layer,
                            decayed=[flags] * (2 * H),
                            masks=[np.ascontiguousarray(m) for m in self._masks])
        if self._n > self._coded:
            core.append_window(self.fp16_rows("key", "window"), self.fp16_rows("value", "window"),
                               layer, importance=np.ascontiguousarray(np.array(self._imp)))
        core.set_rated_tokens(layer, self._rated)

    def _mixed_from_core(self, core, layer: int) -> None:
        """The coded part of ``core``'s mixed-precision layer into the store's pages: each
        stream's packed rows split into the full- and low-width pages by block."""
        mx = _mx()
        H, bt, nc = self.n_kv_heads, self.block_tokens, core.code_tokens(layer)
        self._nc = self._nlo = 0  # _write counts them again
        self._masks = np.stack([np.asarray(core.mixed_masks(layer, h), np.uint64)
                                for h in range(H)]).reshape(H, -1)
        self._mask_cap = self._masks.shape[1]
        if not nc:
            return
        low = self._low_blocks_for(nc)
        per = {}  # (role, low) -> per head (codes, norms)
        for role in ("key", "value"):
            for h in range(H):
                full_q, low_q = self._quantizer(h, role), self._low_quantizer(h, role)
                codes, norms = core.encoded(layer, h, role, 0, nc)
                packed, at = codes.ravel(), 0
                for b, is_low in enumerate(low):
                    cb = (low_q if is_low else full_q).code_bytes
                    block = packed[at:at + bt * cb].reshape(bt, cb)
                    per.setdefault((role, bool(is_low)), [[] for _ in range(H)])[h].append(
                        (block, norms[b * bt:(b + 1) * bt]))
                    at += bt * cb
        for is_low in (False, True):
            parts = []
            for g in self._groups:
                part = []
                for role in ("key", "value"):
                    heads = per[(role, is_low)]
                    part += [mx.array(np.stack([np.concatenate([c for c, _ in heads[h]])
                                                for h in g.heads])),
                             mx.array(np.stack([np.concatenate([x for _, x in heads[h]])
                                                for h in g.heads]))]
                parts.append(tuple(part))
            self._write(parts, low=is_low)

    def _low_blocks_for(self, nc: int) -> np.ndarray:
        R, K = self.mixed_group_blocks, self.mixed_keep_blocks
        b = np.arange(nc // self.block_tokens)
        g, j = b // R, b % R
        return np.where(g % 2 == 0, j >= K, j < R - K).astype(np.uint8)

    def _low_quantizer(self, kv_head: int, role: str):
        i, j = self._slots[kv_head]
        low = self._groups[i].low
        return (low.key_tables if role == "key" else low.value_tables).quantizers[j]

    def _core_config(self, n_layers: int = 1) -> dict:
        return dict(n_layers=n_layers, n_q_heads=self.n_q_heads, n_kv_heads=self.n_kv_heads,
                    key_method="turboquant_mse", key_bits=self.key_bits,
                    value_method="turboquant_mse", value_bits=self.value_bits, seed=self.seed,
                    rotation=self._configured_rotation if self._split else self.rotation,
                    block_tokens=self.block_tokens,
                    norm_correction=self.norm_correction, fp16_window=self.fp16_window,
                    fp16_sinks=self.fp16_sinks, split_angle_bits=self.split_angle_bits,
                    kv_head_offset=self.kv_head_offset,
                    **{name: list(bits) for name, bits in (
                        ("key_head_bits", self.key_head_bits),
                        ("value_head_bits", self.value_head_bits),
                        ("outlier_head_bits", self.outlier_head_bits)) if bits is not None},
                    **({k: v for k, v in self._split.items() if k != "split_angle_bits"}
                       | {"outlier_roles": "keys"} if self._split else {}),
                    **(dict(mixed_group_blocks=self.mixed_group_blocks,
                            mixed_keep_blocks=self.mixed_keep_blocks, decay_bits=self.decay_bits)
                       if self.mixed else {}))

    def to_core(self):
        """A ``_core.KVCache`` holding the same codes and fp16 rows (a CPU copy)."""
        return stores_to_core([self])

    def to_bytes(self) -> bytes:
        """The C++ cache file format (serialize.h) of this layer; loads in _core.KVCache."""
        return self.to_core().to_bytes()

    def save(self, path: str) -> None:
        self.to_core().save(str(path))

    @classmethod
    def from_core(cls, core, layer: int = 0, kernels: Any = None,
                  check_inputs: bool = True) -> MetalCodeStore:
        """A store holding layer ``layer`` of a ``_core.KVCache`` (codes copied to mlx)."""
        chans = [int(c) for c in core.outlier_channels]
        rotation = core.configured_rotation if chans else core.rotation
        why = store_supports(core.head_dim, core.key_method, core.value_method, rotation)
        if why:
            raise ValueError(f"this cache cannot be held by a MetalCodeStore: {why}")
        for name, used in (("fp16 layers", core.fp16_layers), ("a QJL dimension", core.jl_dim),
                           ("temporal decay", core.decay_after),
                           ("eviction", core.max_coded_tokens)):
            if used:
                raise ValueError(f"this cache cannot be held by a MetalCodeStore: it uses {name}")
        split = {}
        if chans:  # checked by the constructor: keys only, split over two halves
            split = dict(outlier_channels=chans, n_outlier_channels=core.n_outlier_channels,
                         outlier_bits=core.outlier_bits, outlier_roles=core.outlier_roles)
        try:
            store = cls(core.head_dim, 1, core.n_q_heads, core.n_kv_heads, core.key_method,
                        core.key_bits, core.value_method, core.value_bits, core.seed,
                        rotation, core.block_tokens, layer=layer,
                        norm_correction=core.norm_correction, fp16_window=core.fp16_window,
                        fp16_sinks=core.fp16_sinks, kernels=kernels, check_inputs=check_inputs,
                        split_angle_bits=core.split_angle_bits,
                        kv_head_offset=core.kv_head_offset,
                        key_head_bits=list(core.key_head_bits) or None,
                        value_head_bits=list(core.value_head_bits) or None,
                        outlier_head_bits=list(core.outlier_head_bits) or None,
                        mixed_group_blocks=core.mixed_group_blocks,
                        mixed_keep_blocks=core.mixed_keep_blocks,
                        decay_bits=core.decay_bits if core.mixed_group_blocks else 0, **split)
        except ValueError as e:
            raise ValueError(f"this cache cannot be held by a MetalCodeStore: {e}") from None
        for role in ("key", "value"):
            for h in range(store.n_kv_heads):
                q = store._quantizer(h, role)
                _, params = core.rotation_parameters(layer, h, role)
                if not np.array_equal(np.asarray(params, np.float32),
                                      np.asarray(q.rotation_parameters(), np.float32)):
                    raise ValueError(
                        f"layer {layer} {role} head {h} has a custom rotation (artifact store); "
                        "the MetalCodeStore uses the seeded rotations only")
        mx = _mx()
        H = core.n_kv_heads
        n, coded = core.size(layer), core.coded_tokens(layer)
        ns, nc = core.sink_tokens(layer), core.code_tokens(layer)

        def rows(role, start, count):
            return mx.array(np.stack([core.decode(layer, h, role, start, count)
                                      for h in range(H)]).astype(np.float16))

        if ns:
            store._k_sink, store._v_sink = rows("key", 0, ns), rows("value", 0, ns)
            store._sink_cap = store.fp16_sinks
        if store.mixed:
            store._mixed_from_core(core, layer)
        elif nc:
            parts = []
            for g in store._groups:
                part = []
                for role in ("key", "value"):
                    pairs = [core.encoded(layer, h, role, 0, nc) for h in g.heads]
                    part += [mx.array(np.stack([c for c, _ in pairs])),
                             mx.array(np.stack([x for _, x in pairs]))]
                parts.append(tuple(part))
            store._write(parts)
        if n > coded:
            store._k_win = rows("key", coded, n - coded)
            store._v_win = rows("value", coded, n - coded)
            store._win_cap = store._plan.window_rows
        if store.mixed:  # the window's importance and rated count; capacities as a load's
            nw, rows = n - coded, store._plan.window_rows
            store._imp = (mx.array(np.stack([np.asarray(core.window_importance(layer, h),
                                                        np.float32) for h in range(H)]))
                          if nw else None)
            store._rated = int(core.rated_tokens(layer))
            store._win_cap = rows if 0 < nw <= rows else nw
            store._imp_cap = nw
        store._n, store._coded = n, coded
        return store

    @classmethod
    def from_bytes(cls, data: bytes, kernels: Any = None, check_inputs: bool = True
                   ) -> MetalCodeStore:
        """Load the bytes of a one-layer cache file (``to_bytes`` or ``_core.KVCache``'s)."""
        core = _core.KVCache.from_bytes(data)
        if core.n_layers != 1:
            raise ValueError(f"the file holds {core.n_layers} layers; MetalCodeStore.from_bytes "
                             "loads one (use MetalKVCache.from_bytes)")
        return cls.from_core(core, 0, kernels, check_inputs)

    @classmethod
    def load(cls, path: str, kernels: Any = None) -> MetalCodeStore:
        return cls.from_core(_core.KVCache.load(str(path)), 0, kernels)

    def _check_layer(self, layer: int) -> None:
        if layer != 0:
            raise ValueError(f"layer must be in [0, 1), got {layer}")

    def __repr__(self) -> str:
        kernels = getattr(self.kernels, "name", None) or getattr(self.kernels, "__name__", "?")
        extra = "".join(f", {k}={v}" for k, v in (("key_split", self.key_split),
                                                   ("norm_correction", self.norm_correction),
                                                   ("fp16_sinks", self.fp16_sinks),
                                                   ("fp16_window", self.fp16_window),
                                                   ("kv_head_offset", self.kv_head_offset),
                                                   ("key_head_bits", self.key_head_bits),
                                                   ("value_head_bits", self.value_head_bits),
                                                   ("outlier_head_bits",
                                                    self.outlier_head_bits),
                                                   ("mixed_group_blocks", self.mixed_group_blocks),
                                                   ("mixed_keep_blocks", self.mixed_keep_blocks),
                                                   ("decay_bits", self.decay_bits)) if v)
        return (f"MetalCodeStore(head_dim={self.head_dim}, n_q_heads={self.n_q_heads}, "
                f"n_kv_heads={self.n_kv_heads}, key={self.key_bits}b, value={self.value_bits}b, "
                f"tokens={self._n}{extra}, kernels={kernels})")


def _split_config(head_dim: int, key_bits: int, n_outlier_channels, outlier_bits,
                  outlier_channels, outlier_roles: str, split_angle_bits) -> dict:
    """The key split's Quantizer options ({} without a split), after checking that the
    split.metal kernels can run it: keys only, outlier channels [0, d/2) (the mlx-lm key
    split's order), the angle at 8 or 16 bits."""
    chans = [int(c) for c in outlier_channels] if outlier_channels is not None else []
    m = len(chans) if chans else int(n_outlier_channels)
    if isinstance(split_angle_bits, bool) or split_angle_bits not in (8, 16):
        raise ValueError(f"split_angle_bits must be 8 or 16, got {split_angle_bits!r}")
    if m == 0:
        return {}
    if outlier_roles != "keys":
        raise ValueError(f"the Metal store splits keys only (outlier_roles='keys'), got "
                         f"{outlier_roles!r}")
    if chans and len(chans) != int(n_outlier_channels or len(chans)):
        raise ValueError(f"n_outlier_channels={n_outlier_channels} but {len(chans)} outlier "
                         "channels were given")
    chans = sorted(chans) if chans else list(range(m))
    if chans != list(range(head_dim // 2)):
        raise ValueError(f"the Metal store's key split needs the outlier channels to be the first "
                         f"half [0, {head_dim // 2}) of the channels (order them first), got "
                         f"{len(chans)} channels" + ("" if len(chans) != head_dim // 2
                                                     else f" starting {chans[:4]}"))
    # n_outlier_channels and outlier_bits as given (0: implied), as the core's file header
    # records them.
    return dict(outlier_channels=chans, n_outlier_channels=int(n_outlier_channels),
                outlier_bits=int(outlier_bits), split_angle_bits=int(split_angle_bits))


def stores_to_core(stores: Sequence[MetalCodeStore]):
    """One ``_core.KVCache`` holding the layers of ``stores`` (store i must be layer i): the
    fp16 sinks appended first (they fill the core's sinks), then the codes, then the fp16
    window rows (which the core keeps as its window: it holds at most fp16_window +
    block_tokens of them, so nothing is re-encoded)."""
    first = stores[0]
    core = _core.KVCache(first.head_dim, **first._core_config(len(stores)))
    for i, s in enumerate(stores):
        if s.layer != i or s._core_config() != first._core_config():
            raise ValueError(f"store {i} (layer {s.layer}) does not belong to this cache")
        if s._ns:
            core.append(s.fp16_rows("key", "sinks").astype(np.float32),
                        s.fp16_rows("value", "sinks").astype(np.float32), i)
        if s.mixed:
            s._mixed_to_core(core, i)
            continue
        kc, kn, vc, vn = s._all_encoded()
        core.append_encoded(kc, kn, vc, vn, i)
        if s._n > s._coded:
            core.append(s.fp16_rows("key", "window").astype(np.float32),
                        s.fp16_rows("value", "window").astype(np.float32), i)
    return core


class MetalKVCache:
    """Several layers of :class:`MetalCodeStore` behind the interface of ``_core.KVCache``
    (``append(keys, values, layer)``, ``attend(queries, layer, causal, scale, window,
    sparse_v)``, ``size``, ``trim``, ``memory_bytes``, ``fp16_bytes``, ``bytes_per_token``,
    ``save`` / ``to_bytes`` / ``from_bytes`` in the C++ file format). What
    ``KVCacheBuilder.with_backend("metal")`` builds on a Mac."""

    def __init__(self, head_dim: int, n_layers: int = 1, n_q_heads: int = 1, n_kv_heads: int = 1,
                 key_method: str = "turboquant_mse", key_bits: int = 3,
                 value_method: str = "turboquant_mse", value_bits: int = 3, seed: int = 0,
                 rotation: str = "auto", block_tokens: int = 256, *,
                 norm_correction: bool = False, fp16_window: int = 0, fp16_sinks: int = 0,
                 kernels: Any = None, check_inputs: bool = True, kv_head_offset: int = 0,
                 stores: Sequence[MetalCodeStore] | None = None, **split):
        if stores is None:
            if int(n_layers) < 1:
                raise ValueError(f"n_layers must be >= 1, got {n_layers}")
            stores = [MetalCodeStore(head_dim, 1, n_q_heads, n_kv_heads, key_method, key_bits,
                                     value_method, value_bits, seed, rotation, block_tokens,
                                     layer=i, norm_correction=norm_correction,
                                     fp16_window=fp16_window, fp16_sinks=fp16_sinks,
                                     kernels=kernels, check_inputs=check_inputs,
                                     kv_head_offset=kv_head_offset, **split)
                      for i in range(int(n_layers))]
        self.layers = list(stores)
        s = self.layers[0]
        self.head_dim, self.n_layers = s.head_dim, len(self.layers)
        self.n_q_heads, self.n_kv_heads = s.n_q_heads, s.n_kv_heads
        self.key_method, self.value_method = s.key_method, s.value_method
        self.key_bits, self.value_bits, self.seed = s.key_bits, s.value_bits, s.seed
        self.rotation, self.block_tokens = s.rotation, s.block_tokens
        self.norm_correction, self.fp16_sinks = s.norm_correction, s.fp16_sinks
        self.fp16_window, self.fp16_layers = s.fp16_window, []
        self.kv_head_offset = s.kv_head_offset
        self.key_head_bits, self.value_head_bits = s.key_head_bits, s.value_head_bits
        self.outlier_head_bits = s.outlier_head_bits

    def _layer(self, layer: int) -> MetalCodeStore:
        if not 0 <= int(layer) < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        return self.layers[int(layer)]

    def append(self, keys, values, layer: int = 0) -> None:
        self._layer(layer).append(keys, values)

    def attend(self, queries, layer: int = 0, causal: bool = True, scale: float | None = None,
               window: int | None = None, sparse_v: float = 0.0, dtype=None):
        return self._layer(layer).attend(queries, 0, causal, scale, window, sparse_v)

    def size(self, layer: int = 0) -> int:
        return self._layer(layer).size()

    def __len__(self) -> int:
        return self.layers[0].size()

    def trim(self, n: int) -> int:
        removed = [s.trim(n) for s in self.layers]
        return removed[0]

    def compact_window(self, layer: int | None = None) -> int:
        """``_core.KVCache.compact_window``: one layer's window (every layer's when layer is
        None) into codes; the tokens moved."""
        if layer is None:
            return sum(s.compact_window() for s in self.layers)
        return self._layer(layer).compact_window()

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes() for s in self.layers)

    def fp16_bytes(self) -> int:
        return sum(s.fp16_bytes() for s in self.layers)

    def bytes_per_token(self) -> int:
        return sum(s.bytes_per_token() for s in self.layers)

    def decode(self, layer: int = 0, kv_head: int = 0, role: str = "key", start: int = 0,
               count: int | None = None):
        return self._layer(layer).decode(0, kv_head, role, start, count)

    def to_core(self):
        return stores_to_core(self.layers)

    def to_bytes(self) -> bytes:
        return self.to_core().to_bytes()

    def save(self, path: str) -> None:
        self.to_core().save(str(path))

    @classmethod
    def from_core(cls, core, kernels: Any = None, check_inputs: bool = True) -> MetalKVCache:
        return cls(core.head_dim, stores=[MetalCodeStore.from_core(core, i, kernels, check_inputs)
                                          for i in range(core.n_layers)])

    @classmethod
    def from_bytes(cls, data: bytes, kernels: Any = None) -> MetalKVCache:
        return cls.from_core(_core.KVCache.from_bytes(data), kernels)

    @classmethod
    def load(cls, path: str, kernels: Any = None) -> MetalKVCache:
        return cls.from_core(_core.KVCache.load(str(path)), kernels)

    def __repr__(self) -> str:
        return (f"MetalKVCache(head_dim={self.head_dim}, n_layers={self.n_layers}, "
                f"n_q_heads={self.n_q_heads}, n_kv_heads={self.n_kv_heads}, tokens={len(self)})")


def _numpy_view(x: Any) -> np.ndarray:
    if _is_mlx(x) and x.dtype == _mx().bfloat16:  # NumPy has no bfloat16
        x = x.astype(_mx().float32)
    return np.asarray(x)


class MetalCompressedKVCache(CompressedKVCache):
    """``CompressedKVCache`` on a :class:`MetalKVCache`: mlx inputs go to the store as
    they are (no NumPy round trip), outputs are mlx arrays for mlx queries (NumPy for
    NumPy queries), in the cache's precision. Built by
    ``KVCacheBuilder.with_backend("metal")`` on a Mac."""

    def append(self, keys: Any, values: Any, layer: int = 0) -> None:
        if len(getattr(keys, "shape", ())) == 1:  # one token of a single-head cache
            keys = keys.reshape(1, -1)
            values = values.reshape(1, -1) if len(values.shape) == 1 else values
        first = self.core.size(layer)
        t0 = time.perf_counter()
        self.core.append(keys, values, layer)
        dt = time.perf_counter() - t0
        if self.observers:
            h, d = self.core.n_kv_heads, self.core.head_dim
            k, v = _numpy_view(keys), _numpy_view(values)
            ev = Event("append", self, layer, dt, k.shape[-2], keys=k.reshape(h, -1, d),
                       values=v.reshape(h, -1, d), first_token=first)
            for o in self.observers:
                o.on_append(ev)

    def attend(self, queries: Any, layer: int = 0, causal: bool = True,
               scale: float | None = None, window: int | None = None,
               sparse_v: float | None = None) -> Any:
        t0 = time.perf_counter()
        out = self.core.attend(queries, layer, causal, scale, window,
                               self.sparse_v if sparse_v is None else sparse_v)
        dt = time.perf_counter() - t0
        if self.observers:
            ev = Event("attend", self, layer, dt,
                       1 if len(queries.shape) == 1 else queries.shape[-2])
            for o in self.observers:
                o.on_attend(ev)
        p = self.precision
        if _is_mlx(queries):
            return out.astype(p if _is_mlx_dtype(p) else _mlx_dtype(p))
        return np.asarray(out).astype(_numpy_dtype(p), copy=False)

    @classmethod
    def load(cls, path: str, precision: Any = np.float32, kernels: Any = None):
        return cls(MetalKVCache.load(str(path), kernels), precision=precision, backend="metal")


# --- First use of a GPU path -----------------------------------------------------------------


def _self_test_step_words(store, rng, mx, hq: int, hkv: int, d: int) -> str | None:
    """A decode step with fp16 and bfloat16 queries in a channel order, the value mean added
    (MetalCodeStore.decode_step_words, the mma block kernel) against the longer form it
    replaces: mlx's gather and float32 cast, decode_step(), then (out + mean).astype():
    the same bits, or why not."""
    order = np.stack([rng.permutation(d) for _ in range(hkv)]).astype(np.uint32)
    index = mx.array(order[:, None, :].astype(np.int32))
    mean = mx.array(rng.standard_normal((hkv, d)).astype(np.float32))
    checked, store.check_inputs = store.check_inputs, False
    try:
        for dtype in (mx.float16, mx.bfloat16):
            q = mx.array(rng.standard_normal((hq, 1, d)).astype(np.float32)).astype(dtype)
            with metal.forced_attention("mma"):
                got = store.decode_step_words(q, mx.array(order), mean, 0.125)
                qf = mx.take_along_axis(q.reshape(hkv, hq // hkv, d), index, axis=2)
                out = store.decode_step(qf.astype(mx.float32).reshape(hq, 1, d), 0.125)
            want = (out.reshape(hkv, hq // hkv, d) + mean[:, None]).astype(dtype)
            if got is None:
                return "a decode step in the model's dtype was not taken by the mma kernel"
            if got.dtype != dtype or not bool(
                    mx.array_equal(got.reshape(hkv, hq // hkv, d), want).item()):
                return (f"a decode step with {dtype} queries and output differs from the "
                        "gather, cast and mean of the longer form")
    finally:
        store.check_inputs = checked
    return None


def self_test(kernels: Any = None) -> str | None:
    """Runs the store on ``kernels`` (default: the GPU kernel set, ``turboquant.metal``) once
    against the C++ core and returns None when it agrees, else what went wrong (a kernel that
    fails to compile or launch raises inside mlx; its message is returned, never raised).

    Six small one-layer caches (head_dim 64, GQA 2, 3-bit codes, norm correction, fp16 sinks
    and window, 8-token pages), one with the key split, one with per-head widths (two width
    groups), one with mixed precision (full- and low-width pages, attended with their
    log-sum-exp), and the plain and split ones again with one Hadamard round
    (``"hadamard1"``, the mlx-lm caches' default), receive 29 tokens: every kernel runs, at
    both rotations (encode, query rotation, split-K decode attention by each block kernel and
    its reduction merged with the fp16 rows, dequantize for a prefill: float32, and the
    float16 tile with the fp16 rows; and the split's five). Codes and norms must equal the
    core's bit for bit, decode and prefill attention within 1e-3 of the core's output scale
    (4e-3 for the mma block kernel, whose products take fp16 inputs, and for the float16
    prefill); the kernel set's ``permute_channels`` (the key split's channel order of a
    prefill chunk, taken by the mlx cache) must equal ``mx.take_along_axis`` bit for bit in
    float32, float16 and bfloat16, its ``centre_rows`` (a decode step's new K/V rows)
    mlx's centring and rounding, with and without a channel order, and a decode step with
    fp16 and bfloat16 queries and output (``decode_step_words``) the longer form's bits."""
    mx = _mx()
    try:
        rng = np.random.default_rng(20261204)
        d, hq, hkv, T = 64, 4, 2, 29
        base = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=11,
                    block_tokens=8, norm_correction=True, fp16_sinks=2, fp16_window=8)
        split = dict(base, key_bits=2, n_outlier_channels=d // 2, outlier_bits=4,
                     outlier_channels=list(range(d // 2)), outlier_roles="keys",
                     split_angle_bits=8)
        heads = dict(base, key_head_bits=[2, 4], value_head_bits=[3, 2])
        mixed = dict(base, fp16_window=4, mixed_group_blocks=2, mixed_keep_blocks=1,
                     decay_bits=2)
        for name, kw in (("plain", base), ("key split", split), ("per-head widths", heads),
                         ("mixed precision", mixed),
                         ("plain, one Hadamard round", dict(base, rotation="hadamard1")),
                         ("key split, one Hadamard round", dict(split, rotation="hadamard1"))):
            store = MetalCodeStore(d, kernels=kernels, **kw)
            core = _core.KVCache(d, **kw)
            k = rng.standard_normal((hkv, T, d)).astype(np.float32)
            k[..., : d // 2] *= 3.0  # unequal halves: the split's angle codes vary
            v = rng.standard_normal((hkv, T, d)).astype(np.float32)
            # (mixed precision: the first 23 tokens rated by their queries, flushed by the
            # next append)
            for a, b in ((0, 23), (23, T)) if store.mixed else ((0, T),):
                store.append(mx.array(k[:, a:b]), mx.array(v[:, a:b]))
                core.append(np.ascontiguousarray(k[:, a:b]), np.ascontiguousarray(v[:, a:b]))
                if store.mixed and a == 0:
                    q = rng.standard_normal((hq, b, d)).astype(np.float32)
                    store.attend(mx.array(q), scale=0.125)
                    core.attend(q, scale=0.125)
            n = core.code_tokens(0)
            if store.code_tokens() != n:
                return f"{name}: the store holds {store.code_tokens()} coded tokens, the core {n}"
            for h in range(hkv):
                if not np.array_equal(store.mixed_masks(0, h), core.mixed_masks(0, h)):
                    return f"{name}: the kept-token masks of KV head {h} differ from the core's"
                for role in ("key", "value"):
                    sc, sn = store.encoded(0, h, role)
                    cc, cn = core.encoded(0, h, role, 0, n)
                    if store.mixed:  # rows packed at their blocks' widths from the front
                        size = len(store._mixed_codes(h, role)[0])
                        sc, cc = sc.ravel()[:size], cc.ravel()[:size]
                    if not np.array_equal(sc, cc):
                        return f"{name}: {role} codes of KV head {h} differ from the C++ core's"
                    if not np.array_equal(np.asarray(sn).view(np.uint16),
                                          np.asarray(cn).view(np.uint16)):
                        return f"{name}: {role} norms of KV head {h} differ from the C++ core's"
            # A decode step (split-K on the codes, by each block kernel: staged, register-
            # tiled, generic), a causal prefill in float32 and in float16 (the fp16 tile with
            # the sinks and window rows, written by one launch).
            for rows, kernel in ((1, "mma"), (1, "staged"), (1, "fast"), (1, "generic"),
                                 (5, ""), (5, "float16")):
                q = rng.standard_normal((hq, rows, d)).astype(np.float32)
                half = kernel == "float16"
                with (metal.forced_attention(kernel) if kernel and not half
                      else contextlib.nullcontext()):
                    got = store.attend(mx.array(q).astype(mx.float16) if half else mx.array(q),
                                       scale=0.125, dtype=mx.float16 if half else None)
                got = np.asarray(got.astype(mx.float32), np.float64)
                want = np.asarray(core.attend(q, scale=0.125), np.float64)
                err = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
                # the mma kernel's products take fp16 queries, centroids and weights; a
                # float16 prefill rounds its queries, tile and output to float16
                if not err <= (4e-3 if kernel in ("mma", "float16") else 1e-3):  # NaN fails
                    what = f" ({kernel} block kernel)" if kernel and not half else (
                        " in float16" if half else "")
                    return (f"{name}: attention of {rows} query row(s){what} differs from the "
                            f"C++ core's by {err:.3g}")
            words = getattr(METAL_KERNELS if kernels is None else kernels, "decode_step_words",
                            None)
            if words is not None and not store.mixed and len(store._groups) == 1:
                why = _self_test_step_words(store, rng, mx, hq, hkv, d)
                if why:
                    return f"{name}: {why}"
        permute = getattr(METAL_KERNELS if kernels is None else kernels, "permute_channels", None)
        if permute is not None:  # the key split's channel order of a prefill chunk
            order = np.stack([rng.permutation(d) for _ in range(hkv)]).astype(np.uint32)
            x = mx.array(rng.standard_normal((hkv, 5, d)).astype(np.float32))
            index = mx.array(order[:, None, :].astype(np.int32))
            for dtype in (mx.float32, mx.float16, mx.bfloat16):
                got = permute(x.astype(dtype), mx.array(order))
                want = mx.take_along_axis(x.astype(dtype), index, axis=2)
                if got.dtype != dtype or not bool(mx.array_equal(got, want).item()):
                    return f"the channel permutation of {dtype} rows differs from take_along_axis"
        centre = getattr(METAL_KERNELS if kernels is None else kernels, "centre_rows", None)
        if centre is not None:  # a decode step's new K/V rows (the mlx cache's centring)
            order = np.stack([rng.permutation(d) for _ in range(hkv)]).astype(np.uint32)
            index = mx.array(order[:, None, :].astype(np.int32))
            means = [mx.array(rng.standard_normal((hkv, 1, d)).astype(np.float32))
                     for _ in range(2)]
            for dtype in (mx.float16, mx.bfloat16):
                k, v = (mx.array(rng.standard_normal((hkv, 1, d)).astype(np.float32) * 8)
                        .astype(dtype) for _ in range(2))
                for perm in (mx.array(order), None):
                    got = centre(k, v, means[0], means[1], perm)
                    kk = k if perm is None else mx.take_along_axis(k, index, axis=2)
                    want = ((kk.astype(mx.float32) - means[0]).astype(mx.float16),
                            (v.astype(mx.float32) - means[1]).astype(mx.float16))
                    if not all(g.dtype == mx.float16 and bool(mx.array_equal(g, w).item())
                               for g, w in zip(got, want)):
                        return (f"the centring of a decode step's {dtype} rows differs from "
                                "mlx's")
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel set
        text = " ".join(str(e).split())
        return f"{type(e).__name__}: {text[:500]}" if text else type(e).__name__
