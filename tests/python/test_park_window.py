"""Parking prompts with their fp16 window in codes: ``TurboQuantKVCache.compact_window``
(the C++ core's ``compact_window``) and the server's prompt-cache store
(``PromptCacheStore(park_window=...)``, ``turboquant serve --park-window``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from test_serve_store import D, HKV, HQ, core_bytes, filled, kv, serve_one  # noqa: E402
from test_serve_store import tiny_model  # noqa: E402, F401 (the fixture)
from turboquant import serve  # noqa: E402
from turboquant.mlx_batch import BatchTurboQuantKVCache  # noqa: E402
from turboquant.mlx_lm import TurboQuantKVCache, make_prompt_cache  # noqa: E402
from turboquant.mlx_rotating import TurboQuantRotatingKVCache  # noqa: E402


def windowed(i, **kw):
    return TurboQuantKVCache(3, 3, layer=i, fp16_window=16, fp16_sinks=4, **kw)


def attend(c, seed=7):
    q = mx.array(np.random.default_rng(seed).standard_normal((1, HQ, 1, D)).astype(np.float16))
    return np.array(c.attend(q, scale=D ** -0.5), dtype=np.float32).ravel()


def test_compact_window_moves_the_window_into_codes_and_gives_its_bytes_back():
    T = 100
    caches, plain = filled(windowed, T, layers=2), filled(windowed, T, layers=2)
    for c, p in zip(caches, plain):
        window = c._core.size(0) - c._core.coded_tokens(0)
        assert window > 0
        before = c.nbytes
        assert c.compact_window() == window
        assert c._core.coded_tokens(0) == c._core.size(0) == c.offset == T
        assert c.nbytes < before - window * HKV * 2 * D  # fp16 rows out, 3-bit codes in
        assert c.compact_window() == 0
        # the sinks stay fp16; the compacted tokens decode to their codes' values, within
        # the quantizer's error of the fp16 rows the uncompacted cache holds
        for h in range(HKV):
            a, b = c._core.decode(0, h, "key", 0, T), p._core.decode(0, h, "key", 0, T)
            np.testing.assert_array_equal(a[:T - window], b[:T - window])
            cos = (a[T - window:] * b[T - window:]).sum(-1) / np.linalg.norm(
                a[T - window:], axis=-1) / np.linalg.norm(b[T - window:], axis=-1)
            assert cos.min() > 0.9
        a, b = attend(c), attend(p)  # random keys: ~flat weights, 20% of the values coded
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95
        # a state round trip and a deep copy keep the compacted layout and its bytes
        assert copy.deepcopy(c).nbytes == c.nbytes
        restored = TurboQuantKVCache()
        restored.meta_state, restored.state = c.meta_state, c.state
        assert restored._core.to_bytes() == c._core.to_bytes()
        assert restored.nbytes == c.nbytes


def test_compacted_cache_appends_and_trims_like_any_other():
    T = 100
    c = filled(windowed, T, layers=1)[0]
    c.compact_window()
    k, v = kv(160, 0)
    for t in range(T, 140):  # decode steps: a new window, flushing on from unaligned codes
        c.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
        attend(c)
    assert c.offset == c._core.size(0) == 140
    assert 16 < c._core.size(0) - c._core.coded_tokens(0) <= 16 + c.block_tokens
    c.trim(50)  # into the compacted codes
    assert c.offset == c._core.size(0) == c._core.coded_tokens(0) == 90
    c.update_and_fetch(k[:, :, 90:95], v[:, :, 90:95])
    assert c._core.size(0) - c._core.coded_tokens(0) == 5


def test_layers_that_keep_their_window_compact_nothing():
    T = 100
    mixed = filled(lambda i: TurboQuantKVCache(4, 4, layer=i, fp16_window=16, fp16_sinks=4,
                                               mixed_bits=2, mixed_keep=0.5), T, layers=1)[0]
    ring = filled(lambda i: TurboQuantRotatingKVCache(64, keep=4, key_bits=3, value_bits=3,
                                                      layer=i, fp16_window=16), T, layers=1)[0]
    pending = windowed(0)
    k, v = kv(10, 0)
    pending.update_and_fetch(k, v)  # no attention call yet: no core
    codes_only = filled(lambda i: TurboQuantKVCache(3, 3, layer=i), T, layers=1)[0]
    for c in (mixed, ring, pending, codes_only):
        before = (c.nbytes, None if c._core is None else c._core.to_bytes())
        assert c.compact_window() == 0
        assert (c.nbytes, None if c._core is None else c._core.to_bytes()) == before


@pytest.mark.parametrize("park", ["codes", "fp16"])
def test_the_store_parks_entries_as_told_and_counts_their_bytes(park):
    T = 257
    caches = filled(windowed, T)
    window = sum(c._core.size(0) - c._core.coded_tokens(0) for c in caches)
    before = sum(c.nbytes for c in caches)
    store = serve.PromptCacheStore(park_window=park)
    store.insert_cache("model", list(range(T)), caches)
    held = [c._core.size(0) - c._core.coded_tokens(0) for c in caches]
    if park == "codes":
        assert held == [0] * len(caches) and store.parked_tokens == window
        assert store.nbytes < before
    else:
        assert sum(held) == window and store.parked_tokens == 0
        assert store.nbytes == before
    assert store.nbytes == sum(c.nbytes for c in caches)  # the bytes it holds, counted
    # a reuse hands out a copy of what is parked
    got, rest = store.fetch_nearest_cache("model", list(range(T)) + [5000])
    assert rest == [5000] and core_bytes(got) == core_bytes(caches)
    with pytest.raises(ValueError, match="park_window"):
        serve.PromptCacheStore(park_window="int8")


def test_parking_halves_a_short_entry_against_fp16_rows():
    """A 257-token SmolLM2-shaped entry of the tq3 recipe (window 64, sinks 4): at least 4x
    fewer bytes than fp16 K/V once parked, about 2x before."""
    T = 257
    caches = filled(lambda i: TurboQuantKVCache(3, 3, layer=i, fp16_window=64, fp16_sinks=4,
                                                block_tokens=32), T)
    fp16 = T * HKV * 2 * D * 2 * len(caches)
    assert fp16 / sum(c.nbytes for c in caches) < 2.5
    serve.park(caches)
    assert fp16 / sum(c.nbytes for c in caches) >= 4.0


def test_a_reused_parked_entry_decodes_as_a_cache_parked_outside_the_server(tiny_model):  # noqa: F811
    """The next turn of a conversation resumes from the parked entry: its greedy tokens and
    log-probs are those of the same requests served on a cache compacted by hand (what the
    store does), not those of a store that keeps the fp16 window."""
    from mlx_lm.generate import generate_step

    model, tok = tiny_model
    a = "The quick brown fox jumps over the lazy dog near the river bank at dawn"
    runs = {}
    for park in ("codes", "fp16"):
        store = serve.PromptCacheStore(park_window=park)
        prompt_a, out_a, _, cache_a = serve_one(store, model, tok, a)
        assert (store.parked_tokens > 0) == (park == "codes")
        text = tok.decode(prompt_a + out_a) + " and then the dog woke up"
        prompt_b, out_b, reused, _ = serve_one(store, model, tok, text)
        assert reused == len(prompt_a) + len(out_a)  # the whole entry: a shorter prefix
        runs[park] = (out_b, serve_one.logprobs)
    # by hand: request a on a fresh cache, its cache compacted, then request b's new tokens
    cache = make_prompt_cache(model, key_bits=3, value_bits=3)
    greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    out = [int(t) for t, _ in generate_step(mx.array(prompt_a), model, prompt_cache=cache,
                                            max_tokens=12, sampler=greedy)]
    assert out == out_a
    assert serve.park(cache) > 0
    steps = [(int(t), np.array(lp)) for t, lp in generate_step(
        mx.array(prompt_b[reused:]), model, prompt_cache=cache, max_tokens=12, sampler=greedy)]
    assert [t for t, _ in steps] == runs["codes"][0]
    np.testing.assert_array_equal(np.stack([lp for _, lp in steps]), runs["codes"][1])
    # the store that keeps the fp16 window gives other log-probs (this random tiny model is
    # far more sensitive to codes than a trained one: bench/park_window_quality.py measures
    # the cost on SmolLM2)
    assert not np.array_equal(runs["fp16"][1][0], runs["codes"][1][0])


def test_batch_rows_are_copies_a_parked_entry_leaves_alone():
    """The batched path stores ``extract`` copies of a batch row: parking one leaves the
    running batch's row (and the caches merged into it) as they were."""
    T = 100
    rows = [filled(windowed, T, layers=1)[0] for _ in range(2)]
    batch = BatchTurboQuantKVCache.merge(rows)
    before = [r._core.to_bytes() for r in batch.rows]
    out = batch.extract(0)
    assert serve.park([out]) > 0
    assert [r._core.to_bytes() for r in batch.rows] == before
    assert rows[0]._core.size(0) != rows[0]._core.coded_tokens(0)


