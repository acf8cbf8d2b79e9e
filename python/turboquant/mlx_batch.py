"""Batch caches for mlx-lm's continuous batching (``BatchGenerator``, the batched server).

mlx-lm decodes several requests in one forward pass by merging their per-request caches
into one batch cache (``KVCache.merge`` -> ``BatchKVCache``): rows are left-padded to a
common length, every row has its own ``offset`` (its RoPE position), and a per-row mask
hides the padding. :class:`BatchTurboQuantKVCache` is the same for TurboQuant caches, with
one difference: it keeps no padded tensor. Each row is a whole per-sequence cache
(:class:`~turboquant.mlx_cache.TurboQuantKVCache`, or
:class:`~turboquant.mlx_rotating.TurboQuantRotatingKVCache` for a sliding-window layer)
holding only that sequence's real tokens as codes; the padding exists only as bookkeeping
(``left_padding``, ``offset`` and the layout length), kept exactly as ``BatchKVCache``
keeps it, so its masks and offsets are the ones mlx-lm's batch cache would produce and a
model may share one mask between fp16 and TurboQuant layers.

Attention (the route that :mod:`turboquant.mlx_route` installs in mlx-lm's model modules)
runs per row on the codes: row i's real queries attend to row i's cache, the outputs are
stacked into the batch's (B, H_q, T, d) output, and padding positions get zeros (their
outputs are never used: padded prompt positions produce no logits that mlx-lm reads). A row
therefore computes what the same cache computes for the sequence served alone.

- Rows on the C++ core: the rows' C++ calls are one ``_core.attend_batch`` per layer and
  step (the GIL released once, the rows in parallel on the library's thread pool); each row
  makes the same core calls, with the same appends between them, as its own ``_attend``
  (``_attend_calls``), so the result is the same bit for bit.
- Rows held by the GPU store (``TurboQuantKVCache._gpu``: a
  :class:`~turboquant.mlx_metal.MetalCodeStore` per row, on Metal or mlx's CUDA back end):
  each row's new keys/values are appended to its own store and its queries attend with the
  store's kernels (one launch set per row), all as lazy mlx ops: nothing is read back to
  the host on a decode step (the one exception: an attention mask made by another layer's
  cache, e.g. an fp16 layer's, is read once per step to find each row's window). The rows'
  outputs are concatenated into the batch's output. Each row runs exactly what its cache
  runs for the sequence alone, so a row's tokens are those of the request served alone.
  Merge, extract and the batch's deep copy copy a row's store on the device
  (``MetalCodeStore.copy``).

Protocol (mlx-lm 0.32): ``merge`` (classmethod; ``TurboQuantKVCache.merge`` calls it),
``update_and_fetch``, ``make_mask``, ``prepare`` (left padding, or right padding of a
prompt batch) / ``finalize``, ``filter``, ``extend``, ``extract``, ``trim`` /
``is_trimmable``, ``size``, ``empty``, ``nbytes``, ``offset``, ``left_padding``, ``state``
(nothing to evaluate: the codes are written when the layer runs).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import base as _mlx_base
from mlx_lm.models import cache as _mlx_cache

from turboquant import _core
from turboquant.mlx_host import PlaceholderKeys, _host, _window_from_mask

__all__ = ["BatchTurboQuantKVCache", "stats"]

# Masks made by make_mask of a batch cache, with their window: the attention route then
# needs no decoding (a mask from another cache, e.g. an fp16 layer's BatchKVCache, is
# decoded row by row). A few recent ones, strongly held so that ids stay unique.
_OWN_MASKS: list[tuple[mx.array, int | None]] = []
_OWN_MASKS_KEPT = 4
# Masks of other caches (an fp16 layer's BatchKVCache) with the batch layout they were
# decoded for and the rows' windows: the route's other layers of the step reuse them.
_FOREIGN_MASKS: list[tuple[mx.array, tuple, tuple]] = []

# The most rows one batch cache has decoded together (GET /v1/turboquant reports it).
_stats = {"max_rows": 0}


def stats() -> dict:
    return dict(_stats)


def _ints(x) -> list[int]:
    if isinstance(x, mx.array):
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


class BatchTurboQuantKVCache(PlaceholderKeys, _mlx_cache._BaseCache):
    """One layer of a batch: a per-sequence TurboQuant cache per row, plus the left-padding
    bookkeeping of mlx-lm's ``BatchKVCache``.

    ``rows`` are per-sequence caches of one layer (all full-attention, or all sliding-window
    with one ``max_size``); ``left_padding`` the padding in front of each row's tokens.
    Build one with :meth:`merge`."""

    turboquant_batch = True  # the attention route sends these to attend_masked

    def __init__(self, rows: Sequence, left_padding: Sequence[int]):
        rows = list(rows)
        if len(rows) != len(left_padding):
            raise ValueError(f"{len(rows)} rows but {len(left_padding)} left paddings")
        _check_rows(rows)
        self.rows = rows
        self._lp = _ints(left_padding)
        self._off = [-p for p in self._lp]
        self._idx = 0  # length of the (virtual) left-padded layout
        self._has_keys = False
        self._right_padding: list[int] | None = None
        self._remaining: list[int] | None = None  # real tokens still due (right padding)
        self._skip = [0] * len(rows)  # padding tokens still due in front (prepare)
        self._spans: list[tuple[int, int]] | None = None  # real tokens of the last update
        self._fetched: tuple[mx.array, mx.array] | None = None
        self._lane = None  # the decode-step lane's tables of the last update (_step_lane)
        self._lane_cache = None  # (the rows' means and orders, their stacked tables)

    # -- geometry -----------------------------------------------------------------------

    @property
    def max_size(self) -> int | None:
        """The sliding window of the rows (None for full attention)."""
        return getattr(self.rows[0], "max_size", None) if self.rows else None

    @property
    def left_padding(self) -> mx.array:
        return mx.array(self._lp)

    @property
    def offset(self) -> mx.array:
        """Per-row positions (RoPE offsets) of the next token, as ``BatchKVCache.offset``."""
        return mx.array(self._off)

    @offset.setter
    def offset(self, v):
        self._off = _ints(v)

    def size(self):
        return self._idx

    def empty(self):
        return not self._has_keys

    @property
    def nbytes(self):
        return sum(r.nbytes for r in self.rows)

    @property
    def state(self):
        return ()

    def is_trimmable(self):
        return all(r.is_trimmable() for r in self.rows)

    def trim(self, n):
        n = min(self._idx, int(n))
        if n <= 0:
            return 0
        for r in self.rows:
            r.trim(n)
        self._idx -= n
        self._off = [o - n for o in self._off]
        return n

    # -- the mlx-lm batch protocol --------------------------------------------------------

    @classmethod
    def merge(cls, caches: Sequence) -> BatchTurboQuantKVCache:
        """A batch of copies of ``caches`` (they are left as they are), left-padded to the
        longest."""
        caches = list(caches)
        if not caches:
            raise ValueError("merge needs at least one cache")
        _check_rows(caches)
        rows = [_copy_row(c) for c in caches]
        lengths = [int(c.offset) for c in caches]
        longest = max(lengths)
        if longest == 0:
            return cls(rows, [0] * len(rows))
        batch = cls(rows, [longest - n for n in lengths])
        batch._off = lengths
        batch._idx = longest
        batch._has_keys = True
        return batch

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self._has_keys:
                raise ValueError("left padding can only be added to an empty batch cache")
            pad = _ints(left_padding)
            self._lp = [a + b for a, b in zip(self._lp, pad)]
            self._off = [a - b for a, b in zip(self._off, pad)]
            self._skip = [a + b for a, b in zip(self._skip, pad)]
        if right_padding is not None and max(_ints(right_padding)) > 0:
            if lengths is None:
                raise ValueError("right padding needs the rows' lengths")
            self._right_padding = _ints(right_padding)
            self._remaining = _ints(lengths)

    def finalize(self):
        if self._right_padding is not None:
            pad = self._right_padding
            self._off = [a - b for a, b in zip(self._off, pad)]
            self._lp = [a + b for a, b in zip(self._lp, pad)]
            self._right_padding = self._remaining = None

    def filter(self, batch_indices):
        keep = _ints(batch_indices)
        self.rows = [self.rows[i] for i in keep]
        self._lp = [self._lp[i] for i in keep]
        self._off = [self._off[i] for i in keep]
        self._skip = [self._skip[i] for i in keep]
        if self._remaining is not None:
            self._remaining = [self._remaining[i] for i in keep]
            self._right_padding = [self._right_padding[i] for i in keep]
        self._spans = None if self._spans is None else [self._spans[i] for i in keep]
        self._fetched = self._lane = None
        # shift left to reduce padding, as BatchKVCache does
        least = min(self._lp) if self._lp else 0
        if least > 0:
            self._idx -= least
            self._lp = [p - least for p in self._lp]

    def extend(self, other: BatchTurboQuantKVCache):
        if not isinstance(other, BatchTurboQuantKVCache):
            raise TypeError(f"cannot extend a TurboQuant batch cache with "
                            f"{type(other).__name__}")
        if self._remaining is not None or other._remaining is not None:
            raise ValueError("cannot extend a batch cache in the middle of a padded prompt")
        _check_rows(self.rows + other.rows)
        if self._has_keys or other._has_keys:
            longest = max(self._idx, other._idx)
            self._lp = ([p + longest - self._idx for p in self._lp] +
                        [p + longest - other._idx for p in other._lp])
            self._idx = longest
            self._has_keys = True
        else:
            self._lp = self._lp + other._lp
        self._off = self._off + other._off
        self._skip = self._skip + other._skip
        self.rows = self.rows + other.rows
        self._spans = self._fetched = self._lane = None

    def extract(self, idx: int):
        """An independent copy of row ``idx``: that sequence's cache, real tokens only."""
        return _copy_row(self.rows[idx])

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = (None if k in ("_fetched", "_lane", "_lane_cache")
                               else copy.deepcopy(v, memo))
        return new

    # -- the forward pass -----------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.ndim != 4 or values.ndim != 4:
            raise ValueError(f"expected (B, H_kv, T, d) keys/values, got {keys.shape} / "
                             f"{values.shape}")
        B, H, T, d = keys.shape
        if B != len(self.rows):
            raise ValueError(f"keys of batch {B} for a batch cache of {len(self.rows)} rows")
        if values.shape[:3] != keys.shape[:3] or values.shape[-1] != d:
            raise ValueError(f"a batch cache needs keys and values of one shape (B, H_kv, T, d), "
                             f"got {keys.shape} and {values.shape}")
        for i, r in enumerate(self.rows):  # every row checked before any row changes
            _check_row_shape(i, r, H, d)
        # one host copy of the batch's keys/values (not one per row) for rows on the core
        for r in self.rows:
            if r._gpu is None:
                r._gpu = r._use_gpu(d)
        host = None
        if not any(r._gpu for r in self.rows):
            mx.eval(keys, values)  # one evaluation of the layer's graph for both copies
            host = (_host(keys), _host(values))
        spans = []
        lane = self._lane = self._step_lane(T, H, d) if host is not None else None
        if lane is not None:  # a decode step of plain rows: the per-row work done for all
            _ingest_step(self.rows, lane, host[0], host[1])
            spans = [(0, 1)] * B
        for i, row in enumerate(self.rows if lane is None else ()):
            a = min(T, self._skip[i])
            self._skip[i] -= a
            b = T
            if self._remaining is not None:
                b = a + min(T - a, self._remaining[i])
                self._remaining[i] -= b - a
            if b > a:
                if host is None:
                    row.update_and_fetch(keys[i:i + 1, :, a:b], values[i:i + 1, :, a:b])
                else:
                    row._ingest(host[0][i:i + 1, :, a:b], host[1][i:i + 1, :, a:b])
                row._fetched = None
            spans.append((a, b))
        self._spans = spans
        _stats["max_rows"] = max(_stats["max_rows"], B)
        self._idx += T
        self._off = [o + T for o in self._off]
        self._has_keys = True
        nan = mx.array(float("nan"), dtype=keys.dtype)
        self._fetched = (mx.broadcast_to(nan, (B, H, self._idx, d)),
                         mx.broadcast_to(nan, (B, H, self._idx, values.shape[-1])))
        return self._fetched

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None,
                  **kwargs):
        """``BatchKVCache``'s mask (causal, left padding hidden; a sliding-window batch adds
        its window). The attention route reads the window back from it."""
        window = window_size if window_size is not None else self.max_size
        mask = _mlx_base.create_causal_mask(N, offset=self._idx, window_size=window,
                                            left_padding=mx.array(self._lp))
        _OWN_MASKS.append((mask, window))
        del _OWN_MASKS[:-_OWN_MASKS_KEPT]
        return mask

    def attend_masked(self, queries: mx.array, scale: float, mask) -> mx.array:
        """Attention of ``queries`` (B, H_q, T, d), the last T layout positions, row by row
        on each row's codes; padding positions get zeros."""
        B, Hq, T, d = queries.shape
        if B != len(self.rows) or self._spans is None:
            raise ValueError(f"queries of batch {B} for a batch cache of {len(self.rows)} rows "
                             "(update_and_fetch must come first)")
        windows = self._windows(mask, T)
        lane = self._lane
        if lane is not None and T == 1 and lane["Hq"] == Hq:  # (one token is never held)
            return mx.array(_attend_step(self.rows, lane, _host(queries), scale,
                                         windows)).astype(queries.dtype)
        if not any(r._gpu for r in self.rows):
            # host rows: one copy of the queries to the host and one of the output back
            # and one C++ call (attend_batch) for the rows' core calls of each round
            qh = _host(queries)
            out = np.zeros((B, Hq, T, d), dtype=np.float32)
            calls = {}
            for i, row in enumerate(self.rows):
                a, b = self._spans[i]
                if b > a:
                    calls[i] = row._attend_calls(qh[i:i + 1, :, a:b], scale=scale, causal=True,
                                                 window=windows[i])
            for i, o in _run_row_calls(calls).items():
                a, b = self._spans[i]
                out[i, :, a:b] = o[0]
            return mx.array(out).astype(queries.dtype)
        # GPU store rows: each row's attention on its own store, lazily (its kernels are
        # launched when the step is evaluated); the rows' outputs concatenated in row order.
        outs = []
        for i, row in enumerate(self.rows):
            a, b = self._spans[i]
            if b == a:
                outs.append(mx.zeros((1, Hq, T, d), dtype=queries.dtype))
                continue
            o = row.attend(queries[i:i + 1, :, a:b], scale=scale, causal=True,
                           window=windows[i])
            if a or b < T:
                o = mx.concatenate([mx.zeros((1, Hq, a, d), dtype=o.dtype), o,
                                    mx.zeros((1, Hq, T - b, d), dtype=o.dtype)], axis=2)
            outs.append(o)
        return outs[0] if B == 1 else mx.concatenate(outs, axis=0)

    def _step_lane(self, T: int, H: int, d: int):
        """The tables of the decode-step lane (:func:`_ingest_step`, :func:`_attend_step`),
        or None where a step takes the per-row path: one new token per row, every row a
        plain full-attention row (``TurboQuantKVCache.batch_step_lane``: not a ring) on the
        C++ core with its core built, nothing held or pending, no mixed precision, and all rows
        alike in centring and key split. The lane does per row exactly what the per-row
        path does (the same arithmetic, element for element), with the rows' means and
        channel orders stacked once (kept while the rows are the same objects)."""
        rows = self.rows
        if T != 1 or not rows or self._remaining is not None or any(self._skip):
            return None
        kind = None
        for r in rows:
            if (not getattr(r, "batch_step_lane", False) or r._gpu or r._core is None
                    or r._held is not None or r._pending or r.mixed_bits or r._batch != 1
                    or r._shape[0] != H or r._n_q_heads is None
                    or (r.center and r._k_mean is None)):  # (its _centre would calibrate)
                return None
            k = (r.center and r._k_mean is not None, r._perm is not None, r._n_q_heads)
            if kind is None:
                kind = k
            elif k != kind:
                return None
        arrays = tuple((r._k_mean, r._v_mean, r._perm) for r in rows)
        cached = self._lane_cache
        if cached is not None and len(cached[0]) == len(arrays) and all(
                a[0] is b[0] and a[1] is b[1] and a[2] is b[2]
                for a, b in zip(cached[0], arrays)):
            return cached[1]
        tables = _lane_tables(rows, kind, d)
        self._lane_cache = (arrays, tables)
        return tables

    def _windows(self, mask, T: int) -> list[int | None]:
        """Each row's attention window (None: plain causal) from the layer's mask."""
        if mask is None or (isinstance(mask, str) and mask == "causal"):
            return [None] * len(self.rows)
        if not isinstance(mask, mx.array):
            raise NotImplementedError(f"unsupported attention mask {mask!r}")
        for m, w in _OWN_MASKS:
            if m is mask:
                return [w] * len(self.rows)
        # Another cache's mask (an fp16 layer's BatchKVCache): the same layout, so row i's
        # real keys are columns [left_padding_i, left_padding_i + its tokens).
        if mask.shape[-1] != self._idx or mask.shape[-2] != T:
            raise NotImplementedError(
                f"attention mask of shape {mask.shape} does not match this batch's "
                f"{T} queries x {self._idx} keys (a mask made by a cache of another layout)")
        # Every layer of a step gets the same mask and layout: decoded (read to the host)
        # once per step, not once per layer.
        layout = (tuple(self._lp), tuple(self._spans), tuple(int(r.offset) for r in self.rows))
        for m, key, windows in _FOREIGN_MASKS:
            if m is mask and key == layout:
                return list(windows)
        m = np.array(mask if mask.dtype == mx.bool_ else mask >= 0)
        out = []
        for i, row in enumerate(self.rows):
            a, b = self._spans[i]
            if b == a:
                out.append(None)
                continue
            sub = m[i if m.shape[0] > 1 else 0, 0, a:b, self._lp[i]:self._lp[i] + row.offset]
            out.append(_window_from_mask(mx.array(sub), b - a, int(row.offset)))
        _FOREIGN_MASKS.append((mask, layout, tuple(out)))
        del _FOREIGN_MASKS[:-_OWN_MASKS_KEPT]
        return out


