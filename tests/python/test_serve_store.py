"""The server's prompt-cache store (mlx-lm's LRUPromptCache) holding TurboQuant caches:
byte accounting by the compressed size, longest-prefix reuse through trimmed copies."""

from __future__ import annotations

import copy

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models.cache import KVCache, LRUPromptCache
from turboquant.mlx_lm import TurboQuantKVCache

# SmolLM2-135M's attention: 9 query heads over 3 KV heads of head_dim 64 (in 30 layers; the
# ratio is the same for any number of layers, so a few are enough).
LAYERS, HQ, HKV, D = 4, 9, 3, 64


def kv(T, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, HKV, T, D)).astype(np.float16)
    v = rng.standard_normal((1, HKV, T, D)).astype(np.float16)
    return mx.array(k), mx.array(v)


def filled(make, T, layers=LAYERS, first=None):
    """A prompt cache of ``layers`` layers holding T tokens (fp16 K/V of SmolLM2's shape),
    given as a first block of ``first`` tokens (default: all T) and then the rest."""
    caches = []
    for i in range(layers):
        c = make(i)
        k, v = kv(T, i)
        for a, b in ((0, first or T), (first or T, T)):
            if b <= a:
                continue
            c.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
            if isinstance(c, TurboQuantKVCache):  # builds the core
                c.attend(mx.zeros((1, HQ, 1, D), mx.float16), scale=D ** -0.5)
        caches.append(c)
    return caches


def tokens_held(caches, T, budget, entries=200):
    """Tokens an LRU store with a ``budget`` of bytes keeps of ``entries`` distinct prompts."""
    store = LRUPromptCache(max_size=entries, max_bytes=budget)
    for i in range(entries):
        store.insert_cache("model", [1000 + i] + list(range(T - 1)), caches)
    assert store.nbytes <= budget
    return len(store) * T


@pytest.mark.parametrize("window", [0, 16])
def test_budget_holds_four_times_more_tokens_than_fp16(window):
    T = 1000 if window == 0 else 2048  # the fp16 window and sinks are a fixed cost per layer
    fp16 = filled(lambda i: KVCache(), T)
    ours = filled(lambda i: TurboQuantKVCache(3, 3, layer=i, fp16_window=window,
                                              fp16_sinks=4 if window else 0), T)
    assert sum(c.nbytes for c in ours) == sum(c._core.memory_bytes() for c in ours) + \
        sum(c._k_mean.nbytes + c._v_mean.nbytes + c._perm.nbytes for c in ours)
    budget = 10 * sum(c.nbytes for c in fp16)
    held_fp16 = tokens_held(fp16, T, budget)
    held_ours = tokens_held(ours, T, budget)
    assert held_fp16 == 10 * T
    assert held_ours >= 4 * held_fp16, (held_ours, held_fp16)


@pytest.mark.parametrize("window", [0, 16])
def test_prefix_reuse_hands_out_trimmed_independent_copies(window):
    T, P = 300, 200
    stored = filled(lambda i: TurboQuantKVCache(3, 3, layer=i, fp16_window=window,
                                                fp16_sinks=4 if window else 0), T, layers=2)
    store = LRUPromptCache()
    tokens = list(range(T))
    store.insert_cache("model", tokens, stored)
    before = [c._core.to_bytes() for c in stored]
    # A prompt sharing P tokens with the stored one: a copy trimmed to the common prefix.
    got, rest = store.fetch_nearest_cache("model", tokens[:P] + [9999, 9998])
    assert rest == [9999, 9998] and [c.offset for c in got] == [P, P]
    assert [c._core.size(0) for c in got] == [P, P]
    assert [c._core.to_bytes() for c in stored] == before  # the stored entry is untouched
    # Re-appending the trimmed tokens gives the stored attention back: exactly for plain code
    # pages; with an fp16 window the trimmed window tokens that had been flushed stay codes.
    q = mx.array(np.random.default_rng(7).standard_normal((1, HQ, 1, D)).astype(np.float16))
    for i, c in enumerate(got):
        k, v = kv(T, i)
        c.update_and_fetch(k[:, :, P:], v[:, :, P:])
        a = np.array(c.attend(q, scale=D ** -0.5), dtype=np.float32).ravel()
        b = np.array(stored[i].attend(q, scale=D ** -0.5), dtype=np.float32).ravel()
        if window == 0:
            assert c._core.to_bytes() == stored[i]._core.to_bytes()
            np.testing.assert_array_equal(a, b)
        else:
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    assert copy.deepcopy(got[0]).nbytes == got[0].nbytes


