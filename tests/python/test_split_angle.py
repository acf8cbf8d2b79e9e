"""The outlier split's part angle width (split_angle_bits, 8 by default or 16): bytes,
accuracy, file format versions (as legacy files 16-bit stay version 1-3, 8-bit ones are version 4;
saves are the version-8 container),
the builder, the info command and the mlx-lm cache's default."""

import struct

import numpy as np
import pytest

import turboquant as tq
from turboquant import _core


def _version(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<I", f.read(12)[8:12])[0]


def _filled(angle, roles="both", T=70, **kw):
    kv = _core.KVCache(64, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=2, n_outlier_channels=16,
                       outlier_roles=roles, split_angle_bits=angle, seed=3, block_tokens=16, **kw)
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, T, 64)).astype(np.float32)
    k[:, :, :16] *= 4.0
    kv.append(k, rng.standard_normal((2, T, 64)).astype(np.float32))
    return kv


def test_quantizer_bytes_and_accuracy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 128)).astype(np.float32)
    q8 = tq.Quantizer("turboquant_mse", 128, 3, n_outlier_channels=32, seed=1)
    q16 = tq.Quantizer("turboquant_mse", 128, 3, n_outlier_channels=32, seed=1, split_angle_bits=16)
    assert q8.split_angle_bits == 8 and q16.split_angle_bits == 16
    assert q8.bytes_per_vector + 1 == q16.bytes_per_vector
    assert "split_angle_bits=8" in repr(q8)
    errs = []
    for q in (q8, q16):
        codes, norms = q.encode(x)
        assert codes.shape[-1] == q.code_bytes
        errs.append(np.mean(np.sum((q.decode(codes, norms) - x) ** 2, axis=1)))
    assert abs(errs[0] / errs[1] - 1) < 0.01, errs
    with pytest.raises(ValueError, match="split_angle_bits must be 8 or 16, got 12"):
        tq.Quantizer("turboquant_mse", 128, 3, n_outlier_channels=32, split_angle_bits=12)


def test_cache_memory_reflects_the_angle():
    k8, k16 = _filled(8), _filled(16)
    assert k8.split_angle_bits == 8 and k16.split_angle_bits == 16
    # one byte less per key and per value (both split), per KV head
    assert k16.bytes_per_token() - k8.bytes_per_token() == 2 * 2
    assert k16.memory_bytes() - k8.memory_bytes() == 2 * 2 * 80  # 5 pages of 16 tokens
    keys_only = _filled(8, roles="keys")
    assert _filled(16, roles="keys").bytes_per_token() - keys_only.bytes_per_token() == 2
    q = np.random.default_rng(2).standard_normal((4, 1, 64)).astype(np.float32)
    np.testing.assert_allclose(k8.attend(q), k16.attend(q), atol=0.05)
    with pytest.raises(ValueError, match="split_angle_bits must be 8 or 16, got 9"):
        _core.KVCache(64, n_outlier_channels=4, split_angle_bits=9)


@pytest.mark.parametrize("angle,roles,want", [(8, "both", 4), (16, "both", 1), (16, "keys", 3), (8, "keys", 4)])
def test_save_load_versions(tmp_path, angle, roles, want):
    kv = _filled(angle, roles)
    path = tmp_path / "c.tqkv"
    kv.save(str(path), legacy=True)  # the oldest version that holds it (before version 8)
    assert _version(path) == want
    back = tq.KVCache.load(str(path))
    assert back.split_angle_bits == angle
    assert back.to_bytes(legacy=True) == kv.to_bytes(legacy=True)
    assert back.to_bytes() == kv.to_bytes()
    kv.save(str(path))  # the section container
    assert _version(path) == 8 and tq.KVCache.load(str(path)).split_angle_bits == angle
    q = np.random.default_rng(4).standard_normal((4, 3, 64)).astype(np.float32)
    np.testing.assert_array_equal(back.attend(q), kv.attend(q))


def test_builder_and_info(tmp_path, capsys):
    from turboquant.__main__ import main

    for angle in (8, 16):
        cache = (tq.KVCacheBuilder().with_head_dim(64).with_bit_width(inlier=2, outlier=3)
                 .with_n_outlier_channels(8).with_split_angle_bits(angle).build())
        assert cache.core.split_angle_bits == angle
        path = str(tmp_path / f"b{angle}.tqkv")
        cache.core.append(np.ones((3, 64), np.float32), np.ones((3, 64), np.float32))
        cache.core.save(path)
        assert main(["info", path]) == 0
        out = capsys.readouterr().out
        assert f"{angle}-bit part angle" in out and "format version 8" in out
    assert tq.KVCacheBuilder().with_head_dim(64).build().core.split_angle_bits == 8
    with pytest.raises(ValueError, match="split_angle_bits must be 8 or 16"):
        tq.KVCacheBuilder().with_head_dim(64).with_split_angle_bits(4).build()