def _lane_tables(rows, kind, d: int) -> dict:
    """Stacked per-row means (B·H, d) and flat gather indices of the rows' key split
    (keys: per KV head; queries: per query head) for a decode step of these rows."""
    centred, split, Hq = kind
    H = int(rows[0]._shape[0])
    g = Hq // H
    t = {"H": H, "Hq": Hq, "g": g, "k_mean": None, "v_mean": None, "k_index": None,
         "q_index": None}
    if centred:
        t["k_mean"] = np.concatenate([r._k_mean.reshape(H, d) for r in rows])
        t["v_mean"] = np.concatenate([r._v_mean.reshape(H, d) for r in rows])
        t["v_mean_q"] = t["v_mean"].reshape(len(rows), H, 1, 1, d)
    if split:
        perms = np.concatenate([r._perm for r in rows]).astype(np.int64)  # (B·H, d)
        t["k_index"] = perms + np.arange(0, perms.shape[0] * d, d)[:, None]
        qp = np.repeat(perms, g, axis=0)  # (B·Hq, d): query head j reads KV head j // g
        t["q_index"] = qp + np.arange(0, qp.shape[0] * d, d)[:, None]
    return t


def _ingest_step(rows, t: dict, keys: np.ndarray, values: np.ndarray) -> None:
    """One decode step's keys/values (B, H, 1, d) into the rows: centred and put in the key
    split's order for all rows at once (what each row's ``_ingest`` computes), then each
    row's append (its window flush rules) as ``_ingest`` makes it."""
    B, H, _, d = keys.shape
    k, v = keys.reshape(B * H, d), values.reshape(B * H, d)
    if t["k_mean"] is not None:
        k = np.ascontiguousarray(k - t["k_mean"], dtype=np.float32)
        v = np.ascontiguousarray(v - t["v_mean"], dtype=np.float32)
    if t["k_index"] is not None:
        k = np.ascontiguousarray(k).reshape(-1)[t["k_index"]]
    k, v = k.reshape(B, H, 1, d), v.reshape(B, H, 1, d)
    for i, row in enumerate(rows):
        row._append_new(k[i], v[i])
        row.offset += 1
        row._fetched = None


