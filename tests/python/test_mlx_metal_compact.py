"""Compaction on the mlx-resident store: ``MetalCodeStore.compact_window`` against the C++
core's ``KVCache::compact_window`` on the same rows (a prompt parked in a prompt-cache
store, ``turboquant serve --park-window codes``).

The store moves its whole fp16 window into codes, its last block partial, by the core's plan
(``_core.SegmentPlan.compact``) and the flush's encode: sizes, codes, norms, decoded rows,
memory and file bytes equal the core's after its compaction, attention matches, and appends
(one-token steps and chunks, across flushes), trims and loads afterwards keep matching.
Checked on ReferenceKernels and on the real kernel set through the emulated CUDA path;
mixed-precision stores keep their windows, as the core's layers do; the mlx-lm cache
compacts a layer held by the store (what the server's store does to an entry it parks)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from test_mlx_metal import assert_same_state, attention_matches, rand  # noqa: E402
from turboquant import _core, metal  # noqa: E402
from turboquant.mlx_metal import MetalCodeStore, MetalKVCache, ReferenceKernels  # noqa: E402

REF = ReferenceKernels()


def pair(d=64, hq=4, hkv=2, kernels=REF, **over):
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=5,
              block_tokens=8, norm_correction=True, fp16_sinks=4, fp16_window=8)
    kw.update(over)
    return MetalCodeStore(d, kernels=kernels, **kw), _core.KVCache(d, **kw)


def append(store, core, rng, T):
    H, d = store.n_kv_heads, store.head_dim
    k, v = rand(rng, H, T, d), rand(rng, H, T, d)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)


def window_bytes(store):
    """The bytes of a flushed window's rows (its capacity once used), K and V."""
    return 2 * store.n_kv_heads * store._plan.window_rows * store.head_dim * 2


