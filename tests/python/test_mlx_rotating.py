"""turboquant.mlx_rotating: the compressed sliding-window cache (mlx-lm RotatingKVCache)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as mlx_cache  # noqa: E402
from mlx_lm.models.base import create_causal_mask  # noqa: E402
from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402
from turboquant import _core, mlx_route, presets  # noqa: E402
from turboquant.mlx_eval import Setting, make_cache  # noqa: E402
from turboquant.mlx_rotating import TurboQuantRotatingKVCache, codes_needed  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, 120).tolist()
# a prefill longer than the window (8), decode steps, a second block, many steps beyond
CHUNKS = [20, 1, 1, 1, 17] + [1] * 30 + [13, 2] + [1] * 20



def codes_only(model, **kw):
    """The raw quantizer's caches (no preset's fp16 sinks/window unless asked): the ring's
    machinery under test."""
    return tq_mlx.make_prompt_cache(model, preset="codes-only", **kw)

def run_chunks(model, cache, tokens=TOKENS, chunks=CHUNKS):
    outs, i = [], 0
    for c in chunks:
        outs.append(model(mx.array(tokens[i:i + c])[None], cache=cache))
        i += c
    return np.concatenate([np.array(o[0].astype(mx.float32)) for o in outs])


def cosines(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def softmax_window(q, k, v, scale, window, sinks=0):
    """Exact attention of the last len(q) positions over k/v, each on its last `window`
    rows plus the first `sinks` rows."""
    n, T = k.shape[0], q.shape[0]
    out = np.empty_like(q, dtype=np.float64)
    for t in range(T):
        p = n - T + t
        rows = sorted(set(range(min(sinks, p + 1))) | set(range(max(0, p - window + 1), p + 1)))
        s = (k[rows] @ q[t]) * scale
        w = np.exp(s - s.max())
        out[t] = (w / w.sum()) @ v[rows]
    return out


@pytest.mark.parametrize("fp16_window,keep", [(0, 0), (6, 0), (0, 3), (5, 2)])
def test_attention_is_window_softmax_over_the_decoded_ring(fp16_window, keep):
    """Every query's output equals the exact sliding-window softmax over the tokens the ring
    holds, decoded from its codes (scores in the cache's channel order, values + mean)."""
    rng = np.random.default_rng(3)
    H, Hq, d, W, bt = 2, 4, 32, 12, 4
    c = TurboQuantRotatingKVCache(max_size=W, key_bits=3, value_bits=3, block_tokens=bt,
                                  seed=5, fp16_window=fp16_window, keep=keep)
    scale, seen = 0.2, 0
    for T in [30, 1, 1, 5, 1, 1, 9, 1, 1, 1, 40, 1, 1]:
        k = mx.array(rng.standard_normal((1, H, T, d)).astype(np.float32) + 0.5)
        v = mx.array(rng.standard_normal((1, H, T, d)).astype(np.float32))
        q = rng.standard_normal((1, Hq, T, d)).astype(np.float32)
        c.update_and_fetch(k, v)
        out = np.array(c.attend(mx.array(q), scale=scale)).astype(np.float64)
        seen += T
        core = c._core
        n, ev = core.size(0), c.evicted_tokens
        assert n + ev == seen == c.offset
        # bounded: old pages were dropped
        assert core.coded_tokens(0) - core.sink_tokens(0) <= c.max_coded_tokens
        assert core.sink_tokens(0) == min(keep, seen)
        assert core.window_tokens(0) <= fp16_window + bt
        # Queries whose whole window is still held (all of them at decode steps).
        first = max(0, T - (n - keep - (W - keep) + 1)) if ev else 0
        if fp16_window or keep:  # a windowed core: earlier chunks saw some tokens in fp16
            # (its recent rows, at most fp16_window + block_tokens) that are codes by now
            first = max(first, (T - 1) // bt * bt)
        for h in range(Hq):
            g = h // (Hq // H)
            kd = core.decode(0, g, "key").astype(np.float64)
            vd = core.decode(0, g, "value").astype(np.float64) + c._v_mean[g, 0]
            qh = q[0, h].astype(np.float64)
            if c._perm is not None:
                qh = qh[:, c._perm[g]]
            # the last T - first positions: the keep sinks and the last W - keep tokens
            ref = softmax_window(qh[first:], kd, vd, scale, W - keep, sinks=keep)
            np.testing.assert_allclose(out[0, h, first:], ref, rtol=2e-4, atol=2e-4)
        if T == 1:
            assert first == 0
    assert c.evicted_tokens > 0


def test_eviction_matches_a_cache_that_keeps_everything():
    """Chunked prefill with eviction gives what the same codes give with nothing evicted."""
    rng = np.random.default_rng(4)
    H, Hq, d, W = 1, 2, 16, 8
    ring = TurboQuantRotatingKVCache(max_size=W, key_bits=4, value_bits=4, block_tokens=4)
    full = tq_mlx.TurboQuantKVCache(key_bits=4, value_bits=4)
    for T in [25, 1, 1, 16, 1]:
        k = mx.array(rng.standard_normal((1, H, T, d)).astype(np.float32))
        v = mx.array(rng.standard_normal((1, H, T, d)).astype(np.float32))
        q = mx.array(rng.standard_normal((1, Hq, T, d)).astype(np.float32))
        ring.update_and_fetch(k, v)
        full.update_and_fetch(k, v)
        a = np.array(ring.attend(q, scale=0.25))
        b = np.array(full.attend(q, scale=0.25, window=W))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert ring.evicted_tokens > 0 and full._core.size(0) == ring.offset


def test_gemma3_every_layer_compressed_and_close_to_mlx_lm():
    model = tiny_model("gemma3_text")  # layer 0 slides (window 8), layer 1 is global
    ref = run_chunks(model, mlx_cache.make_prompt_cache(model))
    cache = codes_only(model, key_bits=8, value_bits=8, block_tokens=4)
    assert type(cache[0]) is TurboQuantRotatingKVCache and cache[0].max_size == 8
    assert type(cache[1]) is tq_mlx.TurboQuantKVCache
    out = run_chunks(model, cache)
    cos = cosines(ref, out)
    assert cos.mean() > 0.9995 and cos.min() > 0.998  # 8-bit codes: windows and offsets right
    ring = cache[0]
    assert ring.offset == sum(CHUNKS) and ring.size() == 8
    assert ring.evicted_tokens > 0 and ring._core.size(0) <= ring.max_coded_tokens
    out3 = run_chunks(model, codes_only(model, key_bits=3, value_bits=3))
    assert np.isfinite(out3).all() and cosines(ref, out3).mean() > 0.7
    # page size does not change the answer: eviction only drops tokens no query sees
    big = run_chunks(model, codes_only(model, key_bits=8, value_bits=8,
                                                     block_tokens=64))
    np.testing.assert_allclose(out, big, rtol=1e-3, atol=1e-3)


def test_memory_is_bounded_while_decoding():
    model = tiny_model("gemma3_text")
    cache = codes_only(model, block_tokens=4)
    run_chunks(model, cache, chunks=[20] + [1] * 12)
    ring = cache[0]
    sizes = []
    for t in TOKENS[32:80]:
        model(mx.array([t])[None], cache=cache)
        sizes.append(ring.nbytes)
    assert max(sizes) == max(sizes[-8:])  # no growth beyond one ring of pages
    assert ring._core.size(0) <= codes_needed(8, 4) == ring.max_coded_tokens == 16
    assert ring.fp16_nbytes == 2 * 2 * 2 * 16 * 8  # mlx-lm's ring: K+V, 2 heads, d 16, 8 tokens


def test_generation_with_long_prompt():
    """Generation through the ring: as long as mlx-lm's, and the same tokens and logprobs as
    the unbounded compressed cache answering the same window (no eviction)."""
    model = tiny_model("gemma3_text")
    prompt = mx.array(TOKENS[:24])  # longer than the window
    n = 30

    def gen(cache):
        steps = generate_step(prompt, model, max_tokens=n, prompt_cache=cache)
        return [(int(t), np.array(lp)) for (t, lp), _ in zip(steps, range(n))]

    ref = gen(mlx_cache.make_prompt_cache(model))
    cache = codes_only(model, key_bits=8, value_bits=8, block_tokens=4)
    got = gen(cache)
    assert len(got) == len(ref) == n and got[0][0] == ref[0][0]
    assert np.abs(got[0][1] - ref[0][1]).max() < 0.1
    assert cache[0].evicted_tokens > 0
    unbounded = codes_only(model, key_bits=8, value_bits=8)
    unbounded[0] = tq_mlx.TurboQuantKVCache(key_bits=8, value_bits=8, layer=0,
                                            rope_pairs=tq_mlx.rope_pairs_of(model))
    same = gen(unbounded)
    assert [t for t, _ in got] == [t for t, _ in same]
    for (_, a), (_, b) in zip(got, same):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_trim_rules():
    model = tiny_model("gemma3_text")
    cache = codes_only(model, key_bits=4, value_bits=4, block_tokens=4)
    run_chunks(model, cache, chunks=[6])
    ring = cache[0]
    assert ring.is_trimmable() and mlx_cache.trim_prompt_cache(cache, 2) == 2
    assert ring.offset == 4 and ring._core.size(0) == 4
    run_chunks(model, cache, TOKENS[4:], [30] + [1] * 5)
    assert ring.evicted_tokens > 0
    held = ring._core.size(0)
    # still trimmable (a speculative-decoding rewind), as far as the next query's window
    assert ring.is_trimmable() and mlx_cache.can_trim_prompt_cache(cache)
    assert ring.max_trim() == held - 7
    assert ring.trim(held - 7) == held - 7  # 7 = window - 1 left: the next query has them
    assert ring.offset == 39 - (held - 7)
    with pytest.raises(ValueError, match="cannot trim 1 tokens"):
        ring.trim(1)


def test_prompt_cache_file_roundtrip(tmp_path):
    model = tiny_model("gemma3_text")
    cache = codes_only(model, key_bits=4, value_bits=3, seed=7, block_tokens=4)
    run_chunks(model, cache, chunks=[25, 1, 1, 1])
    path = str(tmp_path / "cache.safetensors")
    mlx_cache.save_prompt_cache(path, cache, {"note": "sliding"})
    loaded, meta = mlx_cache.load_prompt_cache(path, return_metadata=True)
    assert meta["note"] == "sliding"
    assert [type(c).__name__ for c in loaded] == ["TurboQuantRotatingKVCache",
                                                  "TurboQuantKVCache"]
    ring = loaded[0]
    assert (ring.max_size, ring.keep, ring.offset, ring.key_bits, ring.value_bits) == \
        (8, 0, 28, 4, 3)
    assert ring.evicted_tokens == cache[0].evicted_tokens > 0
    a = run_chunks(model, cache, TOKENS[28:40], [5, 1, 1])
    b = run_chunks(model, loaded, TOKENS[28:40], [5, 1, 1])
    np.testing.assert_array_equal(a, b)  # same codes, same seeds -> identical logits


def test_corrupt_state_refused():
    c = TurboQuantRotatingKVCache(max_size=8, block_tokens=4)
    c.update_and_fetch(mx.ones((1, 1, 10, 16)), mx.ones((1, 1, 10, 16)))
    c.attend(mx.ones((1, 2, 10, 16)), scale=0.25)
    blob, meta, *rest = c.state
    bad = meta.replace('"max_size": 8', '"max_size": 30')
    with pytest.raises(_core.FormatError, match="max_size=30"):
        TurboQuantRotatingKVCache.from_state((blob, bad, *rest))
    bad = meta.replace('"keep": 0', '"keep": 2')
    with pytest.raises(_core.FormatError, match="keep"):
        TurboQuantRotatingKVCache.from_state((blob, bad, *rest))


def test_masks_and_short_windows():
    rng = np.random.default_rng(2)
    c = TurboQuantRotatingKVCache(max_size=8, key_bits=8, value_bits=8, block_tokens=4)
    ref = mlx_cache.RotatingKVCache(max_size=8)
    k = mx.array(rng.standard_normal((1, 1, 20, 16)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, 1, 20, 16)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, 2, 20, 16)).astype(np.float32))
    for i, T in [(0, 12), (12, 1), (13, 1), (14, 6)]:
        for window in (None, 5):
            m1, m2 = c.make_mask(T, window_size=window), ref.make_mask(T, window_size=window)
            assert (m1 is None and m2 is None) or np.array_equal(np.array(m1), np.array(m2)) \
                or T == 1  # one query: our row is in temporal order, mlx-lm's in ring order
        mask, rmask = c.make_mask(T, window_size=5), ref.make_mask(T, window_size=5)
        rk, rv = ref.update_and_fetch(k[:, :, i:i + T], v[:, :, i:i + T])
        pk, pv = c.update_and_fetch(k[:, :, i:i + T], v[:, :, i:i + T])
        qq = q[:, :, i:i + T]
        out = mlx_route._routed_sdpa(qq, pk, pv, cache=c, scale=0.25, mask=mask)
        want = mx.fast.scaled_dot_product_attention(
            qq, mx.repeat(rk, 2, axis=1), mx.repeat(rv, 2, axis=1), scale=0.25,
            mask=rmask)
        cos = cosines(np.array(want).reshape(-1, 16), np.array(out).reshape(-1, 16))
        assert cos.min() > 0.999, (i, T)
    assert isinstance(create_causal_mask(2, 0), mx.array)


