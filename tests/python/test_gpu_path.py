"""Choosing the GPU path: the selection rule (Metal, CUDA, CPU), the first-use self-test that
guards it, and the fall-back to the C++ core when the kernels fail (a shader that does not
compile, or one that computes wrong codes), forced here on the emulated GPU."""

import warnings

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import turboquant  # noqa: E402
from turboquant import _core, metal, mlx_cache, mlx_metal  # noqa: E402
from turboquant import gpu_path


@pytest.fixture
def fresh_selection(monkeypatch):
    """Forget the process's path choice (and restore it afterwards)."""
    saved = dict(gpu_path._SELF_TESTS)
    gpu_path._SELF_TESTS.clear()
    gpu_path.active_path.cache_clear()
    yield
    gpu_path._SELF_TESTS.clear()
    gpu_path._SELF_TESTS.update(saved)
    gpu_path.active_path.cache_clear()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_gpu_path"))


def test_selection_rule_knows_cuda():
    sel = metal.select_path
    assert sel("linux", False, True, None, mlx_cuda=True) == "cuda"
    assert sel("linux", False, True, "auto", mlx_cuda=True) == "cuda"
    assert sel("linux", False, True, "cuda", mlx_cuda=True) == "cuda"
    assert sel("linux", False, True, "cpu", mlx_cuda=True) == "cpu"
    assert sel("linux", False, False, None, mlx_cuda=True) == "cpu"  # no kernel sources
    assert sel("linux", False, True, "cuda", mlx_cuda=False) == "cpu"
    assert sel("linux", True, True, "metal", mlx_cuda=True) == "cpu"  # Metal only on macOS
    assert sel("darwin", True, True, None, mlx_cuda=True) == "metal"
    assert sel("darwin", True, True, "cuda", mlx_cuda=True) == "cuda"
    with pytest.raises(ValueError, match="'auto', 'metal', 'cuda' or 'cpu'"):
        sel("linux", False, True, "rocm")


def test_this_machine_takes_the_cpu_path_and_says_why():
    info = turboquant.build_info()
    assert info["mlx_kernels"] == gpu_path.active_path()
    if not (mx.metal.is_available() or mx.cuda.is_available()):
        assert info["mlx_kernels"] == "cpu" and info["backends"] == ["cpu"]
        assert info["mlx_kernels_reason"].startswith("cpu: ")
        assert "cuda" not in turboquant.backends()


def test_self_test_passes_on_the_emulated_kernels(emulated, monkeypatch):
    emulated.install(monkeypatch)
    start = len(emulated.launches)
    assert mlx_metal.self_test() is None
    used = set(emulated.launches[start:])
    # Every kernel the store launches (the rest serve the single-quantizer functions).
    # (attention_reduce_heads: the codes' log-sum-exp of a mixed-precision cache)
    # (dequantize: the rows form at head_dim 64, its tile form for a float16 prefill)
    assert used == {"encode_heads", "rotate_heads", "dequantize_rows_heads",
                    "dequantize_tile_heads", "attention_block",
                    "attention_mma", "attention_fast", "attention_staged",
                    "attention_reduce_rows",
                    "attention_mma_step", "attention_reduce_rows_step",
                    "attention_reduce_heads",
                    "split_encode_heads",
                    "split_rotate_heads", "split_dequantize_rows_heads",
                    "split_dequantize_tile_heads", "split_attention_block",
                    "permute", "centre"}, used


def test_a_kernel_that_does_not_compile_falls_back_to_the_core(monkeypatch, fresh_selection):
    def no_compile(which, rounds=2):
        def launch(**kwargs):
            raise RuntimeError("[metal_kernel] Unable to build metal library from source\n"
                               "error: use of undeclared identifier 'simd_sum'")
        return launch

    monkeypatch.setattr(metal, "candidate_path", lambda: "metal")
    monkeypatch.setattr(metal, "_kernel", no_compile)
    with pytest.warns(RuntimeWarning, match="metal kernels failed their first-use self-test "
                      r"\(RuntimeError: \[metal_kernel\] Unable to build .*simd_sum"):
        assert gpu_path.active_path() == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per cache
        assert gpu_path.active_path() == "cpu"
        info = turboquant.build_info()
    assert info["mlx_kernels"] == "cpu"
    assert "failed their first-use self-test" in info["mlx_kernels_reason"]
    assert "simd_sum" in info["mlx_kernels_reason"]


