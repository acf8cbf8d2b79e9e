"""Importance-routed mixed precision in the mlx-resident store (turboquant.mlx_metal), against
the C++ core's mixed_group_blocks / mixed_keep_blocks / decay_bits.

The store rates its fp16 window tokens by the squared softmax weights of its attention calls,
flushes them in groups with per-KV-head kept-token masks, holds the kept tokens' codes in
full-width pages and the others' in low-width ones, and attends over both sets and the fp16
rows under one softmax. Checked on ReferenceKernels and on the emulated GPU kernels through
the real turboquant.metal host functions, for the same appends and attends as the core:
sizes, masks, code positions, codes (packed at their blocks' widths), norms, decoded rows,
rated counts and memory equal; importance and attention within fp32 rounding; files load
across the two, byte-identical but for the importance floats each computed itself; the
mlx-lm cache takes the store for a mixed preset.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from metal_args import dequantize_kernel  # noqa: E402
from turboquant import _core, metal  # noqa: E402
from turboquant import gpu_path
from turboquant.mlx_metal import MetalCodeStore, ReferenceKernels  # noqa: E402

REF = ReferenceKernels()


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(a, b, tol=5e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, err


def mixed_kw(d, hq, hkv, kb=4, vb=3, low=2, R=2, K=1, bt=4, sinks=2, window=4, split=False,
             heads=None, seed=3):
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=kb, value_bits=vb, seed=seed,
              block_tokens=bt, norm_correction=True, fp16_sinks=sinks, fp16_window=window,
              mixed_group_blocks=R, mixed_keep_blocks=K, decay_bits=low)
    if split:  # the mlx-lm key split: half of the channels at key_bits + 1, half at - 1
        kw.update(key_bits=kb - 1, n_outlier_channels=d // 2, outlier_bits=kb + 1,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys")
    if heads:
        kh, vh = heads
        kw.update(key_head_bits=[b - 1 for b in kh] if split else kh, value_head_bits=vh)
        if split:
            kw.update(outlier_head_bits=[b + 1 for b in kh])
    return kw


def assert_same_state(store, core, memory=True):
    """Everything but the importance floats equal to the core's; those within rounding
    (``memory``: the memory too, for the same history of calls)."""
    assert store.size() == core.size(0) and store.coded_tokens() == core.coded_tokens(0)
    assert store.code_tokens() == core.code_tokens(0)
    assert store.rated_tokens() == core.rated_tokens(0)
    nc = core.code_tokens(0)
    for h in range(core.n_kv_heads):
        assert np.array_equal(store.mixed_masks(0, h), core.mixed_masks(0, h)), h
        assert np.array_equal(store.mixed_positions(0, h), core.mixed_positions(0, h)), h
        si, ci = store.window_importance(0, h), core.window_importance(0, h)
        assert si.shape == ci.shape
        np.testing.assert_allclose(si, ci, rtol=1e-4, atol=1e-7)
        for role in ("key", "value"):
            packed = store._mixed_codes(h, role)[0]
            sc, sn = store.encoded(0, h, role)
            cc, cn = core.encoded(0, h, role, 0, nc)
            # rows packed at their blocks' widths from the front (the core leaves the rest
            # of its array unset)
            assert np.array_equal(sc.ravel()[:len(packed)], cc.ravel()[:len(packed)]), (h, role)
            assert np.array_equal(sn.view(np.uint16), cn.view(np.uint16)), (h, role)
            assert np.array_equal(store.decode(0, h, role), core.decode(0, h, role)), (h, role)
    if memory:
        assert store.memory_bytes() == core.memory_bytes()


def step(store, core, rng, T, hq, d, attend=True, tol=5e-5):
    hkv = core.n_kv_heads
    k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
    k[..., : d // 2] *= 2.0
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    if attend:  # the append's own queries: a prefill chunk or a decode step
        q = rand(rng, hq, T, d) * 2.0
        close(store.attend(mx.array(q)), core.attend(q), tol)
        if T > 1:  # as the mlx-lm cache does: flush what the queries rated (flush_rated)
            store.flush_rated()
            core.flush_rated()
    assert_same_state(store, core)


def same_file(store, core):
    """The store's file is the core's byte for byte once it carries the core's importance."""
    saved = store._imp
    if saved is not None:
        store._imp = mx.array(np.stack([core.window_importance(0, h)
                                        for h in range(core.n_kv_heads)]))
    try:
        return store.to_bytes() == core.to_bytes()
    finally:
        store._imp = saved