@pytest.mark.parametrize("P,n", [(200, 202), (120, 300), (40, 41)])
def test_a_longer_parked_entry_is_resumed_from_the_common_prefix(P, n):
    """A parked entry's tokens are codes already: a prompt sharing P of its tokens resumes
    from P (the store that keeps the fp16 window resumes from an earlier flush boundary
    where a fresh prompt's window would hold fp16 rows: test_serve_store.py), and the
    resumed cache is the parked one cut at P, then given the new tokens."""
    T = 300

    def make(i):
        return windowed(i, center=False, key_split=False)

    parked = filled(make, T, layers=2)
    store = serve.PromptCacheStore(park_window="codes")
    store.insert_cache("model", list(range(T)), parked)
    prompt = list(range(P)) + [5000 + j for j in range(n - P)]
    got, rest = store.fetch_nearest_cache("model", prompt)
    assert rest == prompt[P:] and [c.offset for c in got] == [P, P]
    for i, c in enumerate(got):
        assert c._core.coded_tokens(0) == P  # codes up to the common prefix, no window
        k2, v2 = kv(n, 100 + i)
        c.update_and_fetch(k2[:, :, P:], v2[:, :, P:])
        attend(c)
        assert c._core.size(0) == n and n - c._core.coded_tokens(0) <= 16 + c.block_tokens
    fp16_store = serve.PromptCacheStore(park_window="fp16")
    fp16_store.insert_cache("model", list(range(T)), filled(make, T, layers=2))
    _, rest = fp16_store.fetch_nearest_cache("model", prompt)
    assert len(rest) > n - P  # resumed before P: the window tokens computed again