def page_rows(tokens, bt):
    return -(-tokens // bt) * bt


def compact_both(store, core):
    """Compact the store and the core; checks that they moved the same window, gave the same
    bytes back (the window's capacity less the code pages it took) and hold the same."""
    w, nc, bt = core.window_tokens(0), core.code_tokens(0), store.block_tokens
    before = store.memory_bytes()
    assert before == core.memory_bytes()
    assert store.compact_window() == core.compact_window(0) == w
    assert store.window_tokens() == 0 and store.code_tokens() == nc + w
    pages = page_rows(nc + w, bt) - page_rows(nc, bt)
    if w:
        assert before - store.memory_bytes() == (window_bytes(store)
                                                 - pages * store.bytes_per_token())
    assert_same_state(store, core)
    assert store.to_bytes() == core.to_bytes()
    return w


def exercise(store, core, rng, tol=5e-5):
    """Uneven appends, a compaction, then appends, trims, a second compaction and a load,
    each step compared with the core."""
    hq, d, bt = store.n_q_heads, store.head_dim, store.block_tokens
    for T in (1, 2, 13, 1, 1, 29, 3):
        append(store, core, rng, T)
    assert core.window_tokens(0) > 0 and core.code_tokens(0) > 0
    assert compact_both(store, core) > 0
    assert core.code_tokens(0) % bt  # the codes now end inside a block
    attention_matches(store, core, rng, hq, d, tol)
    # nothing left to move: 0, nothing changes
    blob = store.to_bytes()
    assert store.compact_window() == core.compact_window(0) == 0
    assert store.to_bytes() == blob and store.memory_bytes() == core.memory_bytes()
    # the compacted file loads as a store that goes on as the core does
    back = MetalCodeStore.from_bytes(blob, kernels=store.kernels)
    assert_same_state(back, core)
    # decode steps: a new window, flushing on from the unaligned end of the codes
    twin = _core.KVCache.from_bytes(blob)
    coded = core.coded_tokens(0)
    for _ in range(store._plan.window_rows + 2):
        k, v = rand(rng, store.n_kv_heads, 1, d), rand(rng, store.n_kv_heads, 1, d)
        for s, c in ((store, core), (back, twin)):
            s.append(mx.array(k), mx.array(v))
            c.append(k, v)
            assert_same_state(s, c)
    assert core.coded_tokens(0) > coded  # crossed a flush
    attention_matches(store, core, rng, hq, d, tol)
    assert store.to_bytes() == core.to_bytes() == back.to_bytes() == twin.to_bytes()
    # a prefill chunk after a second compaction: several flushes at once
    compact_both(store, core)
    for T in (bt + 3, 2 * bt + 1):
        append(store, core, rng, T)
        assert_same_state(store, core)
    attention_matches(store, core, rng, hq, d, tol)
    # trims inside the window, into the compacted codes, then appends and a compaction
    for cut, more in ((2, 1), (store.window_tokens() + 5, 3), (3, bt + 2)):
        assert store.trim(cut) == core.trim(cut)
        assert_same_state(store, core)
        append(store, core, rng, more)
        assert_same_state(store, core)
    compact_both(store, core)
    attention_matches(store, core, rng, hq, d, tol)
    append(store, core, rng, 1)
    assert_same_state(store, core)
    assert store.to_bytes() == core.to_bytes()


@pytest.mark.parametrize("d,hq,hkv,over", [
    (64, 4, 2, {}),                                          # sinks + window, GQA 2
    (32, 6, 1, dict(fp16_sinks=0, fp16_window=5, block_tokens=4)),  # window not a block multiple
    (128, 2, 2, dict(fp16_sinks=3, fp16_window=0)),          # sinks only: up to a block's window
    (64, 4, 2, dict(key_head_bits=[2, 4], value_head_bits=[3, 2])),  # two width groups
    (64, 4, 2, dict(key_bits=2, n_outlier_channels=32, outlier_bits=4,  # the key split
                    outlier_channels=list(range(32)), outlier_roles="keys")),
])
def test_compaction_matches_the_core(d, hq, hkv, over):
    exercise(*pair(d, hq, hkv, **over), np.random.default_rng(d + hq + len(over)))


def test_compaction_on_the_emulated_cuda_path(emulated, monkeypatch):
    """The real kernel set (turboquant.metal's host functions and kernel sources, on the
    emulated GPU as on an NVIDIA one): the compaction's codes are the core's bit for bit."""
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    exercise(*pair(kernels=metal), np.random.default_rng(11), tol=2e-3)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_compact"))


def test_an_empty_window_gives_its_capacity_back():
    """A store whose window was just emptied by a trim into the codes keeps no rows, and one
    whose sinks are not full yet has none: both compact 0 tokens, as the core's."""
    rng = np.random.default_rng(2)
    store, core = pair()
    append(store, core, rng, 2)  # sinks only
    assert store.compact_window() == core.compact_window(0) == 0
    assert_same_state(store, core)
    append(store, core, rng, 40)
    store.trim(store.window_tokens() + 1)
    core.trim(core.window_tokens(0) + 1)
    assert store.window_tokens() == 0
    assert store.compact_window() == core.compact_window(0) == 0
    assert_same_state(store, core)
    append(store, core, rng, 3)
    assert_same_state(store, core)


def test_a_copy_compacts_apart_from_its_original():
    """A batch row extracted for the prompt-cache store is a copy (``MetalCodeStore.copy``):
    compacting it leaves the original's window and codes as they were, and the original goes
    on as the core does (decode steps written in place into its window buffer)."""
    rng = np.random.default_rng(9)
    store, core = pair()
    append(store, core, rng, 30)
    for _ in range(3):
        append(store, core, rng, 1)
    blob = store.to_bytes()
    parked = store.copy()
    assert parked.compact_window() == core.window_tokens(0) > 0
    assert store.to_bytes() == blob
    assert_same_state(store, core)
    for _ in range(12):
        append(store, core, rng, 1)
        assert_same_state(store, core)
    want = _core.KVCache.from_bytes(blob)
    want.compact_window(0)
    assert parked.to_bytes() == want.to_bytes()


def test_unwindowed_and_mixed_precision_stores_keep_what_they_hold():
    rng = np.random.default_rng(4)
    codes_only = pair(fp16_sinks=0, fp16_window=0)
    mixed = pair(fp16_sinks=2, fp16_window=4, block_tokens=4, key_bits=4,
                 mixed_group_blocks=2, mixed_keep_blocks=1, decay_bits=2)
    for store, core in (codes_only, mixed):
        for T in (9, 1, 1, 20, 1):
            append(store, core, rng, T)
            q = rand(rng, store.n_q_heads, 1, store.head_dim)
            store.attend(mx.array(q))
            core.attend(q)
        blob, memory, window = store.to_bytes(), store.memory_bytes(), store.window_tokens()
        assert window == core.window_tokens(0)
        assert (window > 0) == store.mixed
        assert store.compact_window() == core.compact_window(0) == 0
        assert store.memory_bytes() == memory and store.window_tokens() == window
        # the importance floats are each side's own: compare the store with itself
        assert store.to_bytes() == blob


def test_metal_kv_cache_compacts_one_layer_or_all():
    rng = np.random.default_rng(6)
    kw = dict(n_layers=3, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3, seed=1,
              block_tokens=8, fp16_sinks=2, fp16_window=8)
    cache, core = MetalKVCache(64, kernels=REF, **kw), _core.KVCache(64, **kw)
    for layer in range(3):
        k, v = rand(rng, 2, 27, 64), rand(rng, 2, 27, 64)
        cache.append(mx.array(k), mx.array(v), layer)
        core.append(k, v, layer)
    assert cache.compact_window(1) == core.compact_window(1) > 0
    assert cache.to_bytes() == core.to_bytes()
    assert cache.compact_window() == core.compact_window() > 0
    assert cache.to_bytes() == core.to_bytes()
    assert cache.memory_bytes() == core.memory_bytes()


def test_a_store_that_cannot_encode_its_window_is_left_unchanged():
    """A window row whose norm is beyond fp16 (each value finite in fp16): refused before any
    change, as an append's flush of it would be."""
    store, core = pair(fp16_window=16)
    rng = np.random.default_rng(8)
    append(store, core, rng, 12)
    big = np.full((2, 1, 64), 30000.0, np.float32)
    store.append(mx.array(big), mx.array(big))
    blob, memory = store.to_bytes(), store.memory_bytes()
    with pytest.raises(ValueError, match="norm"):
        store.compact_window()
    assert store.to_bytes() == blob and store.memory_bytes() == memory
    assert store.window_tokens() == 9


# --- the mlx-lm cache on the GPU store --------------------------------------------------------

@pytest.fixture
def on_gpu_store(monkeypatch):
    """New caches' layers go to the GPU store, on the reference kernels."""
    import turboquant.mlx_metal as mm
    from turboquant import gpu_path

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)


