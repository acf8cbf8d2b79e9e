"""fp16 attention sinks and temporal decay of the KV cache."""
import numpy as np
import pytest

import turboquant as tq
from turboquant import _core
from reference import attention_over_decoded

D, NQ, NKV = 32, 4, 2




def make(d=D, **kw):
    args = dict(n_layers=1, n_q_heads=NQ, n_kv_heads=NKV, key_bits=3, value_bits=3, block_tokens=8, seed=5)
    args.update(kw)
    return _core.KVCache(d, **args)


def chunk(rng, T, d=D):
    return (rng.standard_normal((NKV, T, d)).astype(np.float32),
            rng.standard_normal((NKV, T, d)).astype(np.float32))


def expected_memory(kv, empty, bits=3):
    """memory_bytes() from the layout (decayed blocks at decay_bits, fp16 norms, sinks, window)."""
    d, bt = kv.head_dim, kv.block_tokens
    packed = lambda b: (d * b + 7) // 8  # noqa: E731
    total = empty
    blocks = -(-kv.code_tokens(0) // bt)
    for h in range(kv.n_kv_heads):
        for role in ("key", "value"):
            dec = kv.decayed_blocks(0, h, role)
            total += bt * (dec * packed(kv.decay_bits or bits) + (blocks - dec) * packed(bits)) + blocks * bt * 2
            if kv.sink_tokens(0):
                total += kv.fp16_sinks * d * 2
            if kv.size(0) > kv.fp16_sinks and (kv.fp16_window or kv.fp16_sinks):
                total += (kv.fp16_window + bt) * d * 2
    return total


@pytest.fixture
def rng():
    return np.random.default_rng(23)


def test_mlx_lm_configuration_one_token_at_a_time_and_prefill(rng):
    """fp16_window=64, block_tokens=32, fp16_sinks=4: decode appends and a large prefill agree."""
    cfg = dict(fp16_window=64, block_tokens=32, fp16_sinks=4, decay_after=96, decay_bits=2)
    step, pre = make(d=64, **cfg), make(d=64, **cfg)
    empty = make(d=64, **cfg).memory_bytes()
    k, v = chunk(rng, 400, d=64)
    for t in range(400):
        step.append(np.ascontiguousarray(k[:, t:t + 1]), np.ascontiguousarray(v[:, t:t + 1]))
        if t in (0, 3, 4, 5, 100, 131, 200, 399):
            assert step.sink_tokens(0) == min(t + 1, 4)
            assert step.memory_bytes() == expected_memory(step, empty)
            w = step.window_tokens(0)
            assert w == t + 1 - step.coded_tokens(0) and (t < 4 or 0 < w <= 64 + 32 or t < 64)
    pre.append(k, v)
    assert pre.to_bytes() == step.to_bytes()
    assert step.code_tokens(0) == step.coded_tokens(0) - 4 and step.code_tokens(0) % 32 == 0
    # Code block b holds tokens [4 + 32b, 4 + 32b + 32): decayed once 96 newer tokens follow it.
    want = sum(1 for b in range(step.code_tokens(0) // 32) if 399 - (4 + 32 * b + 31) >= 96)
    assert step.decayed_blocks(0, 1, "value") == want > 0
    # The sinks are the fp16 inputs, unchanged forever.
    np.testing.assert_array_equal(step.decode(0, 1, "key", 0, 4), k[1, :4].astype(np.float16).astype(np.float32))
    for T_q in (1, 3, 40):
        q = rng.standard_normal((NQ, T_q, 64)).astype(np.float32)
        np.testing.assert_allclose(step.attend(q), attention_over_decoded(step, q), atol=2e-4)


def test_decayed_block_count_follows_the_rule(rng):
    kv = make(decay_after=20, decay_bits=2)
    empty = make(decay_after=20, decay_bits=2).memory_bytes()
    n = 0
    for T in (1, 7, 30, 1, 1, 50, 3):
        kv.append(*chunk(rng, T))
        n += T
        # Block b (tokens [8b, 8b+8)) decays once n - 1 - (8b + 7) >= 20.
        want = sum(1 for b in range(n // 8) if n - 1 - (8 * b + 7) >= 20)
        assert kv.decayed_blocks(0, 0, "key") == want == kv.decayed_blocks(0, 1, "value")
        assert kv.memory_bytes() == expected_memory(kv, empty)


@pytest.mark.parametrize("cfg", [
    dict(decay_after=16, decay_bits=2),
    dict(fp16_sinks=3, fp16_window=10),
    dict(fp16_sinks=3, fp16_window=10, decay_after=12, decay_bits=1),
    dict(fp16_sinks=2, decay_after=9, decay_bits=2),  # window 0: at most block_tokens fp16 rows
])
@pytest.mark.parametrize("T_q,causal,window", [(1, True, None), (2, True, 17), (12, True, None),
                                               (12, False, 30), (1, False, None)])
def test_attention_matches_reference(rng, cfg, T_q, causal, window):
    kv = make(**cfg)
    for T in (2, 1, 37, 1, 40, 1):
        kv.append(*chunk(rng, T))
    q = rng.standard_normal((NQ, T_q, D)).astype(np.float32)
    got = kv.attend(q, causal=causal, window=window)
    np.testing.assert_allclose(got, attention_over_decoded(kv, q, causal=causal, window=window), atol=2e-4)


def test_sparse_v_with_sinks_and_decay_is_exact_at_zero_and_bounded(rng):
    kv = make(fp16_sinks=4, fp16_window=10, decay_after=12, decay_bits=2)
    kv.append(*chunk(rng, 90))
    q = 3 * rng.standard_normal((NQ, 1, D)).astype(np.float32)
    dense = kv.attend(q)
    np.testing.assert_array_equal(kv.attend(q, sparse_v=0.0), dense)
    sparse = kv.attend(q, sparse_v=0.01)
    np.testing.assert_allclose(sparse, dense, atol=0.1)


def test_lut_requantization_distortion_is_close_to_direct_encoding(rng):
    d, n = 128, 512
    x = rng.standard_normal((1, n, d)).astype(np.float32)

    def rel_mse(kv):
        kv.append(x, x)
        y = kv.decode(0, 0, "key")[: n - 8]
        return float(np.sum((y - x[0, : n - 8]) ** 2) / np.sum(x[0, : n - 8] ** 2))

    kw = dict(n_layers=1, n_q_heads=1, n_kv_heads=1, block_tokens=8, seed=1)
    lut = _core.KVCache(d, key_bits=3, value_bits=3, decay_after=8, decay_bits=2, **kw)
    direct = rel_mse(_core.KVCache(d, key_bits=2, value_bits=2, **kw))
    three = rel_mse(_core.KVCache(d, key_bits=3, value_bits=3, **kw))
    via_lut = rel_mse(lut)
    assert lut.decayed_blocks(0, 0, "key") == n // 8 - 1
    print(f"relative MSE: 3-bit {three:.4f}, 2-bit direct {direct:.4f}, 3->2 LUT {via_lut:.4f}")
    assert three < direct <= via_lut < 1.1 * direct


def test_trim_across_every_boundary(rng):
    cfg = dict(fp16_sinks=3, fp16_window=6, decay_after=10, decay_bits=2)
    kv = make(**cfg)
    empty = make(**cfg).memory_bytes()
    kv.append(*chunk(rng, 75))
    full = [kv.decode(0, h, r) for h in range(NKV) for r in ("key", "value")]
    for cut in (1, 4, 2, 7, 9, 16, 8, 20, 5, 2, 1):
        kv.trim(cut)
        n = kv.size(0)
        assert kv.sink_tokens(0) == min(n, 3)
        got = [kv.decode(0, h, r) for h in range(NKV) for r in ("key", "value")]
        for a, b in zip(got, full):
            np.testing.assert_array_equal(a, b[:n])
        assert kv.memory_bytes() == expected_memory(kv, empty)
        if n:
            q = rng.standard_normal((NQ, min(n, 2), D)).astype(np.float32)
            np.testing.assert_allclose(kv.attend(q), attention_over_decoded(kv, q), atol=2e-4)
    assert kv.size(0) == 0 and kv.memory_bytes() == empty
    kv.append(*chunk(rng, 50))
    q = rng.standard_normal((NQ, 1, D)).astype(np.float32)
    np.testing.assert_allclose(kv.attend(q), attention_over_decoded(kv, q), atol=2e-4)
    assert kv.memory_bytes() == expected_memory(kv, empty)


def test_fp16_layers_hold_no_sinks(rng):
    kv = make(n_layers=2, fp16_sinks=4, fp16_layers=[1], fp16_window=8)
    for layer in (0, 1):
        kv.append(*chunk(rng, 30), layer=layer)
    assert kv.sink_tokens(0) == 4 and kv.sink_tokens(1) == 0 and kv.window_tokens(1) == 30
    q = rng.standard_normal((NQ, 1, D)).astype(np.float32)
    for layer in (0, 1):
        np.testing.assert_allclose(kv.attend(q, layer=layer), attention_over_decoded(kv, q, layer), atol=2e-4)


def test_save_load_roundtrip_and_corruption(rng, tmp_path):
    kv = make(n_layers=2, fp16_sinks=3, fp16_window=5, decay_after=9, decay_bits=2)
    for layer, T in ((0, 61), (1, 2)):
        kv.append(*chunk(rng, T), layer=layer)
    path = str(tmp_path / "d.tqkv")
    kv.save(path)
    back = _core.KVCache.load(path)
    assert (back.fp16_sinks, back.decay_after, back.decay_bits) == (3, 9, 2)
    assert back.to_bytes() == kv.to_bytes() and back.memory_bytes() == kv.memory_bytes()
    for layer in (0, 1):
        assert back.sink_tokens(layer) == kv.sink_tokens(layer)
        assert back.decayed_blocks(layer, 1, "key") == kv.decayed_blocks(layer, 1, "key")
    q = rng.standard_normal((NQ, 3, D)).astype(np.float32)
    np.testing.assert_array_equal(back.attend(q), kv.attend(q))
    raw = bytearray(kv.to_bytes(legacy=True))
    assert raw[8] == 3
    for name in (b"SINK", b"LAYR"):
        at = raw.find(name)
        for pos in (at + 1, at + 5, at + 13, at + 23, at + 40):  # tag, length, count, flags/rows
            bad = bytearray(raw)
            bad[pos] ^= 0x40
            with pytest.raises(tq.FormatError):
                _core.KVCache.from_bytes(bytes(bad))
        with pytest.raises(tq.FormatError):
            _core.KVCache.from_bytes(bytes(raw[:at + 20]))
    # Loaded caches keep growing the same way.
    more = chunk(rng, 20)
    kv.append(*more)
    back.append(*more)
    assert back.to_bytes() == kv.to_bytes()
    # Without the new options the old versions are written (legacy saves).
    assert make().to_bytes(legacy=True)[8] == 1
    assert make(fp16_window=4).to_bytes(legacy=True)[8] == 2


def test_bad_arguments_raise_clear_errors(rng):
    with pytest.raises(ValueError, match="decay_bits must be in"):
        make(decay_after=8, decay_bits=3)
    with pytest.raises(ValueError, match="decay_bits must be in"):
        make(decay_after=8, decay_bits=0)
    with pytest.raises(ValueError, match="decay_after is 0"):
        make(decay_bits=2)
    with pytest.raises(ValueError, match="decay_bits must be in"):
        make(decay_after=8, decay_bits=3, key_bits=4)
    with pytest.raises(RuntimeError, match="turboquant_mse"):
        make(decay_after=8, decay_bits=2, key_method="turboquant_prod")
    with pytest.raises(ValueError, match="decay_bits must be in .*outlier split"):
        make(decay_after=8, decay_bits=2, key_bits=1, n_outlier_channels=16, outlier_bits=3,
             outlier_roles="keys")  # keys 2 bits per coordinate: nothing to decay to at 2
    with pytest.raises(ValueError, match="fp16_sinks"):
        make(fp16_sinks=9, max_tokens=8)
    with pytest.raises(TypeError):
        make(fp16_sinks=-1)
    # A failing append leaves the cache unchanged.
    kv = make(fp16_sinks=4, decay_after=8, decay_bits=2)
    kv.append(*chunk(rng, 2))
    before = kv.to_bytes()
    k, v = chunk(rng, 5)
    k[1, 3, 0] = np.inf
    with pytest.raises(ValueError):
        kv.append(k, v)
    assert kv.to_bytes() == before and kv.size(0) == 2


def test_builder(rng):
    cache = (tq.KVCacheBuilder().with_head_dim(D).with_layers(1).with_heads(NQ, NKV).with_bit_width(3)
             .with_block_tokens(8).with_fp16_window(6).with_fp16_sinks(2).with_decay(10, 2).build())
    core = cache.core
    assert (core.fp16_sinks, core.decay_after, core.decay_bits, core.fp16_window) == (2, 10, 2, 6)
    with pytest.raises(ValueError, match="decay_bits"):
        tq.KVCacheBuilder().with_head_dim(D).with_bit_width(3).with_decay(10, 3).build()
    with pytest.raises(ValueError, match="fp16_sinks"):
        tq.KVCacheBuilder().with_head_dim(D).with_fp16_sinks(-2).build()


def test_thread_safety_rules_unchanged(rng):
    import threading

    kv = make(fp16_sinks=4, fp16_window=16, decay_after=24, decay_bits=2)
    kv.append(*chunk(rng, 200))
    qs = [rng.standard_normal((NQ, 2, D)).astype(np.float32) for _ in range(4)]
    expected = [kv.attend(q) for q in qs]
    dec = kv.decode(0, 1, "value")
    errors = []

    def reader(t):
        try:
            for rep in range(30):
                np.testing.assert_array_equal(kv.attend(qs[(t + rep) % 4]), expected[(t + rep) % 4])
                np.testing.assert_array_equal(kv.decode(0, 1, "value"), dec)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # A mutator overlapping readers is refused (ConcurrentAccess -> RuntimeError), never a race.
    big = chunk(rng, 20000)
    conflicts = []
    done = threading.Event()

    def writer():
        try:
            kv.append(*big)
        except RuntimeError as e:
            conflicts.append(str(e))
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        try:
            kv.decode(0, 0, "key", 0, 4)
        except RuntimeError as e:
            conflicts.append(str(e))
    t.join()
    assert all("called while another thread is" in m for m in conflicts)
    assert _core.KVCache.from_bytes(kv.to_bytes()).to_bytes() == kv.to_bytes()


def test_decay_without_window_trim_into_a_decayed_block_then_append(rng):
    kv = make(decay_after=8, decay_bits=2)
    empty = make(decay_after=8, decay_bits=2).memory_bytes()
    k, v = chunk(rng, 60)
    kv.append(k, v)
    assert kv.decayed_blocks(0, 0, "key") == 6  # blocks b with 59 - (8b + 7) >= 8
    prefix = kv.decode(0, 1, "key")[:37]
    kv.trim(23)  # 37 tokens: block 4 = tokens [32, 37) is a partial decayed block
    assert kv.decayed_blocks(0, 0, "key") == 5 and kv.memory_bytes() == expected_memory(kv, empty)
    k2, v2 = chunk(rng, 10)
    kv.append(k2, v2)  # tokens 37..39 land in the decayed block: encoded at 2 bits directly
    np.testing.assert_array_equal(kv.decode(0, 1, "key")[:37], prefix)
    got = kv.decode(0, 1, "key", 37, 3)
    err = np.sum((got - k2[1, :3]) ** 2) / np.sum(k2[1, :3] ** 2)
    assert 0.05 < err < 0.25  # 2-bit error (3-bit would be ~0.03)
    assert kv.memory_bytes() == expected_memory(kv, empty)
    for T_q in (1, 20):
        q = rng.standard_normal((NQ, T_q, D)).astype(np.float32)
        np.testing.assert_allclose(kv.attend(q), attention_over_decoded(kv, q), atol=2e-4)


def test_info_cli_shows_sinks_and_decay(rng, tmp_path, capsys):
    from turboquant.__main__ import main

    kv = make(fp16_sinks=4, decay_after=8, decay_bits=2)
    kv.append(*chunk(rng, 40))
    path = str(tmp_path / "i.tqkv")
    kv.save(path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "format version 8" in out and "fp16 sinks:      4 tokens" in out
    want = sum(kv.decayed_blocks(0, h, r) for h in range(NKV) for r in ("key", "value"))
    assert f"to 2 bits after 8 tokens; {want} blocks decayed" in out and want > 0
    # effective bits: the stored average (decayed blocks at 2 bits, fp16 sinks) and the fresh figure
    import re

    m = re.search(r"effective bits:\s+([\d.]+) per coordinate over the stored tokens .*; ([\d.]+) per "
                  r"freshly coded token", out)
    stored = 8 * kv.token_bytes(0) / kv.size(0) / (2 * NKV * D)
    assert m and float(m.group(1)) == pytest.approx(stored, abs=1e-3) and float(m.group(2)) == 3.5


@pytest.mark.parametrize("cfg", [
    dict(fp16_sinks=4, fp16_window=16, max_coded_tokens=32),
    dict(fp16_sinks=4, fp16_window=16, max_coded_tokens=40, decay_after=12, decay_bits=2),
    dict(max_coded_tokens=16, decay_after=8, decay_bits=1),  # no window, no sinks
])
def test_eviction_keeps_sinks_and_recent_tokens(rng, cfg):
    kv, full = make(**cfg), make(**{k: v for k, v in cfg.items() if k != "max_coded_tokens"})
    empty = make(**cfg).memory_bytes()
    S, total = cfg.get("fp16_sinks", 0), 0
    for T in (3, 1, 1, 30, 1, 1, 1, 50, 7, 1, 60, 1):
        k, v = chunk(rng, T)
        kv.append(k, v)
        full.append(k, v)
        total += T
        e = kv.evicted_tokens(0)
        assert e % 8 == 0 and kv.size(0) == total - e and kv.code_tokens(0) <= cfg["max_coded_tokens"]
        for h in range(NKV):
            for role in ("key", "value"):
                ref = full.decode(0, h, role)
                np.testing.assert_array_equal(kv.decode(0, h, role), np.concatenate([ref[:S], ref[S + e:]]))
        assert kv.memory_bytes() == expected_memory(kv, empty)
    assert kv.evicted_tokens(0) > 0
    for T_q in (1, 12):
        q = rng.standard_normal((NQ, T_q, D)).astype(np.float32)
        np.testing.assert_allclose(kv.attend(q), attention_over_decoded(kv, q), atol=2e-4)
    back = _core.KVCache.from_bytes(kv.to_bytes())
    assert back.evicted_tokens(0) == kv.evicted_tokens(0) and back.max_coded_tokens == cfg["max_coded_tokens"]
    assert back.to_bytes() == kv.to_bytes()
    kv.trim(kv.size(0))
    assert kv.evicted_tokens(0) == 0 and kv.memory_bytes() == empty


def test_eviction_arguments(rng):
    with pytest.raises(ValueError, match="max_coded_tokens"):
        make(max_coded_tokens=4)  # below block_tokens = 8
    cache = (tq.KVCacheBuilder().with_head_dim(D).with_block_tokens(8).with_fp16_sinks(4)
             .with_eviction(64).build())
    assert cache.core.max_coded_tokens == 64
    with pytest.raises(ValueError, match="max_coded_tokens"):
        tq.KVCacheBuilder().with_head_dim(D).with_block_tokens(8).with_eviction(3).build()


# Outlier-split keys (the mlx-lm "key split"): half the channels at 4 bits, half at 2 (3 bits
# per coordinate); decay to 2 drops both parts by one bit (3 + 1), the angle is copied.
SPLIT = dict(key_bits=2, outlier_bits=4, n_outlier_channels=D // 2, outlier_roles="keys")


def test_split_decay_distortion_is_close_to_a_direct_lower_bit_encode(rng):
    d, n = 128, 512
    x = rng.standard_normal((1, n, d)).astype(np.float32)
    x[..., :16] *= 4  # energy in the outlier channels, as RoPE'd keys have

    def rel_mse(kv):
        kv.append(x, x)
        y = kv.decode(0, 0, "key")[: n - 8]
        return float(np.sum((y - x[0, : n - 8]) ** 2) / np.sum(x[0, : n - 8] ** 2))

    kw = dict(n_layers=1, n_q_heads=1, n_kv_heads=1, block_tokens=8, seed=1, value_bits=3,
              n_outlier_channels=64, outlier_roles="keys")
    lut = _core.KVCache(d, key_bits=2, outlier_bits=4, decay_after=8, decay_bits=2, **kw)
    direct = rel_mse(_core.KVCache(d, key_bits=1, outlier_bits=3, **kw))  # the decayed widths
    three = rel_mse(_core.KVCache(d, key_bits=2, outlier_bits=4, **kw))
    via_lut = rel_mse(lut)
    assert lut.decayed_blocks(0, 0, "key") == n // 8 - 1
    print(f"relative MSE: split 4+2 {three:.4f}, split 3+1 direct {direct:.4f}, 4+2 -> 3+1 LUT {via_lut:.4f}")
    assert three < direct and 0.95 * direct < via_lut < 1.1 * direct


@pytest.mark.parametrize("extra", [dict(), dict(norm_correction=True),
                                   dict(fp16_sinks=3, fp16_window=10, norm_correction=True)])
def test_split_decay_attention_roundtrip_and_memory(rng, tmp_path, extra):
    cfg = dict(SPLIT, decay_after=12, decay_bits=2, **extra)
    kv, plain = make(**cfg), make(**dict(SPLIT, **extra))
    for T in (2, 1, 37, 1, 40, 1):
        k, v = chunk(rng, T)
        kv.append(k, v)
        plain.append(k, v)
    assert kv.decayed_blocks(0, 0, "key") > 0 and kv.decayed_blocks(0, 1, "value") > 0
    for T_q, causal in ((1, True), (12, True), (3, False)):
        q = rng.standard_normal((NQ, T_q, D)).astype(np.float32)
        np.testing.assert_allclose(kv.attend(q, causal=causal),
                                   attention_over_decoded(kv, q, causal=causal), atol=2e-4)
    # Norm correction keeps each decayed key (split) and value (plain) at the norm of its
    # undecayed decode.
    for role in ("value", "key"):
        a, b = kv.decode(0, 1, role), plain.decode(0, 1, role)
        ratio = np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        if extra.get("norm_correction"):
            np.testing.assert_allclose(ratio, 1.0, atol=2e-3)
        else:
            assert ratio.min() < 0.99
    # Token bytes: a decayed key row is 4 bytes shorter (16 channels 4+2 -> 3+1 bits, the
    # angle copied), a decayed value row too (32 channels 3 -> 2 bits).
    dk = 8 * sum(kv.decayed_blocks(0, h, "key") for h in range(NKV))
    dv = 8 * sum(kv.decayed_blocks(0, h, "value") for h in range(NKV))
    assert plain.token_bytes(0) - kv.token_bytes(0) == 4 * dk + 4 * dv
    assert kv.stored_bytes_per_token() == pytest.approx(kv.token_bytes(0) / kv.size(0))
    assert kv.bytes_per_token() == plain.bytes_per_token()  # fresh tokens: configured bits
    if not extra.get("fp16_window"):  # memory = state + stored tokens + the last page's slack
        assert kv.stored_bytes_per_token() < kv.bytes_per_token()
        slack = -kv.size(0) % 8
        assert kv.memory_bytes() == make(**cfg).memory_bytes() + kv.token_bytes(0) + slack * kv.bytes_per_token()
    path = str(tmp_path / "s.tqkv")
    kv.save(path)
    back = _core.KVCache.load(path)
    assert back.to_bytes() == kv.to_bytes() and back.memory_bytes() == kv.memory_bytes()
    np.testing.assert_array_equal(back.decode(0, 1, "key"), a)
    more = chunk(rng, 20)
    kv.append(*more)
    back.append(*more)
    assert back.to_bytes() == kv.to_bytes()
