"""Pure-NumPy reference implementations of the quantizer core, written from the papers and
the documented schemes (rng.h, packing.h), independently of the C++ code they check."""

from __future__ import annotations

import math

import numpy as np

M32 = 0xFFFFFFFF


def philox4x32_10(key: int, stream: int, index: int) -> list[int]:
    c = [index & M32, (index >> 32) & M32, stream & M32, (stream >> 32) & M32]
    k0, k1 = key & M32, (key >> 32) & M32
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c


class RandomStream:
    def __init__(self, seed: int, stream: int):
        self.seed, self.stream, self.block, self.buf = seed, stream, 0, []
        self.spare = None

    def u32(self) -> int:
        if not self.buf:
            self.buf = philox4x32_10(self.seed, self.stream, self.block)
            self.block += 1
        return self.buf.pop(0)

    def uniform(self) -> float:
        lo, hi = self.u32(), self.u32()
        return ((lo | (hi << 32)) >> 11) * 2.0**-53 + 2.0**-54

    def gaussian(self) -> float:
        if self.spare is not None:
            s, self.spare = self.spare, None
            return s
        u1, u2 = self.uniform(), self.uniform()
        r = math.sqrt(-2.0 * math.log(u1))
        self.spare = r * math.sin(2 * math.pi * u2)
        return r * math.cos(2 * math.pi * u2)


def stream_id(purpose: int, layer: int = 0, head: int = 0) -> int:
    return (purpose << 48) | ((layer & 0xFFFFFF) << 24) | (head & 0xFFFFFF)


def dense_rotation(d: int, seed: int, stream: int = 0) -> np.ndarray:
    rs = RandomStream(seed, stream ^ stream_id(1))
    g = np.array([[rs.gaussian() for _ in range(d)] for _ in range(d)])
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def hadamard_rotation(d: int, seed: int, stream: int = 0) -> np.ndarray:
    rs = RandomStream(seed, stream ^ stream_id(2))
    s = np.array([1.0 if rs.u32() & 1 else -1.0 for _ in range(2 * d)])
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    h /= math.sqrt(d)
    return h @ np.diag(s[d:]) @ h @ np.diag(s[:d])


def hadamard1_rotation(d: int, seed: int, stream: int = 0) -> np.ndarray:
    """One round H·D₁ (rotation "hadamard1"): D₁ = the first d signs of hadamard_rotation."""
    rs = RandomStream(seed, stream ^ stream_id(2))
    s = np.array([1.0 if rs.u32() & 1 else -1.0 for _ in range(d)])
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(d) @ np.diag(s)


def _beta_log_c(d: int) -> float:
    return math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)


def beta_pdf(x: np.ndarray, d: int) -> np.ndarray:
    """Density of one coordinate of a random unit vector in R^d: ∝ (1 - x²)^((d-3)/2)."""
    s = np.clip(1.0 - x * x, 1e-300, None)
    return np.exp(_beta_log_c(d) + (d - 3) / 2 * np.log(s))


def lloyd_max(d: int, bits: int, iters: int = 50000) -> tuple[np.ndarray, float]:
    """Plain Lloyd iteration for the exact coordinate law: the CDF by the trapezoid rule on a
    fine grid, the first moment in closed form (∫x f = -(1-x²)^((d-1)/2) C/(d-1))."""
    x = np.linspace(-1, 1, 2_000_001)
    f = beta_pdf(x, d)
    cdf = np.concatenate([[0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(x))])
    c_const = math.exp(_beta_log_c(d)) / (d - 1)

    def first_moment_primitive(t):
        return -c_const * np.clip(1 - t * t, 0, None) ** ((d - 1) / 2)

    levels = 2**bits
    c = np.interp((np.arange(levels) + 0.5) / levels, cdf / cdf[-1], x)
    for _ in range(iters):
        t = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
        m0 = np.diff(np.interp(t, x, cdf))
        m1 = np.diff(first_moment_primitive(t))
        c_new = m1 / m0
        done = np.max(np.abs(c_new - c)) < 1e-13
        c = c_new
        if done:
            break
    cell = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    g = (x - c[cell]) ** 2 * f
    dist = np.sum((g[1:] + g[:-1]) / 2 * np.diff(x))
    return c, dist * d


def pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """LSB-first dense bit packing of one vector's indices (packing.h layout v1)."""
    bitstream = ((indices[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    pad = (-len(bitstream)) % 8
    bitstream = np.concatenate([bitstream, np.zeros(pad, np.uint8)])
    return np.packbits(bitstream.reshape(-1, 8), axis=1, bitorder="little").ravel()


def mse_encode(x: np.ndarray, rotation: np.ndarray, centroids: np.ndarray, bits: int):
    norms = np.linalg.norm(x, axis=1)
    u = x / np.where(norms > 0, norms, 1)[:, None]
    y = u @ rotation.T
    t = (centroids[1:] + centroids[:-1]) / 2
    idx = np.searchsorted(t, y, side="right").astype(np.uint8)
    codes = np.stack([pack(row, bits) for row in idx])
    return codes, norms, idx


def mse_decode(idx: np.ndarray, norms: np.ndarray, rotation: np.ndarray, centroids: np.ndarray):
    return (centroids[idx] @ rotation) * norms[:, None]


def qjl_matrix(m: int, d: int, seed: int, stream: int = 0) -> np.ndarray:
    """The QJL sketch S (m x d), row-major Gaussians of the kQjlMatrix stream (quantizer_qjl.h)."""
    rs = RandomStream(seed, stream ^ stream_id(3))
    return np.array([rs.gaussian() for _ in range(m * d)]).reshape(m, d)


def prod_encode(x: np.ndarray, rotation: np.ndarray, centroids: np.ndarray, s: np.ndarray, bits: int):
    """turboquant_prod code rows (quantizer_prod.h): (bits-1)-bit indices, sign(S r), fp16 ||r||."""
    norms = np.linalg.norm(x, axis=1)
    y = (x / norms[:, None]) @ rotation.T
    t = (centroids[1:] + centroids[:-1]) / 2
    idx = np.searchsorted(t, y, side="right").astype(np.uint8)
    r = y - centroids[idx]
    signs = (r @ s.T >= 0).astype(np.uint8)
    gamma = np.linalg.norm(r, axis=1).astype(np.float16).view(np.uint8).reshape(-1, 2)
    rows = [np.concatenate([pack(i, bits - 1), pack(sg, 1), g]) for i, sg, g in zip(idx, signs, gamma)]
    return np.stack(rows), np.abs(r @ s.T)


def attention_over_decoded(kv, q: np.ndarray, layer: int = 0, causal: bool = True,
                           window: int | None = None, scale: float | None = None) -> np.ndarray:
    """float64 attention of q (H_q, T_q, d), the last T_q positions, over everything
    ``kv.decode`` returns for the layer (codes decoded at their bits; fp16 sinks and window
    rows as stored), GQA by head // group, causal / sliding window as the cache defines."""
    n = kv.size(layer)
    hq, tq_, d = q.shape
    g = hq // kv.n_kv_heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros(q.shape)
    for h in range(hq):
        K = kv.decode(layer, h // g, "key").astype(np.float64)
        V = kv.decode(layer, h // g, "value").astype(np.float64)
        for t in range(tq_):
            hi = n - tq_ + t if causal else n - 1
            lo = hi + 1 - window if window and hi + 1 > window else 0
            s = scale * (K[lo:hi + 1] @ q[h, t])
            p = np.exp(s - s.max())
            out[h, t] = p @ V[lo:hi + 1] / p.sum()
    return out


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected 0x82F63B78), as serialize.h specifies; check value
    crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF
