"""A TurboQuant replacement for mlx-lm's ``RotatingKVCache`` (sliding-window layers).

Gemma 3/4, gpt-oss, Mistral and others put most layers behind a sliding window of W tokens:
a query at position p attends to keys p - W + 1 .. p only. mlx-lm keeps those layers in a
bounded fp16 ring (``RotatingKVCache``). :class:`TurboQuantRotatingKVCache` keeps them as
TurboQuant codes instead, in the C++ core's pages, with the core's eviction
(``max_coded_tokens``) as the ring: once a layer holds more code tokens than it needs, its
oldest code pages are dropped and their memory freed, so a layer never holds more than
``max_coded_tokens`` code tokens (plus its fp16 recent window, if any).

``keep`` > 0 (mlx-lm's ``make_prompt_cache(max_kv_size=...)`` keeps 4): the first ``keep``
tokens are the core's fp16 sinks, never evicted and visible to every query
(``sinks_visible``), next to the last ``max_size - keep`` tokens: what mlx-lm's ring
attends at a decode step.

Exactness. Attention is the core's windowed softmax over the stored tokens (the last
``window`` of them per query, plus the sinks), which is the exact sliding-window softmax
over the decoded tokens as long as every query still finds its whole window stored.
Eviction drops whole pages of ``block_tokens``, and a block of new tokens is appended and
attended in chunks of ``block_tokens`` queries, so ``max_coded_tokens`` is sized for the
worst case: after a chunk of C tokens the layer still holds at least W + C - 1 tokens (a
chunk's first query needs W - 1 older ones). Tokens older than that are never attended
again.

Not supported: mixed precision (its codes are not in position order), fp16 sinks other
than the ``keep`` tokens, and the Metal store.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as _mlx_cache

from turboquant import _core
from turboquant.mlx_cache import TurboQuantKVCache, _run_core_calls
from turboquant.mlx_host import _window_from_mask

__all__ = ["TurboQuantRotatingKVCache", "codes_needed"]


def codes_needed(window: int, block_tokens: int, fp16_window: int = 0) -> int:
    """``max_coded_tokens`` of a layer with a sliding window of ``window`` tokens, pages and
    attention chunks of ``block_tokens`` tokens and an fp16 recent window of ``fp16_window``.

    After an append the core holds more than max_coded_tokens - block_tokens code tokens
    (it evicts whole pages) and more than fp16_window window tokens; a chunk of
    block_tokens queries needs window + block_tokens - 1 of them. A multiple of
    block_tokens, at least one page."""
    need = window + 2 * block_tokens - 2 - fp16_window
    return max(block_tokens, -(-need // block_tokens) * block_tokens)


class TurboQuantRotatingKVCache(TurboQuantKVCache):
    """One sliding-window layer's KV cache as TurboQuant codes (mlx-lm ``RotatingKVCache``
    protocol: ``max_size``, ``keep``, ``offset``, ``update_and_fetch``, ``make_mask``,
    ``is_trimmable`` / ``trim``, ``state`` / ``meta_state`` / ``from_state``, ``size``,
    ``nbytes``). Every query attends to the last ``max_size`` tokens (itself included), or
    fewer when the model's mask says so.

    Other keyword arguments are those of :class:`turboquant.mlx_cache.TurboQuantKVCache`;
    ``block_tokens`` (default 32) is the page and the attention chunk: the ring holds at
    most :func:`codes_needed` code tokens. New K/V wait for the attention call that follows
    in the same forward pass, which appends and attends them chunk by chunk.
    """

    _direct_decode = False  # its _attend_calls interleaves the ring's appends
    batch_step_lane = False  # its appends and attention calls are its own (the ring's)

    def __init__(self, max_size: int, keep: int = 0, **kwargs):
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) \
                or max_size < 1:
            raise ValueError(f"max_size must be an integer >= 1, got {max_size!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 0:
            raise ValueError(f"keep must be an integer >= 0, got {keep!r}")
        if keep >= max_size:
            raise ValueError(f"keep must be smaller than max_size={max_size}, got {keep}")
        if keep and not _sinks_visible_supported():
            raise ValueError(f"keep={keep} needs a turboquant core with attend(sinks_visible=...)")
        for name in ("mixed_bits", "fp16_sinks"):
            if kwargs.get(name):
                raise ValueError(f"{name}={kwargs[name]!r} is not supported on a sliding-window "
                                 "layer (0 required)")
        kwargs.pop("fp16_sinks", None)  # the keep tokens are the sinks
        if kwargs.get("block_tokens") is None:
            kwargs["block_tokens"] = 32
        super().__init__(fp16_sinks=int(keep), **kwargs)  # the keep tokens: fp16 sinks
        self.max_size, self.keep = int(max_size), int(keep)
        self._new: list[tuple[np.ndarray, np.ndarray]] = []

    # -- the ring ---------------------------------------------------------------------

    @property
    def max_coded_tokens(self) -> int:
        return codes_needed(self.max_size - self.keep, self.block_tokens, self.fp16_window)

    def _core_options(self) -> dict:
        return {"max_coded_tokens": self.max_coded_tokens}

    def compact_window(self) -> int:
        """Keeps the window (0 tokens moved): the ring's bound on codes
        (:func:`codes_needed`) counts the fp16 window apart, so its tokens moved into codes
        would make the core evict code pages the next queries still attend. A ring holds at
        most its window's tokens anyway."""
        return 0

    def gpu_refusal(self, head_dim: int) -> str | None:
        return "sliding-window eviction (max_coded_tokens) is a C++ core feature"

    def _append_blocks(self, blocks) -> None:
        # Held until the attention call: a chunk's tokens must be attended before the
        # eviction that a later chunk's append causes.
        self._new.extend(blocks)

    def _append_new(self, k, v) -> None:
        self._append_blocks([(k, v)])

    def _evicted(self) -> int:
        return self.evicted_tokens

    def _append_chunks(self, k: np.ndarray, v: np.ndarray, start: int, stop: int) -> None:
        C = self.block_tokens
        for a in range(start, stop, C):
            b = min(a + C, stop)
            self._core.append(np.ascontiguousarray(k[:, a:b]), np.ascontiguousarray(v[:, a:b]))

    def _take_new(self):
        if not self._new:
            return None, None
        new, self._new = self._new, []
        if len(new) == 1:
            return new[0]
        return (np.concatenate([k for k, _ in new], axis=1),
                np.concatenate([v for _, v in new], axis=1))

    def _flush_new(self) -> None:
        """Encode tokens that no attention call has taken yet (saving, trimming)."""
        if self._core is None:
            return
        k, v = self._take_new()
        if k is not None:
            self._append_chunks(k, v, 0, k.shape[1])

    @property
    def evicted_tokens(self) -> int:
        """Tokens of this layer dropped from the ring (never attended again)."""
        return 0 if self._core is None else int(self._core.evicted_tokens(0))

    def _held_tokens(self) -> int:
        return int(self._core.size(0)) + int(self._core.evicted_tokens(0))

    # -- mlx-lm protocol ----------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        super().update_and_fetch(keys, values)
        # Placeholders of the length mlx-lm's RotatingKVCache returns (zero-memory broadcasts)
        B, H, T, d = keys.shape
        n = min(self.offset, self.max_size + T - 1)
        nan = mx.array(float("nan"), dtype=keys.dtype)
        self._fetched = (mx.broadcast_to(nan, (B, H, n, d)), mx.broadcast_to(nan, (B, H, n, d)))
        return self._fetched

    def _attend(self, queries, scale: float, causal: bool = True, window: int | None = None):
        """Sliding-window attention of ``queries`` (B, H_q, T_q, d), the last T_q positions:
        each sees the last min(window, max_size) tokens up to itself (``attend`` converts
        the host result to an mlx array of the queries' dtype)."""
        return _run_core_calls(self._attend_calls(queries, scale, causal, window))

    def _attend_calls(self, queries, scale: float, causal: bool = True,
                      window: int | None = None):
        """:meth:`_attend` as a generator of its core calls (see
        ``TurboQuantKVCache._attend_calls``)."""
        if not causal:
            raise ValueError("a sliding-window cache answers causal attention only")
        B, Hq, Tq, d = queries.shape
        if B != self._batch:
            raise ValueError(f"queries batch {B} != cache batch {self._batch}")
        w = self.max_size if window is None else min(int(window), self.max_size)
        if w < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        q = self._core_queries(queries, scale)
        kw = {"causal": True, "scale": float(scale), "window": w}
        if self.sparse_v:
            kw["sparse_v"] = self.sparse_v
        if self.keep:  # the sinks plus the last w - keep tokens
            kw["window"] = max(1, w - self.keep)
            kw["sinks_visible"] = True
        k, v = self._take_new()
        T_new = 0 if k is None else k.shape[1]
        out = np.empty(q.shape, dtype=np.float32)
        if T_new < Tq:  # queries over tokens already held (no new block to interleave)
            if k is not None:
                self._append_chunks(k, v, 0, T_new)
            out[:] = yield self._core, np.ascontiguousarray(q), kw
        else:
            head = T_new - Tq  # tokens that no query of this call sits at
            self._append_chunks(k, v, 0, head)
            C = self.block_tokens
            bounds = [(a, min(a + C, Tq)) for a in range(0, Tq, C)]
            # a short block (a speculative verify step) is split where the window flushes,
            # like TurboQuantKVCache._append_new; longer ones flush as before
            j = self._flush_point(T_new, k, v) if head == 0 else None
            if j:
                bounds = [(0, j), (j, Tq)]
            elif head or Tq > C:
                self._unflush = None
            for a, b in bounds:
                self._append_chunks(k, v, head + a, head + b)
                out[:, a:b] = yield self._core, np.ascontiguousarray(q[:, a:b]), kw
        if self._v_mean is not None:  # sum_t p_t (v_t - m) + m = sum_t p_t v_t
            out = out.reshape(-1, Hq // (self._core_kv_heads // B), Tq, d) + self._v_mean[:, None]
        return out.reshape(B, Hq, Tq, d)

    def mask_window(self, mask: mx.array, n_q: int) -> int | None:
        """The window of a mask from mlx-lm's ``RotatingKVCache.make_mask`` (or ours): for
        several queries a causal-window mask over the ring's keys, for one query a boolean
        row whose True count is the window."""
        if n_q == 1:
            m = mask if mask.dtype == mx.bool_ else mask >= 0
            return int(m.reshape(-1).sum().item())
        return _window_from_mask(mask, n_q, int(mask.shape[-1]))

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        # mlx-lm's RotatingKVCache.make_mask for several queries (the same masks, so a fp16
        # sliding layer may share them); one query needs a mask only for a window shorter
        # than max_size: the last window_size of the ring's tokens, in temporal order.
        if N > 1:
            window_size = window_size or self.max_size
            offset = min(self.max_size - 1, self.offset)
            if offset + N > window_size or return_array:
                return _mlx_cache.create_causal_mask(N, offset, window_size=window_size)
            return "causal"
        if window_size is None or self.max_size <= window_size or self.offset < window_size:
            return None
        n = min(self.offset + 1, self.max_size)
        return mx.arange(n) >= n - window_size

    def size(self):
        return min(self.offset, self.max_size)

    def empty(self):
        return self._core is None and not self._pending and not self._new

    def is_trimmable(self):
        """True: any trim is exact while nothing was evicted; afterwards :meth:`trim` takes
        as many tokens as leave the next query its whole window (:meth:`max_trim`; right
        after an append at least ``block_tokens`` - 1 by the ring's sizing, so every
        speculative-decoding rewind of fewer draft tokens) and refuses more with a
        ValueError. (mlx-lm's fp16 ring stops
        being trimmable once it rotates; mlx-lm's ``trim_prompt_cache`` then trims no layer
        at all, and speculative decoding would keep the rejected draft tokens.)"""
        return True

    def max_trim(self) -> int:
        """The most tokens :meth:`trim` takes now."""
        if self._core is None or not self.evicted_tokens:
            return self.offset
        return max(0, self._stored() - self.max_size + 1)

    def _stored(self) -> int:
        self._flush_new()
        return int(self._core.size(0))

    def trim(self, n):
        n = min(self.offset, int(n))
        if n <= 0:
            return 0
        if self._core is not None and self.evicted_tokens:
            left = self._stored() - n
            if left < self.max_size - 1:
                raise ValueError(
                    f"layer {self.layer}: cannot trim {n} tokens of a sliding-window cache "
                    f"that has evicted {self.evicted_tokens}: {left} would be left, fewer than "
                    f"the {self.max_size - 1} the next query needs (at most "
                    f"{self._stored() - self.max_size + 1} can be trimmed)")
        elif self._core is not None:
            self._flush_new()
        return super().trim(n)

    @property
    def nbytes(self):
        new = sum(k.nbytes + v.nbytes for k, v in self._new)
        return super().nbytes + new

    @property
    def fp16_nbytes(self):
        """Bytes of mlx-lm's ``RotatingKVCache`` for this layer once it has rotated: the last
        min(offset, max_size) tokens as fp16 K and V (no concatenation slack)."""
        if self._core is not None:
            H, d = self._core_kv_heads, self._head_dim
        elif self._pending:
            H, d = self._pending[0][0].shape[0], self._pending[0][0].shape[2]
        else:
            return 0
        return 2 * 2 * H * d * self.size()

    # -- state (prompt-cache files) -------------------------------------------------------

    @property
    def state(self):
        self._flush_new()
        return TurboQuantKVCache.state.fget(self)

    @state.setter
    def state(self, v):
        self._new = []
        TurboQuantKVCache.state.fset(self, v)
        if self._core is not None and self._core.max_coded_tokens != self.max_coded_tokens:
            raise _core.FormatError(
                f"prompt cache layer {self.layer}: the compressed cache evicts beyond "
                f"{self._core.max_coded_tokens} code tokens, max_size={self.max_size} needs "
                f"{self.max_coded_tokens}")

    def _config(self) -> dict:
        cfg = super()._config()
        cfg.update(max_size=self.max_size, keep=self.keep)
        return cfg

    def _set_config(self, cfg: dict) -> None:
        super()._set_config(cfg)
        max_size, keep = cfg.get("max_size"), cfg.get("keep", 0)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1 \
                or isinstance(keep, bool) or not isinstance(keep, int) \
                or not 0 <= keep < max_size or self.fp16_sinks != keep:
            raise _core.FormatError(
                f"prompt cache layer {self.layer}: a sliding-window cache needs max_size >= 1 "
                f"and 0 <= keep < max_size tokens held as fp16 sinks, got max_size="
                f"{max_size!r}, keep={keep!r}, fp16_sinks={self.fp16_sinks}")
        self.max_size, self.keep = max_size, keep
        self._new = []


def _sinks_visible_supported() -> bool:
    return "sinks_visible" in (_core.KVCache.attend.__doc__ or "")


# load_prompt_cache() looks cache classes up by name in mlx_lm.models.cache.
_mlx_cache.TurboQuantRotatingKVCache = TurboQuantRotatingKVCache
