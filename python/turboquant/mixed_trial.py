"""Mixed precision where it pays: a per-layer trial on the prompt's own keys and queries.

Importance-routed mixed precision (``TurboQuantKVCache(mixed_bits=..., mixed_keep=...)``)
keeps the tokens that got the most attention while they were in the fp16 window at the
layer's bits and stores the rest at ``mixed_bits``. It beats uniform codes of the same
average width only where that window-time importance predicts the attention a token gets
later, and where the low width is not much worse than the uniform one. Both depend on the
layer: on SmolLM2-135M most layers qualify (3.0 average bits, 4/2 routed: about half the
attention-output error of uniform 3 bits), while on Gemma-3-270M's global layers the
importance seen in the window predicts later attention weakly and 2-bit keys have about
seven times the error of 3-bit ones, so routing there doubles the error of uniform 3 bits.

:func:`routing_pays` decides per layer, once, from the first block the layer sees (the
prompt): it encodes the first ``TRIAL_TOKENS`` tokens with the layer's own quantizers at the
kept, the low (through the core's decay path, as the cache stores them) and the uniform
widths, rates each token the way the cache does (sum of squared softmax weights of the
queries that see it in the fp16 window), routes each flush group, and compares the
attention-output error of the two layouts on the prompt's queries that see those tokens as
codes. The layer then keeps mixed precision unless routing's error exceeds the uniform
one's by more than ``MARGIN``; else it holds uniform codes of the same average width
(:func:`turboquant.presets.uniform_widths`).
"""

from __future__ import annotations

import numpy as np

from turboquant import _core

# Tokens of the prompt the trial encodes and attends (a causal prefix: exact by itself).
TRIAL_TOKENS = 512
# Queries that see trial tokens as codes, at least (else the trial is skipped: too short a
# prompt says nothing, and the layer keeps mixed precision).
MIN_QUERIES = 64


# Routing is kept unless its error exceeds uniform codes' by this factor: the trial's
# error is a proxy (one layer's output on its prompt), and layers where routing measured up
# to twice the uniform error still did better routed, end to end, on SmolLM2-135M (mean KL
# on the tuning texts: 0.0077 at 2, 0.0088 at 1, 0.0081 without the trial); Gemma-3-270M's
# global layers measure 2.3 to 37.
MARGIN = 2.0
# Queries whose attention-output error is compared (evenly spaced over those that see codes).
ERROR_QUERIES = 128


def _mm(a: np.ndarray, b: np.ndarray, rows: int = 256) -> np.ndarray:
    """(g, r, i) @ (i, j) as 2-D products (NumPy's stacked matmul skips BLAS here) of at
    most ``rows`` rows: small enough that BLAS stays on one thread, so the trial does not
    contend with the model's own threads."""
    a2 = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
    out = np.empty((a2.shape[0], b.shape[1]), dtype=np.float32)
    for i in range(0, a2.shape[0], rows):
        np.matmul(a2[i:i + rows], b, out=out[i:i + rows])
    return out.reshape(*a.shape[:-1], -1)


def _softmax(s: np.ndarray) -> np.ndarray:
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def trial_tokens(n: int, fp16_sinks: int, fp16_window: int, group: int) -> int:
    """Tokens of an n-token prompt the trial uses (0: too short to say anything)."""
    t = min(n, TRIAL_TOKENS)
    return t if t >= fp16_sinks + fp16_window + group + MIN_QUERIES else 0


def _decoded(core, n: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.stack([core.decode(0, h, role, 0, n) for h in range(heads)])
                 for role in ("key", "value"))


def routing_pays(*args, **kwargs) -> bool:
    """Whether importance routing beats uniform codes on this layer's prompt: the error
    ratio of :func:`error_ratio` (arguments alike) is at most ``MARGIN``."""
    return error_ratio(*args, **kwargs) <= MARGIN


