"""The mlx-resident code store (turboquant.mlx_metal) against the C++ KVCache.

On Linux the store runs on ReferenceKernels (the turboquant.metal kernel signatures computed
with the C++ quantizers): this checks the store's own logic -- paging, head/GQA layout,
decode vs prefill routing, masks, trim, files -- against _core.KVCache on identical inputs.
The per-head Metal kernel sources the store calls on a Mac (metal.KERNELS["*_heads"]) are
run here on the emulated GPU (metal/metal_compat.h) and checked bit-exact against the same
quantizers. What needs a Mac: the kernels on real Metal through mx.fast.metal_kernel.
"""

import shutil
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import turboquant  # noqa: E402
from metal_args import ARG_TYPES, dequantize_kernel  # noqa: E402
from turboquant import _core, metal  # noqa: E402
from turboquant import gpu_path
from turboquant.mlx_metal import (MetalCodeStore, MetalKVCache, ReferenceKernels,  # noqa: E402
                                  kv_stream_id, store_supports)

REF = ReferenceKernels()


def pair(d=64, hq=4, hkv=2, kb=3, vb=4, seed=7, bt=16, layer_seed=None):
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_method="turboquant_mse", key_bits=kb,
              value_method="turboquant_mse", value_bits=vb, seed=seed, rotation="auto",
              block_tokens=bt)
    return MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def assert_same_codes(store, core):
    assert store.size() == core.size(0)
    for h in range(core.n_kv_heads):
        for role in ("key", "value"):
            sc, sn = store.encoded(0, h, role)
            cc, cn = core.encoded(0, h, role)
            assert np.array_equal(sc, cc), (h, role)
            assert np.array_equal(sn.view(np.uint16), cn.view(np.uint16)), (h, role)


def close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, err


@pytest.mark.parametrize("d,hq,hkv,kb,vb", [(64, 4, 2, 3, 4), (128, 8, 1, 2, 3), (32, 3, 3, 4, 2),
                                            (64, 20, 1, 3, 3)])
