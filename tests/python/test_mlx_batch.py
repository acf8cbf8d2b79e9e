"""turboquant.mlx_batch: TurboQuant caches in mlx-lm's continuous batching (BatchGenerator).

Greedy tokens of requests decoded together equal the same requests generated alone (mlx-lm's
``generate_step``, the server's sequential path) with the same caches and prefill chunks,
for full-attention and sliding-window models; mlx-lm's fp16 caches are checked the same way.
The batch cache's offsets, left padding and masks are those of mlx-lm's ``BatchKVCache``."""

from __future__ import annotations

import copy
import random

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_map
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models import cache as mlx_cache
from mlx_tiny import tiny_model
from turboquant import mlx_host
from turboquant import mlx_lm as tq
from turboquant.mlx_batch import BatchTurboQuantKVCache


def _model(model_type: str):
    model = tiny_model(model_type)
    # larger weights: greedy text varies instead of repeating one token
    model.update(tree_map(lambda w: w * 3.0, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(1, 120) for _ in range(n)] for n in (5, 37, 80, 12, 1)]


MAKERS = {
    "fp16": mlx_cache.make_prompt_cache,
    "tq3": tq.make_prompt_cache,
    "tq3-fp16-layer0": lambda m: tq.make_prompt_cache(m, fp16_layers=[0]),
    "codes-only": lambda m: tq.make_prompt_cache(m, preset="codes-only"),
}


def alone(model, prompt, max_tokens, make, prefill_step_size=2048, cache=None):
    cache = make(model) if cache is None else cache
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                        prompt_cache=cache,
                                        prefill_step_size=prefill_step_size)]


def run_batched(gen, pending, schedule=None):
    """Tokens per request; ``schedule`` maps a step number to requests inserted then
    (prompt, max_tokens, cache) while the others decode."""
    schedule = dict(schedule or {})
    out, order, step = {}, [], 0
    while True:
        for prompt, n, cache in schedule.pop(step, []):
            (uid,) = gen.insert([prompt], max_tokens=[n], caches=[cache])
            order.append(uid)
            out[uid] = []
        busy = len(gen._generation_batch) or len(gen._prompt_batch) or \
            gen._unprocessed_sequences
        if not busy and not schedule:
            return [out[u] for u in order]
        for r in gen.next_generated():
            out[r.uid].append(r.token)
        step += 1


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("prefill_step_size", [2048, 16])
def test_batched_greedy_tokens_equal_each_request_alone(model_type, kind, prefill_step_size,
                                                        prompts):
    model, make = _model(model_type), MAKERS[kind]
    max_tokens = [24, 7, 24, 15, 24]
    expect = [alone(model, p, n, make, prefill_step_size) for p, n in zip(prompts, max_tokens)]
    gen = BatchGenerator(model, prefill_step_size=prefill_step_size)
    got = run_batched(gen, None, {0: [(p, n, make(model)) for p, n in zip(prompts, max_tokens)]})
    assert got == expect
    assert [len(t) for t in got] == max_tokens


def test_batch_cache_is_used_and_rows_hold_only_their_own_tokens(prompts):
    model = _model("gemma3_text")  # layer 0 sliding window (8 tokens), layer 1 global
    gen = BatchGenerator(model)
    gen.insert(prompts[:3], max_tokens=[6] * 3, caches=[tq.make_prompt_cache(model)
                                                        for _ in range(3)])
    gen.next_generated()
    caches = gen._generation_batch.prompt_cache
    assert all(isinstance(c, BatchTurboQuantKVCache) for c in caches)
    assert caches[0].max_size == 8 and caches[1].max_size is None
    full = caches[1]
    lengths = [len(p) for p in prompts[:3]]
    # each row holds its prompt and the same number of generated tokens, no padding
    fed = full.rows[0].offset - lengths[0]
    assert fed >= 0
    assert [r.offset for r in full.rows] == [n + fed for n in lengths]
    assert full.offset.tolist() == [n + fed for n in lengths]
    assert full.left_padding.tolist() == [max(lengths) - n for n in lengths]
    assert full.size() == max(lengths) + fed
    # fp16 K and V (2 KV heads x 16 dims) of each row's own tokens: no padding is held
    assert [r.fp16_nbytes for r in full.rows] == [2 * 2 * 2 * 16 * r.offset for r in full.rows]
    assert full.nbytes == sum(r.nbytes for r in full.rows) > 0


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_requests_joining_and_leaving_a_running_batch(model_type, prompts):
    """Continuous batching: requests arrive while others decode, finish at different
    steps (filter), join the running batch (extend); each still gets its alone tokens."""
    model = _model(model_type)
    make = tq.make_prompt_cache
    plan = {0: [(prompts[0], 20, None), (prompts[1], 5, None)],
            3: [(prompts[2], 12, None)],
            4: [(prompts[3], 20, None), (prompts[4], 3, None)],
            11: [(prompts[1], 9, None)]}
    expect = [alone(model, p, n, make) for step in sorted(plan) for p, n, _ in plan[step]]
    schedule = {s: [(p, n, make(model)) for p, n, _ in v] for s, v in plan.items()}
    gen = BatchGenerator(model, prefill_batch_size=2, completion_batch_size=4)
    assert run_batched(gen, None, schedule) == expect


