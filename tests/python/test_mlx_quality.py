"""The quality features of turboquant.mlx_lm: norm correction, the key split over RoPE pairs,
the fp16 recent window in the mlx-lm cache, calibration profiles; and the core options they
rest on (norm_correction, outlier_roles) with their file format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from turboquant import FormatError, _core

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as mlx_cache  # noqa: E402
from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402


def softmax_attention(q, k, v, scale):
    """q (Hq, Tq, d), k/v (H, T, d); causal over the last Tq positions; GQA by head // g."""
    Hq, Tq, d = q.shape
    H, T, _ = k.shape
    g = Hq // H
    out = np.empty_like(q)
    for j in range(Hq):
        s = q[j] @ k[j // g].T * scale
        allowed = np.arange(T)[None, :] <= (T - Tq + np.arange(Tq))[:, None]
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[j] = (p / p.sum(-1, keepdims=True)) @ v[j // g]
    return out


def rope_like_keys(rng, H, T, d, loud_pairs, gain=8.0, base=1.0):
    """Keys whose energy sits in a few RoPE pairs (i, i + d/2), rotating with position."""
    k = base * rng.standard_normal((H, T, d)).astype(np.float32)
    pos = np.arange(T)[:, None]
    for h, pairs in enumerate(loud_pairs):
        for i in pairs:
            th = pos * (0.3 + 0.1 * i)
            k[h, :, i] += gain * np.cos(th[:, 0])
            k[h, :, i + d // 2] += gain * np.sin(th[:, 0])
    return k


def run_cache(c, k, v, q, scale):
    c.update_and_fetch(mx.array(k[None]), mx.array(v[None]))
    return np.array(c.attend(mx.array(q[None]), scale=scale))[0]


# --- core options -----------------------------------------------------------------------


def test_norm_correction_keeps_norms_and_roundtrips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 40, 64)).astype(np.float32) * 3
    kv = _core.KVCache(64, n_q_heads=2, n_kv_heads=2, key_bits=3, value_bits=2,
                       norm_correction=True)
    kv.append(x, x)
    plain = _core.KVCache(64, n_q_heads=2, n_kv_heads=2, key_bits=3, value_bits=2)
    plain.append(x, x)
    assert kv.norm_correction and not plain.norm_correction
    for role in ("key", "value"):
        got = np.linalg.norm(kv.decode(0, 1, role), axis=-1)
        np.testing.assert_allclose(got, np.linalg.norm(x[1], axis=-1), rtol=2e-3)
        shrunk = np.linalg.norm(plain.decode(0, 1, role), axis=-1)
        assert np.mean(shrunk / np.linalg.norm(x[1], axis=-1)) < 0.99  # Lloyd-Max shrinkage
    blob = kv.to_bytes()
    back = _core.KVCache.from_bytes(blob)
    assert back.norm_correction
    np.testing.assert_array_equal(back.decode(0, 0, "key"), kv.decode(0, 0, "key"))
    assert plain.to_bytes(legacy=True)[8:12] == (1).to_bytes(4, "little")  # old options: v1
    assert kv.to_bytes(legacy=True)[8:12] == (3).to_bytes(4, "little")


def test_outlier_roles_split_only_keys():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 30, 64)).astype(np.float32)
    split = dict(n_outlier_channels=16, outlier_bits=6, key_bits=2, value_bits=3)
    keys_only = _core.KVCache(64, outlier_roles="keys", **split)
    both = _core.KVCache(64, **split)
    none = _core.KVCache(64, key_bits=2, value_bits=3)
    for c in (keys_only, both, none):
        c.append(x, x)
    assert keys_only.outlier_roles == "keys" and both.outlier_roles == "both"
    np.testing.assert_array_equal(keys_only.decode(0, 0, "key"), both.decode(0, 0, "key"))
    np.testing.assert_array_equal(keys_only.decode(0, 0, "value"), none.decode(0, 0, "value"))
    assert not np.array_equal(both.decode(0, 0, "value"), none.decode(0, 0, "value"))
    back = _core.KVCache.from_bytes(keys_only.to_bytes())
    assert back.outlier_roles == "keys"
    np.testing.assert_array_equal(back.decode(0, 0, "value"), none.decode(0, 0, "value"))


