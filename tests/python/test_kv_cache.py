"""turboquant._core.KVCache and CompressedKVCache: shapes, accuracy, masks, GQA, trim,
memory, save/load."""

import numpy as np
import pytest

import turboquant as tq
from turboquant import _core


def attention(q, K, V, scale, lo=0, hi=None):
    hi = len(K) - 1 if hi is None else hi
    s = (K[lo:hi + 1].astype(np.float64) @ q.astype(np.float64)) * scale
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ V[lo:hi + 1].astype(np.float64)


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("bits,floor", [(4, 0.985), (3, 0.95)])
def test_decode_accuracy(rng, bits, floor):
    d, n = 128, 1024
    kv = _core.KVCache(d, key_bits=bits, value_bits=bits, block_tokens=100)
    K = rng.standard_normal((n, d), dtype=np.float32)
    V = rng.standard_normal((n, d), dtype=np.float32)
    kv.append(K, V)
    Kd, Vd = kv.decode(0, 0, "key"), kv.decode(0, 0, "value")
    cosines = []
    for _ in range(8):
        q = rng.standard_normal(d, dtype=np.float32)
        out = kv.attend(q)
        assert out.shape == (d,) and out.dtype == np.float32
        np.testing.assert_allclose(out, attention(q, Kd, Vd, d ** -0.5), atol=1e-4, rtol=0)
        cosines.append(cos(out, attention(q, K, V, d ** -0.5)))
    assert np.mean(cosines) >= floor, cosines


def test_prefill_gqa_window_shapes(rng):
    d, hq, hkv, n, tq_ = 64, 6, 2, 70, 9
    kv = _core.KVCache(d, n_layers=2, n_q_heads=hq, n_kv_heads=hkv, key_bits=4, value_bits=3, block_tokens=8)
    K = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    V = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    kv.append(K, V, layer=1)
    assert kv.size(1) == n and kv.size(0) == 0 and len(kv) == 0
    Q = rng.standard_normal((1, hq, tq_, d), dtype=np.float32)
    for causal, window in [(True, None), (True, 5), (False, None), (False, 11)]:
        out = kv.attend(Q, layer=1, causal=causal, window=window, scale=0.2)
        assert out.shape == Q.shape
        for h in range(hq):
            g = h // (hq // hkv)
            Kd, Vd = kv.decode(1, g, "key"), kv.decode(1, g, "value")
            for t in range(tq_):
                hi = n - tq_ + t if causal else n - 1
                lo = max(0, hi + 1 - window) if window else 0
                np.testing.assert_allclose(out[0, h, t], attention(Q[0, h, t], Kd, Vd, 0.2, lo, hi), atol=1e-4)


