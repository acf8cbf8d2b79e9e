"""The GPU path on a real GPU (an mlx Metal device, or mlx's CUDA back end on NVIDIA): the
kernels' codes and norms bit-exact against the C++ core, attention within tolerance, an
mlx-lm model's logits on the GPU path against the CPU path, and prompt-cache files across
paths. Marked ``gpu``; they run where mlx has a GPU device (scripts/gpu-test.sh runs them with
the GPU benchmarks) and are skipped, with the reason, elsewhere. CI has no GPU: there the same
kernels run on the emulator (test_mlx_metal*.py, test_gpu_path.py) and compile for CUDA with
NVRTC (test_cuda_kernels.py).
"""

import os

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from turboquant import _core, metal  # noqa: E402
from turboquant import gpu_path  # noqa: E402
from turboquant.mlx_metal import MetalCodeStore  # noqa: E402

_NO_GPU = metal.candidate_path() == "cpu"
pytestmark = [
    pytest.mark.gpu,
    # Where mlx has a GPU device, these run even when the kernels' first-use self-test failed
    # (then test_self_test_passes fails with its message and the others show which kernel).
    # The reason is asked only here (on a GPU, path_reason() would run the self-test at
    # collection, also for a run of one test that needs none).
    pytest.mark.skipif(_NO_GPU, reason=f"no GPU kernel path here ({gpu_path.path_reason()})"
                       if _NO_GPU else ""),
]


def test_self_test_passes():
    path = metal.candidate_path()
    assert gpu_path.self_test_result(path) is None, gpu_path.self_test_result(path)
    assert gpu_path.active_path() == path


_FIRST_USE = r"""
import json, turboquant
from turboquant import cuda_cache
info = turboquant.build_info()
status = dict(cuda_cache.status(), files=cuda_cache.written_files())
print(json.dumps([info["mlx_kernels"], status]))
"""


def test_compiled_kernels_are_kept_across_processes(tmp_path):
    """On the CUDA path mlx loads the modules turboquant.cuda_cache writes (its probe: the
    cached module's body runs, not the source's) and a second process compiles none of the
    self-test's kernels: it finds every module the first wrote."""
    import json
    import subprocess
    import sys

    if metal.candidate_path() != "cuda":
        pytest.skip("the kernel cache is the CUDA path's (mlx keeps Metal's in memory)")
    env = dict(os.environ, MLX_PTX_CACHE_DIR=str(tmp_path / "ptx"),
               TQ_GPU_HEADER_DIR=str(tmp_path / "headers"))
    env.pop("TQ_CUDA_KERNEL_CACHE", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _FIRST_USE], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    (path1, first), (path2, second) = runs
    assert path1 == path2 == "cuda"
    assert first["state"] == "on" and second["state"] == "on", (first, second)
    assert first["written"] >= 20, first
    assert second["written"] == 0 and second["found"] >= first["written"], second
    # every module the first process wrote is in the folder, each file written once (the
    # folder also holds mlx's own fused kernels and the probe's module)
    files = {p.name for p in (tmp_path / "ptx").rglob("*.ptx")}
    assert len(first["files"]) == len(set(first["files"])) == first["written"], first["files"]
    assert set(first["files"]) <= files, sorted(set(first["files"]) - files)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def kw(d, hq, hkv, kb, vb, split=False, nc=True, sinks=0, window=0, bt=64, rotation="auto"):
    out = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=kb, value_bits=vb, seed=9,
               block_tokens=bt, norm_correction=nc, fp16_sinks=sinks, fp16_window=window,
               rotation=rotation)
    if split:
        out.update(key_bits=kb - 1, n_outlier_channels=d // 2, outlier_bits=kb + 1,
                   outlier_channels=list(range(d // 2)), outlier_roles="keys",
                   split_angle_bits=8)
    return out


def assert_same_codes(store, core):
    n = core.code_tokens(0)
    assert store.code_tokens() == n and store.size() == core.size(0)
    for h in range(core.n_kv_heads):
        for role in ("key", "value"):
            sc, sn = store.encoded(0, h, role)
            cc, cn = core.encoded(0, h, role, 0, n)
            assert np.array_equal(sc, cc), (h, role, np.argwhere(sc != cc)[:4])
            assert np.array_equal(np.asarray(sn).view(np.uint16),
                                  np.asarray(cn).view(np.uint16)), (h, role)


# mlx's CUDA back end runs float32 matmuls (the prefill's attention over the decoded tile, the
# fp16 sinks/window of a decode step) on TF32 tensor cores by default: 10-bit mantissas, about
# 1e-3 relative. MLX_ENABLE_TF32=0 gives full float32, where the kernels agree to 2e-4
# (scripts/gpu-test.sh runs both).
# The mma block kernel (the CUDA path's default) multiplies fp16 queries, centroids and softmax
# weights on tensor cores: 2e-3 as well.
ATTN_TOL = (2e-4 if os.environ.get("MLX_ENABLE_TF32", "1") == "0"
            and metal.default_attention() != "mma" else 2e-3)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))