def test_the_mlx_lm_cache_compacts_a_layer_on_the_gpu_store(on_gpu_store):
    pytest.importorskip("mlx_lm")
    from test_park_window import attend, windowed
    from test_serve_store import HKV, D, filled, kv
    from turboquant import serve

    T = 100
    caches, plain = filled(windowed, T, layers=2), filled(windowed, T, layers=2)
    for c, p in zip(caches, plain):
        assert c._gpu and isinstance(c._core, MetalCodeStore)
        window = c._core.window_tokens()
        assert window > 0
        want = c._core.to_core()  # the core given the same rows, compacted there
        assert want.compact_window(0) == window
        before = c.nbytes
        assert c.compact_window() == window
        assert c._core.to_bytes() == want.to_bytes()
        assert c._core.window_tokens() == 0 and c.offset == T
        assert before - c.nbytes >= window_bytes(c._core) - page_rows(
            window, c.block_tokens) * c._core.bytes_per_token()
        assert c.nbytes < before - window * HKV * 2 * D  # fp16 rows out, 3-bit codes in
        assert c.compact_window() == 0
        a, b = attend(c), attend(p)  # random keys: ~flat weights, 20% of the values coded
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95
        assert c.reuse_prefix(60, 200) == 60  # parked: resumed from any prefix
        # a state round trip and a deep copy keep the compacted layout and its bytes
        restored = type(c)()
        restored.meta_state, restored.state = c.meta_state, c.state
        assert restored._gpu and restored._core.to_bytes() == c._core.to_bytes()
        assert copy.deepcopy(c)._core.to_bytes() == c._core.to_bytes()
    # decode steps and a trim into the compacted codes, as on any cache
    c = caches[0]
    k, v = kv(160, 0)
    for t in range(T, 140):
        c.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
        attend(c)
    assert c.offset == c._core.size() == 140
    assert 16 < c._core.window_tokens() <= 16 + c.block_tokens
    c.trim(50)
    assert c.offset == c._core.size() == c._core.coded_tokens() == 90
    # the server's store parks GPU-store entries too
    entry = filled(windowed, 257, layers=2)
    held = sum(x.nbytes for x in entry)
    store = serve.PromptCacheStore(park_window="codes")
    store.insert_cache("model", list(range(257)), entry)
    assert [x._core.window_tokens() for x in entry] == [0, 0]
    assert store.parked_tokens > 0 and store.nbytes < held
