"""The boundary between mlx arrays and the C++ core that the mlx-lm caches share
(:mod:`turboquant.mlx_cache`, :mod:`turboquant.mlx_batch`, :mod:`turboquant.mlx_rotating`):
host copies of mlx arrays, and mlx-lm attention masks decoded into the window length the
core applies."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models import base as _mlx_base


def _host(x) -> np.ndarray:
    """x as a C-contiguous NumPy array (an mlx array is copied to the host)."""
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else _to_numpy(x)


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:  # NumPy has no bfloat16
        x = x.astype(mx.float32)
    return np.ascontiguousarray(np.array(x, copy=False))



def _window_from_mask(mask: mx.array, n_q: int, n_k: int) -> int | None:
    """Decode a boolean mlx-lm causal(-window) mask back into a window length.

    Returns None for the plain causal mask; raises for anything else (e.g. the padding
    masks of batched generation), which the compressed kernel cannot apply.
    """
    m = mask
    if m.dtype != mx.bool_:
        m = m >= 0  # additive masks: 0 where allowed, -inf where masked
    while m.ndim > 2:
        if m.shape[0] != 1:
            raise NotImplementedError(
                "TurboQuantKVCache supports only causal and sliding-window masks, not "
                "per-batch/per-head masks (e.g. left padding in batched generation)")
        m = m[0]
    m = np.array(m)
    if m.shape != (n_q, n_k):
        raise NotImplementedError(f"attention mask of shape {m.shape} does not match "
                                  f"{n_q} queries x {n_k} keys")
    offset = n_k - n_q
    window = int(m[-1].sum())
    for w in (None, window) if window >= 1 else ():
        expect = np.asarray(_mlx_base.create_causal_mask(n_q, offset, window_size=w))
        if np.array_equal(expect, m):
            return w
    raise NotImplementedError(
        "TurboQuantKVCache supports only causal and sliding-window attention masks")


class PlaceholderKeys:
    """``keys`` of a cache whose state lives outside mlx's graph (the C++ core, or a batch of
    such caches): the last placeholder keys handed to the model (``_fetched[0]``; no fp16
    keys are stored). mlx-lm's pipeline-parallel models read and set ``cache[-1].keys`` to
    make a stage's send to the next rank (``mx.depends(keys, h)``) a dependency of its
    cache; mlx-lm then evaluates the caches' state, which here is not in the graph, so the
    send is evaluated when it is set (else the next stage would wait on it forever)."""

    _fetched: tuple | None = None

    @property
    def keys(self) -> mx.array:
        return self._fetched[0] if self._fetched is not None else mx.zeros((0,))

    @keys.setter
    def keys(self, v) -> None:
        if isinstance(v, mx.array):
            mx.eval(v)
        if self._fetched is not None:
            self._fetched = (v, self._fetched[1])