CONFIGS = [(d, bits, split) for d in (64, 128, 256) for bits in (2, 3, 4)
           for split in (False, True)]
# Both rotations the kernels take: two Hadamard rounds ("auto" is "hadamard" at these head
# dims) and one ("hadamard1", TQ_ROTATION_ROUNDS 1).
ROTATIONS = ["auto", "hadamard1"]


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("d,bits,split", CONFIGS)
def test_codes_bit_exact_and_attention_close(d, bits, split, rotation):
    rng = np.random.default_rng(d * 10 + bits)
    hq, hkv = 32, 8
    cfg = kw(d, hq, hkv, bits, bits, split=split, sinks=4, window=64, rotation=rotation)
    store, core = MetalCodeStore(d, **cfg), _core.KVCache(d, **cfg)
    for T in (700, 1, 63, 1):  # a prefill, decode steps, a chunk
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        k[..., : d // 2] *= 2.5
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_codes(store, core)
    for rows in (1, 16):
        q = rand(rng, hq, rows, d)
        for window in (None, 300):
            got = store.attend(mx.array(q), scale=d ** -0.5, window=window)
            want = core.attend(q, scale=d ** -0.5, window=window)
            assert rel_err(np.array(got), want) <= ATTN_TOL, (rows, window)
    assert store.to_bytes() == core.to_bytes()


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("d,split", [(d, split) for d in (64, 128, 256) for split in (False, True)])
def test_dequantize_forms_and_the_tile_bit_exact(monkeypatch, d, split, rotation):
    # The prefill's dequantize: the rows form (a simd-group per row, the default) and the
    # group form (a threadgroup per row) give the core's decoded rows bit for bit; the fp16
    # tile kernel equals the decoded rows as fp16 between the fp16 rows, bit for bit.
    rng = np.random.default_rng(d + split)
    hkv, T = 8, 1000
    cfg = kw(d, 32, hkv, 3, 3, split=split, rotation=rotation)
    store, core = MetalCodeStore(d, **cfg), _core.KVCache(d, **cfg)
    k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
    k[..., : d // 2] *= 2.5
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    before = mx.array(rng.standard_normal((hkv, 4, d)).astype(np.float16))
    after = mx.array(rng.standard_normal((hkv, 64, d)).astype(np.float16))
    for role, tables in (("key", store.key_tables), ("value", store.value_tables)):
        codes = mx.array(np.stack([store.encoded(0, h, role)[0] for h in range(hkv)]))
        norms = mx.array(np.stack([store.encoded(0, h, role)[1] for h in range(hkv)]))
        out = {}
        for form in ("rows", "group"):
            monkeypatch.setenv("TQ_GPU_DEQUANTIZE", form)
            out[form] = np.array(metal.dequantize_heads(tables, codes, norms))
            half = metal.dequantize_heads(tables, codes, norms, out_dtype=mx.float16)
            out[form + " tile"] = np.array(metal.dequantize_tile_heads(tables, codes, norms,
                                                                       before, after))
            want = np.array(mx.concatenate([before, half, after], axis=1))
            assert np.array_equal(out[form + " tile"].view(np.uint16), want.view(np.uint16))
        assert np.array_equal(out["rows"], out["group"]), role
        for h in range(hkv):
            c, n = core.encoded(0, h, role, 0, T)
            assert np.array_equal(out["rows"][h], tables.quantizers[h].decode(c, n)), (role, h)


@pytest.mark.parametrize("split", [False, True])
def test_per_head_widths_bit_exact_and_attention_close(split):
    # A calibrated profile's per-KV-head widths: four width groups over 8 KV heads, each
    # group on the kernels of its widths.
    rng = np.random.default_rng(7 + split)
    d, hq, hkv = 128, 32, 8
    widths = [2, 4, 3, 3, 2, 4, 3, 3]
    cfg = kw(d, hq, hkv, 3, 3, split=split, sinks=4, window=64)
    if split:  # each head's split of its own width
        cfg.update(key_head_bits=[b - 1 for b in widths],
                   outlier_head_bits=[b + 1 for b in widths])
    else:
        cfg.update(key_head_bits=widths)
    cfg.update(value_head_bits=widths[::-1])
    store, core = MetalCodeStore(d, **cfg), _core.KVCache(d, **cfg)
    assert len(store.width_groups) == 4
    for T in (700, 1, 63, 1):
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        k[..., : d // 2] *= 2.5
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    assert_same_codes(store, core)
    assert store.memory_bytes() == core.memory_bytes()
    for rows in (1, 16):
        q = rand(rng, hq, rows, d)
        got = store.attend(mx.array(q), scale=d ** -0.5)
        assert rel_err(np.array(got), core.attend(q, scale=d ** -0.5)) <= ATTN_TOL, rows
    assert store.to_bytes() == core.to_bytes()


def test_mixed_precision_masks_codes_and_attention():
    # Importance-routed mixed precision: a prefill and decode steps, each attended by its
    # queries; the kept-token masks (from the store's own importance) and the codes are the
    # core's (a prefill's TF32 scores may break a near-tie, so its masks are checked in fp32).
    rng = np.random.default_rng(5)
    d, hq, hkv = 128, 32, 8
    cfg = kw(d, hq, hkv, 4, 4, split=True, sinks=4, window=64, bt=16)
    cfg.update(mixed_group_blocks=2, mixed_keep_blocks=1, decay_bits=2)
    store, core = MetalCodeStore(d, **cfg), _core.KVCache(d, **cfg)
    fp32 = os.environ.get("MLX_ENABLE_TF32", "1") == "0"
    for T in (300,) + (1,) * 40:
        k, v = rand(rng, hkv, T, d), rand(rng, hkv, T, d)
        k[..., : d // 2] *= 2.5
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
        q = rand(rng, hq, T, d)
        got = store.attend(mx.array(q), scale=d ** -0.5)
        assert rel_err(np.array(got), core.attend(q, scale=d ** -0.5)) <= ATTN_TOL, T
    assert store.code_tokens() == core.code_tokens(0) > 0
    if fp32:
        for h in range(hkv):
            assert np.array_equal(store.mixed_masks(0, h), core.mixed_masks(0, h)), h
            for role in ("key", "value"):
                assert np.array_equal(store.decode(0, h, role), core.decode(0, h, role))


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("split", [False, True])
def test_large_context_decode_matches_the_core(split, rotation):
    # Each decode block kernel (mma: the CUDA default; staged; register-tiled; generic) on 16K
    # tokens.
    rng = np.random.default_rng(1)
    d, hq, hkv = 128, 32, 8
    cfg = kw(d, hq, hkv, 3, 3, split=split, sinks=4, window=64, rotation=rotation)
    store, core = MetalCodeStore(d, **cfg), _core.KVCache(d, **cfg)
    for _ in range(4):
        k, v = rand(rng, hkv, 4096, d), rand(rng, hkv, 4096, d)
        store.append(mx.array(k), mx.array(v))
        core.append(k, v)
    q = rand(rng, hq, 1, d)
    want = core.attend(q)
    for kernel in metal.ATTENTION_KERNELS:
        with metal.forced_attention(kernel):
            assert rel_err(np.array(store.attend(mx.array(q))), want) <= ATTN_TOL, kernel


def gpu_sized_model(model_type: str):
    """A tiny random model with head_dim 64 (the GPU store's key split needs head_dim >= 32;
    tests/python/mlx_tiny.py's models have 16)."""
    import importlib

    from mlx_tiny import _COMMON

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    cfg = dict(_COMMON, model_type=model_type, hidden_size=256, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64)
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model


def test_mlx_lm_logits_on_the_gpu_path_match_the_cpu_path(monkeypatch):
    from turboquant.mlx_lm import make_prompt_cache

    model = gpu_sized_model("llama")
    prompt = mx.array((np.arange(1, 300) * 7 % 120)[None])

    def logits(gpu: bool):
        monkeypatch.setattr(gpu_path, "active_path",
                            (lambda: metal.candidate_path()) if gpu else (lambda: "cpu"))
        cache = make_prompt_cache(model, key_bits=3, value_bits=3)
        out = [model(prompt, cache=cache)[:, -1]]
        tok = mx.argmax(out[-1], axis=-1)[:, None]
        for _ in range(6):
            out.append(model(tok, cache=cache)[:, -1])
            tok = mx.argmax(out[-1], axis=-1)[:, None]
        assert all(c._gpu == gpu for c in cache)
        return np.stack([np.array(o.astype(mx.float32)) for o in out])

    gpu, cpu = logits(True), logits(False)
    assert rel_err(gpu, cpu) <= 1e-2
    assert (gpu.argmax(-1) == cpu.argmax(-1)).mean() >= 0.9


def test_prompt_cache_files_load_across_paths(monkeypatch, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from turboquant.mlx_lm import make_prompt_cache

    model = gpu_sized_model("qwen2")
    prompt = mx.array((np.arange(1, 200) * 5 % 120)[None])
    monkeypatch.setattr(gpu_path, "active_path", lambda: metal.candidate_path())
    gpu_cache = make_prompt_cache(model, key_bits=3, value_bits=4)
    model(prompt, cache=gpu_cache)
    assert all(c._gpu for c in gpu_cache)
    save_prompt_cache(str(tmp_path / "gpu.safetensors"), gpu_cache)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "cpu")
    cpu_cache = load_prompt_cache(str(tmp_path / "gpu.safetensors"))
    assert not any(c._gpu for c in cpu_cache)
    tok = mx.array([[3]])
    a = np.array(model(tok, cache=cpu_cache).astype(mx.float32))
    monkeypatch.setattr(gpu_path, "active_path", lambda: metal.candidate_path())
    again = load_prompt_cache(str(tmp_path / "gpu.safetensors"))
    b = np.array(model(tok, cache=again).astype(mx.float32))
    assert rel_err(a, b) <= 1e-2


def _batched_and_alone(model, make, prompts, max_tokens, logprobs=None):
    """Greedy tokens of the prompts decoded together (mlx-lm's BatchGenerator) and each
    generated alone (generate_step), every cache made by ``make``; and the alone caches.
    ``logprobs`` (a list): gets the largest difference between a batched step's
    log-probabilities and the same step's alone, over the steps whose tokens agree."""
    from mlx_lm.generate import BatchGenerator, generate_step

    alone, alone_caches, alone_lp = [], [], []
    for p, n in zip(prompts, max_tokens):
        cache = make(model)
        alone_caches.append(cache)
        steps = list(generate_step(mx.array(p), model, max_tokens=n, prompt_cache=cache))
        alone.append([t for t, _ in steps])
        alone_lp.append([np.array(lp.astype(mx.float32)) for _, lp in steps])
    gen = BatchGenerator(model)
    uids = gen.insert(prompts, max_tokens=list(max_tokens),
                      caches=[make(model) for _ in prompts])
    got = {u: [] for u in uids}
    lps = {u: [] for u in uids}
    while len(gen._generation_batch) or len(gen._prompt_batch) or gen._unprocessed_sequences:
        for r in gen.next_generated():
            got[r.uid].append(r.token)
            lps[r.uid].append(np.array(r.logprobs.astype(mx.float32)))
    if logprobs is not None:
        diff = 0.0
        for i, u in enumerate(uids):
            for a, b, ta, tb in zip(lps[u], alone_lp[i], got[u], alone[i]):
                if ta != tb:
                    break
                diff = max(diff, float(np.max(np.abs(a.ravel() - b.ravel()))))
        logprobs.append(diff)
    return [got[u] for u in uids], alone, alone_caches


@pytest.mark.parametrize("options", [{}, {"fp16_window": 8, "block_tokens": 16},
                                     {"preset": "codes-only"}])
def test_batched_generation_on_the_gpu_store_equals_one_at_a_time(monkeypatch, options):
    """Continuous batching with every row's layers on the GPU store: each request's greedy
    tokens are those it gets generated alone on the store (the default preset's sinks, window
    and key split; a short window that flushes while decoding; codes only). mlx-lm's fp16
    caches are the control: the comparison needs the model's batched forward pass to give
    each row exactly the numbers it gives the row alone. Where the batched matmuls round
    otherwise on this GPU (the fp16 control's log-probabilities differ, even when its tokens
    agree), a K/V value a rounding step away from a centroid boundary takes another code, and
    a random model's near-tied greedy tokens then part: no comparison is possible, and the
    batch's own logic is checked on identical inputs by the test below."""
    from mlx.utils import tree_map
    from mlx_lm.models.cache import make_prompt_cache as fp16_cache

    from turboquant.mlx_lm import make_prompt_cache

    model = gpu_sized_model("llama")
    model.update(tree_map(lambda w: w * 3.0, model.parameters()))  # greedy text varies
    mx.eval(model.parameters())
    prompts = [((np.arange(n) * (7 + n)) % 120 + 1).tolist() for n in (5, 90, 200, 33)]
    max_tokens = [24, 12, 24, 18]
    diff: list[float] = []
    batched, alone, _ = _batched_and_alone(model, fp16_cache, prompts, max_tokens, diff)
    if batched != alone or diff[0] > 0:
        pytest.skip(f"mlx-lm's own fp16 batch rounds otherwise than one at a time on this GPU "
                    f"(log-probabilities up to {diff[0]:.2e} apart)")
    monkeypatch.setattr(gpu_path, "active_path", lambda: metal.candidate_path())
    batched, alone, caches = _batched_and_alone(
        model, lambda m: make_prompt_cache(m, **options), prompts, max_tokens)
    assert all(c._gpu and type(c._core).__name__ == "MetalCodeStore" for cache in caches
               for c in cache)
    assert len({tuple(t) for t in alone}) == len(alone)
    assert batched == alone


@pytest.mark.parametrize("options", [dict(fp16_sinks=4, fp16_window=64),
                                     dict(fp16_sinks=4, fp16_window=8, block_tokens=16), {}])
def test_batched_decode_steps_on_the_gpu_store_equal_each_row_alone(monkeypatch, options):
    """The batch cache on the real kernels, without a model: rows of 5 to 200 tokens prefilled
    through the store, merged into one batch; every decode step's output of row i equals,
    bit for bit, what row i's copy computes alone from the same keys, values and queries
    (sinks and window; a window flushing into codes while decoding; codes only)."""
    import copy

    from turboquant.mlx_batch import BatchTurboQuantKVCache
    from turboquant.mlx_lm import TurboQuantKVCache

    monkeypatch.setattr(gpu_path, "active_path", lambda: metal.candidate_path())
    H, G, d, scale = 2, 4, 128, 128 ** -0.5
    rng = np.random.default_rng(4)

    def arr(*shape):
        return mx.array(rng.standard_normal(shape, np.float32)).astype(mx.float16)

    rows = []
    for n in (5, 90, 200, 33):
        c = TurboQuantKVCache(key_bits=3, value_bits=3, **options)
        c.update_and_fetch(arr(1, H, n, d), arr(1, H, n, d))
        c.attend(arr(1, H * G, n, d), scale=scale)
        assert c._gpu and type(c._core).__name__ == "MetalCodeStore"
        rows.append(c)
    twins = [copy.deepcopy(c) for c in rows]
    batch = BatchTurboQuantKVCache.merge(rows)
    for step in range(24):
        k, v, q = arr(4, H, 1, d), arr(4, H, 1, d), arr(4, H * G, 1, d)
        batch.update_and_fetch(k, v)
        out = np.array(batch.attend_masked(q, scale, batch.make_mask(1)).astype(mx.float32))
        for i, t in enumerate(twins):
            t.update_and_fetch(k[i:i + 1], v[i:i + 1])
            own = np.array(t.attend(q[i:i + 1], scale=scale).astype(mx.float32))
            assert np.array_equal(out[i:i + 1], own), (step, i)

