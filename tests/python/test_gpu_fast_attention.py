"""The register-tiled decode attention (metal/attention_fast.metal) and the reduce that merges
fp16 rows (sinks, window) in: the mlx-resident store on the emulated GPU (the real
turboquant.metal host functions; only mx.fast.metal_kernel is replaced) against the C++ core,
over each compile-time shape the host picks (query heads per pass GM = 1, 2, 4, 8;
coordinates per lane C = 16 or 8; head_dim 64, 128, 256), uneven token counts (streams of a
simd-group with different numbers of tokens), blocks of several tiles, and against the generic
block kernel on the same codes."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from turboquant import _core, metal, mlx_metal  # noqa: E402


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_fast"))


def shorten_tokens(monkeypatch):
    """A faulty launch from here on: the register-tiled / staged block kernel is told one
    token fewer than the cache holds."""
    real = metal._fast_partials

    def short(*a, **kw):
        a = list(a)
        a[12] -= 1  # tokens
        return real(*a, **kw)

    monkeypatch.setattr(metal, "_fast_partials", short)


def test_staged_kernel_is_the_default_and_forced_attention_overrides(monkeypatch):
    monkeypatch.delenv("TQ_GPU_ATTENTION", raising=False)
    assert metal.attention_kernel() == "staged"
    monkeypatch.setenv("TQ_GPU_ATTENTION", "fast")
    assert metal.attention_kernel() == "fast"
    with metal.forced_attention("generic"):
        with metal.forced_attention("staged"):
            assert metal.attention_kernel() == "staged"
        assert metal.attention_kernel() == "generic"
    assert metal.attention_kernel() == "fast"
    monkeypatch.setenv("TQ_GPU_ATTENTION", "nonsense")
    assert metal.attention_kernel() == "staged"
    with pytest.raises(ValueError, match="kernel must be one of"):
        with metal.forced_attention("tiled"):
            pass


def test_shape_rule():
    shape = metal.fast_attention_shape
    assert shape(128, 4, 3, 3) == (4, 16)
    assert shape(128, 1, 2, 4) == (1, 16)
    assert shape(64, 3, 4, 2) == (4, 16)
    assert shape(128, 5, 3, 3) == (8, 8)
    assert shape(256, 8, 3, 3) == (8, 8)  # 32 lanes per token
    assert shape(128, 9, 3, 3) is None  # more than 8 query heads per KV head
    assert shape(96, 4, 3, 3) is None and shape(512, 4, 3, 3) is None
    assert shape(128, 4, 5, 3) == (4, 8) and shape(128, 4, 3, 8) == (4, 8)  # wide: C = 8
    assert shape(128, 4, 3, 9) is None
    assert shape(128, 4, 2, 3, k_bits1=4) == (4, 16)  # split keys: halves of 4 and 2 bits
    assert shape(256, 8, 2, 3, k_bits1=4) == (8, 8)  # 32 lanes: 16 per half
    with metal.generic_attention():
        assert shape(128, 4, 3, 3) is None
    assert shape(128, 4, 3, 3) == (4, 16)
    # The scratch fits a GPU's threadgroup memory at every shape taken.
    for d in (64, 128, 256):
        for gm in metal.FAST_GROUPS:
            assert metal.fast_attention_scratch_floats(d, gm, 8, 8, 8) <= metal.MAX_SCRATCH_FLOATS


@pytest.mark.parametrize("d,hq,hkv,kb,vb,tokens", [
    (64, 4, 2, 3, 3, 75),     # GM 2, C 16: 4 lanes per token
    (128, 3, 1, 4, 2, 203),   # G 3 in GM 4
    (128, 10, 2, 3, 3, 130),  # G 5 in GM 8, C 8
    (256, 2, 2, 2, 4, 97),    # GM 1, 16 lanes per token
    (256, 16, 2, 3, 3, 70),   # GM 8: 32 lanes per token, no merge inside a simd-group
])
def test_fast_kernel_matches_the_core_and_the_generic_kernel(emulated, monkeypatch, d, hq, hkv,
                                                             kb, vb, tokens):
    emulated.install(monkeypatch)
    monkeypatch.setenv("TQ_GPU_ATTENTION", "fast")  # the default is staged
    rng = np.random.default_rng(d + hq)
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=kb, value_bits=vb, seed=5,
              block_tokens=8)
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = (rng.standard_normal((hkv, tokens, d)).astype(np.float32) for _ in range(2))
    k *= 1.5  # sharper softmax: the running max moves
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    q = rng.standard_normal((hq, 1, d)).astype(np.float32)
    start = len(emulated.launches)
    got = np.array(store.attend(mx.array(q), scale=0.2))
    assert emulated.launches[start:] == ["attention_fast", "attention_reduce_heads"]
    want = core.attend(q, scale=0.2)
    np.testing.assert_allclose(got, want, atol=2e-5)
    with metal.generic_attention():
        generic = np.array(store.attend(mx.array(q), scale=0.2))
    assert emulated.launches[-3:] == ["rotate_heads", "attention_block", "attention_reduce_heads"]
    np.testing.assert_allclose(got, generic, atol=2e-5)
    # A window: the last 40 tokens (codes from an offset, head_stride > tokens attended).
    np.testing.assert_allclose(np.array(store.attend(mx.array(q), scale=0.2, window=40)),
                               core.attend(q, scale=0.2, window=40), atol=2e-5)


def split_kw(d, kb_out, kb_in, angle_bits=8):
    return dict(key_bits=kb_in, n_outlier_channels=d // 2, outlier_bits=kb_out,
                outlier_channels=list(range(d // 2)), outlier_roles="keys",
                split_angle_bits=angle_bits)


@pytest.mark.parametrize("d,hq,hkv,kb_out,kb_in,vb,angle_bits,tokens", [
    (64, 4, 2, 4, 2, 3, 8, 75),     # the default recipe's halves: 4 and 2 bits
    (128, 8, 2, 4, 2, 3, 16, 130),  # 16-bit angle codes
    (128, 12, 2, 5, 3, 4, 8, 90),   # GM 8, C 8: a 5-bit half
])
def test_fast_kernel_with_split_keys_matches_the_core(emulated, monkeypatch, d, hq, hkv, kb_out,
                                                      kb_in, vb, angle_bits, tokens):
    emulated.install(monkeypatch)
    monkeypatch.setenv("TQ_GPU_ATTENTION", "fast")  # the default is staged
    rng = np.random.default_rng(d + hq + kb_out)
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, value_bits=vb, seed=6, block_tokens=8,
              **split_kw(d, kb_out, kb_in, angle_bits))
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = (rng.standard_normal((hkv, tokens, d)).astype(np.float32) for _ in range(2))
    k[..., : d // 2] *= 3.0  # unequal halves: the angle codes vary
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    q = rng.standard_normal((hq, 1, d)).astype(np.float32)
    start = len(emulated.launches)
    got = np.array(store.attend(mx.array(q), scale=0.15))
    assert emulated.launches[start:] == ["attention_fast", "attention_reduce_heads"]
    np.testing.assert_allclose(got, core.attend(q, scale=0.15), atol=2e-5)
    with metal.generic_attention():
        generic = np.array(store.attend(mx.array(q), scale=0.15))
    assert emulated.launches[-3:] == ["split_rotate_heads", "split_attention_block",
                                      "attention_reduce_heads"]
    np.testing.assert_allclose(got, generic, atol=2e-5)


def test_blocks_of_several_tiles_with_fp16_rows(emulated, monkeypatch):
    # Few threadgroups (ATTENTION_GROUPS forced small): each block takes several 64-token
    # tiles; fp16 sinks and window merged by the reduce launch.
    emulated.install(monkeypatch)
    monkeypatch.setenv("TQ_GPU_ATTENTION", "fast")  # the default is staged
    monkeypatch.setattr(metal, "ATTENTION_GROUPS", 2)
    rng = np.random.default_rng(3)
    d, hkv, G = 64, 2, 4
    kw = dict(n_layers=1, n_q_heads=hkv * G, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=9,
              block_tokens=8, fp16_sinks=3, fp16_window=16, norm_correction=True)
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    for T in (200, 1, 37, 2):
        k, v = (rng.standard_normal((hkv, T, d)).astype(np.float32) for _ in range(2))
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert metal.attention_blocks(store.code_tokens(), metal.DEFAULT_BLOCK_TOKENS, hkv) == 1
    q = rng.standard_normal((hkv * G, 1, d)).astype(np.float32)
    start = len(emulated.launches)
    for window in (None, 100, 10):
        np.testing.assert_allclose(np.array(store.attend(mx.array(q), window=window)),
                                   core.attend(q, window=window), atol=2e-5)
    assert set(emulated.launches[start:]) == {"attention_fast", "attention_reduce_rows"}


def test_the_comparison_can_fail(emulated, monkeypatch):
    # A kernel that drops the last token of each block is caught by the comparison above.
    emulated.install(monkeypatch)
    monkeypatch.setenv("TQ_GPU_ATTENTION", "fast")  # the default is staged
    shorten_tokens(monkeypatch)
    rng = np.random.default_rng(1)
    kw = dict(n_layers=1, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3, seed=5,
              block_tokens=8)
    store, core = mlx_metal.MetalCodeStore(64, **kw), _core.KVCache(64, **kw)
    k, v = (rng.standard_normal((2, 50, 64)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    q = rng.standard_normal((4, 1, 64)).astype(np.float32)
    got = np.array(store.attend(mx.array(q)))
    assert not np.allclose(got, core.attend(q), atol=2e-5)


@pytest.mark.parametrize("unroll,coords", [("1", ""), ("4", ""), ("2", "8")])
def test_other_unrolls_and_lane_widths_match_the_core(emulated, monkeypatch, unroll, coords):
    # The shapes a benchmark sweeps (TQ_GPU_FAST_UNROLL, TQ_GPU_FAST_COORDS) compute the same.
    emulated.install(monkeypatch)
    monkeypatch.setenv("TQ_GPU_ATTENTION", "fast")  # the default is staged
    monkeypatch.setenv("TQ_GPU_FAST_UNROLL", unroll)
    monkeypatch.setenv("TQ_GPU_FAST_COORDS", coords)
    assert metal.fast_attention_unroll() == int(unroll)
    rng = np.random.default_rng(int(unroll))
    kw = dict(n_layers=1, n_q_heads=8, n_kv_heads=2, value_bits=3, seed=5, block_tokens=8,
              **split_kw(64, 4, 2))
    store, core = mlx_metal.MetalCodeStore(64, **kw), _core.KVCache(64, **kw)
    k, v = (rng.standard_normal((2, 83, 64)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    q = rng.standard_normal((8, 1, 64)).astype(np.float32)
    start = len(emulated.launches)
    np.testing.assert_allclose(np.array(store.attend(mx.array(q))), core.attend(q), atol=2e-5)
    assert emulated.launches[start] == "attention_fast"


def test_staged_tile_rule():
    tile = metal.staged_attention_tile
    # head_dim 128 at 3 bits (48-byte rows, fp16 norms): 64 tokens, 1,600 words, 13 a thread
    assert tile(48, 48, True, 4096, 64, 1576) == (64, 13)
    assert tile(48, 48, True, 4104, 64, 1576) == (8, 2)  # the head stride allows 8 tokens
    assert tile(48, 48, True, 4098, 64, 1576) is None  # no multiple of 4 divides it
    assert tile(256, 256, False, 4096, 64, 1576) == (8, 9)  # 8-bit head_dim 256: 8 tokens fit
    assert tile(48, 48, True, 4096, 64, 8000) is None  # no room beside the scratch
    for kb, vb in ((49, 48), (33, 32), (65, 64)):  # split rows (angle byte + halves)
        tt, r = tile(kb, vb, True, 4096, 64, 1576)
        assert tt * (kb + vb + 4) <= 4 * r * metal.ATTENTION_THREADS


def filled_pair(rng, d, hq, hkv, tokens, kw, split):
    """A store and a core of config ``kw`` holding the same random tokens (keys 1.5x; split
    keys' outlier half 3x more), and one decode query row per query head."""
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = (rng.standard_normal((hkv, tokens, d)).astype(np.float32) for _ in range(2))
    k *= 1.5
    if split:
        k[..., : d // 2] *= 3.0
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    return store, core, rng.standard_normal((hq, 1, d)).astype(np.float32)


@pytest.mark.parametrize("d,hq,hkv,kb,vb,tokens,bt,split", [
    (64, 4, 2, 3, 3, 75, 8, False),      # 8-token tiles, the last one partial
    (128, 3, 1, 4, 2, 203, 64, False),   # 64-token tiles, G 3 in GM 4
    (128, 10, 2, 3, 3, 130, 16, False),  # GM 8, C 8
    (256, 2, 2, 2, 4, 97, 8, False),     # 16 lanes per token
    (64, 4, 2, 4, 3, 75, 8, True),       # split keys: 4- and 2-bit halves, angle byte
    (128, 8, 2, 5, 4, 150, 32, True),    # split, GM 8, C 8
])
def test_staged_kernel_matches_the_core_and_the_fast_kernel(emulated, monkeypatch, d, hq, hkv,
                                                            kb, vb, tokens, bt, split):
    emulated.install(monkeypatch)
    rng = np.random.default_rng(d + hq + tokens)
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, value_bits=vb, seed=5, block_tokens=bt)
    kw.update(split_kw(d, kb, kb - 2) if split else dict(key_bits=kb))
    store, core, q = filled_pair(rng, d, hq, hkv, tokens, kw, split)
    with metal.forced_attention("fast"):
        fast = np.array(store.attend(mx.array(q), scale=0.2))
    monkeypatch.delenv("TQ_GPU_ATTENTION", raising=False)  # the default: staged
    start = len(emulated.launches)
    got = np.array(store.attend(mx.array(q), scale=0.2))
    assert emulated.launches[start:] == ["attention_staged", "attention_reduce_heads"]
    np.testing.assert_allclose(got, core.attend(q, scale=0.2), atol=2e-5)
    np.testing.assert_allclose(got, fast, atol=2e-5)


# --- The tensor-core (mma) block kernel -------------------------------------------------------
# On the emulator its 16x8x16 products are a simd-group exchange over the same fragments the
# tensor cores take, with the same fp16 inputs (queries, centroid pairs, softmax weights):
# it agrees with the fp32 core to fp16's precision, not to 2e-5.
MMA_TOL = 2e-3


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))


