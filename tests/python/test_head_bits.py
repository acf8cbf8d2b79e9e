"""Per-KV-head bit widths: the core's key_head_bits / value_head_bits / outlier_head_bits,
per-head profiles in the mlx-lm cache, and per-head calibration (--granularity head)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reference import crc32c
from turboquant import FormatError, _core

D, H, G = 32, 3, 2
KB, VB = [2, 4, 3], [3, 2, 4]


def gaussian(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def mixed(**kw):
    return _core.KVCache(D, n_q_heads=H * G, n_kv_heads=H, key_head_bits=KB, value_head_bits=VB,
                         block_tokens=8, seed=4, **kw)


# --- the core -------------------------------------------------------------------------------


def test_binding_config_memory_and_per_head_rows():
    kv = mixed()
    assert kv.key_head_bits == KB and kv.value_head_bits == VB and kv.outlier_head_bits == []
    assert kv.legacy_format_version == 5
    assert _core.KVCache(D, n_q_heads=H * G, n_kv_heads=H).legacy_format_version == 1
    k, v = gaussian((H, 20, D), 1), gaussian((H, 20, D), 2)
    kv.append(k, v)
    rows = sum(D * b // 8 + 2 for b in KB + VB)  # codes + fp16 norm, per head and role
    assert kv.token_bytes(0) == 20 * rows
    assert kv.stored_bytes_per_token() == pytest.approx(rows)
    assert kv.bytes_per_token() == rows
    for h in range(H):
        codes, norms = kv.encoded(0, h, "key")
        assert codes.shape == (20, D * KB[h] // 8) and norms.shape == (20,)
        assert kv.encoded(0, h, "value")[0].shape == (20, D * VB[h] // 8)


def test_attention_of_each_head_is_that_of_a_uniform_cache():
    kv = mixed()
    k, v = gaussian((H, 30, D), 3), gaussian((H, 30, D), 4)
    q = gaussian((H * G, 5, D), 5)
    kv.append(k, v)
    out = kv.attend(q)
    for h in range(H):
        uni = _core.KVCache(D, n_q_heads=H * G, n_kv_heads=H, key_bits=KB[h], value_bits=VB[h],
                            block_tokens=8, seed=4)
        uni.append(k, v)
        np.testing.assert_array_equal(out[h * G:(h + 1) * G], uni.attend(q)[h * G:(h + 1) * G])


def test_bad_per_head_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"key_head_bits must be empty, have one entry per KV "
                                         r"head \(n_kv_heads = 3\) or one per layer and KV head "
                                         r"\(n_layers \* n_kv_heads = 6\), got 2 entries"):
        _core.KVCache(D, n_layers=2, n_q_heads=6, n_kv_heads=3, key_head_bits=[2, 3])
    with pytest.raises(ValueError, match=r"value_head_bits\[2\] must be in \[1, 8\], got 9"):
        _core.KVCache(D, n_q_heads=6, n_kv_heads=3, value_head_bits=[2, 3, 9])
    with pytest.raises(ValueError, match="outlier_head_bits needs an outlier split"):
        _core.KVCache(D, n_q_heads=6, n_kv_heads=3, outlier_head_bits=[3, 3, 3])
    with pytest.raises(ValueError, match=r"decay_bits must be in \[1, 1\]"):
        mixed(decay_after=16, decay_bits=2)
    # one (n_kv_heads, n, code_bytes) array per role cannot hold rows of different sizes
    kv, other = mixed(), mixed()
    kv.append(gaussian((H, 4, D), 6), gaussian((H, 4, D), 7))
    kc = np.zeros((H, 4, D * 2 // 8), np.uint8)
    with pytest.raises(ValueError, match="different row sizes"):
        other.append_encoded(kc, np.zeros((H, 4), np.float16), kc, np.zeros((H, 4), np.float16))
    assert other.size(0) == 0


def test_file_round_trip_and_corrupted_per_head_fields():
    kv = mixed(fp16_sinks=2, fp16_window=4, decay_after=8, decay_bits=1)
    kv.append(gaussian((H, 37, D), 8), gaussian((H, 37, D), 9))
    blob = kv.to_bytes(legacy=True)  # version 5, the layout the offsets below assume
    assert blob[8] == 5
    back = _core.KVCache.from_bytes(blob)
    assert back.to_bytes(legacy=True) == blob
    assert _core.KVCache.from_bytes(kv.to_bytes()).to_bytes(legacy=True) == blob
    assert back.key_head_bits == KB and back.value_head_bits == VB
    q = gaussian((H * G, 1, D), 10)
    np.testing.assert_array_equal(back.attend(q), kv.attend(q))
    # a well-formed file whose per-head width is out of range: FormatError naming it
    b = bytearray(mixed().to_bytes(legacy=True))
    conf_len = int.from_bytes(b[20:28], "little")
    end = 28 + conf_len  # CONF payload end: ... | keys u32 3 + 3 i32 | values u32 3 + 3 i32 | u32 0
    values_at = end - 4 - 16
    assert int.from_bytes(b[values_at:values_at + 4], "little") == 3
    b[values_at + 4:values_at + 8] = (0).to_bytes(4, "little")
    b[end:end + 4] = crc32c(bytes(b[16:end])).to_bytes(4, "little")  # well-formed otherwise
    with pytest.raises(FormatError, match=r"value_head_bits\[0\] must be in \[1, 8\], got 0"):
        _core.KVCache.from_bytes(bytes(b))
    b[values_at + 4:values_at + 8] = (3).to_bytes(4, "little")
    b[end:end + 4] = crc32c(bytes(b[16:end])).to_bytes(4, "little")
    assert bytes(b) == mixed().to_bytes(legacy=True)  # the helper above is right


def test_per_layer_head_widths_of_a_multi_layer_cache(tmp_path):
    """n_layers × n_kv_heads widths (layer-major): layer l's heads are those of a cache with
    layer l's list; the file is version 6 and loads back identically."""
    per_layer = KB + [4, 3, 2]
    kv = _core.KVCache(D, n_layers=2, n_q_heads=H * G, n_kv_heads=H, key_head_bits=per_layer,
                       value_head_bits=VB, block_tokens=8, seed=4)
    assert kv.legacy_format_version == 6 and kv.key_head_bits == per_layer
    k, v = gaussian((H, 19, D), 11), gaussian((H, 19, D), 12)
    q = gaussian((H * G, 3, D), 13)
    for layer in (0, 1):
        kv.append(k, v, layer=layer)
        one = _core.KVCache(D, n_layers=2, n_q_heads=H * G, n_kv_heads=H,
                            key_head_bits=per_layer[layer * H:(layer + 1) * H],
                            value_head_bits=VB, block_tokens=8, seed=4)
        one.append(k, v, layer=layer)
        np.testing.assert_array_equal(kv.attend(q, layer=layer), one.attend(q, layer=layer))
        for h in range(H):
            assert kv.encoded(layer, h, "key")[0].shape[1] == D * per_layer[layer * H + h] // 8
    path = tmp_path / "c.tqkv"
    kv.save(str(path))
    back = _core.KVCache.load(str(path))
    assert back.key_head_bits == per_layer and back.to_bytes() == kv.to_bytes()
    np.testing.assert_array_equal(back.attend(q, layer=1), kv.attend(q, layer=1))


