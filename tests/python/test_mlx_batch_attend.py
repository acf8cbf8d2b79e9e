"""One C++ call per layer and step for the rows of a batch: ``_core.attend_batch`` equals each
row's own ``KVCache.attend`` bit for bit (GQA, fp16 windows and sinks, mixed precision, decay,
sparse V, sliding windows, padded rows), and the batch cache's attention through it equals
the row-by-row path it replaced. Bad batches are refused before any row runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from turboquant import _core

D, HQ = 32, 6

# (n_kv_heads, core options, attend options): GQA groups of 3 and 2
KINDS = [
    (2, {}, {}),
    (3, {"fp16_window": 12, "fp16_sinks": 3}, {"window": 9}),
    (2, {"fp16_window": 16, "fp16_sinks": 2, "decay_bits": 2, "mixed_group_blocks": 2,
         "mixed_keep_blocks": 1}, {}),
    (3, {"decay_after": 16, "decay_bits": 2}, {"sparse_v": 0.01}),
    (2, {"fp16_window": 8, "fp16_sinks": 4}, {"window": 7, "sinks_visible": True}),
]


def _cache(kind: int, tokens: int) -> _core.KVCache:
    h, opts, _ = KINDS[kind % len(KINDS)]
    kv = _core.KVCache(D, n_q_heads=HQ, n_kv_heads=h, key_bits=4, value_bits=3, block_tokens=8,
                       seed=kind, **opts)
    rng = np.random.default_rng(100 + kind)
    t = 0
    while t < tokens:  # several appends: windows flush and blocks decay along the way
        n = min(tokens - t, 3 + t % 7)
        kv.append(rng.standard_normal((h, n, D), dtype=np.float32),
                  rng.standard_normal((h, n, D), dtype=np.float32))
        t += n
    return kv


def _rows(spans):
    return [_cache(i, 20 + 13 * i) for i in range(len(spans))]


def _options(B):
    opts = [KINDS[i % len(KINDS)][2] for i in range(B)]
    return {"windows": [o.get("window") for o in opts],
            "sparse_v": [o.get("sparse_v", 0.0) for o in opts],
            "sinks_visible": [o.get("sinks_visible", False) for o in opts]}


@pytest.mark.parametrize("T, spans", [
    (1, [(0, 1)] * 10),  # decode: one query per row
    (6, [(0, 6), (2, 4), (5, 1), (0, 3), (0, 0), (1, 5), (0, 6), (3, 2)]),  # padded prompts
    (4, [(1, 3)]),  # one row
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attend_batch_equals_each_rows_own_attend(T, spans, dtype):
    got_rows, want_rows = _rows(spans), _rows(spans)  # twins: attention rates mixed tokens
    B = len(spans)
    q = np.random.default_rng(T).standard_normal((B, HQ, T, D)).astype(dtype)
    opts = _options(B)
    scale = 0.3
    out = _core.attend_batch(got_rows, q, starts=[a for a, _ in spans],
                             counts=[n for _, n in spans], scale=scale, **opts)
    assert out.shape == (B, HQ, T, D) and out.dtype == np.float32
    for i, (a, n) in enumerate(spans):
        want = np.zeros((HQ, T, D), np.float32)
        if n:
            want[:, a:a + n] = want_rows[i].attend(
                np.ascontiguousarray(q[i, :, a:a + n]), scale=scale, window=opts["windows"][i],
                sparse_v=opts["sparse_v"][i], sinks_visible=opts["sinks_visible"][i])
        assert out[i].tobytes() == want.tobytes(), f"row {i}"
        assert got_rows[i].rated_tokens() == want_rows[i].rated_tokens()
        if KINDS[i % len(KINDS)][1].get("mixed_group_blocks"):
            for h in range(KINDS[i % len(KINDS)][0]):
                assert np.array_equal(got_rows[i].window_importance(0, h),
                                      want_rows[i].window_importance(0, h))
    # a mix-up of rows would show: every real row's output is its own
    real = [out[i].tobytes() for i, (_, n) in enumerate(spans) if n]
    assert len(set(real)) == len(real)


def test_attend_batch_refuses_bad_batches_and_changes_nothing():
    rows = _rows([(0, 1)] * 3)
    q = np.random.default_rng(0).standard_normal((3, HQ, 1, D)).astype(np.float32)
    rated = [r.rated_tokens() for r in rows]
    sizes = [len(r) for r in rows]
    with pytest.raises(ValueError, match="at least one cache"):
        _core.attend_batch([], q)
    with pytest.raises(ValueError, match="queries .* have batch 2 for 3 caches"):
        _core.attend_batch(rows, q[:2])
    with pytest.raises(ValueError, match="heads but the caches have n_q_heads=6"):
        _core.attend_batch(rows, np.ascontiguousarray(q[:, :4]))
    with pytest.raises(ValueError, match=r"must be \(B, H_q, T, d\)"):
        _core.attend_batch(rows, q[0])
    with pytest.raises(ValueError, match="last dimension must be head_dim=32"):
        _core.attend_batch(rows, np.zeros((3, HQ, 1, 16), np.float32))
    with pytest.raises(ValueError, match=r"row 0: layer must be in \[0, 1\), got 1"):
        _core.attend_batch(rows, q, layer=1)
    with pytest.raises(ValueError, match="rows 0 and 2 share one cache"):
        _core.attend_batch([rows[0], rows[1], rows[0]], q)
    with pytest.raises(ValueError, match=r"row 1's queries \[1, 2\) exceed the batch's 1"):
        _core.attend_batch(rows, q, starts=[0, 1, 0])
    with pytest.raises(ValueError, match="counts has 2 entries for 3 caches"):
        _core.attend_batch(rows, q, counts=[1, 1])
    with pytest.raises(ValueError, match="row 2: window must be >= 1"):
        _core.attend_batch(rows, q, windows=[None, None, 0])
    other = _core.KVCache(D, n_q_heads=4, n_kv_heads=2)
    other.append(np.zeros((2, 1, D), np.float32), np.zeros((2, 1, D), np.float32))
    with pytest.raises(ValueError, match="row 1's cache has n_q_heads=4"):
        _core.attend_batch([rows[0], other], q[:2])
    with pytest.raises(TypeError, match=r"caches\[1\] must be a turboquant._core.KVCache"):
        _core.attend_batch([rows[0], "x"], q[:2])
    bad = q.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="row 2: queries contain NaN"):
        _core.attend_batch(rows, bad)
    # the mixed-precision row (row 2) was checked, never run: nothing rated
    assert [r.rated_tokens() for r in rows] == rated
    assert [len(r) for r in rows] == sizes


# -- the batch cache ------------------------------------------------------------------------

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from turboquant import mlx_batch
from turboquant import mlx_lm as tq
from turboquant.mlx_batch import BatchTurboQuantKVCache
from turboquant.mlx_rotating import TurboQuantRotatingKVCache

ROW_KINDS = {
    "codes": lambda: tq.TurboQuantKVCache(key_bits=3, value_bits=3),
    "tq3-window-sinks": lambda: tq.TurboQuantKVCache(key_bits=3, value_bits=3, fp16_window=16,
                                                     fp16_sinks=4),
    "mixed": lambda: tq.TurboQuantKVCache(key_bits=4, value_bits=4, fp16_window=16,
                                          mixed_bits=2, mixed_keep=0.5),
    "decay-sparse-v": lambda: tq.TurboQuantKVCache(key_bits=4, value_bits=3, decay_after=24,
                                                   decay_bits=2, sparse_v=0.01),
    "sliding-keep": lambda: TurboQuantRotatingKVCache(max_size=24, keep=4, key_bits=3,
                                                      value_bits=3, fp16_window=8),
}


def _row_by_row(batch, queries, scale, mask):
    """The batch cache's attention as it was before attend_batch: one core call per row."""
    B, Hq, T, d = queries.shape
    windows = batch._windows(mask, T)
    qh = np.array(queries)
    out = np.zeros((B, Hq, T, d), np.float32)
    for i, row in enumerate(batch.rows):
        a, b = batch._spans[i]
        if b > a:
            out[i, :, a:b] = row._attend(qh[i:i + 1, :, a:b], scale=scale, causal=True,
                                         window=windows[i])[0]
    return out