def test_kernels_with_wrong_codes_fall_back_to_the_core(emulated, monkeypatch, fresh_selection):
    emulated.install(monkeypatch)
    real = emulated.kernel

    def flip_a_bit(which, rounds=2):
        launch = real(which, rounds)
        if which != "encode_heads":
            return launch

        def broken(**kwargs):
            codes, norms = launch(**kwargs)
            c = np.array(codes)
            c[0, 0] ^= 1
            return [mx.array(c), norms]
        return broken

    monkeypatch.setattr(metal, "_kernel", flip_a_bit)
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    with pytest.warns(RuntimeWarning, match="cuda kernels failed .*plain: key codes of KV head 0 "
                      "differ from the C.. core's"):
        assert gpu_path.active_path() == "cpu"
    assert "cuda" not in turboquant.backends()


def test_generation_survives_a_broken_shader(monkeypatch, fresh_selection):
    # mlx-lm on a "Mac" whose kernels fail to compile: the cache warns once and runs on the
    # C++ core, with the same tokens as a cache that never tried the GPU.
    from mlx_lm.generate import generate_step
    from mlx_tiny import tiny_model

    from turboquant.mlx_lm import make_prompt_cache

    def no_compile(which, rounds=2):
        def launch(**kwargs):
            raise RuntimeError("Unable to build metal library from source")
        return launch

    model = tiny_model("llama")
    prompt = mx.array(np.arange(1, 40) % 100)

    def tokens():
        cache = make_prompt_cache(model, key_bits=3, value_bits=3)
        out = [t for t, _ in zip(generate_step(prompt, model, prompt_cache=cache, max_tokens=8),
                                 range(8))]
        return [int(t) for t, _ in out], cache

    want, _ = tokens()
    monkeypatch.setattr(metal, "candidate_path", lambda: "metal")
    monkeypatch.setattr(metal, "_kernel", no_compile)
    gpu_path.active_path.cache_clear()  # the first run chose the CPU path
    with pytest.warns(RuntimeWarning, match="Unable to build metal library"):
        got, cache = tokens()
    assert got == want
    assert all(not c._gpu for c in cache)


