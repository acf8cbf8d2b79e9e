"""Speculative decoding (mlx-lm's draft_model) on TurboQuant caches: the model's and the
draft's caches are trimmed of the rejected draft tokens, and greedy output equals plain
greedy generation token for token, also across fp16-window flushes, code pages and the
sliding-window ring's evictions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_map  # noqa: E402
from mlx_lm.generate import generate_step, speculative_generate_step  # noqa: E402
from mlx_lm.models import cache as mlx_cache  # noqa: E402
import mlx_tiny  # noqa: E402

import turboquant  # noqa: E402
import turboquant.mlx_lm as tq_mlx  # noqa: E402
from turboquant.mlx_rotating import TurboQuantRotatingKVCache  # noqa: E402

PROMPT = [(7 * i + 3) % 120 for i in range(40)]


def scaled_model(model_type: str, seed: int = 0, layers: int = 2, noise: float = 0.0):
    """A tiny random model with weights x3 (varied greedy text); ``noise`` perturbs the
    weights of the same model (a draft that agrees with it part of the time)."""
    saved = dict(mlx_tiny._COMMON)
    mlx_tiny._COMMON["num_hidden_layers"] = layers
    try:
        model = mlx_tiny.tiny_model(model_type, seed)
    finally:
        mlx_tiny._COMMON.clear()
        mlx_tiny._COMMON.update(saved)
    model.update(tree_map(lambda w: w * 3.0, model.parameters()))
    if noise:
        mx.random.seed(seed + 100)
        model.update(tree_map(lambda w: w + noise * mx.random.normal(w.shape),
                              model.parameters()))
    mx.eval(model.parameters())
    return model


def plain(model, cache, n):
    """Greedy tokens, and how many of them come before the first near-tie (top two logits
    within 1e-3: there a verify step's rounding, ~1e-4 off one-token steps' like fp16
    caches', may pick either)."""
    out, ties = [], None
    for t, logprobs in generate_step(mx.array(PROMPT), model, max_tokens=n, prompt_cache=cache):
        top = np.sort(np.array(logprobs))[-2:]
        if ties is None and top[1] - top[0] < 1e-3:
            ties = len(out)
        out.append(int(t))
    return out, n if ties is None else ties


def speculative(model, draft, cache, n, k):
    out, from_draft = [], 0
    for t, _, d in speculative_generate_step(mx.array(PROMPT), model, draft, max_tokens=n,
                                             num_draft_tokens=k, prompt_cache=cache):
        out.append(int(t))
        from_draft += bool(d)
    return out, from_draft


CONFIGS = {
    "tq3": dict(preset="tq3"),  # 4 fp16 sinks, 64-token fp16 window, pages of 32
    "codes-only": dict(preset="codes-only"),
    "tq4": dict(preset="tq4"),
    # a window of 8 flushed 4 tokens at a time: many flushes and pages inside 160 tokens;
    # two Hadamard rounds (the default, one round, gives the scaled llama's greedy path a
    # near-tie at token 37, before the 60 clear tokens this check needs; the other configs
    # run the default)
    "tq3-w8-b4": dict(preset="tq3", fp16_window=8, block_tokens=4, rotation="hadamard"),
}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_output_equals_plain_generation(model_type, config):
    n, k = 160, 3
    model = scaled_model(model_type)
    opts = CONFIGS[config]
    want, clear = plain(model, tq_mlx.make_prompt_cache(model, **opts), n)
    assert clear > 60
    # a draft that agrees part of the time (trims of 0..k tokens), and one that agrees
    # always (every draft accepted); the second has one layer (the draft's own shape)
    for draft, accepted in ((scaled_model(model_type, noise=0.01), None),
                            (scaled_model(model_type), n)):
        cache = tq_mlx.make_prompt_cache(model, **opts) + tq_mlx.make_prompt_cache(draft, **opts)
        got, from_draft = speculative(model, draft, cache, n, k)
        assert got[:clear] == want[:clear]
        if accepted is None:
            assert 0.1 * n < from_draft < 0.9 * n  # both accepted and rejected drafts
        else:
            assert from_draft >= 0.7 * n
        assert all(isinstance(c, tq_mlx.TurboQuantKVCache) for c in cache)
        if model_type == "gemma3_text" and config in ("codes-only", "tq3-w8-b4"):
            # the rings evicted (the presets' 64-token fp16 window holds the tiny model's
            # 8-token window longer) and were still trimmed
            assert any(isinstance(c, TurboQuantRotatingKVCache) and c.evicted_tokens
                       for c in cache)
        # every layer of the model holds the same tokens: the prompt and the sampled ones
        # (but the last, or the last two when the last was an accepted draft)
        offsets = {c.offset for c in cache[:len(model.layers)]}
        assert len(offsets) == 1 and len(PROMPT) + n - 2 <= offsets.pop() <= len(PROMPT) + n


def test_a_small_draft_of_another_shape():
    model = scaled_model("llama")
    draft = scaled_model("llama", seed=1, layers=1)
    want = plain(model, tq_mlx.make_prompt_cache(model), 60)[0]
    cache = tq_mlx.make_prompt_cache(model) + tq_mlx.make_prompt_cache(draft)
    assert speculative(model, draft, cache, 60, 2)[0] == want
    assert len(cache) == 3


def rows(rng, H, T, d):
    return rng.standard_normal((1, H, T, d)).astype(np.float32)


@pytest.mark.parametrize("fp16_window,block_tokens", [(8, 4), (64, 32), (5, 3)])
def test_verify_blocks_and_rewinds_match_one_token_steps(fp16_window, block_tokens):
    """Blocks of 1 + k tokens (the last accepted token and k drafts), of which a random number
    are rejected and trimmed: every query up to the first rejected draft gets the output
    one-token steps give, also where a block crosses the window's flush point and the
    trim goes back before it (the flush is undone). Blocks of up to block_tokens tokens (one
    flush at most) are exact; longer blocks (prefill chunks) flush as before."""
    rng = np.random.default_rng(0)
    H, Hq, d, n = 2, 4, 16, 220
    k = min(4, block_tokens - 1)  # blocks of at most block_tokens tokens are exact
    K, V, Q = rows(rng, H, n, d), rows(rng, H, n, d), rows(rng, Hq, n, d)
    opts = dict(key_bits=3, value_bits=3, fp16_window=fp16_window, fp16_sinks=4,
                block_tokens=block_tokens)
    seq, spec = tq_mlx.TurboQuantKVCache(**opts), tq_mlx.TurboQuantKVCache(**opts)
    p0 = 24
    for c in (seq, spec):
        c.update_and_fetch(mx.array(K[:, :, :p0]), mx.array(V[:, :, :p0]))
        c.attend(mx.array(Q[:, :, :p0]), scale=d ** -0.5)
    want = []
    for t in range(p0, n):
        seq.update_and_fetch(mx.array(K[:, :, t:t + 1]), mx.array(V[:, :, t:t + 1]))
        want.append(np.array(seq.attend(mx.array(Q[:, :, t:t + 1]), scale=d ** -0.5)))
    p, undone, flushes = p0, 0, 0
    while p < n:
        m = min(k + 1, n - p)
        a = int(rng.integers(0, m))  # accepted drafts: positions p .. p + a are right
        kb, vb = K[:, :, p:p + m].copy(), V[:, :, p:p + m].copy()
        kb[:, :, a + 1:] = rows(rng, H, m - a - 1, d)  # rejected drafts: other tokens
        vb[:, :, a + 1:] = rows(rng, H, m - a - 1, d)
        coded = spec._core.coded_tokens(0)
        spec.update_and_fetch(mx.array(kb), mx.array(vb))
        out = np.array(spec.attend(mx.array(Q[:, :, p:p + m]), scale=d ** -0.5))
        flushes += spec._core.coded_tokens(0) > coded
        for i in range(a + 1):
            # (several queries in one call round differently from one: ~1e-7; a query that
            # sees a block as codes instead of fp16 rows is off by ~1e-2)
            np.testing.assert_allclose(out[:, :, i:i + 1], want[p + i - p0], rtol=1e-5,
                                       atol=1e-5)
        before = spec._core.coded_tokens(0)
        assert spec.trim(m - a - 1) == m - a - 1 and spec.offset == p + a + 1
        undone += spec._core.coded_tokens(0) < before
        assert spec._core.size(0) == p + a + 1
        p += a + 1
    assert flushes > 3 and undone > 0
    assert spec._core.coded_tokens(0) == seq._core.coded_tokens(0)
    assert spec.nbytes >= spec._core.memory_bytes()


def test_the_ring_takes_a_rewind_after_eviction_and_refuses_more():
    model = scaled_model("gemma3_text")
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", block_tokens=4)
    ring = cache[0]
    assert isinstance(ring, TurboQuantRotatingKVCache) and ring.max_size == 8
    for t, _ in zip(generate_step(mx.array(PROMPT), model, prompt_cache=cache), range(30)):
        pass
    assert ring.evicted_tokens > 0
    # mlx-lm's trim_prompt_cache trims only when every layer is trimmable
    assert mlx_cache.can_trim_prompt_cache(cache)
    assert ring.max_trim() >= ring.block_tokens - 1
    before = {c.offset for c in cache}
    assert len(before) == 1 and mlx_cache.trim_prompt_cache(cache, 3) == 3
    assert {c.offset for c in cache} == {before.pop() - 3}
    with pytest.raises(ValueError, match="cannot trim"):
        ring.trim(ring.max_trim() + 1)


def test_store_does_not_reuse_a_longer_entry_a_ring_cannot_trim_back():
    from turboquant.serve import PromptCacheStore

    model = scaled_model("gemma3_text")
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only", block_tokens=4)
    tokens = PROMPT + [int(t) for (t, _), _ in zip(generate_step(mx.array(PROMPT), model,
                                                                 prompt_cache=cache), range(30))]
    tokens = tokens[:cache[0].offset]
    store = PromptCacheStore()
    store.insert_cache("m", tokens, cache)
    short = tokens[:10] + [999]  # would need a trim far past the ring's reach
    got, rest = store.fetch_nearest_cache("m", short)
    assert got is None and rest == short
    near = tokens[:-2] + [999]  # a trim of 2: within reach
    got, rest = store.fetch_nearest_cache("m", near)
    assert rest == [999] and {c.offset for c in got} == {len(tokens) - 2}


def test_generate_cli_with_a_draft_model(tmp_path):
    from mlx_tiny_dir import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    draft = save_tiny_model_dir(tmp_path / "draft", num_hidden_layers=1)
    env = dict(os.environ, PYTHONPATH=str(Path(turboquant.__file__).resolve().parents[1])
               + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "turboquant", "generate", "--model",
                            str(model), "--prompt", "hello world", "--max-tokens", "24",
                            "--fp16-window", "8", *args], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    plain_out = cli()
    spec_out = cli("--draft-model", str(draft), "--num-draft-tokens", "3")
    assert spec_out.splitlines()[0] == plain_out.splitlines()[0]
    assert "[turboquant] draft model:" in spec_out and "tokens accepted" in spec_out
    assert "[turboquant] draft KV cache:" in spec_out
