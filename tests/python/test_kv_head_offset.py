"""A cache's KV head offset (kv_cache.h ``kv_head_offset``): a cache holding a slice of a
model's KV heads (a tensor-parallel rank's) gives its head h the random streams of the
model's head offset + h, so it encodes and attends exactly as those heads of a whole-model
cache: in the C++ core, the GPU store, the builder and the mlx-lm cache; the offset is saved
(its own file section, absent for offset 0) and refused when out of range."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import turboquant
from reference import crc32c
from turboquant import FormatError, _core

D, H, G = 32, 4, 2  # the whole model: 4 KV heads, 8 query heads
K = 2               # the slice: the model's KV heads 2 and 3


def gaussian(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CONFIGS = {
    "mse": dict(),
    "prod keys (QJL)": dict(key_method="turboquant_prod"),
    "key split, fp16 sinks and window": dict(n_outlier_channels=D // 2, outlier_bits=4,
                                             outlier_roles="keys", fp16_sinks=2,
                                             fp16_window=8, norm_correction=True),
    "mixed precision": dict(fp16_window=8, decay_bits=2, mixed_group_blocks=2,
                            mixed_keep_blocks=1),
}


def pair(**kw):
    """(whole-model cache, cache of its heads [K, H)) of one configuration."""
    common = dict(n_layers=2, key_bits=3, value_bits=3, block_tokens=8, seed=21, **kw)
    whole = _core.KVCache(D, n_q_heads=H * G, n_kv_heads=H, **common)
    part = _core.KVCache(D, n_q_heads=(H - K) * G, n_kv_heads=H - K, kv_head_offset=K, **common)
    return whole, part


@pytest.mark.parametrize("name", CONFIGS)
def test_slice_encodes_and_attends_as_the_models_heads(name):
    whole, part = pair(**CONFIGS[name])
    assert (whole.kv_head_offset, part.kv_head_offset) == (0, K)
    T = 45
    k, v = gaussian((H, T, D), 1), gaussian((H, T, D), 2)
    for step in (30, 1, 14):  # a prefill, then more tokens; attention rates them (mixed)
        for layer in range(2):
            q = gaussian((H * G, step, D), 3 + step + layer)
            c = np.ascontiguousarray
            whole.append(c(k[:, :step]), c(v[:, :step]), layer)
            part.append(c(k[K:, :step]), c(v[K:, :step]), layer)
            want = whole.attend(q, layer)
            got = part.attend(np.ascontiguousarray(q[K * G:]), layer)
            np.testing.assert_array_equal(got, want[K * G:])
        k, v = k[:, step:], v[:, step:]
    for layer in range(2):
        n = part.code_tokens(layer)
        assert n > 0 and n == whole.code_tokens(layer)
        for h in range(H - K):
            for role in ("key", "value"):
                assert part.rotation_parameters(layer, h, role)[1].tobytes() == \
                    whole.rotation_parameters(layer, K + h, role)[1].tobytes()
                if "mixed" not in name:  # (mixed: rows of two widths, packed; decode below)
                    for a, b in zip(part.encoded(layer, h, role, 0, n),
                                    whole.encoded(layer, K + h, role, 0, n)):
                        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (layer, h, role)
                else:
                    np.testing.assert_array_equal(part.mixed_positions(layer, h),
                                                  whole.mixed_positions(layer, K + h))
                np.testing.assert_array_equal(part.decode(layer, h, role),
                                              whole.decode(layer, K + h, role))


def test_without_the_offset_a_slice_gets_the_first_heads_codes():
    whole, _ = pair()
    unshifted = _core.KVCache(D, n_layers=2, n_q_heads=(H - K) * G, n_kv_heads=H - K,
                              key_bits=3, value_bits=3, block_tokens=8, seed=21)
    k = gaussian((H, 20, D), 5)
    whole.append(k, k)
    unshifted.append(np.ascontiguousarray(k[K:]), np.ascontiguousarray(k[K:]))
    assert not np.array_equal(unshifted.encoded(0, 0, "key")[0], whole.encoded(0, K, "key")[0])


# --- saved caches ---------------------------------------------------------------------------


def sections(data: bytes):
    out, at = [], 16
    while at < len(data):
        (n,) = struct.unpack_from("<Q", data, at + 4)
        out.append((at, data[at:at + 4], n))
        at += 12 + n + 4
    return out


def filled(offset, **kw):
    c = _core.KVCache(D, n_layers=2, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=2,
                      block_tokens=8, seed=3, kv_head_offset=offset, **kw)
    for layer in range(2):
        c.append(gaussian((2, 19, D), 10 + layer), gaussian((2, 19, D), 20 + layer), layer)
    return c


@pytest.mark.parametrize("kw", [dict(), dict(fp16_window=4, fp16_sinks=1)])
def test_offset_round_trips_through_the_file(kw, tmp_path):
    c = filled(K, **kw)
    data = c.to_bytes()
    tags = [t for _, t, _ in sections(data)]
    assert b"KVHO" in tags and tags.index(b"KVHO") < tags.index(b"ROTS")
    path = tmp_path / "slice.tqkv"
    c.save(str(path))
    for back in (_core.KVCache.from_bytes(data), _core.KVCache.load(str(path))):
        assert back.kv_head_offset == K
        assert back.to_bytes() == data
        q = gaussian((4, 3, D), 30)
        for layer in range(2):
            np.testing.assert_array_equal(back.attend(q, layer), c.attend(q, layer))
        # it keeps encoding with the model's heads' streams
        x = gaussian((2, 5, D), 31)
        back.append(x, x, 1)
    c.append(x, x, 1)
    assert back.to_bytes() == c.to_bytes()
    # versions 1-7 have no field for it: a legacy save refuses rather than drop it
    with pytest.raises(RuntimeError, match="kv_head_offset 2 needs the section container"):
        c.to_bytes(legacy=True)
    with pytest.raises(RuntimeError, match="legacy versions 1-7 cannot record"):
        c.save(str(tmp_path / "old.tqkv"), legacy=True)


def test_offset_zero_files_are_unchanged():
    plain = filled(0)
    assert [t for _, t, _ in sections(plain.to_bytes())] == \
        [b"CONF", b"ROTS", b"LAYR", b"LAYR", b"END "]
    assert plain.to_bytes(legacy=True)[8] == 1  # still expressible by version 1
    assert _core.KVCache.from_bytes(plain.to_bytes()).kv_head_offset == 0


def with_payload(data: bytes, tag: bytes, payload: bytes) -> bytes:
    at, _, n = next(s for s in sections(data) if s[1] == tag)
    body = tag + struct.pack("<Q", len(payload)) + payload
    return data[:at] + body + struct.pack("<I", crc32c(body)) + data[at + 16 + n:]


def test_bad_offset_sections_are_format_errors():
    data = filled(K).to_bytes()
    for bad, text in ((0, r"KVHO section of kv_head_offset 0"),
                      (65536, r"kv_head_offset 65536 \(must be in \[1, 65535\]\)"),
                      (65535, r"kv_head_offset must be in \[0, 65536 - n_kv_heads = 65534\]")):
        with pytest.raises(FormatError, match=text):
            _core.KVCache.from_bytes(with_payload(data, b"KVHO", struct.pack("<I", bad)))
    with pytest.raises(FormatError):  # a payload of the wrong size
        _core.KVCache.from_bytes(with_payload(data, b"KVHO", struct.pack("<Q", K)))
    # a critical section: a library that does not know it refuses the file by name (as the
    # container test does for an unknown one), rather than give heads other streams
    assert b"KVHO"[:1].isupper()


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 65535, 1 << 20])
def test_bad_offsets_are_refused(bad):
    with pytest.raises(ValueError, match=r"kv_head_offset must be in \[0, 65536 - n_kv_heads "
                                         rf"= 65534\] .*got {bad}"):
        _core.KVCache(D, n_q_heads=2, n_kv_heads=2, kv_head_offset=bad)
    with pytest.raises((ValueError, TypeError)):
        turboquant.KVCacheBuilder().with_head_dim(D).with_heads(4, 2) \
            .with_kv_head_offset(bad).build()
    import turboquant.mlx_lm as tq_mlx

    if bad < 0 or bad > 65535:
        with pytest.raises(ValueError, match="kv_head_offset must be an integer in"):
            tq_mlx.TurboQuantKVCache(kv_head_offset=bad)
    with pytest.raises(ValueError, match="kv_head_offset must be an integer"):
        tq_mlx.TurboQuantKVCache(kv_head_offset=True)
    last = _core.KVCache(D, n_q_heads=2, n_kv_heads=2, kv_head_offset=65534)
    assert last.kv_head_offset == 65534


# --- the builder and artifact stores --------------------------------------------------------


def test_builder_sets_the_offset_and_artifacts_use_the_models_head_numbers():
    from turboquant.artifacts import MemoryArtifactStore

    store = MemoryArtifactStore()
    whole = (turboquant.KVCacheBuilder().with_head_dim(D).with_heads(H * G, H).with_seed(8)
             .with_backend("cpu").with_artifact_store(store).build())
    part = (turboquant.KVCacheBuilder().with_head_dim(D).with_heads((H - K) * G, H - K)
            .with_seed(8).with_backend("cpu").with_kv_head_offset(K).build())
    assert part.core.kv_head_offset == K and whole.core.kv_head_offset == 0
    k = gaussian((H, 12, D), 40)
    whole.append(k, k)
    part.append(np.ascontiguousarray(k[K:]), np.ascontiguousarray(k[K:]))
    assert part.core.encoded(0, 0, "key")[0].tobytes() == \
        whole.core.encoded(0, K, "key")[0].tobytes()
    # the slice finds the model's heads K.. in the whole model's artifact entry
    sliced = (turboquant.KVCacheBuilder().with_head_dim(D).with_heads((H - K) * G, H - K)
              .with_seed(8).with_backend("cpu").with_kv_head_offset(K)
              .with_artifact_store(store).build())
    assert sliced.description["artifacts_loaded"] == {"key": H - K, "value": H - K}
    assert sliced.core.rotation_parameters(0, 0, "value")[1].tobytes() == \
        whole.core.rotation_parameters(0, K, "value")[1].tobytes()


# --- the GPU store (reference kernels) ------------------------------------------------------


def test_gpu_store_uses_the_models_head_streams():
    pytest.importorskip("mlx.core")
    import mlx.core as mx
    from turboquant.mlx_metal import MetalCodeStore, ReferenceKernels

    kw = dict(n_q_heads=(H - K) * G, n_kv_heads=H - K, key_bits=3, value_bits=3, seed=11,
              block_tokens=8, norm_correction=True, fp16_sinks=2, fp16_window=8,
              n_outlier_channels=D // 2, outlier_bits=4, outlier_channels=list(range(D // 2)),
              outlier_roles="keys")
    store = MetalCodeStore(D, kernels=ReferenceKernels(), kv_head_offset=K, **kw)
    core = _core.KVCache(D, kv_head_offset=K, **kw)
    k, v = gaussian((H - K, 29, D), 50), gaussian((H - K, 29, D), 51)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    n = core.code_tokens(0)
    for h in range(H - K):
        for role in ("key", "value"):
            for a, b in zip(store.encoded(0, h, role), core.encoded(0, h, role, 0, n)):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # its file records the offset and loads back as a store with it
    data = store.to_bytes()
    assert _core.KVCache.from_bytes(data).kv_head_offset == K
    back = MetalCodeStore.from_bytes(data, kernels=ReferenceKernels())
    assert back.kv_head_offset == K and "kv_head_offset=2" in repr(back)
    with pytest.raises(ValueError, match=r"kv_head_offset must be in \[0, 65536 - n_kv_heads"):
        MetalCodeStore(D, kernels=ReferenceKernels(), kv_head_offset=-1)


# --- the mlx-lm cache -----------------------------------------------------------------------


def test_mlx_cache_slice_attends_as_the_models_heads():
    mx = pytest.importorskip("mlx.core")
    import turboquant.mlx_lm as tq_mlx

    opts = dict(key_bits=3, value_bits=3, fp16_sinks=2, fp16_window=8, seed=5, layer=1)
    whole = tq_mlx.TurboQuantKVCache(**opts)
    part = tq_mlx.TurboQuantKVCache(kv_head_offset=K, **opts)
    for T, seed in ((40, 60), (1, 61), (3, 62)):
        k, v = gaussian((1, H, T, D), seed), gaussian((1, H, T, D), seed + 10)
        q = gaussian((1, H * G, T, D), seed + 20)
        whole.update_and_fetch(mx.array(k), mx.array(v))
        part.update_and_fetch(mx.array(k[:, K:]), mx.array(v[:, K:]))
        want = np.asarray(whole.attend(mx.array(q), scale=0.25))
        got = np.asarray(part.attend(mx.array(q[:, K * G:]), scale=0.25))
        np.testing.assert_array_equal(got, want[:, K * G:])
    assert part._core.kv_head_offset == K
    n = part._core.code_tokens(0)
    assert n > 0
    for h in range(H - K):
        assert part._core.encoded(0, h, "key", 0, n)[0].tobytes() == \
            whole._core.encoded(0, K + h, "key", 0, n)[0].tobytes()


def test_make_prompt_cache_offsets_and_prompt_cache_files(tmp_path):
    pytest.importorskip("mlx.core")
    import turboquant.mlx_lm as tq_mlx
    from mlx_lm.models import cache as mlx_cache
    from mlx_tiny import tiny_model

    model = tiny_model("qwen2")  # 2 layers, 2 KV heads, head_dim 16
    assert tq_mlx.tensor_parallel_span(model) == (0, 1)
    assert [c.kv_head_offset for c in tq_mlx.make_prompt_cache(model)] == [0, 0]
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", kv_head_offset=6)
    assert [c.kv_head_offset for c in cache] == [6, 6]
    with pytest.raises(ValueError, match="kv_head_offset must be an integer in"):
        tq_mlx.make_prompt_cache(model, kv_head_offset=-2)
    import mlx.core as mx

    tokens = mx.array([[3, 9, 27, 81 % 128, 17, 5, 60, 2, 44, 8, 1, 99]])
    model(tokens, cache=cache)
    assert [c._core.kv_head_offset for c in cache] == [6, 6]
    assert json.loads(cache[0].meta_state[0])["kv_head_offset"] == 6
    plain = tq_mlx.make_prompt_cache(model, preset="codes-only")
    model(tokens, cache=plain)
    assert "kv_head_offset" not in json.loads(plain[0].meta_state[0])  # as before the option
    path = str(tmp_path / "slice.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert [c.kv_head_offset for c in loaded] == [6, 6]
    assert [c._core.kv_head_offset for c in loaded] == [6, 6]
    nxt = mx.array([[7]])
    np.testing.assert_array_equal(np.asarray(model(nxt, cache=loaded)),
                                  np.asarray(model(nxt, cache=cache)))
    # a header that disagrees with its compressed cache is refused
    state, meta = cache[0].state, json.loads(cache[0].meta_state[0])
    meta["kv_head_offset"] = 1
    fresh = tq_mlx.TurboQuantKVCache()
    with pytest.raises(FormatError, match="kv_head_offset 1, the compressed cache has 6"):
        fresh.state = (state[0], json.dumps(meta), *state[2:])


def test_tensor_parallel_rank_gets_its_heads_offset_and_profile_widths():
    mx = pytest.importorskip("mlx.core")
    import turboquant.mlx_lm as tq_mlx
    from mlx_tiny import tiny_model

    model = tiny_model("qwen2")
    model.shard(mx.distributed.init())  # one process: a group of 1, mlx's sharded layers
    assert type(model.layers[0].self_attn.k_proj).__name__ == "AllToShardedLinear"
    assert tq_mlx.tensor_parallel_span(model) == (0, 1)

    class Rank1Of2:  # what rank 1 of a group of 2 sees (the model is not run)
        def rank(self):
            return 1

        def size(self):
            return 2

    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).group = Rank1Of2()
    assert tq_mlx.tensor_parallel_span(model) == (1, 2)
    # the rank's 2 KV heads per layer are the model's heads 2 and 3
    assert [c.kv_head_offset for c in tq_mlx.make_prompt_cache(model)] == [2, 2]
    # a per-KV-head profile lists the model's 4 heads; the rank keeps its own two
    prof = {"format": tq_mlx.PROFILE_FORMAT, "version": 1,
            "layers": [{"key_bits": [2, 3, 4, 5], "value_bits": [5, 4, 3, 2]},
                       {"key_bits": 3, "value_bits": 3}]}
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", profile=prof)
    assert cache[0].key_head_bits == (4, 5) and cache[0].value_head_bits == (3, 2)
    assert cache[1].key_head_bits is None
    # an explicit offset wins
    assert [c.kv_head_offset for c in tq_mlx.make_prompt_cache(model, kv_head_offset=0)] == [0, 0]
