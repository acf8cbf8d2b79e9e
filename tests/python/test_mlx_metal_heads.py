"""Per-KV-head bit widths in the mlx-resident store (turboquant.mlx_metal), against the C++
core's key_head_bits / value_head_bits / outlier_head_bits.

The store groups KV heads by their (key, value) widths and runs each group on the kernels of
its widths. Checked on ReferenceKernels (the store's grouping, paging, GQA mapping, files)
and on the emulated GPU kernels through the real turboquant.metal host functions: codes,
norms, decoded rows, memory and file bytes equal to the core's, attention within fp32
tolerance, files loading across the two, and the mlx-lm cache taking the store for a
per-head profile.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from metal_args import dequantize_kernel  # noqa: E402
from turboquant import _core, metal  # noqa: E402
from turboquant import gpu_path
from turboquant.mlx_metal import MetalCodeStore, MetalKVCache, ReferenceKernels  # noqa: E402

REF = ReferenceKernels()


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def split_keys(rng, h, t, d):
    """Keys whose halves differ in scale from token to token (part angles over [0, π/2])."""
    x = rand(rng, h, t, d)
    x[..., : d // 2] *= np.exp(rng.uniform(-2.5, 2.5, (h, t, 1))).astype(np.float32)
    return x


def close(a, b, tol=5e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, err


def assert_same_state(store, core, layer=0, rows=True):
    """Sizes, codes and norms (bit-exact), every decoded row as the core's (``rows``)."""
    assert store.size() == core.size(layer)
    assert store.sink_tokens() == core.sink_tokens(layer)
    assert store.code_tokens() == core.code_tokens(layer)
    assert store.window_tokens() == core.window_tokens(layer)
    nc = core.code_tokens(layer)
    for h in range(core.n_kv_heads):
        for role in ("key", "value"):
            sc, sn = store.encoded(0, h, role)
            cc, cn = core.encoded(layer, h, role, 0, nc)
            assert sc.shape == cc.shape and np.array_equal(sc, cc), (h, role)
            assert np.array_equal(sn.view(np.uint16), cn.view(np.uint16)), (h, role)
            if rows:
                assert np.array_equal(store.decode(0, h, role),
                                      core.decode(layer, h, role)), (h, role)


def attention_matches(store, core, rng, hq, d, tol=5e-5):
    for window in (None, 3, 11):  # decode: per width group, merged with the fp16 rows
        q = rand(rng, hq, 1, d)
        close(store.attend(mx.array(q), scale=0.3, window=window),
              core.attend(q, scale=0.3, window=window), tol)
    n = store.size()
    for causal, window in ((True, None), (True, 7), (False, None)):  # prefill
        q = rand(rng, hq, min(n, 6), d)
        close(store.attend(mx.array(q), causal=causal, scale=0.3, window=window),
              core.attend(q, causal=causal, scale=0.3, window=window), tol)


def heads_kw(hq, hkv, kh, vh, bt=8, sinks=0, window=0, nc=True, seed=5, **extra):
    lists = {k: v for k, v in (("key_head_bits", kh), ("value_head_bits", vh)) if v}
    return dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=seed,
                block_tokens=bt, norm_correction=nc, fp16_sinks=sinks, fp16_window=window,
                **lists, **extra)


# d, hq, hkv, key widths, value widths, fp16 sinks, fp16 window: the heads form 1 to 4 width
# groups, interleaved (a group's heads are not contiguous) and of unequal sizes.
PLAIN = [(64, 8, 4, [2, 4, 2, 3], [4, 2, 4, 4], 0, 0),
         (32, 6, 3, [1, 3, 3], [3, 3, 3], 2, 5),
         (64, 4, 4, [3, 3, 3, 3], [2, 5, 2, 5], 0, 6),
         (128, 2, 2, [4, 2], None, 1, 0)]