def test_store_keys_agree_with_the_cache_lengths():
    """A speculative-decoding entry holds one token less than its key: it is stored under
    the prefix it holds, so a reuse resumes with the right token."""
    from turboquant.serve import PromptCacheStore

    T = 40
    # calibrated on the first 20 tokens, so the entry may serve a prompt sharing 30
    caches = filled(lambda i: TurboQuantKVCache(3, 3, layer=i), T - 1, layers=2, first=20)
    assert [c.calibration_tokens for c in caches] == [20, 20]
    store = PromptCacheStore()
    tokens = list(range(T))  # the last token was sampled but never fed to the model
    store.insert_cache("model", tokens, caches)
    got, rest = store.fetch_nearest_cache("model", tokens[:30] + [777])
    assert rest == [777] and [c.offset for c in got] == [30, 30]
    got, rest = store.fetch_nearest_cache("model", tokens)
    assert rest == [T - 1] and [c.offset for c in got] == [T - 1, T - 1]
    mlx_store = LRUPromptCache()  # mlx-lm's store would resume a token short
    mlx_store.insert_cache("model", tokens, filled(lambda i: TurboQuantKVCache(3, 3, layer=i),
                                                   T - 1, layers=2))
    got, rest = mlx_store.fetch_nearest_cache("model", tokens[:30] + [777])
    assert rest == [777] and [c.offset for c in got] == [29, 29]


@pytest.mark.parametrize("P,n", [(200, 202), (270, 275), (120, 300), (290, 292), (40, 41)])
def test_a_reused_prompt_keeps_the_fp16_window_of_a_fresh_one(P, n):
    """A stored prompt whose window flushed past the point a fresh prompt of n tokens flushes
    to is resumed from an earlier flush boundary: its caches then hold what a fresh run
    holds (the same codes, the same recent tokens as fp16 rows), never fewer fp16 rows."""
    from turboquant.serve import PromptCacheStore

    T = 300

    def make(i):  # centring and the key split calibrate on the first block: off, so the
        # stored and the fresh caches encode alike and their bytes can be compared
        return TurboQuantKVCache(3, 3, layer=i, fp16_window=16, fp16_sinks=4, center=False,
                                 key_split=False)

    stored = filled(make, T, layers=2)
    store = PromptCacheStore(park_window="fp16")  # parked entries: tests/python/test_park_window.py
    tokens = list(range(T))
    store.insert_cache("model", tokens, stored)
    prompt = tokens[:P] + [5000 + j for j in range(n - P)]
    got, rest = store.fetch_nearest_cache("model", prompt)
    p = n - len(rest)
    assert p <= P and rest == prompt[p:]
    q = mx.array(np.random.default_rng(3).standard_normal((1, HQ, 1, D)).astype(np.float16))
    for i, c in enumerate(got):
        k, v = kv(T, i)  # the new tokens: those of the stored prompt (any values would do)
        k2, v2 = kv(n, 100 + i)
        keys = mx.concatenate([k[:, :, :p], k2[:, :, p:]], axis=2)[:, :, :n]
        vals = mx.concatenate([v[:, :, :p], v2[:, :, p:]], axis=2)[:, :, :n]
        c.update_and_fetch(keys[:, :, p:], vals[:, :, p:])
        fresh = make(i)
        fresh.update_and_fetch(keys, vals)
        a = np.array(c.attend(q, scale=D ** -0.5), dtype=np.float32)
        b = np.array(fresh.attend(q, scale=D ** -0.5), dtype=np.float32)
        assert c._core.size(0) == fresh._core.size(0) == n
        assert c._core.coded_tokens(0) == fresh._core.coded_tokens(0)
        assert n - c._core.coded_tokens(0) >= 16  # the window's recent tokens stay fp16
        for h in range(HKV):
            for role in ("key", "value"):
                np.testing.assert_array_equal(c._core.decode(0, h, role, 0, n),
                                              fresh._core.decode(0, h, role, 0, n))
        np.testing.assert_array_equal(a, b)