def test_the_server_parks_by_default_and_batches_as_before(tmp_path):
    """``turboquant serve`` without --park-window parks its entries: distinct prompts sent
    together are batched and get the texts they get alone (nothing to resume: parking
    changes no running request), each is then parked, and a prompt sent again resumes from
    its parked entry with the text of the same two requests through a store in-process."""
    from mlx_lm import load
    from mlx_tiny_dir import save_tiny_model_dir
    from test_serve import post, running_server, settled_info
    from test_serve_batch import alone_texts, concurrently, tq_cache
    from test_serve_store import serve_one

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    expect = alone_texts(model_dir, tq_cache)
    with running_server(model_dir, tmp_path / "server.log", "--kv-bits", "3") as url:
        (texts,) = concurrently(url, n_copies=1)
        info = settled_info(url, lambda i: i["prompt_cache"]["parked_tokens"] > 0)
        assert texts == expect and info["batching"]["max_rows"] >= 2
        store = info["prompt_cache"]
        assert store["park_window"] == "codes" and store["parked_tokens"] > 0
        prompt = "Seven silent swans circle the frozen pond at the edge of town"
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
        first, again = (post(url, "/v1/completions", body) for _ in range(2))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    model, tok = load(str(model_dir))
    local = serve.PromptCacheStore()
    want = [tok.decode(serve_one(local, model, tok, prompt, max_tokens=6)[1])
            for _ in range(2)]
    assert [first["choices"][0]["text"], again["choices"][0]["text"]] == want
