"""The reference model of the stateful property tests (test_state_machines.py): what a
``turboquant._core.KVCache`` configuration is, the byte formulas of its layout, and plain
float64 attention over decoded rows. Written from the documented rules (kv_cache.h), not
from the C++ code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from turboquant import _core

METHODS = ("turboquant_mse", "turboquant_prod", "polar", "qjl")
ROLES = ("key", "value")


@dataclass
class CoreConfig:
    """Keyword arguments of ``_core.KVCache`` plus what the model needs to read them."""

    head_dim: int
    kwargs: dict = field(default_factory=dict)

    def get(self, name, default=0):
        return self.kwargs.get(name, default)

    def build(self) -> _core.KVCache:
        return _core.KVCache(self.head_dim, **self.kwargs)

    # --- the rules of kv_cache.h, read off the configuration --------------------------
    @property
    def n_layers(self) -> int:
        return self.get("n_layers", 1)

    @property
    def n_kv(self) -> int:
        return self.get("n_kv_heads", 1)

    @property
    def n_q(self) -> int:
        return self.get("n_q_heads", 1)

    @property
    def bt(self) -> int:
        return self.get("block_tokens", 256)

    @property
    def window(self) -> int:
        return self.get("fp16_window")

    @property
    def sinks(self) -> int:
        return self.get("fp16_sinks")

    @property
    def fp16_layers(self) -> list[int]:
        return list(self.get("fp16_layers", []))

    @property
    def windowed(self) -> bool:
        return self.window > 0 or bool(self.fp16_layers) or self.sinks > 0

    @property
    def mixed(self) -> bool:
        return self.get("mixed_group_blocks") > 0

    @property
    def group_tokens(self) -> int:
        return self.get("mixed_group_blocks") * self.bt

    @property
    def decays(self) -> bool:
        return self.get("decay_after") > 0

    @property
    def evicts(self) -> bool:
        return self.get("max_coded_tokens") > 0

    def method(self, role: str) -> str:
        return self.get(f"{role}_method", "turboquant_mse")

    def n_outliers(self) -> int:
        return len(self.get("outlier_channels", [])) or self.get("n_outlier_channels")

    def split(self, role: str) -> bool:
        roles = self.get("outlier_roles", "both")
        return self.n_outliers() > 0 and (roles == "both" or roles == role + "s")

    def _pick(self, name: str, layer: int, head: int, otherwise: int) -> int:
        v = self.get(name, [])
        if not v:
            return otherwise
        return v[head] if len(v) == self.n_kv else v[layer * self.n_kv + head]

    def bits(self, layer: int, head: int, role: str) -> int:
        return self._pick(f"{role}_head_bits", layer, head, self.get(f"{role}_bits", 3))

    def outlier_bits(self, layer: int, head: int, role: str) -> int:
        ob = self._pick("outlier_head_bits", layer, head, self.get("outlier_bits"))
        return ob or min(self.bits(layer, head, role) + 1, 8)  # 0: bits + 1, at most 8

    def reference_bits(self, layer: int, head: int, role: str) -> int:
        """decay_reference_bits: an outlier split counts as its nominal bits rounded down."""
        b = self.bits(layer, head, role)
        if not self.split(role):
            return b
        n_o, d = self.n_outliers(), self.head_dim
        return (n_o * self.outlier_bits(layer, head, role) + (d - n_o) * b) // d

    def row_bytes(self, layer: int, head: int, role: str, low: bool = False) -> int:
        """Bytes of one stored code row (codes + fp16 norm), at decay_bits when ``low``."""
        b, kw = self.bits(layer, head, role), {"jl_dim": self.get("jl_dim")}
        if self.split(role):
            ob = self.outlier_bits(layer, head, role)
            if low:
                drop = self.reference_bits(layer, head, role) - self.get("decay_bits")
                b, ob = max(1, b - drop), max(1, ob - drop)
            kw.update(n_outlier_channels=self.n_outliers(), outlier_bits=ob,
                      split_angle_bits=self.get("split_angle_bits", 8))
        elif low:
            b = self.get("decay_bits")
        return _core.bytes_per_vector(self.method(role), self.head_dim, b, **kw)

    def cos_floor(self, role: str, low: bool) -> float:
        """A floor on the mean cosine between a decoded code row and its input (measured
        floors of every method with a margin; a row of another token scores about 0)."""
        bits = self.get("decay_bits") if low else min(
            self.bits(layer, h, role) for layer in range(self.n_layers) for h in range(self.n_kv))
        if self.split(role):
            bits = max(1, min(bits, self.reference_bits(0, 0, role)) - 1)
        m, jl = self.method(role), self.get("jl_dim")
        if (m == "qjl" or (m == "turboquant_prod" and bits == 1)) and jl:
            # signs of a jl_dim-row sketch alone: cosine about sqrt(2/π · jl_dim / d)
            return min(0.4, 0.5 * math.sqrt(2 / math.pi * min(1.0, jl / self.head_dim)))
        if m == "qjl":
            return 0.4
        if m == "turboquant_prod":
            return 0.4 if bits <= 2 else 0.6
        return {1: 0.55, 2: 0.75}.get(bits, 0.85)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"_core.KVCache({self.head_dim}, {args})"


def fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def softmax_attention(q: np.ndarray, K: np.ndarray, V: np.ndarray, causal: bool,
                      window: int | None, scale: float, group: int) -> np.ndarray:
    """float64 attention of q (H_q, T_q, d), the last T_q positions of K/V (H_kv, n, d)."""
    hq, tq, _ = q.shape
    n = K.shape[1]
    out = np.zeros(q.shape)
    for h in range(hq):
        Kh, Vh = K[h // group].astype(np.float64), V[h // group].astype(np.float64)
        for t in range(tq):
            hi = n - tq + t if causal else n - 1
            lo = hi + 1 - window if window and hi + 1 > window else 0
            s = scale * (Kh[lo:hi + 1] @ q[h, t].astype(np.float64))
            p = np.exp(s - s.max())
            out[h, t] = p @ Vh[lo:hi + 1] / p.sum()
    return out


def sparse_v_bound(q: np.ndarray, K: np.ndarray, V: np.ndarray, causal: bool,
                   window: int | None, scale: float, group: int, threshold: float) -> np.ndarray:
    """Per (head, query) bound of |o_sparse - o_dense|: the weight of the rows below
    threshold × the maximum weight times their value norms (kv_cache.h, sparse_v)."""
    hq, tq, _ = q.shape
    n = K.shape[1]
    bound = np.zeros((hq, tq))
    for h in range(hq):
        Kh, Vh = K[h // group].astype(np.float64), V[h // group].astype(np.float64)
        for t in range(tq):
            hi = n - tq + t if causal else n - 1
            lo = hi + 1 - window if window and hi + 1 > window else 0
            s = scale * (Kh[lo:hi + 1] @ q[h, t].astype(np.float64))
            p = np.exp(s - s.max())
            p /= p.sum()
            small = p < threshold * p.max()
            bound[h, t] = (p[small] * np.linalg.norm(Vh[lo:hi + 1][small], axis=1)).sum()
    return bound


def row_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    nx = np.linalg.norm(x, axis=-1)
    ny = np.linalg.norm(y, axis=-1)
    return np.sum(x * y, axis=-1) / np.maximum(nx * ny, 1e-30)


def blocks(tokens: int, bt: int) -> int:
    return math.ceil(tokens / bt)