def test_mma_rule_and_default(monkeypatch):
    ok = metal.mma_attention_ok
    assert ok(128, 4, 3, 3, None, 4096, 48)
    assert ok(64, 8, 2, 3, 4, 4096, 25)  # split rows of 25 bytes: heads start on 16-byte chunks
    assert not ok(64, 8, 2, 3, 4, 4104, 25)  # a head stride of 8 tokens more: they do not
    assert not ok(128, 9, 3, 3, None, 4096, 48)  # more than 8 query heads per KV head
    assert not ok(128, 4, 5, 3, None, 4096, 80)  # over 4 bits: the pair table would be 4 KB
    assert not ok(96, 4, 3, 3, None, 4096, 36)
    # head_dim 256 at 4 bits: three stages of 16 rows exceed a CUDA block's 48 KB, two fit
    assert not ok(256, 4, 4, 4, 4, 4096, 129, stages=3)
    assert ok(256, 4, 4, 4, 4, 4096, 129, stages=2)
    # Metal's 32 KB: head_dim 128 at 3 bits takes two stages, not three
    monkeypatch.setattr(metal, "candidate_path", lambda: "metal")
    assert ok(128, 4, 3, 3, None, 4096, 48, stages=2)
    assert not ok(128, 4, 3, 3, None, 4096, 48, stages=3)
    monkeypatch.undo()
    # The CUDA path takes it by default; elsewhere (Metal, this machine) the staged kernel.
    monkeypatch.delenv("TQ_GPU_ATTENTION", raising=False)
    assert metal.default_attention() == "staged" == metal.attention_kernel()
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    monkeypatch.setattr(metal, "_cuda_capability", lambda: 9)
    assert metal.default_attention() == "mma" == metal.attention_kernel()
    monkeypatch.setattr(metal, "_cuda_capability", lambda: 7)  # no mma.sync of fp16 16x8x16
    assert metal.default_attention() == "staged"
    monkeypatch.setattr(metal, "_cuda_capability", lambda: 9)
    monkeypatch.setenv("TQ_GPU_ATTENTION", "staged")
    assert metal.attention_kernel() == "staged"
    # The register cap of a sweep: off unless TQ_GPU_MMA_MIN_BLOCKS names 2..6 threadgroups.
    assert metal.mma_min_blocks() == 0
    monkeypatch.setenv("TQ_GPU_MMA_MIN_BLOCKS", "4")
    assert metal.mma_min_blocks() == 4
    assert "__launch_bounds__(128, 4)" in metal.launch_bounds_header(4)
    monkeypatch.setenv("TQ_GPU_MMA_MIN_BLOCKS", "9")
    assert metal.mma_min_blocks() == 0
    with pytest.raises(ValueError, match="CUDA setting"):
        metal.build_kernel("attention_mma", "metal", min_blocks=4)