@pytest.mark.parametrize("kind", list(ROW_KINDS))
def test_batch_cache_attention_equals_the_row_by_row_path(kind, monkeypatch):
    calls = []
    real = _core.attend_batch
    monkeypatch.setattr(_core, "attend_batch",
                        lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    H, d, B = 2, D, 4
    rng = np.random.default_rng(7)

    def kv(b, n):
        return (mx.array(rng.standard_normal((b, H, n, d)).astype(np.float32)),
                mx.array(rng.standard_normal((b, H, n, d)).astype(np.float32)))

    # a left-padded prompt batch (prefill), then decode steps, then rows of cached prefixes
    # of different lengths merged in
    batch = BatchTurboQuantKVCache([ROW_KINDS[kind]() for _ in range(B)], [0] * B)
    lengths = [9, 30, 1, 17]
    batch.prepare(left_padding=[30 - n for n in lengths])
    steps = [30] + [1] * 12
    for step, T in enumerate(steps):
        if step == 6:
            others = []
            for n in (5, 40):
                c = ROW_KINDS[kind]()
                c.update_and_fetch(*kv(1, n))
                c.attend(mx.array(rng.standard_normal((1, HQ, n, d)).astype(np.float32)),
                         scale=0.25)
                others.append(c)
            batch.extend(BatchTurboQuantKVCache.merge(others))
        batch.update_and_fetch(*kv(len(batch.rows), T))
        mask = batch.make_mask(T)
        queries = mx.array(rng.standard_normal((len(batch.rows), HQ, T, d)).astype(np.float32))
        ref = copy.deepcopy(batch)
        want = _row_by_row(ref, queries, 0.25, mask)
        got = np.array(batch.attend_masked(queries, 0.25, mask))
        assert got.tobytes() == want.tobytes(), f"step {step}"
    assert calls and max(calls) == 6  # the rows went through attend_batch together
    assert mlx_batch.stats()["max_rows"] >= 6