# --- mlx-lm ---------------------------------------------------------------------------------

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as mlx_cache  # noqa: E402
from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402

TOKENS = np.random.default_rng(1).integers(0, 128, 40).tolist()


def logits(model, cache, tokens, chunks):
    outs, i = [], 0
    for c in chunks:
        outs.append(np.array(model(mx.array(tokens[i:i + c])[None], cache=cache)[0]
                             .astype(mx.float32)))
        i += c
    return np.concatenate(outs)


def profile(layers):
    return {"format": tq_mlx.PROFILE_FORMAT, "version": 1, "layers": layers}


def test_per_head_profile_builds_the_core_per_head():
    model = tiny_model("llama")  # 2 layers, 2 KV heads, head_dim 16
    prof = profile([{"key_bits": [2, 4], "value_bits": [3, 2]}, {"key_bits": 3, "value_bits": 3}])
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     profile=prof, fp16_sinks=2, fp16_window=8)
    assert cache[0].key_head_bits == (2, 4) and cache[0].value_head_bits == (3, 2)
    assert cache[1].key_head_bits is None
    logits(model, cache, TOKENS, [24, 1, 1])
    core = cache[0]._core
    # the key split of each head's own width: half the channels at +1, half at -1
    assert core.key_head_bits == [1, 3] and core.outlier_head_bits == [3, 5]
    assert core.value_head_bits == [3, 2]
    # the GPU store holds per-head widths too (test_mlx_metal_heads.py)
    assert tq_mlx.TurboQuantKVCache(key_split=False, value_head_bits=[2, 3]).gpu_refusal(16) \
        is None
    assert tq_mlx.TurboQuantKVCache(key_split=False).gpu_refusal(16) is None
    # equal per-head widths are exactly the per-layer cache
    same = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                    profile=profile([{"key_bits": [3, 3],
                                                             "value_bits": [2, 2]}] * 2))
    plain = tq_mlx.make_prompt_cache(model, preset="codes-only", key_bits=3, value_bits=2)
    np.testing.assert_array_equal(logits(model, same, TOKENS, [30, 1]),
                                  logits(model, plain, TOKENS, [30, 1]))
    # and different ones are not
    other = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     profile=profile([{"key_bits": [2, 4],
                                                              "value_bits": [2, 2]}] * 2))
    assert not np.array_equal(logits(model, other, TOKENS, [30, 1]),
                              logits(model, plain, TOKENS, [30, 1]))