def test_mlx_lm_cache_uses_the_8_bit_angle_and_its_prompt_cache_roundtrips(tmp_path):
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import cache as mlx_cache
    from mlx_tiny import tiny_model

    import turboquant.mlx_lm as tq_mlx

    model = tiny_model("llama")
    tokens = np.random.default_rng(6).integers(0, 128, 40).tolist()
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", key_bits=3, value_bits=3, seed=2)
    model(mx.array(tokens[:35])[None], cache=cache)
    assert all(c._core.n_outlier_channels > 0 and c._core.split_angle_bits == 8 for c in cache)
    path = str(tmp_path / "p.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert all(c._core.split_angle_bits == 8 for c in loaded)
    a = np.array(model(mx.array(tokens[35:])[None], cache=cache))
    b = np.array(model(mx.array(tokens[35:])[None], cache=loaded))
    np.testing.assert_array_equal(a, b)


def test_mlx_lm_cache_option_and_eval_flag():
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    import turboquant.mlx_lm as tq_mlx
    from turboquant.mlx_eval import Setting

    assert Setting.parse("3+s4+w64").split_angle_bits == 8
    s = Setting.parse("3+s4+w64/a16")
    assert s.split_angle_bits == 16 and s.name == "tq-3bit+s4+w64/a16" and s.fp16_window == 64
    assert Setting.parse("3/nosplit/a16").key_split is False
    with pytest.raises(ValueError, match="split_angle_bits must be 8 or 16"):
        tq_mlx.TurboQuantKVCache(split_angle_bits=12)
    c = tq_mlx.TurboQuantKVCache(split_angle_bits=16)
    back = tq_mlx.TurboQuantKVCache()
    back.meta_state = c.meta_state
    assert back.split_angle_bits == 16


def test_mlx_lm_cache_sixteen_bit_prompt_cache_keeps_its_angle(tmp_path):
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import cache as mlx_cache
    from mlx_tiny import tiny_model

    import turboquant.mlx_lm as tq_mlx

    model = tiny_model("llama")
    tokens = np.random.default_rng(7).integers(0, 128, 30).tolist()
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     key_bits=3, value_bits=3, seed=2, split_angle_bits=16)
    model(mx.array(tokens)[None], cache=cache)
    assert all(c._core.split_angle_bits == 16 for c in cache)
    eight = tq_mlx.make_prompt_cache(model, preset="codes-only", key_bits=3, value_bits=3, seed=2)
    model(mx.array(tokens)[None], cache=eight)
    assert sum(c.nbytes for c in cache) > sum(c.nbytes for c in eight)
    path = str(tmp_path / "p16.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert all(c.split_angle_bits == 16 and c._core.split_angle_bits == 16 for c in loaded)


def test_smollm2_shape_3bit_window_memory():
    """The README's memory figures for the mlx-lm 3-bit setting with 4 fp16 sinks and an
    fp16 window (`generate`'s former default, `3+s4+w16`): a SmolLM2-shaped layer (head_dim 64,
    3 KV heads, the key split as make_prompt_cache builds it: 32 channels at 4 bits, 32 at
    2, 8-bit part angle; 3-bit values; norm correction; 32-token pages) is more than 4.5x
    smaller than fp16 K/V at every flush phase between 4096 and 4160 tokens with a 16-token
    window (4.55-4.58x) and about 4.5x with a 32-token one (4.48-4.52x); the 8-bit angle is
    1 byte per key slot smaller than the 16-bit one."""
    def cache(window, angle=8):
        return _core.KVCache(64, n_q_heads=9, n_kv_heads=3, key_bits=2, value_bits=3,
                             n_outlier_channels=32, outlier_bits=4, outlier_roles="keys",
                             split_angle_bits=angle, norm_correction=True, fp16_sinks=4,
                             fp16_window=window, block_tokens=32)
    rng = np.random.default_rng(0)
    caches = {"w16": cache(16), "w32": cache(32), "w32/a16": cache(32, 16)}
    x = rng.standard_normal((3, 4096, 64)).astype(np.float32)
    for kv in caches.values():
        kv.append(x, x)
    ratios = {name: [] for name in caches}
    for t in range(4096, 4161):
        if t > 4096:
            step = rng.standard_normal((3, 1, 64)).astype(np.float32)
            for kv in caches.values():
                kv.append(step, step)
        for name, kv in caches.items():
            ratios[name].append(t * 3 * 64 * 2 * 2 / kv.memory_bytes())
        pages = -(-caches["w32"].code_tokens(0) // 32)  # one angle byte per key slot of a page
        assert caches["w32/a16"].memory_bytes() - caches["w32"].memory_bytes() == 3 * 32 * pages
    assert min(ratios["w16"]) > 4.54 and max(ratios["w16"]) < 4.6, ratios["w16"]
    assert 4.47 < min(ratios["w32"]) and max(ratios["w32"]) < 4.53, ratios["w32"]
    assert max(ratios["w32/a16"]) < min(ratios["w32"])