def _attend_step(rows, t: dict, queries: np.ndarray, scale: float, windows) -> np.ndarray:
    """A decode step's attention of queries (B, H_q, 1, d) on the rows' codes: the queries
    put in each row's key-split order at once, one ``_core.attend_batch`` for all rows (one
    row: its core's ``attend``; both as ``_answer`` makes them), the rows' value means added
    at once; (B, H_q, 1, d) float32."""
    B, Hq, _, d = queries.shape
    q = np.ascontiguousarray(queries)
    if t["q_index"] is not None:
        q = q.reshape(-1)[t["q_index"]].reshape(B, Hq, 1, d)
    if B == 1:  # as _answer: one row's call is its core's attend (heads on the threads)
        kw = {"sparse_v": rows[0].sparse_v} if rows[0].sparse_v else {}
        out = rows[0]._core.attend(q[0], causal=True, scale=float(scale), window=windows[0],
                                   **kw)[None]
    else:
        out = _core.attend_batch([r._core for r in rows], q, counts=[1] * B,
                                 scale=float(scale), causal=True, windows=list(windows),
                                 sparse_v=[float(r.sparse_v or 0.0) for r in rows],
                                 sinks_visible=[False] * B)
    out = np.asarray(out, dtype=np.float32)
    if t["k_mean"] is not None:
        out = (out.reshape(B, t["H"], t["g"], 1, d) + t["v_mean_q"]).reshape(B, Hq, 1, d)
    return out


