"""A decode step on the GPU store in few GPU operations, each the same bits as the longer
form it replaces: the fp16 window written in place in a buffer (one slice update per role, no
concatenation of the window per token) and read by the reduce launch with the buffer's row
stride; the centring, channel permutation and fp16 rounding of the new K/V as one fused
kernel per role; the value mean added in the output's cast; with the mma block kernel, the
queries and the output in the model's dtype (the gather, casts and mean inside the two attention
launches)."""

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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_centre_kernel_is_mlx_centring_bit_for_bit(emulated, monkeypatch, dtype):
    """metal.centre_rows (a decode step's K/V: channel order, float32 centring, one rounding
    to fp16, both roles in one launch) on the emulated GPU equals mlx's ops bit for bit,
    with and without a channel order, at one token and at three; bad shapes are refused."""
    emulated.install(monkeypatch)
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(3)
    H, d = 3, 64
    order = np.stack([rng.permutation(d) for _ in range(H)]).astype(np.uint32)
    km, vm = (mx.array(rng.standard_normal((H, 1, d)).astype(np.float32) * 5)
              for _ in range(2))
    for T in (1, 3):
        k, v = (mx.array(rng.standard_normal((H, T, d)).astype(np.float32) * 40).astype(dt)
                for _ in range(2))
        k = k.at[0, 0, :4].add(mx.array([1e-7, -3e-8, 6e4, -6e4]).astype(dt))  # tiny, large
        for perm in (order, None):
            start = len(emulated.launches)
            got = metal.centre_rows(k, v, km, vm, None if perm is None else mx.array(perm))
            assert emulated.launches[start:] == ["centre"]
            kk = k if perm is None else mx.take_along_axis(
                k, mx.array(perm[:, None, :].astype(np.int32)), axis=2)
            want = ((kk.astype(mx.float32) - km).astype(mx.float16),
                    (v.astype(mx.float32) - vm).astype(mx.float16))
            for g, w in zip(got, want):
                assert g.dtype == mx.float16 and g.shape == (H, T, d)
                assert bool(mx.array_equal(g, w).item())
    with pytest.raises(ValueError, match="one shape and dtype"):
        metal.centre_rows(k, v.astype(mx.float32), km, vm)
    with pytest.raises(ValueError, match="k_mean must be float32"):
        metal.centre_rows(k, v, km.astype(mx.float16), vm)
    with pytest.raises(ValueError, match="order must be uint32"):
        metal.centre_rows(k, v, km, vm, mx.array(order[:2]))


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
        start = len(emulated.launches)
        c.update_and_fetch(kt, vt)
        assert "centre" in emulated.launches[start:]  # the token's K/V in one launch
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


def test_a_decode_token_takes_the_short_lane_and_leaves_the_same_store(monkeypatch):
    """One fp16 token of every head, (H, 1, d) as a decode step hands it, goes to the window
    past append's general checks and plan (the window's slice update only) unless it starts
    a flush or fills a sink; the store then holds what the general path leaves (the same
    token as (1, H, 1, d) takes it), across flushes, and decode_step() gives attend()'s
    bits."""
    general_calls = []
    real = MetalCodeStore._append_windowed

    def counted(self, k, v, T):
        general_calls.append(self)
        return real(self, k, v, T)

    monkeypatch.setattr(MetalCodeStore, "_append_windowed", counted)
    short, _ = _store()
    plain, _ = _store()
    short.check_inputs = plain.check_inputs = False  # as the mlx-lm cache makes its stores
    rng = np.random.default_rng(7)
    k, v = (mx.array(rng.standard_normal((2, 3, 64)).astype(np.float16)) for _ in range(2))
    short.append(k, v)  # less than the sinks: the general path
    plain.append(k, v)
    general_calls.clear()
    steps = 30
    for _ in range(steps):
        k, v = (mx.array(rng.standard_normal((2, 1, 64)).astype(np.float16)) for _ in range(2))
        short.append(k, v)
        plain.append(k[None], v[None])  # (1, H, 1, d): the general path
        for name in ("_n", "_nc", "_ns", "_coded", "_win_cap", "_sink_cap"):
            assert getattr(short, name) == getattr(plain, name), name
        for a, b in ((short._k_win, plain._k_win), (short._v_win, plain._v_win),
                     (short._k_sink, plain._k_sink)):
            np.testing.assert_array_equal(np.array(a), np.array(b))
        g, h = short._groups[0], plain._groups[0]
        for a, b in zip(g.arrays(), h.arrays()) if short._nc else ():
            np.testing.assert_array_equal(np.array(a)[:, :short._nc], np.array(b)[:, :plain._nc])
        q = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float16))
        assert bool(mx.array_equal(short.decode_step(q, 0.125),
                                   plain.attend(q, scale=0.125)).item())
    plain_calls = sum(1 for s in general_calls if s is plain)
    short_calls = sum(1 for s in general_calls if s is short)
    assert plain_calls == steps
    assert 0 < short_calls <= steps // short.block_tokens + 2  # the flushing steps (and sinks)
    assert short._nc > 0


