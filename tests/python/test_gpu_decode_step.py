"""A decode step on the GPU store in few GPU operations, each the same bits as the longer
form it replaces: the fp16 window written in place in a buffer (one slice update per role, no
concatenation of the window per token) and read by the reduce launch with the buffer's row
stride; the centring, channel permutation and fp16 rounding of the new K/V as one fused
kernel per role; the value mean added in the output's cast."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from turboquant import _core, metal, mlx_cache  # noqa: E402
from turboquant import gpu_path  # noqa: E402
from turboquant.mlx_metal import MetalCodeStore, ReferenceKernels  # noqa: E402

REF = ReferenceKernels()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_decode_step"))


def _store(kernels=REF, **over):
    kw = dict(n_layers=1, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3, seed=2,
              block_tokens=4, fp16_sinks=2, fp16_window=6)
    kw.update(over)
    return MetalCodeStore(64, kernels=kernels, **kw), _core.KVCache(64, **kw)


def _emulated_cuda_store(emulated, monkeypatch, seed, tokens, **over):
    """A store on the emulated CUDA path and its C++ core, both holding the same ``tokens``
    random tokens, with the rng (``seed``) that drew them for the caller's later draws."""
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    store, core = _store(kernels=metal, **over)
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((2, tokens, 64)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    return store, core, rng


def _f16(x):
    return np.asarray(x, np.float16)


def test_decode_steps_write_the_window_in_place():
    """Between two flushes each step writes its row into the same buffer (mlx's slice update
    on the store's buffer object, not a new concatenation); the window holds exactly the
    rows after the codes, as the C++ core's window does, across several flushes."""
    store, core = _store()
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((2, 9, 64)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    rows_k = list(_f16(k).transpose(1, 0, 2))  # every token's fp16 key rows, in order
    reused = flushes = 0
    for _ in range(24):
        k, v = (rng.standard_normal((2, 1, 64)).astype(np.float32) for _ in range(2))
        before = store._wbuf
        coded = store._coded
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        rows_k.append(_f16(k[:, 0]))
        if store._coded != coded:
            flushes += 1
        else:
            assert store._wbuf[0].shape[1] == store._plan.window_rows
            if before is not None and before[2] is not None and \
                    before[0].shape[1] == store._plan.window_rows:
                assert store._wbuf[0] is before[0]  # the same buffer object, updated in place
                reused += 1
        want = np.stack(rows_k[store._coded:], axis=1)
        np.testing.assert_array_equal(np.array(store._k_win), want)
        assert store.window_tokens() == core.window_tokens(0)
        assert store.code_tokens() == core.code_tokens(0)
    assert flushes >= 4 and reused >= 12


@pytest.mark.parametrize("kernel,window,block", [("mma", 6, 4), ("staged", 6, 4),
                                                  ("mma", 120, 32)])
def test_the_reduce_reads_the_window_buffer_bit_for_bit(emulated, monkeypatch, kernel, window,
                                                        block):
    """The window passed as (buffer, buffer, rows) (count != stride in the reduce launch's
    parameters) gives the same bits as the window rows passed as their own arrays, on the
    emulated CUDA path; and the store's decode matches the C++ core (also with more window
    rows than the reduce scores in one chunk of 128)."""
    store, core, rng = _emulated_cuda_store(emulated, monkeypatch, 2, 21 + 2 * window,
                                            fp16_window=window, block_tokens=block)
    strided = 0
    for _ in range(6):
        k, v = (rng.standard_normal((2, 1, 64)).astype(np.float32) for _ in range(2))
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        q = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float32))
        sinks, (a, b), win = store._pieces(0)
        qg = q.reshape(2, 2, 64)
        buffered = store._window_rows()
        if len(buffered) == 3 and buffered[2] < buffered[0].shape[1]:
            strided += 1
        with metal.forced_attention(kernel):
            got, _ = store._code_attention(qg, a, b, 0.125, False, rows=[sinks, buffered])
            plain, _ = store._code_attention(qg, a, b, 0.125, False, rows=[sinks, win])
            out = np.array(store.attend(q))
        assert np.array_equal(np.array(got), np.array(plain))
        np.testing.assert_allclose(out, core.attend(np.array(q)), atol=2e-3)
    assert strided >= 4