def _run_row_calls(calls: dict) -> dict:
    """Runs the rows' generators of core calls (``TurboQuantKVCache._attend_calls``) in
    rounds: each round answers the pending call of every row, the rows' C++ cores together
    in one ``_core.attend_batch`` (GIL released, rows in parallel on the library's thread
    pool). Each row makes exactly the calls, appends in between, that its own ``_attend``
    makes, so its result is the same bit for bit. Returns each row's result."""
    results = {}
    pending = {}
    for i, g in calls.items():
        _advance(i, g, None, pending, results, first=True)
    while pending:
        answers = _answer(pending)
        pending = {}
        for i, o in answers.items():
            _advance(i, calls[i], o, pending, results)
    return results


def _advance(i, gen, answer, pending, results, first=False) -> None:
    try:
        pending[i] = next(gen) if first else gen.send(answer)
    except StopIteration as done:
        results[i] = done.value


_BATCH_OPTIONS = frozenset(("causal", "scale", "window", "sparse_v", "sinks_visible"))


def _answer(pending: dict) -> dict:
    """core.attend(q, **kwargs) of each pending (core, q, kwargs): host cores with the same
    causal flag and scale in one attend_batch, anything else on its own."""
    groups: dict = {}
    answers = {}
    for i, (core, q, kw) in pending.items():
        if (isinstance(core, _core.KVCache) and isinstance(q, np.ndarray) and q.ndim == 3
                and kw.keys() <= _BATCH_OPTIONS):
            groups.setdefault((bool(kw.get("causal", True)), kw.get("scale")), []).append(i)
        else:
            answers[i] = core.attend(q, **kw)
    for (causal, scale), rows in groups.items():
        if len(rows) == 1:
            core, q, kw = pending[rows[0]]
            answers[rows[0]] = core.attend(q, **kw)
            continue
        qs = [pending[i][1] for i in rows]
        kws = [pending[i][2] for i in rows]
        counts = [q.shape[1] for q in qs]
        if len(set(counts)) == 1 and len({q.dtype for q in qs}) == 1:
            qb = np.stack(qs)
        else:  # rows with fewer queries than the longest: its first positions hold them
            qb = np.zeros((len(qs), qs[0].shape[0], max(counts), qs[0].shape[2]), np.float32)
            for k, q in enumerate(qs):
                qb[k, :, :q.shape[1]] = q
        ob = _core.attend_batch([pending[i][0] for i in rows], qb, counts=counts,
                                scale=scale, causal=causal,
                                windows=[kw.get("window") for kw in kws],
                                sparse_v=[float(kw.get("sparse_v", 0.0)) for kw in kws],
                                sinks_visible=[bool(kw.get("sinks_visible", False))
                                               for kw in kws])
        for k, i in enumerate(rows):
            answers[i] = ob[k, :, :counts[k]]
    return answers