def test_per_head_profile_errors():
    model = tiny_model("llama")
    for bad, text in (([2, 9], r"key_bits\[1\] must be an integer in \[1, 8\], got 9"),
                      ([], "non-empty list"), (["3", 3], r"key_bits\[0\] must be an integer")):
        with pytest.raises(ValueError, match=text):
            tq_mlx.make_prompt_cache(model, preset="codes-only", profile=profile([{"key_bits": bad,
                                                              "value_bits": 3}] * 2))
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     profile=profile([{"key_bits": [2, 3, 4],
                                                              "value_bits": 3}] * 2))
    with pytest.raises(ValueError, match="3 per-head bit widths for 2 KV heads"):
        logits(model, cache, TOKENS, [8])
    with pytest.raises(ValueError, match=r"decay_bits must be in \[1, 1\]"):
        tq_mlx.make_prompt_cache(model, preset="codes-only", profile=profile([{"key_bits": [2, 4],
                                                          "value_bits": 3}] * 2),
                                 decay_after=16, decay_bits=2)


def test_prompt_cache_file_keeps_per_head_bits(tmp_path):
    model = tiny_model("llama")
    prof = profile([{"key_bits": [2, 4], "value_bits": [4, 2]}, {"key_bits": [3, 5],
                                                                "value_bits": [2, 3]}])
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     profile=prof, fp16_sinks=2, fp16_window=8)
    logits(model, cache, TOKENS, [30])
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert [c.key_head_bits for c in loaded] == [(2, 4), (3, 5)]
    assert [c._core.value_head_bits for c in loaded] == [[4, 2], [2, 3]]
    np.testing.assert_array_equal(logits(model, cache, TOKENS[30:], [3, 1]),
                                  logits(model, loaded, TOKENS[30:], [3, 1]))


def test_batch_of_two_tiles_the_per_head_widths():
    model = tiny_model("llama")
    prof = profile([{"key_bits": [2, 4], "value_bits": [3, 2]}] * 2)
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", profile=prof)
    toks = mx.array([TOKENS[:12], TOKENS[12:24]])
    out = np.array(model(toks, cache=cache).astype(mx.float32))
    assert cache[0]._core.value_head_bits == [3, 2, 3, 2]
    # sequence 0's KV heads are streams 0..H-1, as in a batch of one
    single = tq_mlx.make_prompt_cache(model, preset="codes-only", profile=prof)
    one = np.array(model(toks[:1], cache=single).astype(mx.float32))
    np.testing.assert_allclose(out[0], one[0], rtol=1e-4, atol=1e-4)