def test_builder_cuda_backend(emulated, monkeypatch, fresh_selection):
    def builder():
        return (turboquant.KVCacheBuilder().with_head_dim(32).with_heads(4, 2)
                .with_key_bits(3).with_value_bits(2).with_seed(3).with_block_tokens(8))

    if not mx.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this cache: .*"
                           r"mlx\[cuda13\].*here: cpu: "):
            builder().with_backend("cuda").build()
    # On an "NVIDIA machine" (emulated kernels, the CUDA path chosen): the store serves it,
    # explicitly and for "auto", and agrees with the C++ cache.
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    monkeypatch.delenv("TURBOQUANT_BACKEND", raising=False)
    gpu_path.active_path.cache_clear()
    assert gpu_path.active_path() == "cuda" and turboquant.backends()[-1] == "cuda"
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((2, 12, 32)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((4, 1, 32)).astype(np.float32)
    cpu = builder().with_backend("cpu").build()
    cpu.append(k, v)
    for backend in ("cuda", "auto"):
        gpu = builder().with_backend(backend).build()
        assert gpu.backend == "cuda", backend
        gpu.append(k, v)
        np.testing.assert_allclose(np.asarray(gpu.attend(q)), np.asarray(cpu.attend(q)),
                                   atol=2e-5)
    # A configuration the store cannot hold is refused by name for "cuda"...
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this cache"):
        builder().with_method("qjl").with_backend("cuda").build()
    # ...and served by the C++ core for "auto".
    assert builder().with_method("qjl").build().backend == "cpu"


def test_core_has_no_cuda_backend_of_its_own():
    with pytest.raises(ValueError, match="backend must be"):
        _core.resolve_backend("cuda")


def test_attention_passes_fit_threadgroup_memory(emulated, monkeypatch):
    # head_dim 512 with a GQA group of 16 would need 17,472 floats of scratch (68 KB, over
    # Metal's 32 KB): the group runs in passes that fit (the emulator refuses more).
    assert metal.attention_scratch_floats(512, 16, 64, 3, 3) == 17472
    assert metal.group_pass(128, 3, 3) == metal.MAX_GROUP
    assert metal.group_pass(512, 3, 3) == (metal.MAX_SCRATCH_FLOATS - 16) // (2 * 512 + 64 + 3) == 7
    assert metal.group_pass(512, 2, 3, k_bits1=4) == 7
    with pytest.raises(ValueError, match="does not fit the GPU's 32 KB"):
        metal.group_pass(8192, 3, 3)
    emulated.install(monkeypatch)
    rng = np.random.default_rng(5)
    kw = dict(n_layers=1, n_q_heads=16, n_kv_heads=1, key_bits=3, value_bits=3, seed=2,
              block_tokens=8)
    store, core = mlx_metal.MetalCodeStore(512, **kw), _core.KVCache(512, **kw)
    k, v = (rng.standard_normal((1, 9, 512)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    q = rng.standard_normal((16, 1, 512)).astype(np.float32)
    np.testing.assert_allclose(np.array(store.attend(mx.array(q))), core.attend(q), atol=2e-5)


def test_a_layer_kept_off_the_gpu_says_why(monkeypatch):
    from mlx_tiny import tiny_model

    from turboquant import mlx_lm as tq_mlx

    model = tiny_model("llama")
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cuda")
    monkeypatch.setattr(mlx_cache, "_GPU_FALLBACKS_WARNED", set())
    # (the tiny model's head_dim 16 is below the key split's 32: no split, to reach decay)
    cache = tq_mlx.make_prompt_cache(model, key_bits=3, value_bits=3, decay_after=64,
                                     decay_bits=2, key_split=False)
    with pytest.warns(RuntimeWarning, match="stay on the C.. CPU core, not the cuda GPU store: "
                      "temporal decay is a C.. core feature"):
        model(mx.array([[1, 2, 3, 4]]), cache=cache)
    assert not any(c._gpu for c in cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per reason, not once per layer or cache
        model(mx.array([[1, 2, 3, 4]]), cache=tq_mlx.make_prompt_cache(
            model, key_bits=3, value_bits=3, decay_after=64, decay_bits=2, key_split=False))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("groups", [2, 4])
def test_long_context_blocks_of_several_tiles_match_the_core(emulated, monkeypatch, split,
                                                             groups):
    # Past ATTENTION_GROUPS threadgroups a decode launch gives each block several tiles
    # (online softmax inside the block): forced here at a small size, 2 KV heads of 300
    # tokens (about 280 in codes: 5 tiles of 64) in 1 block of 5 tiles, or 2 blocks of 3 and 2.
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "ATTENTION_GROUPS", groups)
    assert metal.attention_blocks(280, metal.DEFAULT_BLOCK_TOKENS, 2) == groups // 2
    rng = np.random.default_rng(11)
    d, hkv, G = 64, 2, 3
    kw = dict(n_layers=1, n_q_heads=hkv * G, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=4,
              block_tokens=8, fp16_sinks=2, fp16_window=8)
    if split:
        kw.update(key_bits=2, n_outlier_channels=d // 2, outlier_bits=4,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys",
                  split_angle_bits=8)
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = (rng.standard_normal((hkv, 300, d)).astype(np.float32) for _ in range(2))
    k[..., : d // 2] *= 2.0
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    assert store.code_tokens() == core.code_tokens(0) > 256
    q = rng.standard_normal((hkv * G, 1, d)).astype(np.float32)
    # The fp16 sinks/window part is mlx matmuls: TF32 on an NVIDIA GPU (about 1e-4 here).
    atol = 3e-5 if mx.default_device() == mx.cpu else 3e-4
    for window in (None, 250):
        np.testing.assert_allclose(np.array(store.attend(mx.array(q), window=window)),
                                   core.attend(q, window=window), atol=atol)


def test_counted_params_on_the_cuda_path(monkeypatch):
    # On the CUDA path a decode step's counts are added to a block made once, on the GPU;
    # the result must be the same words as the block made directly, kept by value.
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    words = metal.attention_params(128, 0, 4096, 64, 4, 3, 3, True, 0.088, 7)
    for tokens in (0, 1, 300, 4095, 300):
        want = metal.attention_params(128, tokens, 4096, 64, 4, 3, 3, True, 0.088, 7)
        got = metal.counted_params(words, {1: tokens})
        assert got.dtype == mx.uint32
        np.testing.assert_array_equal(np.array(got), want)
        assert metal.counted_params(words, {1: tokens}) is got  # kept by value
    # Several words from one count (the fp16 rows' count and stride) and from two counts.
    rows = metal._reduce_rows_params(128, 9, 4, 4, 4, 70, 70, 0.125, True)
    want = np.array([128, 9, 4, 1, 4, 4, 70, 70, 0, 1], np.uint32)
    want[8] = np.array([0.125], np.float32).view(np.uint32)[0]
    np.testing.assert_array_equal(np.array(rows), want)
    odd = metal._reduce_rows_params(128, 9, 4, 0, 0, 70, 72, 0.125, True)
    want[4:8] = (0, 0, 70, 72)
    np.testing.assert_array_equal(np.array(odd), want)
    # A window buffer's rows (count != stride): a row of a table made once per block.
    for path in ("cuda", "metal"):
        monkeypatch.setattr(metal, "candidate_path", lambda: path)
        for n in (0, 5, 71, 96, 5):
            got = metal._reduce_rows_params(128, 9, 4, 4, 4, n, 96, 0.125, True)
            want[4:8] = (4, 4, n, 96)
            assert got.dtype == mx.uint32 and got.shape == (10,)
            np.testing.assert_array_equal(np.array(got), want)
        table = metal.counted_table(metal._reduce_rows_words(128, 9, 4, 0.125, True),
                                    {(4, 5): 4, 7: 96}, 6, 97)
        assert table.shape == (97, 10)
        assert metal.counted_table(metal._reduce_rows_words(128, 9, 4, 0.125, True),
                                   {(4, 5): 4, 7: 96}, 6, 97) is table  # kept by value
    # Elsewhere the block is made directly, also kept by value.
    monkeypatch.setattr(metal, "candidate_path", lambda: "metal")
    direct = metal.counted_params(words, {1: 77})
    np.testing.assert_array_equal(np.array(direct)[1], 77)


@pytest.mark.parametrize("kernel,tol", [("staged", 3e-5), ("mma", 2e-3)])
def test_decode_steps_on_the_cuda_path_match_the_core(emulated, monkeypatch, kernel, tol):
    # Decode steps as on an NVIDIA GPU (emulated kernels, the CUDA path's parameter blocks):
    # each step's token and fp16-row counts reach the kernels right, across window flushes.
    # (The mma kernel takes fp16 inputs: it agrees with the fp32 core to fp16's precision.)
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "candidate_path", lambda: "cuda")
    rng = np.random.default_rng(5)
    d, hkv, G = 64, 2, 2
    kw = dict(n_layers=1, n_q_heads=hkv * G, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=2,
              block_tokens=8, fp16_sinks=2, fp16_window=8)
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = (rng.standard_normal((hkv, 40, d)).astype(np.float32) for _ in range(2))
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    atol = tol if mx.default_device() == mx.cpu else max(tol, 3e-4)
    for _ in range(20):  # two flushes of the window
        k, v = (rng.standard_normal((hkv, 1, d)).astype(np.float32) for _ in range(2))
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        q = rng.standard_normal((hkv * G, 1, d)).astype(np.float32)
        with metal.forced_attention(kernel):
            got = np.array(store.attend(mx.array(q)))
        np.testing.assert_allclose(got, core.attend(q), atol=atol)
    assert store.code_tokens() == core.code_tokens(0) > 40


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_permute_kernel_moves_each_channel_bit_for_bit(emulated, monkeypatch, dtype):
    """metal.permute_channels (the key split's channel order of a prefill chunk) on the
    emulated GPU: y[h, t, c] = x[h, t, order[h, c]] in x's dtype, with a grid padded past the
    last element (3 x 7 x 64 elements is no multiple of the 256-thread groups)."""
    emulated.install(monkeypatch)
    rng = np.random.default_rng(3)
    dt = getattr(mx, dtype)
    order = np.stack([rng.permutation(64) for _ in range(3)]).astype(np.uint32)
    x = mx.array(rng.standard_normal((3, 7, 64)).astype(np.float32)).astype(dt)
    got = metal.permute_channels(x, mx.array(order))
    assert emulated.launches[-1] == "permute" and got.dtype == dt and got.shape == x.shape
    want = mx.take_along_axis(x, mx.array(order[:, None, :].astype(np.int32)), axis=2)
    assert bool(mx.array_equal(got, want).item())
    assert not bool(mx.array_equal(got, x).item())  # the order moved something
    with pytest.raises(ValueError, match="order must be uint32 of shape"):
        metal.permute_channels(x, mx.array(order[:2]))
    with pytest.raises(ValueError, match="takes float16, bfloat16 or float32"):
        metal.permute_channels(x.astype(mx.int32), mx.array(order))


def test_a_key_split_prefill_permutes_on_the_gpu_and_matches_take_along_axis(emulated,
                                                                             monkeypatch):
    """The mlx cache's key split on the emulated GPU: a prefill chunk's keys and queries go
    through the permute kernel, a decode step's through take_along_axis; outputs and codes
    equal those of TQ_GPU_PERMUTE=gather (take_along_axis everywhere) bit for bit."""
    emulated.install(monkeypatch)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cuda")
    rng = np.random.default_rng(4)
    k, v = (rng.standard_normal((1, 2, 21, 32)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, 4, 21, 32)).astype(np.float32)

    def run(gather: bool):
        if gather:
            monkeypatch.setenv("TQ_GPU_PERMUTE", "gather")
        else:
            monkeypatch.delenv("TQ_GPU_PERMUTE", raising=False)
        start = len(emulated.launches)
        c = mlx_cache.TurboQuantKVCache(key_bits=3, value_bits=3, fp16_sinks=2, fp16_window=4)
        outs = []
        for a, b in ((0, 20), (20, 21)):  # a prefill chunk, then one decode step
            c.update_and_fetch(mx.array(k[:, :, a:b]).astype(mx.float16),
                               mx.array(v[:, :, a:b]).astype(mx.float16))
            outs.append(np.array(c.attend(mx.array(q[:, :, a:b]).astype(mx.float16), 0.2)))
        assert c._gpu and c._perm is not None
        return outs, c._core.encoded(0, 1, "key"), emulated.launches[start:]

    (pre, step), codes, launched = run(gather=False)
    (pre_g, step_g), codes_g, launched_g = run(gather=True)
    assert launched.count("permute") == 2 and "permute" not in launched_g  # keys, queries
    assert np.array_equal(pre, pre_g) and np.array_equal(step, step_g)
    assert np.array_equal(codes[0], codes_g[0]) and np.array_equal(codes[1], codes_g[1])