@pytest.mark.parametrize("d,hq,hkv,kh,vh,sinks,window", PLAIN)
def test_per_head_widths_match_the_core(d, hq, hkv, kh, vh, sinks, window):
    rng = np.random.default_rng(d + hkv + sinks)
    kw = heads_kw(hq, hkv, kh, vh, sinks=sinks, window=window)
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    widths = {(k, (vh or [3] * hkv)[h]) for h, k in enumerate(kh)}
    assert len(store.width_groups) == len(widths)
    for T in (5, 1, 19, 1, 11):  # uneven chunks over page boundaries (block_tokens=8)
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_state(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    assert store.fp16_bytes() == core.fp16_bytes()
    assert store.bytes_per_token() == core.bytes_per_token()
    attention_matches(store, core, rng, hq, d)
    # files: the store's bytes are the core's, and each loads in the other
    blob = core.to_bytes()
    assert store.to_bytes() == blob
    back = MetalCodeStore.from_bytes(blob, kernels=REF)
    assert back.key_head_bits == tuple(kh) and back.width_groups == store.width_groups
    assert_same_state(back, core)
    assert back.to_bytes() == blob
    # trims (into the codes too), then appends, as the core
    for n in (3, 14):
        assert store.trim(n) == core.trim(n)
        assert_same_state(store, core)
        assert store.memory_bytes() == core.memory_bytes()
    k, v = rand(rng, hkv, 9, d), rand(rng, hkv, 9, d)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    assert_same_state(store, core)
    attention_matches(store, core, rng, hq, d)
    assert store.to_bytes() == core.to_bytes()


def test_per_layer_widths_in_a_multi_layer_cache():
    # n_layers × n_kv_heads entries (layer-major): each layer's store takes its own row.
    rng = np.random.default_rng(3)
    d, H = 32, 3
    kh, vh = [2, 3, 2, 4, 4, 1], [3, 3, 3, 2, 4, 2]
    kw = dict(n_layers=2, n_q_heads=6, n_kv_heads=H, key_bits=3, value_bits=3, seed=9,
              block_tokens=4, norm_correction=True, fp16_window=3, key_head_bits=kh,
              value_head_bits=vh)
    gpu, cpu = MetalKVCache(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    assert [len(s.width_groups) for s in gpu.layers] == [2, 3]
    for T in (7, 1, 6):
        for layer in range(2):
            k, v = rand(rng, H, T, d), rand(rng, H, T, d)
            gpu.append(mx.array(k), mx.array(v), layer)
            cpu.append(k, v, layer)
    for layer in range(2):
        assert_same_state(gpu.layers[layer], cpu, layer)
        q = rand(rng, 6, 1, d)
        close(gpu.attend(mx.array(q), layer), cpu.attend(q, layer))
    assert gpu.memory_bytes() == cpu.memory_bytes()
    # codes and fp16 norms of every layer's heads at their own widths
    assert gpu.bytes_per_token() == sum(metal.code_bytes(d, kb) + metal.code_bytes(d, vb) + 4
                                        for kb, vb in zip(kh, vh))
    blob = cpu.to_bytes()
    assert gpu.to_bytes() == blob
    back = MetalKVCache.from_bytes(blob, kernels=REF)
    assert back.key_head_bits == tuple(kh) and back.to_bytes() == blob


def test_split_keys_with_per_head_widths_match_the_core():
    # The mlx-lm form: each head splits its own key width (outlier half +1, the rest -1).
    rng = np.random.default_rng(11)
    d, hkv, hq = 64, 3, 6
    widths = [3, 2, 3]
    kw = heads_kw(hq, hkv, [b - 1 for b in widths], [3, 4, 4], sinks=2, window=4,
                  n_outlier_channels=d // 2, outlier_bits=4, outlier_channels=list(range(d // 2)),
                  outlier_roles="keys", split_angle_bits=8,
                  outlier_head_bits=[b + 1 for b in widths])
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    assert store.key_split and store.width_groups == [(0,), (1,), (2,)]
    for T in (13, 1, 1, 8):
        k, v = split_keys(rng, hkv, T, d), rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_state(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    attention_matches(store, core, rng, hq, d)
    blob = core.to_bytes()
    assert store.to_bytes() == blob
    assert MetalCodeStore.from_bytes(blob, kernels=REF).to_bytes() == blob


def test_per_head_widths_the_store_refuses():
    base = heads_kw(4, 2, [2, 3], None)
    for kh, text in (([2, 3, 4], r"key_head_bits must have one entry per KV head"),
                     ([2, 9], r"key_head_bits\[1\] must be an integer in \[1, 8\], got 9"),
                     ([0, 2], r"key_head_bits\[0\] must be an integer in \[1, 8\]"),
                     ([2, True], r"key_head_bits\[1\] must be an integer")):
        with pytest.raises(ValueError, match=text):
            MetalCodeStore(64, kernels=REF, **dict(base, key_head_bits=kh))
    with pytest.raises(ValueError, match="one per layer and KV head .* covering layer 2"):
        MetalCodeStore(64, kernels=REF, layer=2, **dict(base, key_head_bits=[2, 3, 3, 3]))
    with pytest.raises(ValueError, match="outlier_head_bits needs the key split"):
        MetalCodeStore(64, kernels=REF, **dict(base, outlier_head_bits=[4, 4]))
    store = MetalCodeStore(64, kernels=REF, **base)
    with pytest.raises(ValueError, match="2 different widths"):
        _ = store.key_tables
    # a uniform list is one group: the tables of a uniform store
    same = MetalCodeStore(64, kernels=REF, **dict(base, key_head_bits=[3, 3]))
    assert same.width_groups == [(0, 1)] and same.key_tables.bits == 3


def test_core_append_encoded_takes_per_head_rows():
    rng = np.random.default_rng(5)
    kw = heads_kw(4, 2, [2, 4], [3, 1], bt=4)
    a, b = _core.KVCache(32, **kw), _core.KVCache(32, **kw)
    a.append(rand(rng, 2, 9, 32), rand(rng, 2, 9, 32))
    parts = [[a.encoded(0, h, role) for h in range(2)] for role in ("key", "value")]
    kc, kn = [c for c, _ in parts[0]], [x for _, x in parts[0]]
    vc, vn = [c for c, _ in parts[1]], [x for _, x in parts[1]]
    with pytest.raises(ValueError, match="one array per KV head"):  # one array: refused
        b.append_encoded(np.zeros((2, 9, 8), np.uint8), np.zeros((2, 9), np.float16), vc, vn)
    with pytest.raises(ValueError, match=r"codes of KV head 1 must have shape \(n, code_bytes=16"):
        b.append_encoded([kc[0], kc[0]], kn, vc, vn)
    with pytest.raises(ValueError, match="KV head 1 hold 8 tokens but those of KV head 0 hold 9"):
        b.append_encoded([kc[0], kc[1][:8]], [kn[0], kn[1][:8]], vc, vn)
    with pytest.raises(ValueError, match="one array per KV head .n_kv_heads=2., got 1"):
        b.append_encoded(kc[:1], kn[:1], vc, vn)
    assert b.size(0) == 0  # refused before anything was written
    b.append_encoded(kc, kn, vc, vn)
    assert b.to_bytes() == a.to_bytes()


# --- The store on the turboquant.metal functions, kernels on the emulated GPU ---------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_heads"))


@pytest.mark.parametrize("split", [False, True])
def test_per_head_widths_on_the_emulated_gpu(emulated, monkeypatch, split):
    emulated.install(monkeypatch)
    rng = np.random.default_rng(21 + split)
    d, hkv, hq = 32, 3, 6
    if split:
        kw = heads_kw(hq, hkv, [1, 2, 1], [3, 2, 3], sinks=2, window=3,
                      n_outlier_channels=d // 2, outlier_bits=3,
                      outlier_channels=list(range(d // 2)), outlier_roles="keys",
                      outlier_head_bits=[3, 4, 3])
    else:
        kw = heads_kw(hq, hkv, [2, 4, 2], [3, 2, 3], sinks=2, window=3)
    store, core = MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    assert store.kernels is metal and store.width_groups == [(0, 2), (1,)]
    start = len(emulated.launches)
    for T in (11, 1, 6):
        k = split_keys(rng, hkv, T, d) if split else rand(rng, hkv, T, d)
        v = rand(rng, hkv, T, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_state(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    for window in (None, 5):
        q = rand(rng, hq, 1, d)
        close(store.attend(mx.array(q), scale=0.3, window=window),
              core.attend(q, scale=0.3, window=window))
    q = rand(rng, hq, 4, d)
    close(store.attend(mx.array(q)), core.attend(q))
    used = set(emulated.launches[start:])
    assert {"split_encode_heads" if split else "encode_heads", "attention_reduce_rows",
            dequantize_kernel(d, split)} <= used, used
    assert store.to_bytes() == core.to_bytes()


# --- mlx-lm: a per-head profile takes the GPU store ------------------------------------------


def test_mlx_lm_per_head_profile_takes_the_gpu_store(monkeypatch, tmp_path):
    import importlib

    import turboquant.mlx_metal as mm
    from mlx_lm.models import cache as mlx_cache
    from mlx_tiny import _COMMON

    from turboquant import mlx_lm as tq_mlx

    llama = importlib.import_module("mlx_lm.models.llama")  # head_dim 32: the key split runs
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(_COMMON, model_type="llama",
                                                       hidden_size=128)))
    mx.eval(model.parameters())
    prof = {"format": tq_mlx.PROFILE_FORMAT, "version": 1,
            "layers": [{"key_bits": [2, 4], "value_bits": [3, 2]},
                       {"key_bits": 3, "value_bits": [4, 2]}]}
    cfg = dict(profile=prof, fp16_sinks=2, fp16_window=4, block_tokens=4, seed=3)
    tokens = np.random.default_rng(23).integers(0, 128, 24).tolist()

    def run(cache):
        out = [np.array(model(mx.array(tokens[:17])[None], cache=cache))]
        for t in tokens[17:21]:
            out.append(np.array(model(mx.array([[t]]), cache=cache)))
        return out

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)
    assert tq_mlx.TurboQuantKVCache(key_split=False, value_head_bits=[2, 3]).gpu_refusal(32) \
        is None
    gpu = tq_mlx.make_prompt_cache(model, **cfg)
    out = run(gpu)
    assert all(c._gpu and isinstance(c._core, mm.MetalCodeStore) for c in gpu)
    assert gpu[0]._core.key_split and gpu[0]._core.outlier_head_bits == (3, 5)
    assert len(gpu[0]._core.width_groups) == 2 and len(gpu[1]._core.width_groups) == 2
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu = tq_mlx.make_prompt_cache(model, **cfg)
    ref = run(cpu)
    assert not any(c._gpu for c in cpu)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=3e-4)
    for c, g in zip(cpu, gpu):  # the same codes as the core's (the fp16 rows of keys and
        # values centred on the GPU may differ from the host's in the last bit)
        assert_same_state(g._core, c._core, rows=False)
    # prompt-cache files cross between the two paths byte for byte
    for saved, load_path in ((gpu, "cpu"), (cpu, "metal")):
        path = str(tmp_path / f"from_{load_path}.safetensors")
        mlx_cache.save_prompt_cache(path, saved)
        monkeypatch.setattr(gpu_path, "active_path", lambda p=load_path: p)
        loaded = mlx_cache.load_prompt_cache(path)
        assert all(c._gpu == (load_path == "metal") for c in loaded)
        for a, b in zip(loaded, saved):
            assert np.array_equal(np.array(a.state[0]), np.array(b.state[0]))