def error_ratio(keys: np.ndarray, values: np.ndarray, queries: np.ndarray, scale: float,
                make_core, kept: tuple[int, int], low: int, uniform: tuple[int, int],
                fp16_sinks: int, fp16_window: int, group: int, keep: int,
                block_tokens: int) -> float:
    """Attention-output error of the routed layout over that of uniform codes, on this
    layer's prompt (0 where the trial cannot run: too short a prompt, queries that are not
    the block's own).

    keys / values (H, T, d): the layer's first block as the cache encodes it (centred, key
    channels in the split's order); queries (H·g, T, d): that block's queries in the same
    channel order; ``make_core(key_bits, value_bits, decay_bits)`` a codes-only C++ core with
    the layer's quantizer settings (seed, rotation, key split, norm correction), decaying
    every full block to ``decay_bits`` when it is not 0. ``kept``: the routed layer's
    (key, value) bits; ``low``: its mixed_bits; ``uniform``: the alternative's bits;
    ``group`` tokens per flush group, of which ``keep`` stay at ``kept``; ``block_tokens``:
    the cores' block."""
    H, T, _ = keys.shape
    n = trial_tokens(T, fp16_sinks, fp16_window, group)
    if n == 0 or queries.shape[1] != T or queries.shape[0] % H:
        return 0.0
    g = queries.shape[0] // H
    k = np.ascontiguousarray(keys[:, :n], dtype=np.float32)
    v = np.ascontiguousarray(values[:, :n], dtype=np.float32)
    q = np.ascontiguousarray(queries[:, :n], dtype=np.float32)
    variants = {}
    for name, (kb, vb, decay) in {"kept": (*kept, 0), "low": (*kept, low),
                                  "uniform": (*uniform, 0)}.items():
        core = make_core(kb, vb, decay)
        core.append(k, v)
        variants[name] = _decoded(core, n, H)
        if decay:
            low_core = core  # blocks followed by a newer token hold decayed codes
    decayed = int(low_core.decayed_blocks(0, 0, "key")) * block_tokens
    groups = (min(decayed, n - fp16_window - 1) - fp16_sinks) // group
    end = fp16_sinks + groups * group  # whole groups only; later tokens count as fp16
    pos = np.arange(n)
    # coded[r, t]: query r sees token t as codes (older than the fp16 window, not a sink)
    coded = ((pos[None, :] >= fp16_sinks) & (pos[None, :] < end)
             & (pos[:, None] - pos[None, :] > fp16_window))
    rows = np.flatnonzero(coded.any(1))
    if len(rows) < MIN_QUERIES or groups < 1:
        return 0.0
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), ERROR_QUERIES)).astype(int)]
    coded_r = coded[rows]
    mask = np.where(pos[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float32)
    # the queries that rate token t while it is fp16: t <= r <= t + fp16_window
    seen = ((pos[:, None] - pos[None, :] <= fp16_window) & (pos[None, :] <= pos[:, None])
            & (pos[None, :] >= fp16_sinks))
    err = {"mixed": 0.0, "uniform": 0.0}
    for h in range(H):
        qh = q[h * g:(h + 1) * g]  # (g, n, d)
        s = _mm(qh, k[h].T * np.float32(scale)) + mask  # (g, n, n)
        p = _softmax(s)
        imp = np.where(seen, (p * p).sum(0), 0.0).sum(0)
        exact = _mm(p[:, rows], v[h])
        high = np.ones(n, dtype=bool)  # tokens at the kept width
        for j in range(groups):
            a = fp16_sinks + j * group
            order = np.argsort(-imp[a:a + group], kind="stable")
            high[a + order[keep:]] = False
        kk, vk = variants["kept"]
        kl, vl = variants["low"]
        layouts = {"mixed": (np.where(high[:, None], kk[h], kl[h]),
                             np.where(high[:, None], vk[h], vl[h])),
                   "uniform": (variants["uniform"][0][h], variants["uniform"][1][h])}
        qr, sr = qh[:, rows], s[:, rows]
        for name, (kc, vc) in layouts.items():
            pc = _softmax(np.where(coded_r, _mm(qr, kc.T * np.float32(scale)), sr))
            out = _mm(pc * coded_r, vc) + _mm(pc * ~coded_r, v[h])
            err[name] += float(np.sum((out - exact) ** 2))
    return err["mixed"] / max(err["uniform"], 1e-30)


def best_widths(keys: np.ndarray, values: np.ndarray, queries: np.ndarray, scale: float,
                make_core, layouts: list[tuple[int, int]], fp16_sinks: int,
                fp16_window: int) -> tuple[int, int]:
    """Of uniform (key, value) layouts of the same bytes, the one whose codes give the
    smallest attention-output error on this layer's prompt (arguments as in
    :func:`error_ratio`; every token that is not a sink and is older than the fp16 window is
    seen as codes). ``layouts[0]`` (the recipe's own widths) wins ties and is returned where
    the trial cannot run. On Gemma-3-270M the error of one role dominates on some layers
    (keys on its global layers, values on several sliding-window ones), so e.g. 2/3 instead
    of 3/2 bits lowers the error there (``bench/results/layer_error_tuning.txt``); the cache
    offers only layouts with both roles at 2 bits or more
    (:meth:`turboquant.mlx_cache.TurboQuantKVCache._trial_widths`)."""
    H, T, _ = keys.shape
    n = trial_tokens(T, fp16_sinks, fp16_window, 0)
    if len(layouts) < 2 or n == 0 or queries.shape[1] != T or queries.shape[0] % H:
        return layouts[0]
    g = queries.shape[0] // H
    k = np.ascontiguousarray(keys[:, :n], dtype=np.float32)
    v = np.ascontiguousarray(values[:, :n], dtype=np.float32)
    q = np.ascontiguousarray(queries[:, :n], dtype=np.float32)
    pos = np.arange(n)
    coded = (pos[None, :] >= fp16_sinks) & (pos[:, None] - pos[None, :] > fp16_window)
    rows = np.flatnonzero(coded.any(1))
    if len(rows) < MIN_QUERIES:
        return layouts[0]
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), ERROR_QUERIES)).astype(int)]
    coded_r = coded[rows]
    mask = np.where(pos[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float32)
    decoded = []
    for kb, vb in layouts:
        core = make_core(kb, vb, 0)
        core.append(k, v)
        decoded.append(_decoded(core, n, H))
    err = [0.0] * len(layouts)
    for h in range(H):
        qh = q[h * g:(h + 1) * g]
        s = _mm(qh, k[h].T * np.float32(scale)) + mask
        p = _softmax(s)
        exact = _mm(p[:, rows], v[h])
        qr, sr = qh[:, rows], s[:, rows]
        for i, (kc, vc) in enumerate(decoded):
            pc = _softmax(np.where(coded_r, _mm(qr, kc[h].T * np.float32(scale)), sr))
            out = _mm(pc * coded_r, vc[h]) + _mm(pc * ~coded_r, v[h])
            err[i] += float(np.sum((out - exact) ** 2))
    return layouts[int(np.argmin(err))]


def make_core_factory(head_dim: int, n_kv_heads: int, n_q_heads: int, method: str,
                      seed: int, rotation: str, norm_correction: bool, split_plan,
                      split_angle_bits: int, block_tokens: int):
    """``make_core(key_bits, value_bits, decay_bits)`` for :func:`routing_pays`: codes-only
    cores with the layer's quantizer settings; ``split_plan(key_bits)`` gives the key split
    (channels, their bits, the others' bits) or None."""

    def make_core(key_bits: int, value_bits: int, decay_bits: int):
        plan = split_plan(key_bits)
        split = {}
        kb = key_bits
        if plan is not None:
            m, hi, lo = plan
            kb = lo
            split = dict(n_outlier_channels=m, outlier_bits=hi, outlier_channels=list(range(m)),
                         outlier_roles="keys", split_angle_bits=split_angle_bits)
        decay = dict(decay_after=1, decay_bits=decay_bits) if decay_bits else {}
        return _core.KVCache(head_dim, n_layers=1, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                             key_method=method, key_bits=kb, value_method=method,
                             value_bits=value_bits, seed=seed, rotation=rotation,
                             block_tokens=block_tokens, norm_correction=norm_correction,
                             **split, **decay)

    return make_core