# -- reuse and calibration, on a tiny model through mlx-lm's generation loop ------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mlx_lm import load
    from mlx_tiny_dir import save_tiny_model_dir

    model, tokenizer = load(str(save_tiny_model_dir(tmp_path_factory.mktemp("tiny_reuse"))))
    return model, tokenizer


def serve_one(store, model, tokenizer, text: str, max_tokens: int = 12):
    """One request as mlx-lm's server serves it on the sequential path: the nearest entry of
    the store (else a fresh TurboQuant cache, tq3), greedy generation from the rest of the
    prompt, the cache stored under the prompt and the generated tokens. Returns the prompt,
    the generated tokens, how many prompt tokens came from the store, and the cache."""
    from mlx_lm.generate import generate_step
    from turboquant.mlx_lm import make_prompt_cache

    prompt = tokenizer.encode(text)
    cache, rest = store.fetch_nearest_cache("model", prompt)
    reused = len(prompt) - len(rest)
    if cache is None:
        cache = make_prompt_cache(model, key_bits=3, value_bits=3)
    steps = [(int(t), np.array(lp)) for t, lp in generate_step(
        mx.array(rest), model, prompt_cache=cache, max_tokens=max_tokens,
        sampler=lambda x: mx.argmax(x, axis=-1))]
    out = [t for t, _ in steps]
    store.insert_cache("model", prompt + out, cache)
    serve_one.logprobs = np.stack([lp for _, lp in steps])
    return prompt, out, reused, cache


def core_bytes(cache):
    return [c._core.to_bytes() for c in cache]


def test_an_entry_is_not_reused_from_a_prefix_shorter_than_its_calibration(tiny_model):
    """Prompt B shares 16 tokens with the stored prompt A, fewer than A's caches were
    calibrated on (A's first prefill block): B gets a fresh cache, so its output and its
    caches are those of B served first."""
    from turboquant.serve import PromptCacheStore

    model, tok = tiny_model
    a = "The quick brown fox jumps over the lazy dog near the river bank at dawn"
    b = "The quick brown cat sat on the mat by the door"
    store = PromptCacheStore()
    prompt_a, _, _, cache_a = serve_one(store, model, tok, a)
    assert [c.calibration_tokens for c in cache_a] == [len(prompt_a) - 1] * len(cache_a)
    prompt_b, out_b, reused, cache_b = serve_one(store, model, tok, b)
    logprobs_b = serve_one.logprobs
    assert prompt_b[:16] == prompt_a[:16] and reused == 0
    _, alone, _, cache_alone = serve_one(PromptCacheStore(), model, tok, b)
    assert out_b == alone
    np.testing.assert_array_equal(logprobs_b, serve_one.logprobs)
    assert core_bytes(cache_b) == core_bytes(cache_alone)
    for x, y in zip(cache_b, cache_alone):
        np.testing.assert_array_equal(np.array(x._k_mean), np.array(y._k_mean))
        np.testing.assert_array_equal(x._perm, y._perm)


def test_an_entry_is_reused_from_a_prefix_that_covers_its_calibration(tiny_model):
    """The next turn of a conversation (the stored prompt, part of its answer, new text)
    shares every token the entry was calibrated on: it is resumed from the entry."""
    from turboquant.serve import PromptCacheStore

    model, tok = tiny_model
    a = "The quick brown fox jumps over the lazy dog near the river bank at dawn"
    store = PromptCacheStore()
    prompt_a, out_a, _, cache_a = serve_one(store, model, tok, a)
    calibrated = max(c.calibration_tokens for c in cache_a)
    text = tok.decode(prompt_a + out_a[:5]) + " and then?"
    prompt_b = tok.encode(text)
    shared = next(i for i, (x, y) in enumerate(zip(prompt_b, prompt_a + out_a)) if x != y)
    assert shared >= calibrated
    _, _, reused, cache_b = serve_one(store, model, tok, text)
    assert calibrated <= reused <= shared
    assert max(c.calibration_tokens for c in cache_b) == calibrated  # the entry's
    # an entry is also reused whole by a prompt that extends it
    _, _, reused, _ = serve_one(store, model, tok, tok.decode(prompt_b) + " more")
    assert reused >= calibrated and reused >= len(prompt_b) - 1