def test_options_and_errors():
    model = tiny_model("gemma3_text")
    cache = codes_only(model, sliding=False)
    assert type(cache[0]) is mlx_cache.RotatingKVCache
    assert type(cache[1]) is tq_mlx.TurboQuantKVCache
    cache = codes_only(model, fp16_layers=[0])
    assert type(cache[0]) is mlx_cache.RotatingKVCache
    run_chunks(model, cache, chunks=[12, 1])  # a fp16 ring next to compressed layers
    # mixed precision / sinks apply to full-attention layers only
    cache = codes_only(model, key_bits=4, value_bits=4, fp16_window=16,
                                     mixed_bits=2, mixed_keep=0.5, fp16_sinks=2)
    assert cache[0].mixed_bits == 0 and cache[0].fp16_sinks == 0
    assert cache[1].mixed_bits == 2
    # the ring holds uniform codes of the recipe's average width (3.0 bits), not 4-bit codes
    assert (cache[0].key_bits, cache[0].value_bits) == (3, 3)
    assert (cache[1].key_bits, cache[1].value_bits) == (4, 4)
    # 2.5 bits: 3-bit keys, 2-bit values, the rings one bit wider with an 8-token window
    cache = tq_mlx.make_prompt_cache(model, preset="tq2.5")
    assert (cache[0].key_bits, cache[0].value_bits, cache[0].mixed_bits) == (4, 3, 0)
    assert (cache[0].fp16_window, cache[0].block_tokens) == (8, 8)
    cache = tq_mlx.make_prompt_cache(model, preset="tq2.5", ring_extra_bits=0)
    assert (cache[0].key_bits, cache[0].value_bits, cache[0].mixed_bits) == (3, 2, 0)
    cache = tq_mlx.make_prompt_cache(model, preset="tq2")  # tq2 keeps its rings' recipe
    assert (cache[0].key_bits, cache[0].value_bits, cache[0].fp16_window) == (2, 2, 64)
    # ring_extra_bits widens the ring's codes only (capped at 8 bits); eval's +rN says the same
    cache = tq_mlx.make_prompt_cache(model, key_bits=3, value_bits=3, ring_extra_bits=1)
    assert (cache[0].key_bits, cache[0].value_bits) == (4, 4)
    assert (cache[1].key_bits, cache[1].value_bits) == (3, 3)
    cache = tq_mlx.make_prompt_cache(model, key_bits=3, value_bits=3, ring_extra_bits=0)
    assert (cache[0].key_bits, cache[0].value_bits) == (3, 3)
    cache = tq_mlx.make_prompt_cache(model, key_bits=7, value_bits=6, ring_extra_bits=2)
    assert (cache[0].key_bits, cache[0].value_bits) == (8, 8)
    run_chunks(model, cache, chunks=[12, 1])
    s = Setting.parse("3+s4+w64+r1")
    assert s.ring_extra_bits == 1 and s.name.endswith("+r1")
    assert [(c.key_bits, c.value_bits) for c in make_cache(model, s)] == [(4, 4), (3, 3)]
    for bad in ("3+r0", "3+r7"):
        with pytest.raises(ValueError, match="rN needs N in"):
            Setting.parse(bad)
    # +bN: the setting's block size (code pages and window flushes), e.g. for a ring recipe
    s = Setting.parse("3+w16+b16")
    assert s.block_tokens == 16 and s.name == "tq-3bit+w16+b16"
    assert {(c.block_tokens, c.fp16_window) for c in make_cache(model, s)} == {(16, 16)}
    for bad, msg in (("3+b12", "bN needs N tokens"), ("3+b0", "bN needs N tokens"),
                     ("4+m2:0.5+b16", "bN and mixed precision exclude")):
        with pytest.raises(ValueError, match=msg):
            Setting.parse(bad)
    for bad in (-1, 7, 1.5):
        with pytest.raises(ValueError, match="ring_extra_bits must be an integer in"):
            tq_mlx.make_prompt_cache(model, ring_extra_bits=bad)
    for kw, msg in [({"ring_window": -1}, "ring_window must be None or an integer >= 0"),
                    ({"ring_window": 2.0}, "ring_window must be None or an integer >= 0"),
                    ({"ring_block_tokens": 0}, "ring_block_tokens must be None or an integer"),
                    ({"ring_block_tokens": True}, "ring_block_tokens must be None or an")]:
        with pytest.raises(ValueError, match=msg):
            tq_mlx.make_prompt_cache(model, **kw)
    for bad in ("3+rb12", "3+rb0"):
        with pytest.raises(ValueError, match="rbN needs N tokens a ring block"):
            Setting.parse(bad)
    with pytest.raises(tq_mlx.UnsupportedArchitectureError, match="no layer left"):
        codes_only(model, fp16_layers=[1], sliding=False)
    for kw, msg in [({"max_size": 0}, "max_size must be"),
                    ({"max_size": 8, "keep": -1}, "keep"),
                    ({"max_size": 8, "keep": 8}, "keep must be smaller than max_size=8"),
                    ({"max_size": 8, "mixed_bits": 2}, "mixed_bits=2"),
                    ({"max_size": 8, "fp16_sinks": 4}, "fp16_sinks=4")]:
        with pytest.raises(ValueError, match=msg):
            TurboQuantRotatingKVCache(**kw)


