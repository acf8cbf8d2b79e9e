"""Continuous batching on the GPU store: rows whose layers are held by MetalCodeStore.

The store runs as on a GPU machine (``gpu_path.active_path`` says "metal"), its kernels the
ReferenceKernels (the turboquant.metal signatures computed with the C++ quantizers), or the
kernel sources themselves on the emulated GPU (tests/python/mlx_kernel_emulator.py), as in
test_mlx_metal*.py. Greedy tokens of requests decoded together (mlx-lm's BatchGenerator)
equal each request generated alone on the GPU store; merge / extract / filter / extend /
trim copy and keep rows on the device; a row extracted from a batch and continued alone
gives the tokens of a request never batched. tests/python/test_gpu.py repeats the token
comparison on a real GPU."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import turboquant.mlx_metal as mm
from mlx.utils import tree_map
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import cache as mlx_cache
from mlx_tiny import _COMMON
from test_mlx_batch import alone, run_batched
from turboquant import mlx_batch
from turboquant import gpu_path
from turboquant import mlx_lm as tq
from turboquant.mlx_batch import BatchTurboQuantKVCache

REF = mm.ReferenceKernels()


@pytest.fixture
def on_gpu_store(monkeypatch):
    """New caches' layers go to the GPU store, on the reference kernels."""
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)