def _check_row_shape(i: int, row, heads: int, head_dim: int) -> None:
    """Refuses keys of ``heads`` KV heads of ``head_dim`` for a row built for others (the
    row's own append would refuse them too, but after the rows before it had changed)."""
    if row._core is not None:
        want = tuple(row._shape)
    elif row._pending:
        k = row._pending[0][0]
        want = (int(k.shape[0]), int(k.shape[2]))
    else:
        return
    if (heads, head_dim) != want:
        raise ValueError(f"layer {row.layer}: keys of {heads} KV heads x head_dim {head_dim} "
                         f"for batch row {i}, whose cache holds {want[0]} KV heads x head_dim "
                         f"{want[1]}; the batch cache is unchanged")


def _check_rows(rows) -> None:
    kinds = {(type(r), getattr(r, "max_size", None)) for r in rows}
    for r in rows:
        if not getattr(r, "turboquant_layer", False):
            raise TypeError(f"a TurboQuant batch cache holds TurboQuantKVCache rows, got "
                            f"{type(r).__name__}")
    if len(kinds) > 1:
        raise ValueError("a batch cache needs rows of one kind (all full-attention, or all "
                         f"sliding-window of one size), got {sorted(str(k) for k in kinds)}")


def _copy_row(row):
    out = copy.deepcopy(row)
    out._fetched = None
    return out
