"""fp16 recent window / fp16 layers of the KV cache, and sparse V attention."""
import numpy as np
import pytest

import turboquant as tq
from turboquant import _core
from reference import attention_over_decoded

D, NQ, NKV, BT, W = 32, 4, 2, 8, 12




def make(**kw):
    args = dict(n_layers=2, n_q_heads=NQ, n_kv_heads=NKV, key_bits=3, value_bits=3, block_tokens=BT, seed=5)
    args.update(kw)
    return _core.KVCache(D, **args)


def fill(kv, rng, chunks, layers=(0, 1)):
    data = {l: ([], []) for l in layers}
    for T in chunks:
        for l in layers:
            k = rng.standard_normal((NKV, T, D)).astype(np.float32)
            v = rng.standard_normal((NKV, T, D)).astype(np.float32)
            kv.append(k, v, layer=l)
            data[l][0].append(k)
            data[l][1].append(v)
    return {l: (np.concatenate(a, 1), np.concatenate(b, 1)) for l, (a, b) in data.items()}


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_window_bounds_codes_and_fp16_rows(rng):
    kv = make(fp16_window=W)
    plain = make()
    data = fill(kv, rng, [5, 3, 1, 17, 1, 1, 30, 2])
    n = kv.size(0)
    assert n == 60
    c = kv.coded_tokens(0)
    assert c % BT == 0 and W < n - c <= W + BT and kv.window_tokens(0) == n - c
    # Codes are those of the fp16-rounded tokens, appended directly.
    k16, v16 = (x.astype(np.float16).astype(np.float32) for x in data[0])
    plain.append(np.ascontiguousarray(k16[:, :c]), np.ascontiguousarray(v16[:, :c]), layer=0)
    for h in range(NKV):
        np.testing.assert_array_equal(kv.decode(0, h, "key", 0, c), plain.decode(0, h, "key"))
        np.testing.assert_array_equal(kv.decode(0, h, "value", 0, c), plain.decode(0, h, "value"))
        np.testing.assert_array_equal(kv.decode(0, h, "key", c), k16[h, c:])
        np.testing.assert_array_equal(kv.decode(0, h, "value", c), v16[h, c:])
    # memory: the plain cache's codes + one window of (W + BT) rows per layer/head/role.
    plain.append(np.ascontiguousarray(k16[:, :c]), np.ascontiguousarray(v16[:, :c]), layer=1)
    assert kv.memory_bytes() == plain.memory_bytes() + 2 * NKV * 2 * (W + BT) * D * 2


@pytest.mark.parametrize("T_q", [1, 3, 20, 40])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 9), (False, None), (True, 30)])
def test_attention_matches_reference(rng, T_q, causal, window):
    kv = make(fp16_window=W)
    fill(kv, rng, [23, 1, 26])  # 50 tokens: codes [0, 32), window [32, 50)
    assert kv.coded_tokens(0) == 32
    q = rng.standard_normal((NQ, T_q, D)).astype(np.float32)
    got = kv.attend(q, layer=1, causal=causal, window=window)
    np.testing.assert_allclose(got, attention_over_decoded(kv, q, 1, causal, window), atol=1e-4, rtol=0)


def test_trim_window_then_codes_and_fp16_layers(rng):
    kv = make(fp16_window=W, fp16_layers=[1])
    data = fill(kv, rng, [40, 3])
    assert kv.coded_tokens(1) == 0 and kv.window_tokens(1) == 43
    for h in range(NKV):
        np.testing.assert_array_equal(kv.decode(1, h, "key"), data[1][0][h].astype(np.float16).astype(np.float32))
    c = kv.coded_tokens(0)
    w = kv.window_tokens(0)
    assert kv.trim(w - 2) == w - 2  # inside the window
    assert kv.coded_tokens(0) == c and kv.window_tokens(0) == 2
    q = rng.standard_normal((NQ, 4, D)).astype(np.float32)
    for layer in (0, 1):
        np.testing.assert_allclose(kv.attend(q, layer=layer), attention_over_decoded(kv, q, layer), atol=1e-4, rtol=0)
    kv.trim(5)  # the rest of the window and 3 coded tokens
    assert kv.size(0) == c - 3 and kv.coded_tokens(0) == c - 3 and kv.window_tokens(0) == 0
    np.testing.assert_allclose(kv.attend(q, layer=0), attention_over_decoded(kv, q, 0), atol=1e-4, rtol=0)
    # Growing again from an unaligned code count: the flush starts mid-page.
    fill(kv, rng, [25])
    assert kv.coded_tokens(0) == c - 3 + BT
    np.testing.assert_allclose(kv.attend(q, layer=0), attention_over_decoded(kv, q, 0), atol=1e-4, rtol=0)
    np.testing.assert_allclose(kv.attend(q, layer=1), attention_over_decoded(kv, q, 1), atol=1e-4, rtol=0)