@pytest.mark.parametrize("dtype,key_split,center", [("float16", True, True),
                                                     ("bfloat16", True, True),
                                                     ("float16", False, False),
                                                     ("bfloat16", False, True)])
def test_a_decode_step_in_the_models_dtype_gives_the_longer_forms_bits(emulated, monkeypatch,
                                                                        dtype, key_split,
                                                                        center):
    """With the mma block kernel, a decode step of an fp16 or bfloat16 model takes its queries
    and gives its output in the model's dtype (metal.decode_step_words): the block kernel
    reads the queries' words in the key split's channel order and keeps them as float32 for
    the reduce, which adds the value mean and rounds once; no gather, cast or add launches.
    Its output is the longer form's bits (TQ_GPU_STEP_WORDS=0: mlx's gather and cast, the
    float32 kernels, then (out + mean).astype()), across window flushes, with and without
    the key split's channel order and the value mean."""
    emulated.install(monkeypatch)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cuda")
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(23)
    k, v = (rng.standard_normal((1, 2, 30, 64)).astype(np.float32) * 3 + 1 for _ in range(2))
    q = rng.standard_normal((1, 4, 30, 64)).astype(np.float32)
    c = mlx_cache.TurboQuantKVCache(key_bits=3, value_bits=3, fp16_sinks=2, fp16_window=6,
                                    block_tokens=4, key_split=key_split, center=center)
    cast = (lambda x: mx.array(x).astype(dt))  # noqa: E731
    with metal.forced_attention("mma"):
        c.update_and_fetch(cast(k[:, :, :20]), cast(v[:, :, :20]))
        c.attend(cast(q[:, :, :20]), 0.125)
        assert c._gpu and (c._perm is not None) == key_split
        assert (c._v_mean is not None) == center
        for t in range(20, 30):  # 4-token blocks: flushes on the way
            c.update_and_fetch(cast(k[:, :, t:t + 1]), cast(v[:, :, t:t + 1]))
            qt = cast(q[:, :, t:t + 1])
            start = len(emulated.launches)
            got = c.attend(qt, 0.125)
            launches = emulated.launches[start:]
            assert launches == ["attention_mma_step", "attention_reduce_rows_step"], launches
            monkeypatch.setenv("TQ_GPU_STEP_WORDS", "0")
            start = len(emulated.launches)
            want = c.attend(qt, 0.125)
            assert emulated.launches[start:] == ["attention_mma", "attention_reduce_rows"]
            monkeypatch.delenv("TQ_GPU_STEP_WORDS")
            assert got.dtype == dt and got.shape == (1, 4, 1, 64)
            assert bool(mx.array_equal(got, want).item()), t


def test_a_decode_step_in_the_models_dtype_is_refused_where_it_does_not_apply(emulated,
                                                                               monkeypatch):
    """decode_step_words gives None (the caller takes the longer form) for float32 queries
    and where the plan's block kernel is not the mma kernel."""
    store, _, rng = _emulated_cuda_store(emulated, monkeypatch, 3, 13)
    store.check_inputs = False
    q = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float16))
    with metal.forced_attention("mma"):
        assert store.decode_step_words(q, None, None, 0.125) is not None
        assert store.decode_step_words(q.astype(mx.float32), None, None, 0.125) is None
    with metal.forced_attention("staged"):
        assert store.decode_step_words(q, None, None, 0.125) is None


def test_decode_step_gives_attend_on_the_emulated_cuda_path(emulated, monkeypatch):
    """The store's decode_step() runs the kernels attend() runs (the mma block kernel and
    the reduce with the sinks and the window's buffer), bit for bit, on the emulated CUDA
    path; a mixed-precision store and an empty one take attend() itself."""
    store, _, rng = _emulated_cuda_store(emulated, monkeypatch, 11, 13)
    store.check_inputs = False  # as the mlx-lm cache makes its stores (else attend() runs)
    for _ in range(3):
        k, v = (mx.array(rng.standard_normal((2, 1, 64)).astype(np.float16)) for _ in range(2))
        store.append(k, v)
        q = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float32))
        with metal.forced_attention("mma"):
            got, want = store.decode_step(q, 0.125), store.attend(q, scale=0.125)
        assert bool(mx.array_equal(got, want).item())
    empty, _ = _store(kernels=metal)
    empty.check_inputs = False
    calls = []
    monkeypatch.setattr(MetalCodeStore, "attend",
                        lambda self, q, **kw: calls.append(kw) or mx.zeros(q.shape))
    empty.decode_step(mx.zeros((4, 1, 64)), 0.125)
    assert calls == [dict(causal=True, scale=0.125)]