def gpu_model(model_type: str = "llama", seed: int = 0):
    """A tiny random model with head_dim 32 (the GPU store's key split needs >= 32), weights
    scaled so that greedy text varies."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(dict(_COMMON, model_type=model_type,
                                                        hidden_size=128)))
    model.update(tree_map(lambda w: w * 3.0, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[rng.randrange(1, 120) for _ in range(n)] for n in (5, 37, 61, 12, 1)]


MAKERS = {
    # the default preset (4 fp16 sinks, 64-token fp16 window, key split)
    "tq3": lambda m: tq.make_prompt_cache(m),
    # a short window with small blocks: the window flushes into codes while decoding
    "tq3-short-window": lambda m: tq.make_prompt_cache(m, fp16_window=6, block_tokens=4),
    "codes-only": lambda m: tq.make_prompt_cache(m, preset="codes-only"),
    "codes-only-no-split": lambda m: tq.make_prompt_cache(m, preset="codes-only",
                                                          key_split=False),
    # importance-routed mixed precision (the trial forced on), flushing while decoding
    "tq3-mixed": lambda m: tq.make_prompt_cache(m, preset="tq3-mixed", fp16_window=8,
                                                block_tokens=4, mixed_trial=False),
    # layer 0 fp16: the TurboQuant layer reads the fp16 layer's batch mask
    "codes-only-fp16-layer0": lambda m: tq.make_prompt_cache(m, preset="codes-only",
                                                             fp16_layers=[0]),
}


def assert_on_gpu_store(cache):
    for c in cache:
        if isinstance(c, mlx_cache.KVCache):  # an fp16 layer
            continue
        assert c._gpu and isinstance(c._core, mm.MetalCodeStore), c
        assert c._core.kernels is REF and not c._core.check_inputs


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("prefill_step_size", [2048, 16])
def test_gpu_rows_batched_greedy_tokens_equal_each_request_alone(on_gpu_store, kind,
                                                                 prefill_step_size, prompts):
    model, make = gpu_model(), MAKERS[kind]
    max_tokens = [14, 6, 14, 10, 14]
    expect, coded = [], 0
    for p, n in zip(prompts, max_tokens):
        cache = make(model)
        expect.append(alone(model, p, n, make, prefill_step_size, cache=cache))
        assert_on_gpu_store(cache)
        coded = max(coded, cache[-1]._core.code_tokens())
        assert cache[-1]._core.mixed == (kind == "tq3-mixed")
    assert coded > 0 or kind == "tq3"  # (the default window holds these prompts in fp16)
    assert len({tuple(t) for t in expect}) == len(expect)  # a mix-up between rows shows
    gen = BatchGenerator(model, prefill_step_size=prefill_step_size)
    got = run_batched(gen, None, {0: [(p, n, make(model)) for p, n in zip(prompts, max_tokens)]})
    assert got == expect


def test_the_batch_holds_gpu_rows_and_each_row_only_its_tokens(on_gpu_store, prompts):
    model = gpu_model()
    gen = BatchGenerator(model)
    gen.insert(prompts[:3], max_tokens=[6] * 3, caches=[tq.make_prompt_cache(model)
                                                        for _ in range(3)])
    gen.next_generated()
    for layer in gen._generation_batch.prompt_cache:
        assert isinstance(layer, BatchTurboQuantKVCache)
        assert_on_gpu_store(layer.rows)
        lengths = [len(p) for p in prompts[:3]]
        fed = layer.rows[0].offset - lengths[0]
        assert [r.offset for r in layer.rows] == [n + fed for n in lengths]
        assert [r._core.size() for r in layer.rows] == [n + fed for n in lengths]
        assert layer.left_padding.tolist() == [max(lengths) - n for n in lengths]
    assert mlx_batch.stats()["max_rows"] >= 3


def test_a_decode_step_of_gpu_rows_reads_nothing_back_to_the_host(on_gpu_store, monkeypatch):
    """update_and_fetch and attention of a decode step stay lazy mlx ops: no host copy of
    keys, values, queries or the mask (the store's own kernels aside: the reference
    kernels here compute on the CPU, the GPU kernels do not)."""
    from turboquant import mlx_cache as tq_cache

    batch = BatchTurboQuantKVCache.merge([_filled(n, seed=n) for n in (9, 3, 14)])
    rng = np.random.default_rng(2)
    k = mx.array(rng.standard_normal((3, 2, 1, 32), np.float32))
    q = mx.array(rng.standard_normal((3, 4, 1, 32), np.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("a host copy on the decode path of GPU rows")

    for module in (mlx_batch, tq_cache):
        monkeypatch.setattr(module, "_host", refuse)
    monkeypatch.setattr(mlx_batch, "_window_from_mask", refuse)
    mask = batch.make_mask(1)
    batch.update_and_fetch(k, k)
    out = batch.attend_masked(q, 0.2, mask)
    assert isinstance(out, mx.array) and out.shape == (3, 4, 1, 32)
    mx.eval(out)


def test_gpu_rows_joining_and_leaving_a_running_batch(on_gpu_store, prompts):
    """Requests arrive while others decode, finish at different steps (filter) and join the
    running batch (extend), on GPU rows; each still gets its alone tokens."""
    model = gpu_model()
    make = MAKERS["tq3-short-window"]
    plan = {0: [(prompts[0], 12, None), (prompts[1], 4, None)],
            3: [(prompts[2], 9, None)],
            4: [(prompts[3], 12, None), (prompts[4], 3, None)],
            8: [(prompts[1], 7, None)]}
    expect = [alone(model, p, n, make) for step in sorted(plan) for p, n, _ in plan[step]]
    schedule = {s: [(p, n, make(model)) for p, n, _ in v] for s, v in plan.items()}
    gen = BatchGenerator(model, prefill_batch_size=2, completion_batch_size=4)
    assert run_batched(gen, None, schedule) == expect


def test_cached_prefix_on_the_gpu_store_merges_with_fresh_requests(on_gpu_store, prompts):
    model, make = gpu_model(), MAKERS["tq3-short-window"]
    prefix = make(model)
    model(mx.array([prompts[2][:40]]), cache=prefix)
    assert_on_gpu_store(prefix)
    before = [c._core.to_bytes() for c in prefix]
    expect = [alone(model, prompts[2][40:], 10, make, cache=copy.deepcopy(prefix)),
              alone(model, prompts[1], 10, make)]
    got = run_batched(BatchGenerator(model), None,
                      {0: [(prompts[2][40:], 10, copy.deepcopy(prefix)),
                           (prompts[1], 10, make(model))]})
    assert got == expect
    # merge copies on the device: the caller's caches are unchanged
    assert [c._core.to_bytes() for c in prefix] == before and prefix[0].offset == 40


def test_an_extracted_gpu_row_continued_alone_equals_a_request_never_batched(on_gpu_store,
                                                                            prompts):
    model, make = gpu_model(), MAKERS["tq3-short-window"]
    gen = BatchGenerator(model)
    uids = gen.insert(prompts[1:3], max_tokens=[40, 40], caches=[make(model) for _ in range(2)])
    for _ in range(5):
        gen.next_generated()
    (cache, live), = gen.extract_cache([uids[1]]).values()
    tokens = list(live)
    fed = len(tokens) - len(prompts[2])
    assert fed >= 3 and cache[0].offset == len(tokens)
    assert_on_gpu_store(cache)
    snapshot = [c._core.to_bytes() for c in cache]
    for _ in range(4):  # the batch goes on: the extracted copy does not change
        gen.next_generated()
    assert [c._core.to_bytes() for c in cache] == snapshot
    expect = alone(model, prompts[2], fed + 12, make)
    assert tokens[len(prompts[2]):] == expect[:fed]
    # continued alone from the next token: the tokens of the request never batched
    assert alone(model, [expect[fed]], 11, make, cache=cache) == expect[fed + 1:]


def _filled(n: int, kv_heads: int = 2, d: int = 32, seed: int = 0, window: bool = True):
    c = tq.TurboQuantKVCache(key_bits=3, value_bits=3, fp16_sinks=2 if window else 0,
                             fp16_window=4 if window else 0, block_tokens=4)
    rng = np.random.default_rng(seed)
    if n:
        c.update_and_fetch(mx.array(rng.standard_normal((1, kv_heads, n, d), np.float32)),
                           mx.array(rng.standard_normal((1, kv_heads, n, d), np.float32)))
        c.attend(mx.array(rng.standard_normal((1, 4, n, d), np.float32)), scale=0.2)
    return c


@pytest.mark.parametrize("options", [{}, {"fp16_sinks": 2, "fp16_window": 4},
                                     {"key_head_bits": [2, 4], "value_head_bits": [3, 2]}])
def test_store_copy_is_independent_and_equal(options):
    """MetalCodeStore.copy: the same bytes; appends and trims of either leave the other's."""
    kw = dict(n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3, seed=2, block_tokens=4,
              kernels=REF, check_inputs=False, **options)
    rng = np.random.default_rng(0)

    def kv(n):
        return (mx.array(rng.standard_normal((2, n, 32), np.float32)),
                mx.array(rng.standard_normal((2, n, 32), np.float32)))

    first, a, b = kv(7), kv(3), kv(3)

    def built(*blocks):
        s = mm.MetalCodeStore(32, **kw)
        for k, v in blocks:
            s.append(k, v)
        return s.to_bytes()

    store = mm.MetalCodeStore(32, **kw)
    store.append(*first)
    twin = store.copy()
    assert twin.to_bytes() == store.to_bytes()
    assert twin.kernels is REF and not twin.check_inputs
    # each writes other tokens into the page rows both arrays had room for
    twin.append(*a)
    store.append(*b)
    assert twin.to_bytes() == built(first, a) and store.to_bytes() == built(first, b)
    twin.trim(5)
    store.append(*a)
    assert twin.size() == 5
    assert store.to_bytes() == built(first, b, a)
    q = mx.array(rng.standard_normal((4, 1, 32), np.float32))
    assert np.array_equal(np.array(twin.attend(q, scale=0.2)),
                          np.array(twin.copy().attend(q, scale=0.2)))