# d, hq, hkv, widths, flush groups (blocks, kept), block_tokens, sinks, window, split, per-head
CASES = [(32, 4, 2, dict(), (2, 1), 4, 2, 4, False, None),
         (64, 8, 2, dict(kb=3, vb=3, low=1), (4, 1), 4, 0, 6, False, None),
         (32, 6, 3, dict(), (3, 2), 2, 1, 3, False, ([4, 3, 4], [3, 3, 4])),
         (64, 4, 2, dict(kb=4, vb=4, low=2), (2, 1), 4, 2, 4, True, None),
         (32, 4, 2, dict(kb=4, vb=3, low=1), (2, 1), 4, 2, 5, True, ([3, 4], [3, 4]))]
APPENDS = (13, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1, 1, 9, 1, 1, 1)


@pytest.mark.parametrize("d,hq,hkv,widths,groups,bt,sinks,window,split,heads", CASES)
def test_mixed_store_matches_the_core(d, hq, hkv, widths, groups, bt, sinks, window, split,
                                      heads):
    rng = np.random.default_rng(d + hq + bt)
    kw = mixed_kw(d, hq, hkv, R=groups[0], K=groups[1], bt=bt, sinks=sinks, window=window,
                  split=split, heads=heads, **widths)
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    assert store.mixed and store.key_split == split
    for T in APPENDS:  # prefill chunks and decode steps, each attended by its queries
        step(store, core, rng, T, hq, d)
    assert store.code_tokens() >= 2 * groups[0] * bt and store._nlo > 0
    # files: byte-identical but for the importance floats, and loading across
    assert same_file(store, core)
    blob = core.to_bytes()
    back = MetalCodeStore.from_bytes(blob, kernels=REF)
    assert_same_state(back, _core.KVCache.from_bytes(blob))
    mine = _core.KVCache.from_bytes(store.to_bytes())
    assert_same_state(store, mine, memory=False)
    # both go on from the loaded state as the core does
    core2 = _core.KVCache.from_bytes(blob)
    for T in (1, 1, 3, 1):
        step(back, core2, rng, T, hq, d)


def test_prefill_in_chunks_of_query_rows(monkeypatch):
    import turboquant.mlx_metal as mm

    monkeypatch.setattr(mm, "_SCORE_CHUNK", 300)  # a few query rows per chunk
    rng = np.random.default_rng(9)
    d, hq, hkv = 32, 4, 2
    kw = mixed_kw(d, hq, hkv)
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    for T in (30, 1, 1, 17, 1, 1, 1):
        step(store, core, rng, T, hq, d)
    assert store.code_tokens() > 0


def test_trims_follow_the_core():
    rng = np.random.default_rng(5)
    d, hq, hkv = 32, 4, 2
    kw = mixed_kw(d, hq, hkv)
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    for T in (20, 1, 1, 1, 1, 6, 1):
        step(store, core, rng, T, hq, d)
    coded, n = core.coded_tokens(0), core.size(0)
    assert coded >= 2 + 16
    # a cut inside a flush group is refused by both, nothing changed
    for cache in (store, core):
        with pytest.raises(RuntimeError, match="splits a mixed-precision flush group of 8"):
            cache.trim(n - coded + 3)
    assert_same_state(store, core)
    assert same_file(store, core)
    for cut in (2, n - coded + 8 - 2, 8, 100):  # into the window, to group boundaries, empty
        assert store.trim(cut) == core.trim(cut)
        assert_same_state(store, core)
    for T in (9, 1, 1, 12, 1):
        step(store, core, rng, T, hq, d)