def test_core_option_errors_and_corrupted_flags():
    with pytest.raises(ValueError, match="outlier_roles must be 'both', 'keys' or 'values'"):
        _core.KVCache(64, outlier_roles="queries")
    with pytest.raises(ValueError, match="norm_correction needs turboquant_mse"):
        _core.KVCache(64, key_method="qjl", norm_correction=True)
    kv = _core.KVCache(64, norm_correction=True, outlier_roles="keys", n_outlier_channels=8)
    kv.append(np.ones((1, 3, 64), np.float32), np.ones((1, 3, 64), np.float32))
    blob = bytearray(kv.to_bytes())
    # the two version-3 words are the last ones of the CONF section: find them by value
    i = blob.index(bytes([1, 0, 0, 0, 1, 0, 0, 0]))
    for bad in (2, 7):
        b = bytearray(blob)
        b[i:i + 4] = bad.to_bytes(4, "little")
        with pytest.raises(FormatError):
            _core.KVCache.from_bytes(bytes(b))


# --- the mlx-lm cache ------------------------------------------------------------------


def test_choose_channels_follows_rope_pairs():
    rng = np.random.default_rng(2)
    H, T, d = 2, 64, 32
    k = rope_like_keys(rng, H, T, d, [(1, 5), (6,)])
    c = tq_mlx.TurboQuantKVCache(key_bits=3)
    perm = c._choose_channels(k - k.mean(1, keepdims=True), None, d // 4)
    assert set(perm[0, :4]) == {1, 17, 5, 21}
    assert {6, 22} <= set(perm[1, :4])
    assert all(np.array_equal(np.sort(p), np.arange(d)) for p in perm)
    adj = tq_mlx.TurboQuantKVCache(key_bits=3, rope_pairs="adjacent")
    p2 = adj._choose_channels(k, None, 4)
    assert all(sorted(p2[h, :4]) in ([a, a + 1, b, b + 1] for a in range(0, d, 2)
                                     for b in range(a + 2, d, 2)) for h in range(H))


def _channel_order_by_definition(energy, pair, m):
    """Per head: pairs by falling summed energy (ties: lower pair first), each pair's
    channels in channel order, the first m of those, then the other channels in order."""
    perm = []
    for e in energy:
        per_pair = np.bincount(pair, weights=e)
        order = np.argsort(-per_pair, kind="stable")
        chosen = [c for p in order for c in np.flatnonzero(pair == p)][:m]
        perm.append(chosen + [c for c in range(len(pair)) if c not in set(chosen)])
    return np.array(perm)


@pytest.mark.parametrize("rope_pairs", ["half", "adjacent", None])
def test_choose_channels_is_the_definition_ties_included(rope_pairs, monkeypatch):
    rng = np.random.default_rng(7)
    c = tq_mlx.TurboQuantKVCache(key_bits=3, rope_pairs=rope_pairs)
    for trial in range(60):
        d = int(rng.choice([16, 32, 64, 128]))
        H, m = int(rng.integers(1, 5)), int(rng.integers(0, d + 1))
        energy = rng.random((H, d))
        if trial % 3 == 0:
            energy = np.round(energy * 2) / 2  # many equal pair energies
        if trial % 5 == 0:
            energy[:] = 1.0
        monkeypatch.setattr(tq_mlx.TurboQuantKVCache, "_mean_square",
                            staticmethod(lambda xs, heads, e=energy: [e] * len(xs)))
        pair = {"half": np.arange(d) % (d // 2), "adjacent": np.arange(d) // 2,
                None: np.arange(d)}[rope_pairs]
        perm = c._choose_channels(np.zeros((H, 1, d), np.float32), None, m)
        assert perm.dtype == np.int16
        np.testing.assert_array_equal(perm, _channel_order_by_definition(energy, pair, m))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_key_split_is_exact_reordering_and_helps_loud_pairs(bits):
    rng = np.random.default_rng(3)
    H, Hq, T, d = 2, 4, 200, 64
    k = rope_like_keys(rng, H, T, d, [(2, 9, 11), (4, 30, 7)], gain=4.0, base=0.3)
    v = rng.standard_normal((H, T, d)).astype(np.float32)
    q = rope_like_keys(rng, Hq, 1, d, [(2, 9), (2, 9), (4, 30), (4, 30)], gain=3.0) * 0.5
    q = np.ascontiguousarray(q)
    ref = softmax_attention(q, k, v, 0.125)
    err = {}
    for split in (False, True):
        c = tq_mlx.TurboQuantKVCache(key_bits=bits, value_bits=8, key_split=split, seed=5)
        out = run_cache(c, k, v, q, 0.125)
        err[split] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert (c._perm is not None) == split
        if split:
            assert c._core.outlier_roles == "keys" and c._core.key_bits == bits - 1
            assert c._core.outlier_bits == bits + 1
    assert err[True] < 0.85 * err[False], err
    # 8-bit keys are not split and stay near exact
    c8 = tq_mlx.TurboQuantKVCache(key_bits=8, value_bits=8)
    assert c8.split_plan(d) is None
    out8 = run_cache(c8, k, v, q, 0.125)
    assert np.linalg.norm(out8 - ref) / np.linalg.norm(ref) < 0.02


def test_fp16_window_tokens_are_exact():
    rng = np.random.default_rng(4)
    H, Hq, d = 1, 2, 32
    k = rng.standard_normal((H, 48, d)).astype(np.float32)
    v = rng.standard_normal((H, 48, d)).astype(np.float32)
    q = rng.standard_normal((Hq, 1, d)).astype(np.float32)
    c = tq_mlx.TurboQuantKVCache(key_bits=2, value_bits=2, fp16_window=64, block_tokens=16)
    out = run_cache(c, k, v, q, 0.2)
    np.testing.assert_allclose(out, softmax_attention(q, k, v, 0.2), atol=3e-3)
    assert c._core.coded_tokens(0) == 0
    # more tokens: the oldest are flushed into codes, at least 64 stay fp16
    k2 = rng.standard_normal((H, 100, d)).astype(np.float32)
    c.update_and_fetch(mx.array(k2[None]), mx.array(k2[None]))
    assert 64 <= c.offset - c._core.coded_tokens(0) <= 64 + 16


def test_prompt_cache_roundtrip_with_split_and_window(tmp_path):
    model = tiny_model("llama")
    tokens = np.random.default_rng(5).integers(0, 128, 60).tolist()
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     key_bits=3, value_bits=3, fp16_window=8,
                                     block_tokens=4, seed=3)
    model(mx.array(tokens[:50])[None], cache=cache)
    assert all(c._perm is not None and c._core.fp16_window == 8 for c in cache)
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert all(np.array_equal(a._perm, b._perm) for a, b in zip(cache, loaded))
    a = np.array(model(mx.array(tokens[50:55])[None], cache=cache))
    b = np.array(model(mx.array(tokens[50:55])[None], cache=loaded))
    np.testing.assert_array_equal(a, b)


def test_rope_layout_detection():
    model = tiny_model("llama")
    assert tq_mlx.rope_pairs_of(model) == "half"
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only")
    assert all(c.rope_pairs == "half" for c in cache)


def test_profile_sets_per_layer_bits(tmp_path):
    model = tiny_model("llama")  # 2 layers
    prof = {"format": "turboquant-profile", "version": 1,
            "layers": [{"key_bits": 4, "value_bits": 2}, {"fp16": True}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", profile=str(path))
    assert isinstance(cache[0], tq_mlx.TurboQuantKVCache)
    assert (cache[0].key_bits, cache[0].value_bits) == (4, 2)
    assert type(cache[1]) is mlx_cache.KVCache
    with pytest.raises(ValueError, match="profile has 1 layers, the model 2"):
        tq_mlx.make_prompt_cache(model, preset="codes-only",
                                 profile={**prof, "layers": prof["layers"][:1]})
    with pytest.raises(ValueError, match="not a turboquant profile"):
        tq_mlx.make_prompt_cache(model, preset="codes-only", profile={"layers": []})
    with pytest.raises(ValueError, match="key_bits must be an integer"):
        tq_mlx.make_prompt_cache(model, preset="codes-only",
                                 profile={**prof, "layers": [{"key_bits": 9,
                                                                     "value_bits": 2}] * 2})
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        tq_mlx.make_prompt_cache(model, preset="codes-only", profile=str(bad))


# --- calibration -------------------------------------------------------------------------


def test_allocate_spends_bits_where_errors_are():
    from turboquant.calibrate import KEY_CANDIDATES, VALUE_CANDIDATES, LayerErrors, allocate

    def table(cands, scale):
        return {b: scale * 4.0 ** -b for b in cands}

    errs = [LayerErrors(0, table(KEY_CANDIDATES, 100.0), table(VALUE_CANDIDATES, 1.0)),
            LayerErrors(1, table(KEY_CANDIDATES, 1.0), table(VALUE_CANDIDATES, 1.0)),
            LayerErrors(2, table(KEY_CANDIDATES, 1.0), table(VALUE_CANDIDATES, 30.0))]
    bits = allocate(errs, 3.0)
    assert sum(k + v for k, v in bits) == 2 * 3.0 * 3
    assert bits[0][0] > bits[1][0] and bits[2][1] > bits[1][1]
    assert allocate(errs, 2.0) == [(2, 2)] * 3
    with pytest.raises(ValueError, match="budget must be in"):
        allocate(errs, 1.5)


@pytest.mark.parametrize("metric", ["kl", "hybrid", "attention"])
def test_calibrate_tiny_model_profile_roundtrip(tmp_path, metric):
    from turboquant import calibrate

    model = tiny_model("llama")
    tokens = np.random.default_rng(6).integers(0, 128, 48).tolist()
    scoring = calibrate.Scoring(prefix=24, chunk=8, fp16_sinks=2, fp16_window=8)
    prof = calibrate.calibrate(model, tokens, 3.0, log=lambda *a: None, metric=metric,
                               scoring=scoring)
    assert prof["metric"] == metric and prof["allocation"] == "exact"
    bits = [(e["key_bits"], e["value_bits"]) for e in prof["layers"]]
    assert len(bits) == 2 and sum(k + v for k, v in bits) == 2 * 3 * 2
    top_k, top_v = (4, 4) if metric == "kl" else (6, 5)
    for e in prof["errors"].values():  # more bits, less error (measured, not assumed)
        assert e["key"][top_k] < e["key"][2] and e["value"][top_v] < e["value"][2]
    if metric == "kl":
        assert prof["scoring"] == {"prefix": 24, "chunk": 8, "fp16_sinks": 2, "fp16_window": 8}
        assert set(prof["errors"]["0"]["key"]) == {2, 3, 4}
    path = tmp_path / "p.json"
    calibrate.save(prof, str(path))
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", profile=str(path))
    assert [(c.key_bits, c.value_bits) for c in cache] == bits
    out = model(mx.array(tokens[:10])[None], cache=cache)
    assert np.isfinite(np.array(out)).all()
    # the saved errors allocate again for another budget without running the model
    again = calibrate.reallocate(str(path), 2.5)
    assert sum(e["key_bits"] + e["value_bits"] for e in again["layers"]) == 2 * 2.5 * 2
    assert calibrate.reallocate(str(path), 3.0)["layers"] == json.loads(path.read_text())["layers"]


def _brute_force(errs, limit):
    import itertools
    best = None
    for kb in itertools.product(*[sorted(e.key) for e in errs]):
        for vb in itertools.product(*[sorted(e.value) for e in errs]):
            if sum(kb) + sum(vb) != limit:
                continue
            total = sum(e.key[k] + e.value[v] for e, k, v in zip(errs, kb, vb))
            if best is None or total < best[0]:
                best = (total, list(zip(kb, vb)))
    return best


def test_allocate_exact_is_optimal_and_spends_the_budget():
    from turboquant.calibrate import LayerErrors, allocate

    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(1, 4))
        # noisy, not always convex or monotone tables: the greedy can miss, the DP cannot
        errs = [LayerErrors(i, {b: float(rng.exponential()) * 3.0 ** -b for b in (2, 3, 4)},
                            {b: float(rng.exponential()) * 2.0 ** -b for b in (2, 3, 4)})
                for i in range(n)]
        for budget in (2.0, 2.5, 3.0, 3.5, 4.0):
            bits = allocate(errs, budget)
            limit = int(round(2 * budget * n))
            assert sum(k + v for k, v in bits) == limit
            total = sum(e.key[k] + e.value[v] for e, (k, v) in zip(errs, bits))
            assert total == pytest.approx(_brute_force(errs, limit)[0])
            greedy = allocate(errs, budget, exact=False)
            assert sum(k + v for k, v in greedy) <= limit
            if sum(k + v for k, v in greedy) == limit:  # same spend: never worse than greedy
                assert total <= sum(e.key[k] + e.value[v]
                                    for e, (k, v) in zip(errs, greedy)) + 1e-12


def test_allocate_and_calibrate_options_are_checked():
    from turboquant import calibrate
    from turboquant.calibrate import LayerErrors, allocate

    errs = [LayerErrors(0, {2: 1.0, 3: 0.5}, {2: 1.0, 3: 0.5}),
            LayerErrors(1, {2: 1.0, 4: 0.5}, {2: 1.0, 3: 0.5})]
    with pytest.raises(ValueError, match="measured widths differ"):
        allocate(errs, 2.5)
    with pytest.raises(ValueError, match="budget must be in"):
        allocate(errs[:1], 3.5)
    with pytest.raises(ValueError, match="no layers"):
        allocate([], 3.0)
    model = tiny_model("llama")
    tokens = list(range(40))
    with pytest.raises(ValueError, match="key candidates must be distinct integers"):
        calibrate.calibrate(model, tokens, 3.0, key_candidates=(2, 2, 4))
    with pytest.raises(ValueError, match="value candidates must be distinct integers"):
        calibrate.calibrate(model, tokens, 3.0, value_candidates=(0, 3))
    with pytest.raises(ValueError, match="prefix .* must leave tokens to score"):
        calibrate.calibrate(model, tokens, 3.0, scoring=calibrate.Scoring(prefix=39))
    with pytest.raises(ValueError, match="fp16_window must be an integer >= 0"):
        calibrate.calibrate(model, tokens, 3.0,
                            scoring=calibrate.Scoring(prefix=20, fp16_window=-1))
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        calibrate.calibrate(model, tokens, 3.0, scoring=calibrate.Scoring(prefix=20, chunk=0))
    with pytest.raises(ValueError, match="no measured"):
        calibrate.reallocate({"format": tq_mlx.PROFILE_FORMAT, "layers": [{"fp16": True}]}, 3.0)


@pytest.mark.parametrize("metric", ["kl", "hybrid"])
def test_calibrate_gives_a_sensitive_layer_more_bits(metric):
    """Layer 1's keys made loud (k_proj scaled up: sharp attention, key errors amplified)
    draw key bits away from layer 0."""
    from turboquant import calibrate

    tokens = np.random.default_rng(1).integers(0, 128, 48).tolist()
    scoring = calibrate.Scoring(prefix=24, chunk=8)
    kbits = {}
    for loud in (0, 1):
        model = tiny_model("llama")
        attn = model.layers[loud].self_attn
        attn.k_proj.weight = attn.k_proj.weight * 6.0
        prof = calibrate.calibrate(model, tokens, 3.0, log=lambda *a: None, scoring=scoring,
                                   metric=metric)
        kbits[loud] = [e["key_bits"] for e in prof["layers"]]
    assert kbits[0][0] > kbits[0][1] and kbits[1][1] > kbits[1][0]


# --- the Metal path of the mlx-lm cache (simulated Mac, reference kernels) ----------------


def test_mlx_cache_takes_the_metal_path_where_it_fits(monkeypatch, tmp_path):
    import turboquant.mlx_metal as mm
    from turboquant import gpu_path

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", mm.ReferenceKernels())
    model = tiny_model("llama")
    tokens = np.random.default_rng(7).integers(0, 128, 30).tolist()
    plain = dict(key_bits=3, value_bits=3, key_split=False, debias=False, seed=2)
    gpu = tq_mlx.make_prompt_cache(model, preset="codes-only", **plain)
    a = np.array(model(mx.array(tokens[:24])[None], cache=gpu))
    assert all(c._gpu and isinstance(c._core, mm.MetalCodeStore) for c in gpu)
    # the key split (on by default) is CPU-only: the default configuration stays on the core
    default = tq_mlx.make_prompt_cache(model, preset="codes-only")
    model(mx.array(tokens[:24])[None], cache=default)
    assert not any(c._gpu for c in default)
    # same codes and seeds as the CPU core: same logits
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu = tq_mlx.make_prompt_cache(model, preset="codes-only", **plain)
    b = np.array(model(mx.array(tokens[:24])[None], cache=cpu))
    assert not any(c._gpu for c in cpu)
    np.testing.assert_allclose(a, b, atol=2e-4)
    # a prompt cache saved on the Metal path loads on the CPU path
    path = str(tmp_path / "g.safetensors")
    mlx_cache.save_prompt_cache(path, gpu)
    loaded = mlx_cache.load_prompt_cache(path)
    x = np.array(model(mx.array(tokens[24:27])[None], cache=loaded))
    y = np.array(model(mx.array(tokens[24:27])[None], cache=cpu))
    np.testing.assert_allclose(x, y, atol=2e-4)


def test_fp16_sinks_in_the_mlx_cache(tmp_path):
    rng = np.random.default_rng(8)
    H, Hq, d = 1, 2, 32
    k = rng.standard_normal((H, 40, d)).astype(np.float32)
    v = rng.standard_normal((H, 40, d)).astype(np.float32)
    k[:, 0] *= 6.0  # a loud first token, as attention sinks are
    q = np.ascontiguousarray(k[:, :1].repeat(Hq, 0) * 0.5)
    ref = softmax_attention(q, k, v, 0.25)
    errs = {}
    for sinks in (0, 4):
        c = tq_mlx.TurboQuantKVCache(key_bits=2, value_bits=2, fp16_sinks=sinks, seed=1)
        out = run_cache(c, k, v, q, 0.25)
        errs[sinks] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert c._core.fp16_sinks == sinks
    assert errs[4] < 0.5 * errs[0], errs
    model = tiny_model("llama")
    tokens = np.random.default_rng(9).integers(0, 128, 30).tolist()
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     fp16_sinks=2, fp16_window=4, block_tokens=4)
    model(mx.array(tokens[:25])[None], cache=cache)
    path = str(tmp_path / "s.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert all(c.fp16_sinks == 2 and c._core.fp16_sinks == 2 for c in loaded)
    a = np.array(model(mx.array(tokens[25:28])[None], cache=cache))
    b = np.array(model(mx.array(tokens[25:28])[None], cache=loaded))
    np.testing.assert_array_equal(a, b)