def test_cached_prefixes_merge_with_fresh_requests(prompts):
    """Requests resumed from a cache holding part of their prompt (the server's prompt
    store) batch with fresh ones: merge left-pads caches of different lengths."""
    model, make = _model("llama"), tq.make_prompt_cache
    prefix_cache = make(model)
    long_prompt = prompts[2]
    model(mx.array([long_prompt[:50]]), cache=prefix_cache)  # a prompt of 50 tokens
    held = prefix_cache[0].offset
    assert held == 50
    resumed = copy.deepcopy(prefix_cache)
    expect = [alone(model, long_prompt[held:], 16, make, cache=copy.deepcopy(prefix_cache)),
              alone(model, prompts[1], 16, make)]
    gen = BatchGenerator(model)
    got = run_batched(gen, None, {0: [(long_prompt[held:], 16, resumed),
                                      (prompts[1], 16, make(model))]})
    assert got == expect
    assert prefix_cache[0].offset == held  # merge copies: the caller's cache is unchanged


def test_extract_returns_an_independent_copy_of_the_sequence(prompts):
    model = _model("llama")
    gen = BatchGenerator(model)
    uids = gen.insert(prompts[:2], max_tokens=[30, 30],
                      caches=[tq.make_prompt_cache(model) for _ in range(2)])
    for _ in range(3):
        gen.next_generated()
    (cache, live), = gen.extract_cache([uids[1]]).values()
    tokens = list(live)  # the batch keeps appending to its own list
    assert isinstance(cache[0], tq.TurboQuantKVCache)
    fed = len(tokens) - len(prompts[1])
    assert fed >= 1 and cache[0].offset == len(tokens)
    before = cache[0].nbytes
    for _ in range(3):
        gen.next_generated()
    assert cache[0].offset == len(tokens) and cache[0].nbytes == before
    assert gen.extract_cache([uids[1]])[uids[1]][0][0].offset == len(tokens) + 3
    # the tokens fed after the prompt are the ones generated alone
    expect = alone(model, prompts[1], 30, tq.make_prompt_cache)
    assert tokens[len(prompts[1]):] == expect[:fed]


def test_geometry_and_masks_equal_mlx_lm_batch_kv_cache():
    """merge / prepare (right padding) / finalize / update / filter / extend / trim keep the
    offsets, left padding and masks of mlx-lm's BatchKVCache, step by step."""
    H, d = 2, 16
    mx.random.seed(1)

    def kv(n):
        return mx.random.normal((1, H, n, d)), mx.random.normal((1, H, n, d))

    def filled(cls, n):
        c = cls()
        if n:
            c.update_and_fetch(*kv(n))
        return c

    def ours():
        return tq.TurboQuantKVCache(key_bits=3, value_bits=3)

    lengths = [3, 0, 7]
    ref = mlx_cache.BatchKVCache.merge([filled(mlx_cache.KVCache, n) for n in lengths])
    got = BatchTurboQuantKVCache.merge([filled(ours, n) for n in lengths])

    def same(step):
        assert got.offset.tolist() == ref.offset.tolist(), step
        assert got.left_padding.tolist() == ref.left_padding.tolist(), step
        assert got.size() == ref.size(), step
        for N in (1, 4):
            assert mx.array_equal(got.make_mask(N), ref.make_mask(N)).item(), (step, N)

    same("merge")
    for c in (ref, got):
        c.prepare(lengths=[5, 2, 4], right_padding=[0, 3, 1])
    for c in (ref, got):
        k, v = mx.random.normal((3, H, 5, d)), mx.random.normal((3, H, 5, d))
        c.update_and_fetch(k, v)
        c.finalize()
    same("padded prompt")
    assert [r.offset for r in got.rows] == [8, 2, 11]
    for _ in range(3):
        k, v = mx.random.normal((3, H, 1, d)), mx.random.normal((3, H, 1, d))
        ref.update_and_fetch(k, v)
        got.update_and_fetch(k, v)
    same("decode")
    ref.filter([0, 2])
    got.filter([0, 2])
    same("filter")
    other_ref = mlx_cache.BatchKVCache.merge([filled(mlx_cache.KVCache, 4)])
    other = BatchTurboQuantKVCache.merge([filled(ours, 4)])
    ref.extend(other_ref)
    got.extend(other)
    same("extend")
    ref.trim(2)
    got.trim(2)
    same("trim")
    assert [r.offset for r in got.rows] == got.offset.tolist()