@pytest.mark.parametrize("d,hq,hkv,kb,vb,tokens,bt,split,stages", [
    (64, 4, 2, 3, 3, 75, 8, False, 3),      # 16-token tiles, the last one partial
    (128, 3, 1, 4, 2, 203, 64, False, 1),   # G 3: rows 3..7 of the products zero; no ring
    (128, 16, 2, 1, 4, 130, 16, False, 2),  # G 8, 1-bit keys
    (256, 2, 2, 2, 4, 97, 8, False, 4),     # 32 value coordinates a lane row; 8-token pages
    (64, 4, 2, 3, 3, 75, 8, True, 3),       # split: 4- and 2-bit halves in 25-byte rows
    (128, 8, 2, 3, 3, 150, 32, True, 2),    # split, 49-byte rows (unaligned)
    (128, 8, 2, 3, 3, 90, 16, 16, 3),       # split with 16-bit angles (read from device memory)
])
def test_mma_kernel_matches_the_core(emulated, monkeypatch, d, hq, hkv, kb, vb, tokens, bt,
                                     split, stages):
    emulated.install(monkeypatch)
    monkeypatch.setenv("TQ_GPU_MMA_STAGES", str(stages))
    rng = np.random.default_rng(d + hq + tokens + split)
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, value_bits=vb, seed=5, block_tokens=bt,
              key_bits=kb)
    if split:
        kw.update(split_kw(d, kb + 1, kb - 1, angle_bits=16 if split == 16 else 8),
                  block_tokens=bt)
    store, core, q = filled_pair(rng, d, hq, hkv, tokens, kw, bool(split))
    start = len(emulated.launches)
    with metal.forced_attention("mma"):
        got = np.array(store.attend(mx.array(q), scale=0.2))
    assert emulated.launches[start:] == ["attention_mma", "attention_reduce_heads"]
    want = core.attend(q, scale=0.2)
    assert rel_err(got, want) <= MMA_TOL
    # fp16 rounding, not a wrong token or coordinate: the error is far below a 3-bit code's
    assert rel_err(got, want) > 0.0