def test_attention_the_core_refuses_is_refused():
    rng = np.random.default_rng(6)
    kw = mixed_kw(32, 4, 2)
    store, core = MetalCodeStore(32, kernels=REF, **kw), _core.KVCache(32, **kw)
    for T in (20, 1, 1, 1):
        step(store, core, rng, T, 4, 32)
    q = rand(rng, 4, 1, 32)
    for cache, x in ((store, mx.array(q)), (core, q)):
        with pytest.raises(RuntimeError, match="a sliding window .5. over a mixed-precision"):
            cache.attend(x, window=5)
    q = rand(rng, 4, 10, 32)  # the first of 10 queries is older than a coded token
    for cache, x in ((store, mx.array(q)), (core, q)):
        with pytest.raises(RuntimeError, match="see only part of the"):
            cache.attend(x)
    close(store.attend(mx.array(q), causal=False), core.attend(q, causal=False))
    assert_same_state(store, core)


def test_unrated_tokens_flush_in_position_order_past_the_bound():
    # Appends without attention calls: past 4096 unrated window tokens (besides the latest
    # append's) the oldest groups flush unrated, keeping the oldest tokens of each group.
    rng = np.random.default_rng(7)
    d, hq, hkv = 16, 2, 1
    kw = mixed_kw(d, hq, hkv, kb=3, vb=3, low=1, bt=8, sinks=0, window=8)
    store, core = MetalCodeStore(d, kernels=REF, **kw), _core.KVCache(d, **kw)
    for T in (2000, 2000, 150, 30):
        step(store, core, rng, T, hq, d, attend=False)
    assert core.code_tokens(0) > 0 and core.rated_tokens(0) == 0
    step(store, core, rng, 1, hq, d)
    assert same_file(store, core)


def test_store_refuses_bad_mixed_options():
    base = dict(n_q_heads=2, n_kv_heads=1, key_bits=4, value_bits=4, block_tokens=4,
                fp16_window=4)
    for extra, text in ((dict(mixed_group_blocks=2, mixed_keep_blocks=2, decay_bits=2),
                         r"mixed_keep_blocks must be in \[1, mixed_group_blocks - 1 = 1\]"),
                        (dict(mixed_group_blocks=2, mixed_keep_blocks=1, decay_bits=4),
                         r"decay_bits must be in \[1, 3\]"),
                        (dict(mixed_group_blocks=2048, mixed_keep_blocks=1, decay_bits=2),
                         "at most 4096 tokens"),
                        (dict(mixed_keep_blocks=1), "mixed_group_blocks is 0"),
                        (dict(decay_bits=2), "no temporal decay")):
        with pytest.raises(ValueError, match=text):
            MetalCodeStore(32, kernels=REF, **base, **extra)
    with pytest.raises(ValueError, match="needs an fp16 window"):
        MetalCodeStore(32, kernels=REF, **dict(base, fp16_window=0), mixed_group_blocks=2,
                       mixed_keep_blocks=1, decay_bits=2)
    decay = _core.KVCache(32, **base, decay_after=8, decay_bits=2)
    with pytest.raises(ValueError, match="it uses temporal decay"):
        MetalCodeStore.from_core(decay, kernels=REF)


# --- The store on the turboquant.metal functions, kernels on the emulated GPU ---------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_mixed"))


@pytest.mark.parametrize("d,split", [(32, False), (32, True), (64, False)])
def test_mixed_store_on_the_emulated_gpu(emulated, monkeypatch, d, split):
    # (head_dim 64: the register-tiled decode kernel, with its log-sum-exp)
    emulated.install(monkeypatch)
    rng = np.random.default_rng(11 + split + d)
    hq, hkv = 4, 2
    kw = mixed_kw(d, hq, hkv, kb=4, vb=3, low=1 if split else 2, split=split)
    store, core = MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    assert store.kernels is metal
    start = len(emulated.launches)
    for T in (13, 1, 1, 1, 4, 1, 1):
        step(store, core, rng, T, hq, d)
    assert store._nlo > 0
    used = set(emulated.launches[start:])
    encode = "split_encode_heads" if split else "encode_heads"
    dequant = dequantize_kernel(d, split)
    assert {encode, dequant, "attention_reduce_heads"} <= used, used
    if d == 64:  # the staged kernel (the default), or the register-tiled one where no tile fits
        assert used & {"attention_staged", "attention_fast"}, used
    assert same_file(store, core)