def test_float16_input_and_zero_copy_errors(rng):
    d = 32
    kv = _core.KVCache(d)
    k = rng.standard_normal((5, d)).astype(np.float16)
    kv.append(k, k)
    kv32 = _core.KVCache(d)
    kv32.append(k.astype(np.float32), k.astype(np.float32))
    np.testing.assert_array_equal(kv.decode(), kv32.decode())
    with pytest.raises(TypeError, match="float32 or float16"):
        kv.append(k.astype(np.float64), k.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        kv.append(np.zeros((d, 5), np.float32).T, np.zeros((d, 5), np.float32).T)
    with pytest.raises(ValueError, match="head_dim=32"):
        kv.append(np.zeros((5, 16), np.float32), np.zeros((5, 16), np.float32))
    with pytest.raises(ValueError, match="batch size must be 1"):
        kv.append(np.zeros((2, 1, 5, d), np.float32), np.zeros((2, 1, 5, d), np.float32))
    with pytest.raises(ValueError, match="n_kv_heads=1"):
        kv.append(np.zeros((3, 5, d), np.float32), np.zeros((3, 5, d), np.float32))
    with pytest.raises(ValueError, match="only 5 tokens"):
        kv.attend(np.zeros((6, d), np.float32))
    bad = np.zeros((2, d), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kv.append(bad, bad)
    assert len(kv) == 5


def test_trim_memory_and_ratio(rng):
    d = 128
    kv = _core.KVCache(d, block_tokens=256)
    base = kv.memory_bytes()
    assert base == 2 * 2 * d * 4  # two hadamard rotations: 2 sign vectors of d floats each
    x = rng.standard_normal((1024, d), dtype=np.float32)
    kv.append(x, x)
    mem = kv.memory_bytes()
    assert mem == base + 2 * 1024 * 50
    assert mem <= 2 * 50 * 1024 + 256 * 100
    assert kv.fp16_bytes() / mem >= 5.0
    assert kv.trim(300) == 300 and len(kv) == 724
    assert kv.memory_bytes() == base + 2 * 768 * 50
    assert kv.trim(10_000) == 724 and len(kv) == 0 and kv.memory_bytes() == base


def test_save_load_roundtrip_and_errors(rng, tmp_path):
    kv = _core.KVCache(64, n_layers=2, n_q_heads=2, n_kv_heads=1, key_bits=4, value_bits=2, seed=5, block_tokens=16)
    x = rng.standard_normal((40, 64), dtype=np.float32)
    kv.append(x, x, layer=0)
    kv.append(x[:3], x[:3], layer=1)
    p = tmp_path / "c.tqkv"
    kv.save(str(p))
    r = _core.KVCache.load(str(p))
    assert (r.size(0), r.size(1), r.key_bits, r.value_bits, r.seed) == (40, 3, 4, 2, 5)
    q = rng.standard_normal((2, 4, 64), dtype=np.float32)
    np.testing.assert_array_equal(kv.attend(q), r.attend(q))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    with pytest.raises(tq.FormatError, match="CRC32C"):
        _core.KVCache.from_bytes(bytes(data))
    with pytest.raises(tq.FormatError):
        _core.KVCache.from_bytes(p.read_bytes()[:-1])
    assert issubclass(tq.FormatError, ValueError)
    with pytest.raises(FileNotFoundError):
        _core.KVCache.load(str(tmp_path / "missing"))


def test_hadamard1_cache_saves_and_loads(rng, tmp_path):
    kv = _core.KVCache(64, n_layers=2, n_q_heads=2, n_kv_heads=1, key_bits=3, value_bits=2, seed=5,
                       rotation="hadamard1", block_tokens=16)
    assert kv.rotation == "hadamard1"
    kind, params = kv.rotation_parameters(1, 0, "value")
    assert kind == "hadamard1" and params.shape == (64,)
    x = rng.standard_normal((40, 64), dtype=np.float32)
    kv.append(x, x, layer=0)
    p = tmp_path / "c.tqkv"
    kv.save(str(p))
    r = _core.KVCache.load(str(p))
    assert r.rotation == "hadamard1"
    np.testing.assert_array_equal(r.rotation_parameters(1, 0, "value")[1], params)
    q = rng.standard_normal((2, 4, 64), dtype=np.float32)
    np.testing.assert_array_equal(kv.attend(q), r.attend(q))


def test_wrapper_observers_and_save(rng, tmp_path):
    lat, mem, dist = tq.LatencyObserver(), tq.MemoryObserver(), tq.DistortionObserver(fraction=0.5, seed=1)
    cache = (tq.KVCacheBuilder().with_head_dim(64).with_heads(4, 2).with_bit_width(4)
             .with_observer(lat).with_observer(mem).with_observer(dist).build())
    for _ in range(3):
        cache.append(rng.standard_normal((2, 10, 64), dtype=np.float32),
                     rng.standard_normal((2, 10, 64), dtype=np.float32))
    out = cache.attend(rng.standard_normal((4, 1, 64), dtype=np.float32))
    assert out.shape == (4, 1, 64)
    assert lat.summary()["append_calls"] == 3 and lat.summary()["attend_calls"] == 1
    assert [t for t, _ in mem.samples] == [10, 20, 30]
    assert mem.samples[-1][1] == cache.memory_bytes()
    s = dist.summary()
    assert 0 < s["sampled_vectors"] < 60
    # 4-bit Lloyd-Max on d=64: about 0.0095 relative MSE, never near 0 or 1.
    assert 0.005 < s["key_relative_mse"] < 0.02 and 0.005 < s["value_relative_mse"] < 0.02
    p = tmp_path / "w.tqkv"
    cache.save(p)
    again = tq.CompressedKVCache.load(p)
    assert len(again) == 30 and again.memory_bytes() == cache.memory_bytes()
    assert cache.compression_ratio() == pytest.approx(cache.fp16_bytes() / cache.memory_bytes())
    assert cache.fp16_bytes() == 30 * 2 * 2 * 64 * 2