def test_save_load_roundtrip_and_corruption(rng, tmp_path):
    kv = make(fp16_window=W, fp16_layers=[0])
    fill(kv, rng, [37, 2])
    path = str(tmp_path / "w.tqkv")
    kv.save(path)
    back = _core.KVCache.load(path)
    assert back.fp16_window == W and back.fp16_layers == [0]
    for l in (0, 1):
        assert back.size(l) == kv.size(l) and back.coded_tokens(l) == kv.coded_tokens(l)
        for h in range(NKV):
            for role in ("key", "value"):
                np.testing.assert_array_equal(back.decode(l, h, role), kv.decode(l, h, role))
    q = rng.standard_normal((NQ, 2, D)).astype(np.float32)
    np.testing.assert_array_equal(back.attend(q, layer=1), kv.attend(q, layer=1))
    assert back.memory_bytes() <= kv.memory_bytes()
    raw = bytearray(kv.to_bytes())
    at = raw.rfind(b"WNDW")
    assert at > 0
    for pos in (at + 30, at + 5, at + 13):  # a window row, the length, the token count
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        with pytest.raises(tq.FormatError):
            _core.KVCache.from_bytes(bytes(bad))
    with pytest.raises(tq.FormatError):
        _core.KVCache.from_bytes(bytes(raw[:at + 20]))
    # As a legacy file, a cache without a window is version 1, one with it version 2.
    plain = make()
    assert plain.to_bytes(legacy=True)[8] == 1 and kv.to_bytes(legacy=True)[8] == 2
    assert raw[8] == 8  # the section container


def test_bad_window_arguments(rng):
    with pytest.raises(ValueError, match="fp16_layers"):
        make(fp16_layers=[2])
    kv = make(fp16_window=W)
    k = np.full((NKV, 3, D), 1e6, np.float32)  # not representable in fp16
    with pytest.raises(ValueError, match="not finite in fp16"):
        kv.append(k, k, layer=0)
    assert kv.size(0) == 0 and kv.memory_bytes() == make(fp16_window=W).memory_bytes()
    kv.append(np.ones((NKV, 1, D), np.float32), np.ones((NKV, 1, D), np.float32), layer=0)
    with pytest.raises(ValueError, match="sparse_v"):
        kv.attend(np.zeros((NQ, 1, D), np.float32), layer=0, sparse_v=1.5)


def test_builder(rng):
    cache = (tq.KVCacheBuilder().with_head_dim(D).with_layers(2).with_heads(NQ, NKV).with_block_tokens(BT)
             .with_fp16_window(W, layers=[1]).with_sparse_v(0.01).build())
    assert cache.core.fp16_window == W and cache.core.fp16_layers == [1] and cache.sparse_v == 0.01
    with pytest.raises(ValueError, match="fp16_layers"):
        tq.KVCacheBuilder().with_head_dim(D).with_fp16_window(4, layers=[3]).build()
    with pytest.raises(ValueError, match="sparse_v"):
        tq.KVCacheBuilder().with_head_dim(D).with_sparse_v(2.0).build()


@pytest.mark.parametrize("fp16_window", [0, W])
@pytest.mark.parametrize("T_q", [1, 3])
def test_sparse_v_exact_at_zero_and_bounded(rng, fp16_window, T_q):
    kv = make(fp16_window=fp16_window, block_tokens=16)
    fill(kv, rng, [200])
    q = 3.0 * rng.standard_normal((NQ, T_q, D)).astype(np.float32)  # peaked softmax
    dense = kv.attend(q, layer=0)
    np.testing.assert_array_equal(kv.attend(q, layer=0, sparse_v=0.0), dense)
    t = 0.05
    sparse = kv.attend(q, layer=0, sparse_v=t)
    assert not np.array_equal(sparse, dense)
    # Bound: every skipped row has weight < t * max weight, so the error is at most the
    # mass of those rows times their value norms.
    n, g = kv.size(0), NQ // NKV
    for h in range(NQ):
        K = kv.decode(0, h // g, "key").astype(np.float64)
        V = kv.decode(0, h // g, "value").astype(np.float64)
        for i in range(T_q):
            s = (K[:n - T_q + i + 1] @ q[h, i]) / np.sqrt(D)
            p = np.exp(s - s.max())
            p /= p.sum()
            small = p < t * p.max()
            bound = (p[small] * np.linalg.norm(V[:n - T_q + i + 1][small], axis=1)).sum()
            assert np.linalg.norm(sparse[h, i] - dense[h, i]) <= bound + 1e-4


def test_sparse_v_prefill_stays_dense(rng):
    kv = make(block_tokens=16)
    fill(kv, rng, [100])
    q = 3.0 * rng.standard_normal((NQ, 20, D)).astype(np.float32)  # 40 rows per KV head: GEMM path
    np.testing.assert_array_equal(kv.attend(q, layer=0, sparse_v=0.05), kv.attend(q, layer=0))


def test_info_cli_shows_window(rng, tmp_path, capsys):
    from turboquant.__main__ import main
    kv = make(fp16_window=W, fp16_layers=[1])
    fill(kv, rng, [30])
    path = str(tmp_path / "w.tqkv")
    kv.save(path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "format version 8" in out and f"fp16 window:     {W} tokens, fp16 layers [1]" in out
    assert f"window tokens/layer: {kv.window_tokens(0)}, 30" in out