def test_a_decode_step_takes_the_short_lanes_and_gives_the_general_paths_tokens(monkeypatch):
    """mlx-lm decode on the GPU store (reference kernels): with the short lanes (a token to
    the window past append's general checks, attention by the store's decode_step) the
    logits are bit for bit those of the general calls (the cache's generator and
    attend()), and the lanes are taken at most steps."""
    from mlx_lm.models import llama
    from mlx_tiny import _COMMON

    from turboquant import mlx_metal
    from turboquant.mlx_lm import make_prompt_cache

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mlx_metal, "METAL_KERNELS", REF)
    mx.random.seed(3)
    model = llama.Model(llama.ModelArgs.from_dict(dict(_COMMON, model_type="llama",
                                                      hidden_size=128)))
    model.set_dtype(mx.float16)
    prompt = mx.array([[(7 * i) % 100 + 1 for i in range(40)]])
    direct = []
    real = MetalCodeStore.decode_step

    def spy(self, q, scale):
        direct.append(1)
        return real(self, q, scale)

    monkeypatch.setattr(MetalCodeStore, "decode_step", spy)

    def run(short: bool):
        monkeypatch.setattr(mlx_cache.TurboQuantKVCache, "_direct_decode", short)
        cache = make_prompt_cache(model, fp16_window=8, block_tokens=4)
        logits = [model(prompt, cache=cache)[:, -1]]
        tok = mx.argmax(logits[-1], axis=-1)[:, None]
        for _ in range(12):  # three window flushes
            logits.append(model(tok, cache=cache)[:, -1])
            tok = mx.argmax(logits[-1], axis=-1)[:, None]
        assert all(c._gpu for c in cache)
        return np.array(mx.concatenate(logits).astype(mx.float32))

    want = run(False)
    assert not direct
    got = run(True)
    np.testing.assert_array_equal(got, want)
    assert len(direct) == 12 * len(model.layers)


@pytest.mark.parametrize("rows,split", [("sinks+window", False), ("window", True),
                                        ("sinks", False), ("sinks+window", True)])
def test_decode_step_plans_give_the_general_launches_bits(emulated, monkeypatch, rows, split):
    """decode_step takes metal.decode_step_heads: its launches come from a plan kept per
    value of what a step does not change, and give decode_attention_heads' bits (the store's
    attend()) on the emulated CUDA path, across window flushes (a new token count, so a new
    plan), for every arrangement of fp16 rows and plain or split keys; a changed setting
    (the reduce's threads) is a new plan too. The general function is not called while a
    plan serves."""
    over = dict(fp16_sinks=2 if "sinks" in rows else 0,
                fp16_window=6 if "window" in rows else 0)
    if split:
        over.update(key_bits=2, n_outlier_channels=32, outlier_bits=4,
                    outlier_channels=list(range(32)), outlier_roles="keys")
    store, _, rng = _emulated_cuda_store(emulated, monkeypatch, 17, 13, **over)
    store.check_inputs = False
    general = []
    real = metal.decode_attention_heads

    def spy(*a, **kw):
        general.append(1)
        return real(*a, **kw)

    metal._DECODE_PLANS.clear()
    for step in range(10):  # 4-token blocks: flushes on the way
        k, v = (mx.array(rng.standard_normal((2, 1, 64)).astype(np.float16)) for _ in range(2))
        store.append(k, v)
        q = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float32))
        if step == 6:
            monkeypatch.setenv("TQ_GPU_REDUCE_THREADS", "32")
        with metal.forced_attention("mma"):
            monkeypatch.setattr(metal, "decode_attention_heads", spy)
            got = store.decode_step(q, 0.125)
            monkeypatch.setattr(metal, "decode_attention_heads", real)
            want = store.attend(q, scale=0.125)
        assert bool(mx.array_equal(got, want).item()), step
    assert not general
    plans = list(metal._DECODE_PLANS)
    assert len({key[8] for key in plans}) >= 2  # token counts: rebuilt at flushes
    assert len({key[-1] for key in plans}) == 2  # the setting's change made its own plan