def test_the_default_recipe_gives_rings_their_own_window_and_blocks():
    """tq3 (what key_bits=3 / value_bits=3 or no bits select) holds its sliding-window rings at
    4 bits with an 8-token fp16 window and 8-token blocks, the full-attention layers at 3 bits
    with the 64-token window; the ring_* keywords override that, each on its own, and eval's
    +rwN / +rbN say the same as the preset."""
    model = tiny_model("gemma3_text")
    shape = lambda c: (c.key_bits, c.value_bits, c.fp16_window, c.block_tokens)  # noqa: E731
    for kw in ({}, {"key_bits": 3, "value_bits": 3}, {"preset": "tq3"}):
        cache = tq_mlx.make_prompt_cache(model, **kw)
        assert type(cache[0]) is TurboQuantRotatingKVCache and shape(cache[0]) == (4, 4, 8, 8)
        assert type(cache[1]) is tq_mlx.TurboQuantKVCache
        assert shape(cache[1])[:3] == (3, 3, 64) and cache[1].fp16_sinks == 4
    ref = run_chunks(model, mlx_cache.make_prompt_cache(model))
    cache = tq_mlx.make_prompt_cache(model)
    out = run_chunks(model, cache)
    assert np.isfinite(out).all() and cosines(ref, out).mean() > 0.95
    ring = cache[0]  # the codes it may keep, plus its fp16 window and the rows not yet flushed
    assert ring.size() == 8 and ring.evicted_tokens > 0
    assert ring._core.size(0) <= ring.max_coded_tokens + 8 + 8
    cache = tq_mlx.make_prompt_cache(model, ring_window=16)
    assert shape(cache[0]) == (4, 4, 16, 8)
    cache = tq_mlx.make_prompt_cache(model, ring_block_tokens=32, ring_extra_bits=0)
    assert shape(cache[0]) == (3, 3, 8, 32)
    cache = tq_mlx.make_prompt_cache(model, fp16_window=0, fp16_sinks=0)  # no fp16 rows at all
    assert shape(cache[0]) == (4, 4, 0, 8) and shape(cache[1])[2] == 0
    # the other recipes keep the full-attention layers' window on their rings
    cache = tq_mlx.make_prompt_cache(model, preset="tq4")
    assert shape(cache[0]) == (4, 4, 64, 32)
    s = Setting.parse(presets.get("tq3").spec())
    assert (s.ring_extra_bits, s.ring_window, s.ring_block_tokens) == (1, 8, 8)
    assert s.name.endswith("+r1+rw8+rb8")
    assert [shape(c) for c in make_cache(model, s)][0] == (4, 4, 8, 8)
    s = Setting.parse("3+w16+rw4+rb16")
    assert [shape(c) for c in make_cache(model, s)] == [(3, 3, 4, 16), (3, 3, 16, 32)]


