"""``CompressedKVCache``: the Python face of the compressed KV cache (C++ ``_core.KVCache``).

Accepts NumPy arrays, anything with the buffer protocol, and mlx arrays; returns attention
outputs in the cache's precision, as mlx arrays when the queries were mlx arrays.
Shapes: keys/values ``(d,)`` (one token, one head) | ``(T, d)`` | ``(H_kv, T, d)`` |
``(1, H_kv, T, d)``; queries ``(d,)`` | ``(T_q, d)`` | ``(H_q, T_q, d)`` | ``(1, H_q, T_q, d)``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from turboquant import _core
from turboquant.observers import Event


def _is_mlx(x: Any) -> bool:
    return type(x).__module__.startswith("mlx")


def to_numpy(x: Any, what: str) -> np.ndarray:
    """A float32/float16 C-contiguous view of x (no copy for NumPy and mlx float32/float16)."""
    if _is_mlx(x):
        import mlx.core as mx

        if x.dtype not in (mx.float32, mx.float16):
            x = x.astype(mx.float32)
        # Buffer protocol: shares mlx's memory; a transposed mlx view (common in mlx-lm) is
        # made contiguous here, since mlx has no in-place contiguous layout to offer.
        return np.ascontiguousarray(np.asarray(x))
    if isinstance(x, np.ndarray):
        return x
    a = np.asarray(x)
    if a.dtype == np.float64:  # Python lists and float64 literals
        a = a.astype(np.float32)
    return a


def _output(out: np.ndarray, precision: Any, like_mlx: bool) -> Any:
    if like_mlx:
        import mlx.core as mx

        return mx.array(out).astype(precision if _is_mlx_dtype(precision) else _mlx_dtype(precision))
    return out.astype(_numpy_dtype(precision), copy=False)


def _is_mlx_dtype(p: Any) -> bool:
    return type(p).__module__.startswith("mlx")


def _numpy_dtype(p: Any) -> np.dtype:
    if _is_mlx_dtype(p):
        name = str(p).rsplit(".", 1)[-1]
        return np.dtype("float32" if name == "bfloat16" else name)
    return np.dtype(p)


def _mlx_dtype(p: Any) -> Any:
    import mlx.core as mx

    return {"float16": mx.float16, "float32": mx.float32}[np.dtype(p).name]


class CompressedKVCache:
    """A compressed KV cache. Build it with :class:`turboquant.KVCacheBuilder`."""

    def __init__(self, core: _core.KVCache, precision: Any = np.float32, observers: list | None = None,
                 backend: str = "cpu", description: dict | None = None, sparse_v: float = 0.0) -> None:
        self.core = core
        self.sparse_v = float(sparse_v)  # default sparse-V threshold of attend()
        self.precision = precision
        self.observers = list(observers or [])
        self.backend = backend
        self.description = dict(description or {})

    # --- mlx-kv-quant compatible surface -------------------------------------------------
    def append(self, keys: Any, values: Any, layer: int = 0) -> None:
        k, v = to_numpy(keys, "keys"), to_numpy(values, "values")
        if k.ndim == 1:  # one token of a single-head cache
            k, v = k.reshape(1, -1), v.reshape(1, -1) if v.ndim == 1 else v
        first = self.core.size(layer)
        t0 = time.perf_counter()
        self.core.append(k, v, layer)
        dt = time.perf_counter() - t0
        if self.observers:
            h = self.core.n_kv_heads
            ev = Event("append", self, layer, dt, k.shape[-2], keys=k.reshape(h, -1, k.shape[-1]),
                       values=v.reshape(h, -1, v.shape[-1]), first_token=first)
            for o in self.observers:
                o.on_append(ev)

    def attend(self, queries: Any, layer: int = 0, causal: bool = True, scale: float | None = None,
               window: int | None = None, sparse_v: float | None = None) -> Any:
        q = to_numpy(queries, "queries")
        t0 = time.perf_counter()
        out = self.core.attend(q, layer, causal, scale, window, self.sparse_v if sparse_v is None else sparse_v)
        dt = time.perf_counter() - t0
        if self.observers:
            ev = Event("attend", self, layer, dt, 1 if q.ndim == 1 else q.shape[-2])
            for o in self.observers:
                o.on_attend(ev)
        return _output(out, self.precision, _is_mlx(queries))

    def memory_bytes(self) -> int:
        """Exact bytes allocated: code and norm pages, rotations and QJL state."""
        return self.core.memory_bytes()

    def __len__(self) -> int:
        return len(self.core)

    # --- extensions ----------------------------------------------------------------------
    def size(self, layer: int = 0) -> int:
        return self.core.size(layer)

    def trim(self, n: int) -> int:
        """Removes the last n tokens of every layer; returns how many layer 0 lost."""
        return self.core.trim(n)

    def fp16_bytes(self) -> int:
        return self.core.fp16_bytes()

    def compression_ratio(self) -> float:
        """fp16 K+V bytes of the stored tokens / memory_bytes() (0.0 while empty)."""
        mem = self.memory_bytes()
        return self.fp16_bytes() / mem if mem and len(self) else 0.0

    def effective_bits(self) -> float:
        """Stored bits per coordinate of K and V together (codes + norms, no fixed state)."""
        per_token = self.core.bytes_per_token()
        return 8.0 * per_token / (2 * self.core.n_layers * self.core.n_kv_heads * self.core.head_dim)

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def save(self, path: str) -> None:
        self.core.save(str(path))

    @classmethod
    def load(cls, path: str, precision: Any = np.float32) -> CompressedKVCache:
        return cls(_core.KVCache.load(str(path)), precision=precision)

    @property
    def head_dim(self) -> int:
        return self.core.head_dim

    def __repr__(self) -> str:
        return (f"CompressedKVCache(tokens={len(self)}, memory={self.memory_bytes()} B, "
                f"core={self.core!r})")