# --- mlx-lm: a mixed preset takes the GPU store ---------------------------------------------


def test_mlx_lm_mixed_precision_takes_the_gpu_store(monkeypatch, tmp_path):
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
    cfg = dict(preset="tq3-mixed", fp16_sinks=2, fp16_window=8, block_tokens=4, seed=3)
    tokens = np.random.default_rng(23).integers(0, 128, 40).tolist()

    def run(cache, toks=tokens, prefill=21):
        out = [np.array(model(mx.array(toks[:prefill])[None], cache=cache))]
        for t in toks[prefill:]:
            out.append(np.array(model(mx.array([[t]]), cache=cache)))
        return out

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)
    assert tq_mlx.TurboQuantKVCache(mixed_bits=2, mixed_keep=0.5, fp16_window=16,
                                    key_bits=4, value_bits=4).gpu_refusal(64) is None
    gpu = tq_mlx.make_prompt_cache(model, **cfg)
    out = run(gpu)
    assert all(c._gpu and isinstance(c._core, mm.MetalCodeStore) and c._core.mixed for c in gpu)
    assert gpu[0]._core.key_split and gpu[0]._core._nlo > 0
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu = tq_mlx.make_prompt_cache(model, **cfg)
    ref = run(cpu)
    assert not any(c._gpu for c in cpu)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=3e-4)
    for c, g in zip(cpu, gpu):  # the same flush groups, masks and code positions
        assert g._core.code_tokens() == c._core.code_tokens(0) > 0
        for h in range(c._core.n_kv_heads):
            assert np.array_equal(g._core.mixed_masks(0, h), c._core.mixed_masks(0, h))
    # prompt-cache files cross between the two paths, and generation goes on alike
    for saved, load_path in ((gpu, "cpu"), (cpu, "metal")):
        path = str(tmp_path / f"from_{load_path}.safetensors")
        mlx_cache.save_prompt_cache(path, saved)
        monkeypatch.setattr(gpu_path, "active_path", lambda p=load_path: p)
        loaded = mlx_cache.load_prompt_cache(path)
        assert all(c._gpu == (load_path == "metal") for c in loaded)
        monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
        again = mlx_cache.load_prompt_cache(path)
        for a, b in zip(run(loaded, tokens[30:36], 1), run(again, tokens[30:36], 1)):
            np.testing.assert_allclose(a, b, atol=3e-4)