def test_keep_tokens_match_mlx_lm_decode():
    """keep > 0: the first tokens stay visible at every step, as in mlx-lm's ring (compared
    at decode steps, after a prefill that fits the ring)."""
    rng = np.random.default_rng(6)
    W, keep, d = 8, 2, 16
    c = TurboQuantRotatingKVCache(max_size=W, keep=keep, key_bits=8, value_bits=8,
                                  block_tokens=4)
    ref = mlx_cache.RotatingKVCache(max_size=W, keep=keep)
    cos = []
    for T in [6] + [1] * 30:
        k = mx.array(rng.standard_normal((1, 1, T, d)).astype(np.float32))
        v = mx.array(rng.standard_normal((1, 1, T, d)).astype(np.float32))
        q = mx.array(rng.standard_normal((1, 2, T, d)).astype(np.float32))
        mask = ref.make_mask(T)
        rk, rv = ref.update_and_fetch(k, v)
        c.update_and_fetch(k, v)
        out = np.array(c.attend(q, scale=0.25)).reshape(-1, d)
        want = mx.fast.scaled_dot_product_attention(
            q, mx.repeat(rk, 2, axis=1), mx.repeat(rv, 2, axis=1), scale=0.25, mask=mask)
        cos.append(cosines(np.array(want).reshape(-1, d), out).min())
    assert min(cos) > 0.999
    assert c.evicted_tokens > 0 and c._core.sink_tokens(0) == keep
    # the keep=4 rings of mlx-lm's make_prompt_cache(max_kv_size=...): state round-trips
    ring = TurboQuantRotatingKVCache(max_size=16, keep=4, block_tokens=4)
    ring.update_and_fetch(mx.ones((1, 2, 20, 16)), mx.ones((1, 2, 20, 16)))
    ring.attend(mx.ones((1, 4, 20, 16)), scale=0.25)
    again = TurboQuantRotatingKVCache.from_state(ring.state)
    assert (again.keep, again.max_size, again.offset) == (4, 16, 20)