@pytest.mark.parametrize("window", [False, True])
def test_merge_extract_filter_extend_round_trips_keep_gpu_rows(on_gpu_store, window):
    # (without a window every token is written into the code pages at once)
    caches = [_filled(n, seed=n, window=window) for n in (9, 3, 14)]
    assert_on_gpu_store(caches)
    before = [c._core.to_bytes() for c in caches]
    batch = BatchTurboQuantKVCache.merge(caches)
    assert all(r._core is not c._core for r, c in zip(batch.rows, caches))
    # extract: an equal, independent copy on the device
    for i, c in enumerate(caches):
        row = batch.extract(i)
        assert_on_gpu_store([row])
        assert row._core.to_bytes() == before[i] and row.offset == c.offset
    # a decode step of the batch: the rows change, the merged caches do not
    rng = np.random.default_rng(3)
    k = mx.array(rng.standard_normal((3, 2, 1, 32), np.float32))
    batch.update_and_fetch(k, k)
    out = batch.attend_masked(mx.array(rng.standard_normal((3, 4, 1, 32), np.float32)), 0.2,
                              batch.make_mask(1))
    assert out.shape == (3, 4, 1, 32)
    assert [c._core.to_bytes() for c in caches] == before
    assert [r.offset for r in batch.rows] == [10, 4, 15]
    after = [batch.extract(i)._core.to_bytes() for i in range(3)]
    # filter keeps rows (and their stores) in the new order; extend appends another batch's
    batch.filter([2, 0])
    assert [batch.extract(i)._core.to_bytes() for i in range(2)] == [after[2], after[0]]
    other = BatchTurboQuantKVCache.merge([_filled(6, seed=6, window=window)])
    batch.extend(other)
    assert [r.offset for r in batch.rows] == [15, 10, 6]
    assert batch.left_padding.tolist() == [0, 5, 9]
    # a deep copy of the batch (BatchGenerator splits batches so) is independent too
    twin = copy.deepcopy(batch)
    twin.trim(1)
    k = mx.array(rng.standard_normal((3, 2, 2, 32), np.float32))
    twin.update_and_fetch(k, k)
    assert [r.offset for r in twin.rows] == [16, 11, 7]
    assert [r.offset for r in batch.rows] == [15, 10, 6]
    assert batch.extract(0)._core.to_bytes() == after[2]
    assert batch.extract(1)._core.to_bytes() == after[0]
    assert_on_gpu_store(twin.rows + batch.rows)