@pytest.mark.parametrize("kernel,first,tol", [("staged", 200, 2e-5), ("mma", 300, MMA_TOL)])
def test_block_kernel_with_several_tiles_per_block_fp16_rows_and_a_check_that_fails(
        emulated, monkeypatch, kernel, first, tol):
    # Few threadgroups: each block takes many tiles in turn (the staged kernel's two stage
    # buffers, the mma kernel's copy rings reused), fp16 sinks and window merged by the reduce
    # launch, and a comparison that can fail (the tokens count shortened by one).
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "ATTENTION_GROUPS", 2)
    monkeypatch.setenv("TQ_GPU_ATTENTION", kernel)
    rng = np.random.default_rng(4 if kernel == "staged" else 6)
    d, hkv, G = 64, 2, 4
    kw = dict(n_layers=1, n_q_heads=hkv * G, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=9,
              block_tokens=8, fp16_sinks=3, fp16_window=16, norm_correction=True)
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    for T in (first, 1, 37):
        k, v = (rng.standard_normal((hkv, T, d)).astype(np.float32) for _ in range(2))
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    q = rng.standard_normal((hkv * G, 1, d)).astype(np.float32)
    start = len(emulated.launches)
    assert rel_err(np.array(store.attend(mx.array(q))), core.attend(q)) <= tol
    assert set(emulated.launches[start:]) == {f"attention_{kernel}", "attention_reduce_rows"}
    shorten_tokens(monkeypatch)
    assert rel_err(np.array(store.attend(mx.array(q))), core.attend(q)) > tol