def test_codes_and_attention_match_the_core(d, hq, hkv, kb, vb):
    rng = np.random.default_rng(d + hq)
    store, core = pair(d, hq, hkv, kb, vb)
    # appends in uneven chunks, crossing page boundaries (block_tokens=16): 37 tokens
    for T in (5, 1, 19, 1, 11):
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_codes(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    assert store.fp16_bytes() == core.fp16_bytes()
    assert store.bytes_per_token() == core.bytes_per_token()
    scale = 0.2
    # decode (one query position: the split-K kernel path), with and without a window
    for window in (None, 9, 100):
        q = rand(rng, hq, 1, d)
        out = store.attend(mx.array(q), causal=True, scale=scale, window=window)
        assert isinstance(out, mx.array) and out.dtype == mx.float32 and out.shape == q.shape
        close(out, core.attend(q, causal=True, scale=scale, window=window))
    # prefill (several positions: dequantized tile + mx attention), causal / window / full
    for causal, window in ((True, None), (True, 6), (False, None), (False, 10)):
        q = rand(rng, hq, 13, d)
        out = store.attend(mx.array(q), causal=causal, scale=scale, window=window)
        close(out, core.attend(q, causal=causal, scale=scale, window=window))
    q = rand(rng, 1, hq, 3, d)  # (1, H, T, d) input, default scale
    close(store.attend(mx.array(q)), core.attend(q))


def test_single_head_shapes_and_numpy_inputs():
    rng = np.random.default_rng(1)
    store, core = pair(64, 1, 1)
    k, v = rand(rng, 9, 64), rand(rng, 9, 64)
    store.append(k, v)  # NumPy (T, d) accepted and converted
    core.append(k, v)
    assert_same_codes(store, core)
    q = rand(rng, 64)
    out = store.attend(mx.array(q))
    assert out.shape == (64,)
    close(out, core.attend(q))


def test_float16_and_bfloat16_inputs_match_float32_codes():
    rng = np.random.default_rng(2)
    store, core = pair()
    k = rand(rng, 2, 6, 64).astype(np.float16)
    v = rand(rng, 2, 6, 64).astype(np.float16)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    assert_same_codes(store, core)
    b = mx.array(rand(rng, 2, 3, 64)).astype(mx.bfloat16)
    store.append(b, b)
    f = np.array(b.astype(mx.float32))
    core.append(f, f)
    assert_same_codes(store, core)


def test_trim_frees_pages_and_matches_the_core():
    rng = np.random.default_rng(3)
    store, core = pair(bt=8)
    k, v = rand(rng, 2, 30, 64), rand(rng, 2, 30, 64)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    for n in (3, 9, 0):
        assert store.trim(n) == core.trim(n)
        assert store.memory_bytes() == core.memory_bytes()
        assert_same_codes(store, core)
    k2, v2 = rand(rng, 2, 4, 64), rand(rng, 2, 4, 64)
    store.append(mx.array(k2), mx.array(v2))
    core.append(k2, v2)
    assert_same_codes(store, core)
    q = rand(rng, 4, 1, 64)
    close(store.attend(mx.array(q)), core.attend(q))
    assert store.trim(100) == core.trim(100) == 22
    assert store.size() == 0 and store.memory_bytes() == core.memory_bytes()
    with pytest.raises(ValueError, match="empty cache"):
        store.attend(mx.array(q))


def test_save_load_round_trip_and_cross_loading(tmp_path):
    rng = np.random.default_rng(4)
    store, core = pair(seed=123)
    k, v = rand(rng, 2, 21, 64), rand(rng, 2, 21, 64)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    blob = store.to_bytes()
    assert blob == core.to_bytes()  # one byte format
    back = MetalCodeStore.from_bytes(blob, kernels=REF)
    assert_same_codes(back, core)
    assert back.memory_bytes() == store.memory_bytes()
    q = rand(rng, 4, 1, 64)
    close(back.attend(mx.array(q)), core.attend(q))
    # a file written by the C++ cache loads into the store, and the store's into the core
    core.save(str(tmp_path / "c.tqkv"))
    assert_same_codes(MetalCodeStore.load(str(tmp_path / "c.tqkv"), kernels=REF), core)
    store.save(str(tmp_path / "s.tqkv"))
    loaded = _core.KVCache.load(str(tmp_path / "s.tqkv"))
    assert_same_codes(store, loaded)
    # empty stores too
    empty, ecore = pair()
    assert empty.to_bytes() == ecore.to_bytes()
    assert MetalCodeStore.from_bytes(ecore.to_bytes(), kernels=REF).size() == 0


def test_refuses_what_it_cannot_hold():
    blob = _core.KVCache(64, key_method="turboquant_prod").to_bytes()
    with pytest.raises(ValueError, match="turboquant_mse"):
        MetalCodeStore.from_bytes(blob, kernels=REF)
    with pytest.raises(ValueError, match="one"):
        MetalCodeStore.from_bytes(_core.KVCache(64, n_layers=2).to_bytes(), kernels=REF)
    core = _core.KVCache(64)
    kind, params = core.rotation_parameters(0, 0, "key")
    core.set_rotation_parameters(0, 0, "key", kind, -np.asarray(params))
    with pytest.raises(ValueError, match="custom rotation"):
        MetalCodeStore.from_bytes(core.to_bytes(), kernels=REF)
    assert store_supports(96) and store_supports(64, rotation="dense")
    assert store_supports(64, "polar") and store_supports(64) is None
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        MetalCodeStore(96, kernels=REF)


def test_bad_input_is_refused_and_leaves_the_store_unchanged():
    rng = np.random.default_rng(5)
    store, core = pair()
    k, v = rand(rng, 2, 4, 64), rand(rng, 2, 4, 64)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    bad = k.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.append(mx.array(bad), mx.array(v))
    with pytest.raises(ValueError, match="heads"):
        store.append(mx.array(rand(rng, 3, 4, 64)), mx.array(rand(rng, 3, 4, 64)))
    with pytest.raises(ValueError, match="differs"):
        store.append(mx.array(k), mx.array(v[:, :2]))
    with pytest.raises(TypeError, match="float"):
        store.append(mx.array(k).astype(mx.int32), mx.array(v))
    assert_same_codes(store, core)
    q = rand(rng, 4, 1, 64)
    with pytest.raises(ValueError, match="query heads|heads"):
        store.attend(mx.array(rand(rng, 3, 1, 64)))
    with pytest.raises(ValueError, match="only 4 tokens"):
        store.attend(mx.array(rand(rng, 4, 5, 64)))
    with pytest.raises(ValueError, match="window"):
        store.attend(mx.array(q), window=0)
    with pytest.raises(ValueError, match="sparse_v"):
        store.attend(mx.array(q), sparse_v=0.1)
    qn = q.copy()
    qn[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        store.attend(mx.array(qn))


def test_multi_layer_cache_matches_the_core():
    rng = np.random.default_rng(6)
    kw = dict(n_layers=3, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3, seed=9,
              block_tokens=16)
    cache, core = MetalKVCache(64, kernels=REF, **kw), _core.KVCache(64, **kw)
    for layer in range(3):
        k, v = rand(rng, 2, 10 + layer, 64), rand(rng, 2, 10 + layer, 64)
        cache.append(mx.array(k), mx.array(v), layer)
        core.append(k, v, layer)
    for layer in range(3):  # streams of layer l use layer l's rotations
        close(cache.decode(layer, 1, "value"), core.decode(layer, 1, "value"), 0)
        q = rand(rng, 4, 2, 64)
        close(cache.attend(mx.array(q), layer), core.attend(q, layer))
    assert cache.memory_bytes() == core.memory_bytes()
    assert cache.to_bytes() == core.to_bytes()
    back = MetalKVCache.from_bytes(core.to_bytes(), kernels=REF)
    assert [back.size(i) for i in range(3)] == [10, 11, 12]
    assert cache.trim(5) == core.trim(5) and cache.memory_bytes() == core.memory_bytes()


def test_stream_ids_are_those_of_the_core():
    core = _core.KVCache(64, n_layers=3, n_q_heads=2, n_kv_heads=2, seed=5)
    for layer in range(3):
        for h in range(2):
            for r, role in enumerate(("key", "value")):
                q = _core.Quantizer("turboquant_mse", 64, 3, 5, rotation="hadamard",
                                    stream=kv_stream_id(layer, h, r))
                assert np.array_equal(q.rotation_parameters(),
                                      core.rotation_parameters(layer, h, role)[1])


@pytest.mark.skipif(sys.platform == "darwin", reason="the Linux behaviour")
def test_default_kernels_need_a_gpu():
    store = MetalCodeStore(64)  # the turboquant.metal kernel set
    with pytest.raises(RuntimeError, match="no GPU kernel path on this platform"):
        store.append(mx.zeros((1, 1, 64)), mx.zeros((1, 1, 64)))
    assert store.size() == 0


# --- The per-head Metal kernel sources on the emulated GPU ---------------------------------


def test_per_head_kernels_on_the_emulated_gpu(tmp_path):
    from test_metal import EMU_FLAGS, ROOT, _emulated_program, _run

    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed to run the kernel sources"
    rng = np.random.default_rng(0)
    dim, H, group, T, stride, bt = 64, 3, 2, 37, 40, 16
    kt = metal.HeadTables(_core.Quantizer("turboquant_mse", dim, 3, 11, rotation="hadamard",
                                          stream=kv_stream_id(0, h, 0)) for h in range(H))
    vt = metal.HeadTables(_core.Quantizer("turboquant_mse", dim, 4, 11, rotation="hadamard",
                                          stream=kv_stream_id(0, h, 1)) for h in range(H))
    keys, values = rand(rng, H, stride, dim), rand(rng, H, stride, dim)
    queries = rand(rng, H, group, dim)
    t = metal.threads_for(dim)
    rows = H * stride
    blocks = -(-T // bt)
    kernels = [
        *({"id": f"enc{tb.bits}", "kernel": "encode_heads", "types": ARG_TYPES,
           "grid": (rows * t, 1, 1), "threadgroup": (t, 1, 1),
           "out_bytes": [rows * tb.code_bytes, rows * 2]} for tb in (kt, vt)),
        {"id": "deq", "kernel": "dequantize_heads", "types": ARG_TYPES, "grid": (rows * t, 1, 1),
         "threadgroup": (t, 1, 1), "out_bytes": [rows * dim * 4]},
        {"id": "rot", "kernel": "rotate_heads", "types": ARG_TYPES, "grid": (H * group * t, 1, 1),
         "threadgroup": (t, 1, 1), "out_bytes": [H * group * dim * 4]},
        {"id": "block", "kernel": "attention_block", "types": ARG_TYPES,
         "template": {"SCRATCH": metal.attention_scratch_floats(dim, group, bt, 3, 4)},
         "grid": (blocks * metal.ATTENTION_THREADS, H, 1),
         "threadgroup": (metal.ATTENTION_THREADS, 1, 1),
         "out_bytes": [H * blocks * group * 4] * 2 + [H * blocks * group * dim * 4]},
        {"id": "red", "kernel": "attention_reduce_heads", "types": ARG_TYPES,
         "grid": (group * t, H, 1), "threadgroup": (t, 1, 1), "out_bytes": [H * group * dim * 4]},
    ]
    src = tmp_path / "heads.cpp"
    src.write_text(_emulated_program(kernels))
    exe = tmp_path / "heads"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-w", *EMU_FLAGS, f"-I{ROOT / 'metal'}",
                        str(src), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    f32 = lambda a: np.asarray(a, np.float32).ravel()  # noqa: E731
    wp = lambda words, per: np.concatenate([words, np.array([per], np.uint32)])  # noqa: E731

    def encode(tables, x):
        c, n = _run(exe, tmp_path, f"enc{tables.bits}", [x, tables.signs_numpy(),
                                           f32(tables.quantizers[0].codebook.boundaries),
                                           f32(tables.quantizers[0].codebook.centroids),
                                           wp(metal.encode_params(rows, dim, tables.bits, True),
                                              stride)], 2)
        return (np.frombuffer(c, np.uint8).reshape(H, stride, tables.code_bytes),
                np.frombuffer(n, np.uint16).reshape(H, stride))

    kc, kn = encode(kt, keys)
    vc, vn = encode(vt, values)
    for h in range(H):  # each head with its own rotation, bit-exact with the C++ quantizer
        rc, rn = kt.quantizers[h].encode(keys[h])
        assert np.array_equal(kc[h], rc) and np.array_equal(kn[h], rn.view(np.uint16))
        rc, rn = vt.quantizers[h].encode(values[h])
        assert np.array_equal(vc[h], rc) and np.array_equal(vn[h], rn.view(np.uint16))
    (deq,) = _run(exe, tmp_path, "deq", [vc, vn, f32(vt.quantizers[0].codebook.centroids),
                                         vt.signs_numpy(),
                                         wp(metal.dequant_params(rows, dim, 4, True, True, False),
                                            stride)], 1)
    deq = np.frombuffer(deq, np.float32).reshape(H, stride, dim)
    for h in range(H):
        assert np.array_equal(deq[h], vt.quantizers[h].decode(vc[h], vn[h].view(np.float16)))

    (q_rot,) = _run(exe, tmp_path, "rot", [queries, kt.signs_numpy(),
                                           wp(metal.rotate_params(H * group, dim), group)], 1)
    scale = 0.125
    parts = _run(exe, tmp_path, "block",
                 [np.frombuffer(q_rot, np.float32), kc, kn, vc, vn,
                  f32(kt.quantizers[0].codebook.centroids),
                  f32(vt.quantizers[0].codebook.centroids),
                  metal.attention_params(dim, T, stride, bt, group, 3, 4, True, scale)], 3)
    (out,) = _run(exe, tmp_path, "red",
                  [np.frombuffer(p, np.float32) for p in parts] + [
                      vt.signs_numpy(), metal.reduce_params(dim, blocks, group, True)], 1)
    out = np.frombuffer(out, np.float32).reshape(H, group, dim)
    ref = REF.decode_attention_heads(kt, vt, mx.array(queries), mx.array(kc),
                                     mx.array(kn).view(mx.float16), mx.array(vc),
                                     mx.array(vn).view(mx.float16), T, scale)
    close(out, ref, 1e-5)


def test_build_info_still_reports_the_mlx_path():
    assert turboquant.build_info()["mlx_kernels"] == gpu_path.active_path()


# --- KVCacheBuilder.with_backend("metal") ---------------------------------------------------


def builder(**kw):
    b = (turboquant.KVCacheBuilder().with_head_dim(64).with_layers(2).with_heads(4, 2)
         .with_key_bits(3).with_value_bits(4).with_seed(3).with_block_tokens(16))
    for name, args in kw.items():
        b = getattr(b, name)(*args)
    return b


@pytest.mark.skipif(sys.platform == "darwin", reason="the Linux behaviour")
def test_builder_metal_is_refused_clearly_without_a_mac(monkeypatch):
    monkeypatch.delenv("TURBOQUANT_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="Metal is not available on this platform"):
        builder().with_backend("metal").build()
    assert builder().build().backend == "cpu"


def test_builder_metal_cache_matches_the_cpu_cache(tmp_path):
    b = builder()
    cpu = b.build()
    gpu = b._metal_cache("turboquant_mse", "turboquant_mse", kernels=REF)
    assert gpu.backend == "metal" and type(gpu.core) is MetalKVCache
    rng = np.random.default_rng(8)
    for layer in range(2):
        k, v = rand(rng, 2, 19, 64), rand(rng, 2, 19, 64)
        cpu.append(k, v, layer)
        gpu.append(mx.array(k), mx.array(v), layer)
    assert gpu.memory_bytes() == cpu.memory_bytes()
    assert gpu.effective_bits() == cpu.effective_bits()
    for tq in (1, 5):
        q = rand(rng, 4, tq, 64)
        out = gpu.attend(mx.array(q), 1)
        assert isinstance(out, mx.array)
        close(out, cpu.attend(q, 1))
        close(gpu.attend(q, 0), cpu.attend(q, 0))  # NumPy in, NumPy out
    gpu.save(str(tmp_path / "g.tqkv"))
    back = turboquant.CompressedKVCache.load(str(tmp_path / "g.tqkv"))  # the CPU cache
    q = rand(rng, 4, 1, 64)
    close(back.attend(q, 1), cpu.attend(q, 1), 0)
    assert gpu.trim(4) == 4 and len(gpu) == 15


def test_builder_selects_the_metal_store_where_metal_resolves(monkeypatch):
    # Simulates a Mac: the core resolves "metal", mlx has a Metal device, and the store's
    # default kernel set is the reference one.
    import turboquant.mlx_metal as mm

    monkeypatch.delenv("TURBOQUANT_BACKEND", raising=False)
    monkeypatch.setattr(_core, "resolve_backend",
                        lambda requested: "cpu" if requested == "cpu" else "metal")
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)
    cache = builder().with_backend("metal").build()
    assert cache.backend == "metal" and isinstance(cache, mm.MetalCompressedKVCache)
    assert builder().build().backend == "metal"  # auto picks it too
    assert builder().with_backend("cpu").build().backend == "cpu"
    mixed = builder(with_fp16_window=(8,), with_mixed_precision=(1,))
    assert mixed.with_backend("metal").build().core.layers[0].mixed
    # configurations the store cannot hold: explicit requests are refused with the reason,
    # "auto" falls back to the CPU cache
    for kw, why in (({"with_method": ("polar",)}, "turboquant_mse"),
                    ({"with_fp16_window": (8, [1])}, "fp16 layers"),
                    ({"with_decay": (32, 2)}, "decay"),
                    ({"with_rotation": ("dense",)}, "hadamard"),
                    ({"with_sparse_v": (0.01,)}, "sparse V")):
        with pytest.raises(RuntimeError, match=why):
            builder(**kw).with_backend("metal").build()
        assert builder(**kw).build().backend == "cpu"
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    with pytest.raises(RuntimeError, match="mlx with a Metal device"):
        builder().with_backend("metal").build()
    assert builder().build().backend == "cpu"


def test_core_encoded_and_append_encoded():
    rng = np.random.default_rng(9)
    a = _core.KVCache(64, n_q_heads=2, n_kv_heads=2, key_bits=2, value_bits=5, block_tokens=8)
    k, v = rand(rng, 2, 13, 64), rand(rng, 2, 13, 64)
    a.append(k, v)
    b = _core.KVCache(64, n_q_heads=2, n_kv_heads=2, key_bits=2, value_bits=5, block_tokens=8)
    parts = []
    for role in ("key", "value"):
        pairs = [a.encoded(0, h, role) for h in range(2)]
        parts += [np.stack([c for c, _ in pairs]), np.stack([n for _, n in pairs])]
    assert parts[0].shape == (2, 13, 16) and parts[1].dtype == np.float16
    c, n = a.encoded(0, 1, "value", 4, 3)
    assert np.array_equal(c, parts[2][1, 4:7]) and np.array_equal(n, parts[3][1, 4:7])
    bad = [
        ((parts[0].astype(np.int8), *parts[1:]), TypeError, "uint8"),
        ((parts[0][:1], *parts[1:]), ValueError, "n_kv_heads=2"),
        ((parts[0], parts[1].astype(np.float32), *parts[2:]), TypeError, "float16"),
        ((*parts[:2], parts[2][:, :5].copy(), parts[3][:, :5].copy()), ValueError, "13 tokens"),
        ((*parts[:2], parts[2][:, ::2], parts[3][:, ::2]), ValueError, "C-contiguous"),
        ((parts[0][:, :, :-1].copy(), *parts[1:]), ValueError, "code_bytes=16"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            b.append_encoded(*args)
        assert b.size(0) == 0
    b.append_encoded(*parts)
    assert b.to_bytes() == a.to_bytes()
    with pytest.raises(ValueError, match="beyond"):
        a.encoded(0, 0, "key", 10, 5)
    with pytest.raises(ValueError, match="role"):
        a.encoded(0, 0, "both")


# --- The store on the real turboquant.metal functions, kernels on the emulated GPU ----------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu"))


@pytest.mark.parametrize("hq,hkv,kb,vb", [(4, 2, 3, 4), (3, 1, 2, 2)])
def test_store_on_the_metal_functions_with_emulated_kernels(emulated, monkeypatch, hq, hkv, kb, vb):
    # MetalCodeStore with its default kernel set (turboquant.metal), whose host functions run
    # as on a Mac; only the mx.fast.metal_kernel launch is replaced by the emulator.
    emulated.install(monkeypatch)
    rng = np.random.default_rng(hq)
    d = 32
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=kb, value_bits=vb, seed=4,
              block_tokens=8)
    store, core = MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    assert store.kernels is metal
    start = len(emulated.launches)
    for T in (6, 1, 5):  # 12 tokens over two pages
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_codes(store, core)
    for window in (None, 5):
        q = rand(rng, hq, 1, d)
        close(store.attend(mx.array(q), scale=0.3, window=window),
              core.attend(q, scale=0.3, window=window))
    q = rand(rng, hq, 4, d)
    close(store.attend(mx.array(q), window=6), core.attend(q, window=6))
    used = set(emulated.launches[start:])
    assert used == {"encode_heads", "rotate_heads", "attention_block",
                    "attention_reduce_heads", dequantize_kernel(d)}, used


@pytest.mark.parametrize("dtype,split", [("float16", False), ("bfloat16", True)])
def test_half_precision_prefill_on_emulated_kernels(emulated, monkeypatch, dtype, split):
    # attend(dtype=...) of a prefill decodes the tile to fp16 and attends in the model's
    # precision: within half-precision rounding of the core, in that dtype; float32 stays
    # exact; decode steps ignore it; another dtype is refused.
    emulated.install(monkeypatch)
    rng = np.random.default_rng(7)
    d, hq, hkv = 64, 4, 2
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=4,
              block_tokens=8, fp16_sinks=2, fp16_window=8)
    if split:
        kw.update(key_bits=2, n_outlier_channels=d // 2, outlier_bits=4,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys")
    store, core = MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = rand(rng, hkv, 40, d), rand(rng, hkv, 40, d)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    q = rand(rng, hq, 6, d)
    want = core.attend(q, scale=0.2)
    start = len(emulated.launches)
    half = store.attend(mx.array(q), scale=0.2, dtype=getattr(mx, dtype))
    assert half.dtype == getattr(mx, dtype) and half.shape == q.shape
    assert dequantize_kernel(d, split, tile=dtype == "float16") in emulated.launches[start:]
    err = np.abs(np.array(half.astype(mx.float32)) - want).max()
    assert 0 < err < (2e-2 if dtype == "bfloat16" else 4e-3), err
    close(store.attend(mx.array(q), scale=0.2, dtype=mx.float32), want)
    q1 = rand(rng, hq, 1, d)
    assert store.attend(mx.array(q1), dtype=mx.float16).dtype == mx.float32
    with pytest.raises(ValueError, match="dtype must be"):
        store.attend(mx.array(q), dtype=mx.int32)


def test_single_quantizer_metal_functions_with_emulated_kernels(emulated, monkeypatch):
    emulated.install(monkeypatch)
    rng = np.random.default_rng(12)
    kq = _core.Quantizer("turboquant_mse", 32, 3, 5, rotation="hadamard")
    vq = _core.Quantizer("turboquant_mse", 32, 2, 6, rotation="hadamard")
    k, v = rand(rng, 10, 32), rand(rng, 10, 32)
    kc, kn = metal.encode(kq, mx.array(k))
    vc, vn = metal.encode(vq, mx.array(v))
    rc, rn = kq.encode(k)
    assert np.array_equal(np.array(kc), rc) and np.array_equal(np.array(kn), rn)
    dec = np.array(metal.dequantize(kq, kc, kn))  # default out_dtype: fp32, decoded
    assert np.array_equal(dec, kq.decode(rc, rn))
    half = metal.dequantize(kq, kc, kn, out_dtype=mx.float16)
    assert half.dtype == mx.float16 and np.array_equal(np.array(half), dec.astype(np.float16))
    q = rand(rng, 2, 2, 32)
    out = metal.decode_attention(kq, vq, mx.array(q), kc.reshape(2, 5, -1), kn.reshape(2, 5),
                                 vc.reshape(2, 5, -1), vn.reshape(2, 5), 4, 0.25)
    kd = kq.decode(rc, rn).reshape(2, 5, 32)[:, :4]
    vd = vq.decode(np.array(vc), np.array(vn)).reshape(2, 5, 32)[:, :4]
    s = np.einsum("hgd,htd->hgt", q, kd) * 0.25
    p = np.exp(s - s.max(-1, keepdims=True))
    close(out, np.einsum("hgt,htd->hgd", p / p.sum(-1, keepdims=True), vd), 1e-5)


# --- Norm correction, fp16 sinks and the fp16 recent window in the store -------------------


def quality_pair(d=64, hq=4, hkv=2, kb=3, vb=3, bt=8, nc=True, sinks=0, window=0, seed=5,
                 kernels=REF):
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=kb, value_bits=vb, seed=seed,
              block_tokens=bt, norm_correction=nc, fp16_sinks=sinks, fp16_window=window)
    return MetalCodeStore(d, kernels=kernels, **kw), _core.KVCache(d, **kw)


def assert_same_state(store, core):
    """Same sizes, codes (bit-exact), fp16 rows and memory as the C++ cache."""
    assert_same_codes_and_rows(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    assert store.fp16_bytes() == core.fp16_bytes()


def assert_same_codes_and_rows(store, core):
    assert store.size() == core.size(0)
    assert store.sink_tokens() == core.sink_tokens(0)
    assert store.coded_tokens() == core.coded_tokens(0)
    assert store.code_tokens() == core.code_tokens(0)
    assert store.window_tokens() == core.window_tokens(0)
    nc = core.code_tokens(0)
    for h in range(core.n_kv_heads):
        for role in ("key", "value"):
            sc, sn = store.encoded(0, h, role)
            cc, cn = core.encoded(0, h, role, 0, nc)
            assert np.array_equal(sc, cc), (h, role)
            assert np.array_equal(sn.view(np.uint16), cn.view(np.uint16)), (h, role)
            # every token: sinks and window as stored, codes decoded
            assert np.array_equal(store.decode(0, h, role), core.decode(0, h, role)), (h, role)


def attention_matches(store, core, rng, hq, d, tol=5e-5):
    for window in (None, 3, 11, 1000):  # decode: split-K on the codes + fp16 part, merged
        q = rand(rng, hq, 1, d)
        close(store.attend(mx.array(q), scale=0.3, window=window),
              core.attend(q, scale=0.3, window=window), tol)
    n = store.size()
    for causal, window in ((True, None), (True, 7), (False, None), (False, 9)):
        q = rand(rng, hq, min(n, 6), d)
        close(store.attend(mx.array(q), causal=causal, scale=0.3, window=window),
              core.attend(q, causal=causal, scale=0.3, window=window), tol)


@pytest.mark.parametrize("d,hq,hkv,kb,vb", [(64, 4, 2, 3, 3), (128, 8, 1, 2, 4), (32, 3, 3, 4, 2),
                                            (16, 2, 1, 1, 3), (256, 2, 2, 3, 3)])
def test_norm_correction_codes_and_norms_equal_the_cores(d, hq, hkv, kb, vb):
    rng = np.random.default_rng(d + kb)
    store, core = quality_pair(d, hq, hkv, kb, vb, bt=16)
    plain, _ = quality_pair(d, hq, hkv, kb, vb, bt=16, nc=False)
    for T in (7, 1, 30, 2):
        k, v = rand(rng, hkv, T, d) * 3, rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        plain.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_state(store, core)
    # the correction changed the norms (and only them): the decoded vectors keep ‖x‖
    assert np.array_equal(store.encoded(0, 0, "key")[0], plain.encoded(0, 0, "key")[0])
    assert not np.array_equal(store.encoded(0, 0, "key")[1], plain.encoded(0, 0, "key")[1])
    attention_matches(store, core, rng, hq, d)
    blob = store.to_bytes()
    assert blob == core.to_bytes()
    back = _core.KVCache.from_bytes(blob)
    assert back.norm_correction and np.array_equal(back.decode(0, 0, "value"),
                                                   core.decode(0, 0, "value"))
    again = MetalCodeStore.from_bytes(blob, kernels=REF)
    assert again.norm_correction
    assert_same_state(again, core)


@pytest.mark.parametrize("d,hq,hkv,sinks,window,bt", [
    (64, 4, 2, 4, 8, 8),     # the mlx-lm layout: sinks + window, GQA 2
    (32, 6, 1, 0, 5, 4),     # window only, GQA 6, window not a multiple of the block
    (128, 2, 2, 3, 0, 8),    # sinks only (the window holds up to one block)
    (64, 20, 1, 2, 6, 16),   # GQA above 16 (two decode passes)
])
def test_fp16_sinks_and_window_match_the_core(d, hq, hkv, sinks, window, bt):
    rng = np.random.default_rng(d + hq + sinks)
    store, core = quality_pair(d, hq, hkv, bt=bt, sinks=sinks, window=window)
    # uneven appends: one token (filling sinks one by one), a prefill, decode steps
    for T in (1, 2, 13, 1, 1, 1, 29, 1, 3):
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        assert_same_state(store, core)
    assert store.code_tokens() > 0 and store.window_tokens() > 0
    attention_matches(store, core, rng, hq, d)
    assert store.to_bytes() == core.to_bytes()
    # trims: inside the window, below it (into the codes), into the sinks; then append again
    for cut, more in ((2, 1), (store.window_tokens() + 3, 2), (0, 5), (1000, 3),
                      (0, sinks + window + 2 * bt + 1)):
        assert store.trim(cut) == core.trim(cut)
        assert_same_state(store, core)
        k, v = rand(rng, hkv, more, d), rand(rng, hkv, more, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        assert_same_state(store, core)
        attention_matches(store, core, rng, hq, d)
    blob = store.to_bytes()
    assert blob == core.to_bytes()
    back = MetalCodeStore.from_bytes(blob, kernels=REF)
    assert_same_codes_and_rows(back, core)
    attention_matches(back, core, rng, hq, d)
    k, v = rand(rng, hkv, bt + 1, d), rand(rng, hkv, bt + 1, d)  # the loaded store flushes
    back.append(mx.array(k), mx.array(v))
    core.append(k, v)
    assert_same_codes_and_rows(back, core)


def test_prefill_gives_sdpa_the_fused_causal_mask(monkeypatch):
    # A prefill chunk's queries are the last of the keys: mlx's "causal" string is that mask,
    # and sdpa's fused kernels take it (cuDNN on CUDA); an array mask would send CUDA's sdpa
    # to its unfused fallback. A sliding window still needs an array.
    rng = np.random.default_rng(3)
    store, core = quality_pair(64, 4, 2, bt=8, sinks=4, window=8)
    k, v = rand(rng, 2, 40, 64), rand(rng, 2, 40, 64)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    masks, sdpa = [], mx.fast.scaled_dot_product_attention

    def recording(*a, mask=None, **kw):
        masks.append(mask)
        return sdpa(*a, mask=mask, **kw)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", recording)
    q = rand(rng, 4, 6, 64)
    for half in (None, mx.float16):
        out = np.array(store.attend(mx.array(q), dtype=half).astype(mx.float32))
        np.testing.assert_allclose(out, core.attend(q), atol=2e-2 if half else 1e-4)
    assert masks == ["causal", "causal"]
    store.attend(mx.array(q), window=16)
    assert isinstance(masks[-1], mx.array)


def test_windowed_store_refuses_bad_input_unchanged():
    rng = np.random.default_rng(11)
    store, core = quality_pair(sinks=2, window=4, bt=4)
    k, v = rand(rng, 2, 9, 64), rand(rng, 2, 9, 64)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    big = rand(rng, 2, 3, 64)
    big[0, 1, 5] = 1e6  # finite in fp32, not in fp16: refused by both
    with pytest.raises(ValueError, match="not finite in fp16"):
        store.append(mx.array(big), mx.array(big))
    with pytest.raises(ValueError):
        core.append(big, big)
    assert_same_state(store, core)
    with pytest.raises(ValueError, match="integer >= 0"):
        MetalCodeStore(64, fp16_window=-1, kernels=REF)


def test_quality_store_on_the_metal_functions_with_emulated_kernels(emulated, monkeypatch):
    # Norm correction computed by the encode kernel, the split-K decode's log-sum-exp merged
    # with the fp16 sinks/window: the real turboquant.metal host functions, emulated GPU.
    emulated.install(monkeypatch)
    rng = np.random.default_rng(13)
    d, hq, hkv = 32, 4, 2
    store, core = quality_pair(d, hq, hkv, kb=3, vb=2, bt=4, sinks=2, window=3, kernels=None)
    assert store.kernels is metal
    start = len(emulated.launches)
    for T in (1, 12, 1, 2):  # 16 tokens: 2 sinks, 8 coded, a window of 6
        k, v = rand(rng, hkv, T, d) * 2, rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_state(store, core)  # codes and corrected norms bit-exact
    for window in (None, 5, 9):
        q = rand(rng, hq, 1, d)
        close(store.attend(mx.array(q), scale=0.3, window=window),
              core.attend(q, scale=0.3, window=window), 1e-4)
    q = rand(rng, hq, 5, d)
    close(store.attend(mx.array(q), window=6), core.attend(q, window=6), 1e-4)
    used = set(emulated.launches[start:])
    # The reduce launch merges the fp16 sinks/window in (attention_reduce_rows).
    assert used == {"encode_heads", "rotate_heads", "attention_block",
                    "attention_reduce_rows", dequantize_kernel(d)}, used


def test_norm_corrected_encode_kernel_on_the_emulated_gpu(emulated, monkeypatch):
    # metal.encode / encode_heads with quantizers built with norm_correction=True
    emulated.install(monkeypatch)
    rng = np.random.default_rng(14)
    for d, bits in ((64, 3), (16, 1), (128, 4)):
        q = _core.Quantizer("turboquant_mse", d, bits, 3, rotation="hadamard",
                            norm_correction=True)
        x = rand(rng, 40, d) * 5
        x[3] = 0.0
        codes, norms = metal.encode(q, mx.array(x))
        rc, rn = q.encode(x)
        assert np.array_equal(np.array(codes), rc)
        assert np.array_equal(np.array(norms).view(np.uint16), rn.view(np.uint16))
        tables = metal.HeadTables([q, _core.Quantizer("turboquant_mse", d, bits, 3,
                                                      rotation="hadamard", norm_correction=True,
                                                      stream=9)])
        hc, hn = metal.encode_heads(tables, mx.array(x.reshape(2, 20, d)))
        for h in range(2):
            rc, rn = tables.quantizers[h].encode(x.reshape(2, 20, d)[h])
            assert np.array_equal(np.array(hc[h]), rc)
            assert np.array_equal(np.array(hn[h]).view(np.uint16), rn.view(np.uint16))
    with pytest.raises(ValueError, match="norm correction"):
        metal.HeadTables([q, _core.Quantizer("turboquant_mse", 128, 4, 3, rotation="hadamard")])


def test_mlx_lm_quality_features_take_the_metal_path(monkeypatch, tmp_path):
    # A simulated Mac (reference kernels): debias (norm correction), fp16 sinks and window
    # run on the store, with the C++ core's logits; decay and sparse V stay on the core.
    import turboquant.mlx_metal as mm
    from mlx_lm.models import cache as mlx_cache
    from mlx_tiny import tiny_model

    from turboquant import mlx_lm as tq_mlx

    model = tiny_model("llama")
    tokens = np.random.default_rng(15).integers(0, 128, 40).tolist()
    cfg = dict(key_bits=3, value_bits=3, key_split=False, fp16_sinks=2, fp16_window=6,
               block_tokens=4, seed=3)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)
    gpu = tq_mlx.make_prompt_cache(model, preset="codes-only", **cfg)
    logits = [np.array(model(mx.array(tokens[:21])[None], cache=gpu))]
    for t in tokens[21:26]:  # decode steps: the merged split-K path
        logits.append(np.array(model(mx.array([[t]]), cache=gpu)))
    assert all(c._gpu and isinstance(c._core, mm.MetalCodeStore) for c in gpu)
    assert all(c._core.norm_correction and c._core.fp16_sinks == 2 for c in gpu)
    assert gpu[0]._core.window_tokens() > 0 and gpu[0]._core.code_tokens() > 0
    # key split: on the store from head_dim 32
    default = tq_mlx.make_prompt_cache(model, preset="codes-only")
    model(mx.array(tokens[:8])[None], cache=default)
    assert not any(c._gpu for c in default)  # head_dim 16: halves of 8 channels
    assert "head_dim >= 32" in default[0].gpu_refusal(16)
    assert default[0].gpu_refusal(64) is None  # (test_mlx_metal_split.py runs it)
    assert "decay" in tq_mlx.TurboQuantKVCache(decay_after=8, decay_bits=2).gpu_refusal(64)
    assert "sparse_v" in tq_mlx.TurboQuantKVCache(sparse_v=0.01).gpu_refusal(64)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu = tq_mlx.make_prompt_cache(model, preset="codes-only", **cfg)
    ref = [np.array(model(mx.array(tokens[:21])[None], cache=cpu))]
    for t in tokens[21:26]:
        ref.append(np.array(model(mx.array([[t]]), cache=cpu)))
    assert not any(c._gpu for c in cpu)
    for a, b in zip(logits, ref):
        np.testing.assert_allclose(a, b, atol=3e-4)
    # prompt-cache files cross between the two paths, and load back on the Metal path
    path = str(tmp_path / "q.safetensors")
    mlx_cache.save_prompt_cache(path, gpu)
    loaded = mlx_cache.load_prompt_cache(path)  # on the CPU path now
    x = np.array(model(mx.array(tokens[26:29])[None], cache=loaded))
    y = np.array(model(mx.array(tokens[26:29])[None], cache=cpu))
    np.testing.assert_allclose(x, y, atol=3e-4)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    again = mlx_cache.load_prompt_cache(path)
    assert all(isinstance(c._core, mm.MetalCodeStore) and c._core.norm_correction
               and c._core.window_tokens() == g._core.window_tokens() > 0
               for c, g in zip(again, gpu))
    z = np.array(model(mx.array(tokens[26:29])[None], cache=again))
    np.testing.assert_allclose(z, y, atol=3e-4)


def test_builder_metal_cache_with_sinks_and_window_matches_the_cpu_cache():
    b = builder(with_fp16_window=(6,), with_fp16_sinks=(2,), with_block_tokens=(4,))
    cpu = b.build()
    gpu = b._metal_cache("turboquant_mse", "turboquant_mse", kernels=REF)
    assert gpu.core.layers[0].fp16_window == 6 and gpu.core.layers[0].fp16_sinks == 2
    rng = np.random.default_rng(16)
    for T in (3, 14, 1):
        for layer in range(2):
            k, v = rand(rng, 2, T, 64), rand(rng, 2, T, 64)
            cpu.append(k, v, layer)
            gpu.append(mx.array(k), mx.array(v), layer)
    assert gpu.memory_bytes() == cpu.memory_bytes()
    for tq in (1, 4):
        q = rand(rng, 4, tq, 64)
        close(gpu.attend(mx.array(q), 1), cpu.attend(q, 1), 5e-5)


def test_mlx_lm_quality_path_end_to_end_on_the_emulated_gpu(emulated, monkeypatch):
    # The mlx-lm cache as on a Mac with mlx_lm's defaults except the key split (debias on,
    # fp16 sinks + window): every kernel launch on the emulated GPU; logits as the C++ core's.
    from mlx_tiny import tiny_model

    from turboquant import mlx_lm as tq_mlx

    model = tiny_model("llama")
    tokens = np.random.default_rng(17).integers(0, 128, 16).tolist()
    cfg = dict(key_bits=3, value_bits=3, key_split=False, fp16_sinks=2, fp16_window=3,
               block_tokens=4, seed=1)
    emulated.install(monkeypatch)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    start = len(emulated.launches)
    gpu = tq_mlx.make_prompt_cache(model, preset="codes-only", **cfg)
    out = [np.array(model(mx.array(tokens[:12])[None], cache=gpu))]
    for t in tokens[12:14]:
        out.append(np.array(model(mx.array([[t]]), cache=gpu)))
    assert all(c._gpu and c._core.kernels is metal and c._core.norm_correction for c in gpu)
    d = model.args.hidden_size // model.args.num_attention_heads
    assert {"encode_heads", "attention_block",
            dequantize_kernel(d)} <= set(emulated.launches[start:])
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu = tq_mlx.make_prompt_cache(model, preset="codes-only", **cfg)
    ref = [np.array(model(mx.array(tokens[:12])[None], cache=cpu))]
    for t in tokens[12:14]:
        ref.append(np.array(model(mx.array([[t]]), cache=cpu)))
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=3e-4)


def test_pages_grow_by_an_eighth_and_memory_counts_the_pages_in_use(monkeypatch):
    # A long run of one-token appends: the page arrays are reallocated (a copy of the
    # layer's codes) a logarithmic number of times, not once per page; memory_bytes() stays
    # the core's; allocated_bytes() counts the rows allocated, at most ~1/8 (plus a page)
    # more; a trim of a few tokens keeps the arrays, a large one shrinks them.
    from turboquant import mlx_metal

    grows = []
    real = mlx_metal._WidthGroup.grow
    monkeypatch.setattr(mlx_metal._WidthGroup, "grow",
                        lambda self, a, b: (grows.append((a, b)), real(self, a, b))[1])
    rng = np.random.default_rng(2)
    d, hkv = 32, 2
    store, core = pair(d, 4, hkv)
    k, v = rand(rng, hkv, 1200, d), rand(rng, hkv, 1200, d)
    for a, b in [(0, 100)] + [(t, t + 1) for t in range(100, 1200)]:
        kt, vt = np.ascontiguousarray(k[:, a:b]), np.ascontiguousarray(v[:, a:b])
        store.append(mx.array(kt), mx.array(vt))
        core.append(kt, vt)
    pages = 1200 // store.block_tokens
    assert len(grows) < 25 < pages, (len(grows), pages)
    assert store.memory_bytes() == core.memory_bytes()
    rows = store.code_arrays()[0].shape[1]
    assert 1200 <= rows <= 1200 * 9 // 8 + 2 * store.block_tokens
    extra = (rows - 1200) * store.bytes_per_token()
    assert store.allocated_bytes() == store.memory_bytes() + extra
    assert_same_codes(store, core)
    q = rand(rng, 4, 1, d)
    close(store.attend(mx.array(q)), core.attend(q))
    store.trim(20)
    core.trim(20)
    assert store.code_arrays()[0].shape[1] == rows  # kept: no copy
    assert store.memory_bytes() == core.memory_bytes()
    close(store.attend(mx.array(q)), core.attend(q))
    store.trim(900)
    core.trim(900)
    assert store.code_arrays()[0].shape[1] < rows // 2
    assert store.memory_bytes() == core.memory_bytes() == store.allocated_bytes()
    assert_same_codes(store, core)


def test_page_arrays_hold_whole_16_row_chunks_with_small_pages():
    # 8-token pages: the arrays still hold a multiple of 16 rows after every growth and a
    # shrinking trim (the tensor-core decode kernel needs each head's rows on 16-byte chunks),
    # while memory_bytes() counts the pages in use, as the core does.
    rng = np.random.default_rng(3)
    d, hkv = 32, 2
    store, core = pair(d, 4, hkv, bt=8)
    for T in (9, 1, 30, 1, 1, 200):
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        assert store.code_arrays()[0].shape[1] % 16 == 0
        assert store.memory_bytes() == core.memory_bytes()
    store.trim(200)
    core.trim(200)
    rows = store.code_arrays()[0].shape[1]
    assert rows % 16 == 0 and rows < 100
    assert store.memory_bytes() == core.memory_bytes()
    assert_same_codes(store, core)