def test_batched_attention_equals_each_gpu_rows_own(on_gpu_store):
    """A padded prompt step and a decode step: each row's slice of the batch's output is
    the row's own attention, bit for bit, padding positions zero."""
    rows = [_filled(n, seed=10 + n) for n in (7, 12, 2)]
    twins = [copy.deepcopy(r) for r in rows]
    batch = BatchTurboQuantKVCache.merge(rows)
    rng = np.random.default_rng(4)
    batch.prepare(lengths=[3, 1, 3], right_padding=[0, 2, 0])
    k = rng.standard_normal((3, 2, 3, 32), np.float32)
    v = rng.standard_normal((3, 2, 3, 32), np.float32)
    q = rng.standard_normal((3, 4, 3, 32), np.float32)
    batch.update_and_fetch(mx.array(k), mx.array(v))
    out = np.array(batch.attend_masked(mx.array(q), 0.2, batch.make_mask(3)))
    batch.finalize()
    for i, (t, n) in enumerate(zip(twins, (3, 1, 3))):
        t.update_and_fetch(mx.array(k[i:i + 1, :, :n]), mx.array(v[i:i + 1, :, :n]))
        own = np.array(t.attend(mx.array(q[i:i + 1, :, :n]), scale=0.2))
        assert np.array_equal(out[i:i + 1, :, :n], own), i
        assert not out[i, :, n:].any()
    _decode_step_equals_rows(batch, twins, rng)


def test_geometry_and_masks_with_gpu_rows_equal_mlx_lm_batch_kv_cache(on_gpu_store):
    lengths = [3, 0, 7]

    def ref_filled(n):
        c = mlx_cache.KVCache()
        if n:
            x = mx.zeros((1, 2, n, 32))
            c.update_and_fetch(x, x)
        return c

    ref = mlx_cache.BatchKVCache.merge([ref_filled(n) for n in lengths])
    got = BatchTurboQuantKVCache.merge([_filled(n) for n in lengths])
    rng = np.random.default_rng(5)
    for _ in range(3):
        k = mx.array(rng.standard_normal((3, 2, 1, 32), np.float32))
        ref.update_and_fetch(k, k)
        got.update_and_fetch(k, k)
    for c in (ref, got):
        c.filter([0, 2])
        c.trim(2)
    assert got.offset.tolist() == ref.offset.tolist()
    assert got.left_padding.tolist() == ref.left_padding.tolist()
    for N in (1, 4):
        assert mx.array_equal(got.make_mask(N), ref.make_mask(N)).item()
    assert [r._core.size() for r in got.rows] == got.offset.tolist()