def test_fp16_layer_mask_is_read_row_by_row(monkeypatch):
    """Llama builds its one mask from layer 0: kept fp16, that is mlx-lm's BatchKVCache
    mask, which the TurboQuant layers read back row by row (same layout)."""
    from turboquant import mlx_batch

    decoded = []

    def counting(mask, n_q, n_k):
        decoded.append((n_q, n_k))
        return mlx_host._window_from_mask(mask, n_q, n_k)

    monkeypatch.setattr(mlx_batch, "_window_from_mask", counting)
    model = _model("llama")
    make = lambda m: tq.make_prompt_cache(m, fp16_layers=[0])
    rng = random.Random(3)
    ps = [[rng.randrange(1, 120) for _ in range(n)] for n in (9, 30)]
    expect = [alone(model, p, 10, make) for p in ps]
    got = run_batched(BatchGenerator(model), None, {0: [(p, 10, make(model)) for p in ps]})
    assert got == expect
    assert (1, 9 + 9) in decoded and (1, 30 + 9) in decoded  # the last decode step's rows


def test_bad_batches_are_refused_with_clear_errors():
    full = tq.TurboQuantKVCache()
    window = tq.make_prompt_cache(_model("gemma3_text"))[0]
    with pytest.raises(ValueError, match="rows of one kind"):
        BatchTurboQuantKVCache.merge([full, window])
    with pytest.raises(TypeError, match="TurboQuantKVCache rows, got KVCache"):
        BatchTurboQuantKVCache.merge([full, mlx_cache.KVCache()])
    batch = tq.TurboQuantKVCache.merge([tq.TurboQuantKVCache(), tq.TurboQuantKVCache()])
    with pytest.raises(ValueError, match="keys of batch 3 for a batch cache of 2 rows"):
        batch.update_and_fetch(mx.zeros((3, 2, 1, 16)), mx.zeros((3, 2, 1, 16)))
    with pytest.raises(TypeError, match="cannot extend"):
        batch.extend(mlx_cache.BatchKVCache([0]))
    batch.update_and_fetch(mx.zeros((2, 2, 4, 16)), mx.zeros((2, 2, 4, 16)))
    with pytest.raises(ValueError, match="left padding can only be added to an empty"):
        batch.prepare(left_padding=[1, 0])


def _lane_rows(lengths, **options):
    """Per-sequence tq3 caches of SmolLM2's attention shape (3 KV heads of 64 channels, 9
    query heads: the key split's channel order is chosen), cores built by an attend."""
    import numpy as np

    rows = []
    for i, T in enumerate(lengths):
        rng = np.random.default_rng(100 + i)
        c = tq.TurboQuantKVCache(3, 3, layer=0, fp16_window=16, fp16_sinks=4, **options)
        k, v = (mx.array(rng.standard_normal((1, 3, T, 64)).astype(np.float32) + 0.5)
                for _ in range(2))
        c.update_and_fetch(k, v)
        c.attend(mx.array(rng.standard_normal((1, 9, 1, 64)).astype(np.float32)), scale=0.125)
        rows.append(c)
    return rows


@pytest.mark.parametrize("options", [{}, {"center": False}, {"key_split": False},
                                     {"sparse_v": 0.01}], ids=["tq3", "uncentred", "no-split",
                                                               "sparse-v"])
def test_decode_step_lane_equals_the_per_row_path(options, monkeypatch):
    """The batch's decode-step lane (all rows' centring, key-split order and value means at
    once, one attend_batch) gives every row the same outputs, bit for bit, and leaves the
    same caches as the per-row path, through window flushes and a row leaving."""
    import numpy as np

    from turboquant import mlx_batch

    def run(lane: bool):
        taken = []
        if not lane:
            monkeypatch.setattr(BatchTurboQuantKVCache, "_step_lane", lambda self, *a: None)
        else:
            real = mlx_batch._ingest_step
            monkeypatch.setattr(mlx_batch, "_ingest_step",
                                lambda *a: (taken.append(1), real(*a)))
        batch = BatchTurboQuantKVCache.merge(_lane_rows([20, 37, 5, 50], **options))
        rng = np.random.default_rng(7)
        outs = []
        for step in range(45):
            if step == 30:
                batch.filter([0, 2, 3])  # a request leaves mid-way
            if step == 40:
                batch.filter([1])  # one row left: the lane's attend_batch of one row
            B = len(batch.rows)
            k, v = (mx.array(rng.standard_normal((B, 3, 1, 64)).astype(np.float32))
                    for _ in range(2))
            q = mx.array(rng.standard_normal((B, 9, 1, 64)).astype(np.float32))
            batch.update_and_fetch(k, v)
            mask = batch.make_mask(1) if step % 2 else None
            outs.append(np.array(batch.attend_masked(q, 0.125, mask)))
        monkeypatch.undo()
        return outs, [r._core.to_bytes() for r in batch.rows], [r.offset for r in batch.rows], \
            len(taken)

    on, off = run(True), run(False)
    assert on[3] == 45 and off[3] == 0  # the lane took every step; the per-row path none
    for a, b in zip(on[0], off[0]):
        np.testing.assert_array_equal(a, b)
    assert on[1] == off[1] and on[2] == off[2]