def test_core_bindings_copy_a_mixed_cache():
    # append_encoded with block flags and masks, append_window with importance and
    # set_rated_tokens: a mixed cache copied through them is the original, byte for byte.
    rng = np.random.default_rng(13)
    d = 32
    kw = mixed_kw(d, 4, 2)
    a = _core.KVCache(d, **kw)
    for T in (20, 1, 1, 1, 1, 6, 1):
        a.append(rand(rng, 2, T, d), rand(rng, 2, T, d))
        a.attend(rand(rng, 4, T, d))
    store = MetalCodeStore.from_core(a, kernels=REF)
    packed = {r: [store._mixed_codes(h, r) for h in range(2)] for r in ("key", "value")}
    flags = [store._low_blocks()] * 4
    masks = [a.mixed_masks(0, h) for h in range(2)]
    args = ([p[0] for p in packed["key"]], [p[2] for p in packed["key"]],
            [p[0] for p in packed["value"]], [p[2] for p in packed["value"]])
    b = _core.KVCache(d, **kw)
    b.append(store.fp16_rows("key", "sinks").astype(np.float32),
             store.fp16_rows("value", "sinks").astype(np.float32))
    with pytest.raises(ValueError, match="needs the groups' masks and block flags"):
        b.append_encoded(*args, 0, decayed=flags)
    with pytest.raises(ValueError, match="block flags need one array per stream"):
        b.append_encoded(*args, 0, decayed=flags[:3], masks=masks)
    with pytest.raises(ValueError, match=r"must be a C-contiguous \(\d+,\) uint8 array of packed"):
        b.append_encoded([args[0][0][:-1], args[0][1]], *args[1:], 0, decayed=flags, masks=masks)
    with pytest.raises(ValueError, match="masks of KV head 1 must be"):
        b.append_encoded(*args, 0, decayed=flags, masks=[masks[0], masks[1][:-1]])
    assert b.code_tokens(0) == 0  # refused before anything was written
    b.append_encoded(*args, 0, decayed=flags, masks=masks)
    imp = np.stack([a.window_importance(0, h) for h in range(2)])
    with pytest.raises(ValueError, match="importance must be an"):
        b.append_window(store.fp16_rows("key"), store.fp16_rows("value"), 0, importance=imp[:1])
    b.append_window(store.fp16_rows("key"), store.fp16_rows("value"), 0, importance=imp)
    b.set_rated_tokens(0, a.rated_tokens(0))
    assert b.to_bytes() == a.to_bytes()
    plain = _core.KVCache(d, n_q_heads=4, n_kv_heads=2, fp16_window=4, block_tokens=4)
    with pytest.raises(ValueError, match="no low-width blocks"):
        plain.append_encoded(*args, 0, decayed=flags, masks=masks)


def test_builder_metal_cache_with_mixed_precision_matches_the_cpu_cache():
    import turboquant

    b = (turboquant.KVCacheBuilder().with_head_dim(32).with_layers(2).with_heads(4, 2)
         .with_key_bits(4).with_value_bits(3).with_seed(3).with_block_tokens(4)
         .with_fp16_window(4).with_fp16_sinks(2).with_mixed_precision(2))
    cpu = b.build()
    gpu = b._metal_cache("turboquant_mse", "turboquant_mse", kernels=REF)
    assert all(s.mixed for s in gpu.core.layers)
    rng = np.random.default_rng(17)
    for T in (13, 1, 1, 1, 5, 1, 1):
        for layer in range(2):
            k, v = rand(rng, 2, T, 32), rand(rng, 2, T, 32)
            cpu.append(k, v, layer)
            gpu.append(mx.array(k), mx.array(v), layer)
            q = rand(rng, 4, T, 32)
            close(gpu.attend(mx.array(q), layer), cpu.attend(q, layer))
    assert gpu.core.layers[1].code_tokens() > 0
    assert gpu.memory_bytes() == cpu.memory_bytes()


def test_the_mixed_trial_decides_on_the_gpu_store_too(monkeypatch):
    # A layer whose trial finds routing does not pay holds uniform codes of the average
    # width on the GPU store as on the core (the trial reads the first block back once).
    import importlib

    import turboquant.mlx_metal as mm
    from mlx_tiny import _COMMON

    from turboquant import mixed_trial
    from turboquant import mlx_lm as tq_mlx

    llama = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(_COMMON, model_type="llama",
                                                       hidden_size=128)))
    mx.eval(model.parameters())
    tokens = np.random.default_rng(5).integers(0, 128, 24).tolist()
    seen = []
    real = mixed_trial.error_ratio

    def spy(keys, *a, **k):
        seen.append(type(keys))
        return real(keys, *a, **k)

    monkeypatch.setattr(mixed_trial, "error_ratio", spy)
    monkeypatch.setattr(mixed_trial, "MARGIN", -1.0)  # routing never pays
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)
    gpu = tq_mlx.make_prompt_cache(model, preset="tq3-mixed", fp16_window=8, block_tokens=4)
    model(mx.array(tokens)[None], cache=gpu)
    assert seen and all(t is np.ndarray for t in seen)
    assert all(c._gpu and isinstance(c._core, mm.MetalCodeStore) for c in gpu)
    assert all(not c._core.mixed and c.mixed_bits == 0 for c in gpu)
    assert all((c.key_bits, c.value_bits) == (3, 3) for c in gpu)