def test_bad_keys_leave_every_gpu_row_unchanged(on_gpu_store):
    batch = BatchTurboQuantKVCache.merge([_filled(5), _filled(8)])
    before = [r._core.to_bytes() for r in batch.rows]
    geometry = (batch.offset.tolist(), batch.left_padding.tolist(), batch.size())
    with pytest.raises(ValueError, match="keys of 3 KV heads x head_dim 32 for batch row 0"):
        batch.update_and_fetch(mx.zeros((2, 3, 1, 32)), mx.zeros((2, 3, 1, 32)))
    with pytest.raises(ValueError, match="head_dim 16 for batch row 0"):
        batch.update_and_fetch(mx.zeros((2, 2, 1, 16)), mx.zeros((2, 2, 1, 16)))
    with pytest.raises(ValueError, match="keys and values of one shape"):
        batch.update_and_fetch(mx.zeros((2, 2, 1, 32)), mx.zeros((2, 2, 2, 32)))
    assert [r._core.to_bytes() for r in batch.rows] == before
    assert (batch.offset.tolist(), batch.left_padding.tolist(), batch.size()) == geometry


def test_a_batch_of_gpu_and_cpu_rows(monkeypatch):
    """A row restored on the C++ core beside rows on the GPU store: each attends on its own
    cache (the core's row through the host), the outputs stacked in row order."""
    monkeypatch.setattr(mm, "METAL_KERNELS", REF)
    cpu = _filled(6, seed=6)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    gpu = _filled(9, seed=9)
    assert not cpu._gpu and gpu._gpu
    batch = BatchTurboQuantKVCache.merge([gpu, cpu])
    twins = [copy.deepcopy(gpu), copy.deepcopy(cpu)]
    _decode_step_equals_rows(batch, twins, np.random.default_rng(8))


def _decode_step_equals_rows(batch, twins, rng):
    """One decode step of the batch and of each twin alone (the keys doubling as values):
    row i's output equals twin i's bit for bit."""
    B = len(twins)
    k = rng.standard_normal((B, 2, 1, 32), np.float32)
    q = rng.standard_normal((B, 4, 1, 32), np.float32)
    batch.update_and_fetch(mx.array(k), mx.array(k))
    out = np.array(batch.attend_masked(mx.array(q), 0.2, batch.make_mask(1)))
    for i, t in enumerate(twins):
        t.update_and_fetch(mx.array(k[i:i + 1]), mx.array(k[i:i + 1]))
        assert np.array_equal(out[i:i + 1], np.array(t.attend(mx.array(q[i:i + 1]), scale=0.2))), i


# --- the kernel sources on the emulated GPU ------------------------------------------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu"))


def test_batched_tokens_on_the_emulated_gpu_equal_each_request_alone(emulated, monkeypatch):
    """Every kernel launch on the emulated GPU (the metal/*.metal sources): the default
    preset's key split with fp16 sinks and a short window, three requests of different
    lengths decoded together and alone."""
    emulated.install(monkeypatch)
    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    model = gpu_model()
    make = MAKERS["tq3-short-window"]
    rng = random.Random(9)
    ps = [[rng.randrange(1, 120) for _ in range(n)] for n in (19, 30, 24)]
    n_tokens = [5, 3, 5]
    expect = [alone(model, p, n, make) for p, n in zip(ps, n_tokens)]
    start = len(emulated.launches)
    caches = [make(model) for _ in ps]
    got = run_batched(BatchGenerator(model), None,
                      {0: [(p, n, c) for p, n, c in zip(ps, n_tokens, caches)]})
    assert got == expect
    assert {"split_encode_heads", "split_attention_block"} <= set(emulated.launches[start:])