def test_a_copy_has_a_window_of_its_own():
    store, _ = _store()
    rng = np.random.default_rng(3)
    k, v = (rng.standard_normal((2, 10, 64)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    one = rng.standard_normal((2, 1, 64)).astype(np.float32)
    store.append(mx.array(one), mx.array(one))
    twin = store.copy()
    before = np.array(store._k_win)
    a, b = (rng.standard_normal((2, 1, 64)).astype(np.float32) for _ in range(2))
    twin.append(mx.array(a), mx.array(a))
    store.append(mx.array(b), mx.array(b))
    np.testing.assert_array_equal(np.array(store._k_win)[:, :-1], before)
    np.testing.assert_array_equal(np.array(store._k_win)[:, -1], _f16(b[:, 0]))
    np.testing.assert_array_equal(np.array(twin._k_win)[:, -1], _f16(a[:, 0]))
    np.testing.assert_array_equal(np.array(twin._k_win)[:, :-1], before)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_fused_step_kernels_give_the_unfused_bits(dtype):
    rng = np.random.default_rng(4)
    dt = getattr(mx, dtype)
    k, v = (mx.array(rng.standard_normal((8, 1, 128)).astype(np.float32) * 9).astype(dt)
            for _ in range(2))
    km, vm = (mx.array(rng.standard_normal((8, 1, 128)).astype(np.float32) * 3)
              for _ in range(2))
    fused = mlx_cache._centre_rows_step(k, v, km, vm)
    plain = ((k.astype(mx.float32) - km).astype(mx.float16),
             (v.astype(mx.float32) - vm).astype(mx.float16))
    for a, b in zip(fused, plain):
        assert a.dtype == mx.float16 and bool(mx.array_equal(a, b).item())
    out = mx.array(rng.standard_normal((8, 4, 1, 128)).astype(np.float32))
    got = mlx_cache._add_mean_step[dt](out, vm[:, None])
    assert got.dtype == dt and bool(mx.array_equal(got, (out + vm[:, None]).astype(dt)).item())


def test_a_decode_step_centres_and_permutes_as_before(emulated, monkeypatch):
    """The mlx-lm cache on the emulated GPU with the key split (a channel order) and centring:
    a decode step's window rows are the float32-centred, permuted keys rounded once to
    fp16 (what _centre then _permute then the store's cast gave), and attend() returns the
    output plus the value mean in the queries' dtype, as the unfused path does."""
    emulated.install(monkeypatch)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cuda")
    rng = np.random.default_rng(5)
    k, v = (rng.standard_normal((1, 2, 23, 64)).astype(np.float32) * 4 for _ in range(2))
    q = rng.standard_normal((1, 4, 23, 64)).astype(np.float32)
    c = mlx_cache.TurboQuantKVCache(key_bits=3, value_bits=3, fp16_sinks=2, fp16_window=6,
                                    block_tokens=4)
    h16 = (lambda x: mx.array(x).astype(mx.float16))  # noqa: E731
    c.update_and_fetch(h16(k[:, :, :20]), h16(v[:, :, :20]))
    c.attend(h16(q[:, :, :20]), 0.125)
    assert c._gpu and c._perm is not None and c._core.windowed
    idx = mx.array(c._perm[:, None, :].astype(np.int32))
    for t in range(20, 23):
        kt, vt = h16(k[:, :, t:t + 1]), h16(v[:, :, t:t + 1])
        c.update_and_fetch(kt, vt)
        want_k = mx.take_along_axis(kt[0].astype(mx.float32) - c._k_mean, idx, axis=2)
        want_v = vt[0].astype(mx.float32) - c._v_mean
        assert bool(mx.array_equal(c._core._k_win[:, -1:], want_k.astype(mx.float16)).item())
        assert bool(mx.array_equal(c._core._v_win[:, -1:], want_v.astype(mx.float16)).item())
        qt = h16(q[:, :, t:t + 1])
        unfused = mx.array(c._attend(qt, 0.125)).astype(mx.float16)
        got = c.attend(qt, 0.125)
        assert got.dtype == mx.float16 and got.shape == (1, 4, 1, 64)
        assert bool(mx.array_equal(got, unfused).item())


def test_a_prefill_leaves_no_view_of_its_chunk_alive():
    """After a prefill chunk the store holds its codes, its sinks and its window, not the
    chunk: the sinks are rows of their own (a view would keep the whole chunk's fp16 rows
    alive, and the decode kernels would copy it at every step), and so is the window left
    after the chunk's flushes."""
    import gc

    H, T, d = 8, 4096, 128
    store = MetalCodeStore(d, kernels=REF, n_layers=1, n_q_heads=H, n_kv_heads=H, key_bits=3,
                           value_bits=3, seed=1, block_tokens=32, fp16_sinks=4, fp16_window=64)
    gc.collect()
    mx.synchronize()
    base = mx.get_active_memory()
    k, v = (mx.random.normal((H, T, d)).astype(mx.float16) for _ in range(2))
    mx.eval(k, v)
    store.append(k, v)
    mx.eval(store._k_sink, store._v_sink, store._k_win, store._v_win, *store.code_arrays())
    del k, v
    gc.collect()
    held = mx.get_active_memory() - base
    chunk = 2 * H * T * d * 2
    assert held < store.allocated_bytes() + chunk // 8, (held, store.allocated_bytes(), chunk)


@pytest.mark.parametrize("kernel", ["mma", "staged"])
def test_the_reduce_in_slices_matches_one_slice(emulated, monkeypatch, kernel):
    """A reduce threadgroup of more threads than head_dim splits the blocks and the fp16 rows
    over slices (attention.metal's tq_reduce_slices): the same attention as one slice up to
    float32 rounding, with slices that get no block or row (16 slices, 9 blocks, 2 sinks),
    with and without fp16 rows; and every count matches the C++ core."""
    store, core, rng = _emulated_cuda_store(emulated, monkeypatch, 5, 43, fp16_window=6,
                                            block_tokens=4)
    q = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float32))
    sinks, (a, b), win = store._pieces(0)
    qg = q.reshape(2, 2, 64)
    want = core.attend(np.array(q))
    got = {}
    for threads in ("64", "128", "512", "1024"):
        monkeypatch.setenv("TQ_GPU_REDUCE_THREADS", threads)
        with metal.forced_attention(kernel):
            rows, _ = store._code_attention(qg, a, b, 0.125, False, rows=[sinks, win])
            codes, _ = store._code_attention(qg, a, b, 0.125, False)
            out = np.array(store.attend(q))
        got[threads] = (np.array(rows), np.array(codes))
        np.testing.assert_allclose(out, want, atol=2e-3)
    one = got["64"]
    assert not np.array_equal(got["512"][0], one[0]), "8 slices sum in another order than one"
    for t in ("128", "512", "1024"):
        for x, y in zip(got[t], one):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_a_bad_reduce_thread_count_is_refused(monkeypatch):
    for bad in ("48", "2048", "x", "16"):
        monkeypatch.setenv("TQ_GPU_REDUCE_THREADS", bad)
        with pytest.raises(ValueError, match="TQ_GPU_REDUCE_THREADS"):
            metal.reduce_threads(128)
    monkeypatch.setenv("TQ_GPU_REDUCE_THREADS", "64")
    assert metal.reduce_threads(128) == 64 and metal.reduce_threads(32) == 64
    assert metal.reduce_threads(16) == 16  # under 32: one slice, whatever the setting
    monkeypatch.delenv("TQ_GPU_REDUCE_THREADS")
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    assert metal.reduce_threads(128) == metal.REDUCE_THREADS == 512
    assert metal.reduce_threads(512) == 512
    monkeypatch.setattr(metal, "candidate_path", lambda: "metal")
    assert metal.reduce_threads(128) == metal.REDUCE_THREADS_METAL == 256
    assert metal.reduce_threads(512) == 256  # a power of two dividing dim: one slice


