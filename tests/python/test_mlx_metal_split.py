"""The key split in the mlx-resident store (turboquant.mlx_metal) and its Metal kernels
(metal/split.metal), against the C++ core's OutlierSplitQuantizer.

The kernels run on the emulated GPU (metal/metal_compat.h, tests/python/mlx_kernel_emulator.py)
through the real turboquant.metal host functions: codes (part angles included) and norms
bit-exact against _core.KVCache, decode attention within fp32 tolerance, prompt-cache files
byte-identical both ways. What needs a Mac: the same kernels on real Metal.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from metal_args import dequantize_kernel  # noqa: E402
from turboquant import _core, metal  # noqa: E402
from turboquant import gpu_path
from turboquant.mlx_metal import MetalCodeStore, MetalKVCache, ReferenceKernels  # noqa: E402

REF = ReferenceKernels()


def split_kw(d, hq, hkv, kb, vb=3, ab=8, bt=8, nc=True, sinks=0, window=0, seed=3):
    return dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=kb - 1, value_bits=vb,
                seed=seed, block_tokens=bt, norm_correction=nc, fp16_sinks=sinks,
                fp16_window=window, n_outlier_channels=d // 2, outlier_bits=kb + 1,
                outlier_channels=list(range(d // 2)), outlier_roles="keys", split_angle_bits=ab)


def keys(rng, h, t, d):
    """Keys whose halves differ in scale from token to token (part angles over [0, π/2])."""
    x = rng.standard_normal((h, t, d)).astype(np.float32)
    x[..., : d // 2] *= np.exp(rng.uniform(-2.5, 2.5, (h, t, 1))).astype(np.float32)
    return x


def assert_same_codes(store, core):
    assert store.size() == core.size(0) and store.code_tokens() == core.code_tokens(0)
    assert store.window_tokens() == core.window_tokens(0)
    nc = core.code_tokens(0)
    for h in range(core.n_kv_heads):
        for role in ("key", "value"):
            sc, sn = store.encoded(0, h, role)
            cc, cn = core.encoded(0, h, role, 0, nc)
            assert np.array_equal(sc, cc), (h, role, np.argwhere(sc != cc)[:3])
            assert np.array_equal(sn.view(np.uint16), cn.view(np.uint16)), (h, role)


def close(a, b, tol=5e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, err


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_split"))


# d, hq, hkv, key bits, angle bits, fp16 sinks, fp16 window, tokens per append
CASES = [(64, 4, 2, 3, 8, 0, 0, (11, 1, 6)),
         (128, 6, 2, 2, 16, 0, 0, (9, 1)),
         (64, 3, 1, 4, 16, 2, 4, (13, 1, 1)),
         (128, 4, 1, 3, 8, 0, 0, (5, 1)),
         (32, 2, 1, 3, 8, 0, 0, (7, 1))]


@pytest.mark.parametrize("d,hq,hkv,kb,ab,sinks,window,appends", CASES)
def test_split_store_on_emulated_kernels_matches_the_core(emulated, monkeypatch, d, hq, hkv, kb,
                                                          ab, sinks, window, appends):
    emulated.install(monkeypatch)
    rng = np.random.default_rng(d * kb + ab)
    kw = split_kw(d, hq, hkv, kb, ab=ab, sinks=sinks, window=window)
    store, core = MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    assert store.key_split and store.kernels is metal
    start = len(emulated.launches)
    for T in appends:  # token counts not a multiple of the block (8)
        k, v = keys(rng, hkv, T, d), rng.standard_normal((hkv, T, d)).astype(np.float32)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_codes(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    for h in range(hkv):  # the prefill tile: decoded keys bit-identical to the core's
        assert np.array_equal(store.decode(0, h, "key"), core.decode(0, h, "key"))
    q = rng.standard_normal((hq, 1, d)).astype(np.float32)
    for window_ in (None, 7):
        close(store.attend(mx.array(q), scale=0.2, window=window_),
              core.attend(q, scale=0.2, window=window_))
    q = rng.standard_normal((hq, 3, d)).astype(np.float32)
    close(store.attend(mx.array(q)), core.attend(q))
    used = set(emulated.launches[start:])
    # Decode attention by the register-tiled kernel (split keys) where its shape allows,
    # else the split block kernel; the reduce merges fp16 sinks/window rows when there are.
    fast = metal.fast_attention_shape(d, hq // hkv, kw["outlier_bits"], kw["value_bits"],
                                      kw["key_bits"]) is not None
    # (the staged kernel by default; the register-tiled one where no tile fits)
    block = set() if fast else {"split_rotate_heads", "split_attention_block"}
    reduce = "attention_reduce_rows" if sinks or window else "attention_reduce_heads"
    assert {"split_encode_heads", reduce, "encode_heads"} | block <= used, used
    assert not fast or used & {"attention_staged", "attention_fast"}, used
    assert store.to_bytes() == core.to_bytes()


def test_split_dequantize_kernel_is_bit_exact(emulated, monkeypatch):
    emulated.install(monkeypatch)
    rng = np.random.default_rng(2)
    d = 64
    store = MetalCodeStore(d, **split_kw(d, 2, 1, 3, ab=16, nc=True))
    tables = store.key_tables
    x = keys(rng, 1, 10, d)
    codes, norms = metal.encode_heads(tables, mx.array(x))
    q = tables.quantizers[0]
    rc, rn = q.encode(x[0])
    assert np.array_equal(np.array(codes[0]), rc)
    assert np.array_equal(np.array(norms[0]).view(np.uint16), rn.view(np.uint16))
    dec = np.array(metal.dequantize_heads(tables, codes, norms))[0]
    assert np.array_equal(dec, q.decode(rc, rn))
    tile = np.array(metal.dequantize_heads(tables, codes, norms, inverse_rotate=False))[0]
    close(tile, dec @ np.asarray(q.rotation_matrix(), np.float32).T, 1e-5)
    half = metal.dequantize_heads(tables, codes, norms, out_dtype=mx.float16)
    assert np.array_equal(np.array(half)[0], dec.astype(np.float16))


def test_split_angle_tables_are_the_cores():
    # A split code with all-zero part indices decodes (norm 1) to ±fl(cos φ̃·c_O[0]) on the
    # outlier channels and ±fl(sin φ̃·c_I[0]) on the others, exactly: the inverse hadamard of
    # a constant vector only adds equal values and scales by powers of two. So every angle
    # code's (cos, sin) in the kernels' table must be the core's, to the bit.
    d = 32
    for ab in (8, 16):
        q = _core.Quantizer("turboquant_mse", d, 2, 1, rotation="hadamard",
                            outlier_channels=list(range(d // 2)), outlier_bits=3,
                            split_angle_bits=ab, norm_dtype="float32")
        angles, bounds = metal.split_angle_tables(ab)
        top = (1 << ab) - 1
        assert angles.shape == (top + 1, 2) and bounds.shape == (top, 2)
        ks = np.arange(top + 1) if ab == 8 else np.unique(np.r_[0:300, top - 300:top + 1,
                                                               np.arange(0, top, 97)])
        codes = np.zeros((len(ks), q.code_bytes), np.uint8)
        codes[:, 0] = ks & 0xFF
        if ab == 16:
            codes[:, 1] = ks >> 8
        dec = q.decode(codes, np.ones(len(ks), np.float32))
        c0 = np.float32(q.part(0).codebook.centroids[0])
        c1 = np.float32(q.part(1).codebook.centroids[0])
        assert np.array_equal(np.abs(dec[:, 0]), np.abs(angles[ks, 0] * c0))
        assert np.array_equal(np.abs(dec[:, d - 1]), np.abs(angles[ks, 1] * c1))
        # The boundaries lie halfway between the codes' angles, cos² as hi + lo.
        t = (np.arange(top) + 0.5) * (np.pi / 2) / top
        np.testing.assert_allclose(bounds[:, 0].astype(np.float64) + bounds[:, 1],
                                   np.cos(t) ** 2, rtol=0, atol=2e-15)


def test_split_store_on_reference_kernels_cross_loads_files():
    rng = np.random.default_rng(8)
    d = 64
    kw = split_kw(d, 4, 2, 3, ab=16, bt=8)
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    for T in (10, 3):
        k, v = keys(rng, 2, T, d), rng.standard_normal((2, T, d)).astype(np.float32)
        store.append(k, v)
        core.append(k, v)
    assert_same_codes(store, core)
    blob = core.to_bytes()
    assert store.to_bytes() == blob
    back = MetalCodeStore.from_bytes(blob, kernels=REF)  # the core's file in the store
    assert back.key_split and back.split_angle_bits == 16
    assert_same_codes(back, core)
    assert back.to_bytes() == blob
    assert _core.KVCache.from_bytes(store.to_bytes()).to_bytes() == blob  # and back
    plain = _core.KVCache(d, n_kv_heads=1, block_tokens=4, split_angle_bits=16)  # no split
    plain.append(keys(rng, 1, 6, d), keys(rng, 1, 6, d))
    assert MetalCodeStore.from_core(plain, kernels=REF).to_bytes() == plain.to_bytes()
    multi = MetalKVCache(d, kernels=REF, **dict(kw, n_layers=2))
    assert all(s.key_split for s in multi.layers)


def test_split_configurations_the_store_refuses():
    base = split_kw(64, 2, 1, 3)
    with pytest.raises(ValueError, match="first half"):
        MetalCodeStore(64, kernels=REF, **dict(base, outlier_channels=list(range(1, 33))))
    with pytest.raises(ValueError, match="first half"):
        MetalCodeStore(64, kernels=REF, **dict(base, outlier_channels=list(range(8)),
                                               n_outlier_channels=8))
    with pytest.raises(ValueError, match="keys only"):
        MetalCodeStore(64, kernels=REF, **dict(base, outlier_roles="both"))
    with pytest.raises(ValueError, match="split_angle_bits"):
        MetalCodeStore(64, kernels=REF, **dict(base, split_angle_bits=12))
    with pytest.raises(ValueError, match="head_dim"):  # halves of 8: dense part rotations
        MetalCodeStore(16, kernels=REF, **split_kw(16, 2, 1, 3))
    # A core whose split the kernels cannot run is refused when loaded into the store.
    core = _core.KVCache(64, **dict(base, outlier_channels=list(range(1, 33))))
    with pytest.raises(ValueError, match="cannot be held by a MetalCodeStore"):
        MetalCodeStore.from_core(core, kernels=REF)
    values_split = _core.KVCache(64, **dict(base, outlier_roles="values"))
    with pytest.raises(ValueError, match="keys only"):
        MetalCodeStore.from_core(values_split, kernels=REF)


def _run(model, cache, tokens, prefill):
    out = [np.array(model(mx.array(tokens[:prefill])[None], cache=cache))]
    for t in tokens[prefill:]:  # decode steps: the split-K kernels
        out.append(np.array(model(mx.array([[t]]), cache=cache)))
    return out


def test_mlx_lm_default_cache_runs_the_key_split_on_the_emulated_gpu(emulated, monkeypatch,
                                                                      tmp_path):
    # make_prompt_cache's defaults (key split, debias) as on a Mac: every kernel launch on
    # the emulated GPU, logits as the C++ core's; prompt-cache files cross both ways.
    import importlib

    from mlx_lm.models import cache as mlx_cache
    from mlx_tiny import _COMMON

    from turboquant import mlx_lm as tq_mlx

    llama = importlib.import_module("mlx_lm.models.llama")  # head_dim 32: halves of 16
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(_COMMON, model_type="llama",
                                                       hidden_size=128)))
    mx.eval(model.parameters())
    tokens = np.random.default_rng(19).integers(0, 128, 14).tolist()
    emulated.install(monkeypatch)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    start = len(emulated.launches)
    gpu = tq_mlx.make_prompt_cache(model, preset="codes-only", seed=2)
    out = _run(model, gpu, tokens, 11)
    assert all(c._gpu and c._core.kernels is metal and c._core.key_split for c in gpu)
    assert {"split_encode_heads", "split_attention_block",
            dequantize_kernel(32, split=True)} <= set(emulated.launches[start:])
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu = tq_mlx.make_prompt_cache(model, preset="codes-only", seed=2)
    ref = _run(model, cpu, tokens, 11)
    assert not any(c._gpu for c in cpu)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=3e-4)
    # The Metal store's file loads in the core, and the core's in the store, byte for byte.
    for saved, load_path in ((gpu, "cpu"), (cpu, "metal")):
        path = str(tmp_path / f"from_{load_path}.safetensors")
        mlx_cache.save_prompt_cache(path, saved)
        monkeypatch.setattr(gpu_path, "active_path", lambda p=load_path: p)
        loaded = mlx_cache.load_prompt_cache(path)
        assert all(c._gpu == (load_path == "metal") for c in loaded)
        for a, b in zip(loaded, saved):
            assert np.array_equal(np.array(a.state[0]), np.array(b.state[0]))