# --- calibration ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["attention", "hybrid"])
def test_calibrate_per_head_profile(tmp_path, metric):
    from turboquant import calibrate

    model = tiny_model("llama")
    tokens = np.random.default_rng(6).integers(0, 128, 48).tolist()
    scoring = calibrate.Scoring(prefix=24, chunk=8, fp16_sinks=2, fp16_window=8)
    prof = calibrate.calibrate(model, tokens, 3.0, log=lambda *a: None, metric=metric,
                               scoring=scoring, granularity="head")
    assert prof["granularity"] == "head" and prof["metric"] == metric
    kb = [b for e in prof["layers"] for b in e["key_bits"]]
    vb = [b for e in prof["layers"] for b in e["value_bits"]]
    assert len(kb) == len(vb) == 4  # 2 layers x 2 KV heads
    assert sum(kb) + sum(vb) == 2 * 3 * 4 and prof["average_bits"] == 3.0
    for heads in prof["head_errors"].values():  # more bits, less error (measured)
        assert len(heads) == 2
        for e in heads:
            assert e["key"]["6"] < e["key"]["2"] and e["value"]["5"] < e["value"]["2"]
    path = tmp_path / "heads.json"
    calibrate.save(prof, str(path))
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", profile=str(path))
    assert [list(c.key_head_bits) for c in cache] == [e["key_bits"] for e in prof["layers"]]
    assert np.isfinite(logits(model, cache, tokens, [20])).all()
    again = calibrate.reallocate(str(path), 2.5)
    assert sum(sum(e["key_bits"]) + sum(e["value_bits"]) for e in again["layers"]) == 2 * 2.5 * 4
    assert calibrate.reallocate(str(path), 3.0)["layers"] == json.loads(path.read_text())["layers"]


def test_per_head_errors_add_up_to_the_layer_error():
    """Unprojected per-head errors of one run sum to the layer's attention-output error."""
    from turboquant import calibrate, calibrate_heads

    model = tiny_model("llama")
    tokens = np.random.default_rng(7).integers(0, 128, 32).tolist()
    cap = calibrate.capture(model, tokens)
    heads = calibrate_heads.head_errors(model, cap, key_candidates=(2, 4),
                                        value_candidates=(2,), project=False)
    layers = calibrate.layer_errors(model, cap, key_candidates=(2, 4), value_candidates=(2,))
    for le in layers:
        mine = [e for e in heads if e.layer == le.layer]
        for b in (2, 4):
            assert sum(e.key[b] for e in mine) == pytest.approx(le.key[b], rel=1e-5)
        assert sum(e.value[2] for e in mine) == pytest.approx(le.value[2], rel=1e-5)


def test_per_head_calibration_refuses_kl():
    from turboquant import calibrate

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="per-head calibration measures the hybrid or attention"):
        calibrate.calibrate(model, list(range(40)), 3.0, metric="kl", granularity="head")
    with pytest.raises(ValueError, match="granularity must be"):
        calibrate.calibrate(model, list(range(40)), 3.0, granularity="token")


@pytest.mark.slow
def test_smollm2_per_head_profile():
    """The saved SmolLM2 per-head profile: 3 KV heads per layer, and on the real model as
    close to fp16 as the per-layer profile of the same budget (same bytes)."""
    from mlx_lm import load

    from turboquant import models
    from turboquant.mlx_eval import Setting, evaluate

    path = "bench/results/profile_smollm2_3.0_heads.json"
    prof = tq_mlx.load_profile(path)
    assert all(len(e["key_bits"]) == len(e["value_bits"]) == 3 for e in prof["layers"])
    assert prof["average_bits"] == 3.0
    model, tokenizer = load(str(models.smollm2("float32")))
    tokens = tokenizer.encode(open("/usr/share/common-licenses/GPL-3").read())
    fp16, heads, layers = evaluate(
        model, tokens, [Setting.parse(f"p+s4+w64+profile:{p}") for p in
                        (path, "bench/results/profile_smollm2_3.0.json")],
        prefix=128, score=64, chunk=32, context=0, decode_tokens=0, log=lambda *a: None)
    assert heads.kv_bytes == layers.kv_bytes  # same budget, same bytes
    assert heads.logit_cosine > 0.99 and heads.kl < 0.03, heads
    assert heads.kl < 1.5 * layers.kl, (heads, layers)