@pytest.mark.parametrize("kernel", ["mma", "staged"])
def test_the_reduce_folds_long_row_sets_past_its_first_chunk(emulated, monkeypatch, kernel):
    """The reduce's fused pass takes the blocks and the first 128 fp16 rows (set a's, then set
    b's); the rest follow chunk by chunk. With 150 rows in set a and 40 in set b (set a alone
    fills the fused pass), with 100 + 90 (the pass ends inside set b) and with the 190 rows as
    one set, the outputs agree to float32 rounding and match a numpy reference; dropping one
    row of set b changes them."""
    store, core, rng = _emulated_cuda_store(emulated, monkeypatch, 9, 64, block_tokens=8,
                                            fp16_sinks=0, fp16_window=0)
    q = rng.standard_normal((2, 2, 64)).astype(np.float32)
    k, v = (_f16(rng.standard_normal((2, 190, 64))) for _ in range(2))

    def attend(*cuts):
        sets = [(mx.array(k[:, a:b]), mx.array(v[:, a:b])) for a, b in zip(cuts, cuts[1:])]
        with metal.forced_attention(kernel):
            out, _ = store._code_attention(mx.array(q), 0, 64, 0.125, False, rows=sets)
        return np.array(out)

    # the reference: the codes' attention from the core's decode of its own codes, then the rows
    # under one softmax (scores in float64)
    kc, vc = (np.stack([core.decode(0, h, role, 0, 64) for h in range(2)]).astype(np.float64)
              for role in ("key", "value"))
    keys = np.concatenate([kc, k.astype(np.float64)], axis=1)
    vals = np.concatenate([vc, v.astype(np.float64)], axis=1)
    s = np.einsum("hgd,htd->hgt", q.astype(np.float64), keys) * 0.125
    w = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hgt,htd->hgd", w / w.sum(-1, keepdims=True), vals)
    outs = [attend(0, 150, 190), attend(0, 100, 190), attend(0, 190)]
    for out in outs:
        np.testing.assert_allclose(out, want, atol=2e-3)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    np.testing.assert_allclose(outs[1], outs[2], atol=1e-5)
    assert np.abs(attend(0, 150, 189) - outs[0]).max() > 1e-4
