"""Importance-routed mixed precision as an option of the mlx-lm cache (TurboQuantKVCache,
make_prompt_cache, prompt-cache files) and of the eval grammar (``+mB:F``)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as mlx_cache  # noqa: E402
from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402
from turboquant import FormatError  # noqa: E402
from turboquant.mlx_eval import Setting  # noqa: E402

TOKENS = np.random.default_rng(12).integers(0, 128, 120).tolist()


def logits(model, cache, tokens):
    return np.array(model(mx.array(tokens)[None], cache=cache)[0].astype(mx.float32))


def run(model, cache, tokens, prefill=64):
    """Prefill, then one token per step (each append's tokens are rated by its queries)."""
    out = [logits(model, cache, tokens[:prefill])[-1]]
    for t in tokens[prefill:]:
        out.append(logits(model, cache, [t])[-1])
    return np.stack(out)


def test_options_are_validated_with_clear_errors():
    C = tq_mlx.TurboQuantKVCache
    with pytest.raises(ValueError, match="mixed_keep=0.5 needs mixed_bits > 0"):
        C(fp16_window=16, mixed_keep=0.5)
    with pytest.raises(ValueError, match=r"layer 3: mixed_bits must be in \[1, 2\]"):
        C(key_bits=3, value_bits=4, fp16_window=16, mixed_bits=3, mixed_keep=0.5, layer=3)
    with pytest.raises(ValueError, match="needs an fp16 window"):
        C(key_bits=4, mixed_bits=2, mixed_keep=0.5)
    with pytest.raises(ValueError, match="k/r in"):
        C(key_bits=4, fp16_window=16, mixed_bits=2, mixed_keep=0.3)
    for bad in (0.0, 1.0, True, "0.5"):
        with pytest.raises(ValueError, match="mixed_keep"):
            C(key_bits=4, fp16_window=16, mixed_bits=2, mixed_keep=bad)
    with pytest.raises(ValueError, match="temporal decay"):
        C(key_bits=4, fp16_window=16, mixed_bits=2, mixed_keep=0.5, decay_after=64, decay_bits=2)
    with pytest.raises(ValueError, match="turboquant_mse"):
        C(key_bits=4, fp16_window=16, mixed_bits=2, mixed_keep=0.5, value_method="turboquant_prod")
    c = C(key_bits=4, fp16_window=16, mixed_bits=2, mixed_keep=0.25)
    assert (c._mixed_blocks, c.block_tokens) == ((4, 1), 16)


def test_mixed_cache_splits_the_codes_by_attention_and_stays_close_to_uniform():
    model = tiny_model("llama")
    opts = dict(fp16_sinks=2, fp16_window=8, block_tokens=4, seed=5)
    mixed = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     key_bits=4, value_bits=4, mixed_bits=2, mixed_keep=0.5,
                                     **opts)
    ref = mlx_cache.make_prompt_cache(model)
    a, b = run(model, ref, TOKENS), run(model, mixed, TOKENS)
    for c in mixed:
        core = c._core
        assert (core.mixed_group_blocks, core.mixed_keep_blocks, core.decay_bits) == (2, 1, 2)
        assert core.legacy_format_version == 7
        coded = core.code_tokens(0)
        assert coded > 0 and coded % 8 == 0
        # half of the code blocks of every stream at 2 bits, the others at the key/value bits
        assert core.decayed_blocks(0, 0, "key") == core.decayed_blocks(0, 1, "value") == coded // 8
        for h in range(core.n_kv_heads):
            pos = core.mixed_positions(0, h)
            assert sorted(pos.tolist()) == list(range(2, 2 + coded))
            imp = core.window_importance(0, h)
            assert imp.shape == (core.window_tokens(0),) and np.all(np.isfinite(imp) & (imp >= 0))
            assert imp.max() > 0  # the last step's queries rated the window
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert 0.9 < cos.mean() < 0.99999


def test_mixed_cache_survives_prompt_cache_files(tmp_path):
    model = tiny_model("llama")
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     key_bits=4, value_bits=3, mixed_bits=1, mixed_keep=0.5,
                                     fp16_window=8, fp16_sinks=2, seed=6)
    run(model, cache, TOKENS[:80], prefill=40)
    path = str(tmp_path / "m.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    for c, l in zip(cache, loaded):
        assert (l.mixed_bits, l.mixed_keep) == (1, 0.5)
        assert l._core.to_bytes() == c._core.to_bytes()
    np.testing.assert_array_equal(run(model, cache, TOKENS[80:90], prefill=1),
                                  run(model, loaded, TOKENS[80:90], prefill=1))
    state = cache[0].state
    bad = tq_mlx.TurboQuantKVCache()
    with pytest.raises(FormatError, match="layer 0: mixed_keep"):
        bad.state = (state[0], state[1].replace('"mixed_keep": 0.5', '"mixed_keep": 0.3'),
                     *state[2:])


def test_trim_into_a_group_is_refused_and_whole_groups_trim():
    model = tiny_model("llama")
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     key_bits=4, value_bits=4, mixed_bits=2, mixed_keep=0.5,
                                     fp16_window=8, block_tokens=4)
    run(model, cache, TOKENS[:60], prefill=40)
    core = cache[0]._core
    n, coded = core.size(0), core.coded_tokens(0)
    before = core.to_bytes()
    with pytest.raises(RuntimeError, match="splits a mixed-precision flush group"):
        cache[0].trim(n - coded + 3)
    assert core.to_bytes() == before
    assert cache[0].trim(n - coded + 8) == n - coded + 8 and core.coded_tokens(0) == coded - 8


def test_a_prompt_in_one_call_holds_what_it_does_in_chunks(monkeypatch):
    """A prompt's queries rate its own tokens: the groups then due flush right after the
    attention call, not at the next append. Filled in one call, a cache held every token as
    fp16 rows until then (here 1.84x the bytes of 64-token chunks); the next steps see what
    they saw before (the same flushes, at the same importance)."""
    from turboquant import _core

    model = tiny_model("llama")
    opts = dict(preset="tq3-mixed", mixed_trial=False, seed=5)  # routed on every layer
    tokens = np.random.default_rng(7).integers(0, 128, 300).tolist()
    one, chunked, late = (tq_mlx.make_prompt_cache(model, **opts) for _ in range(3))
    logits(model, one, tokens)
    for s in range(0, len(tokens), 64):
        logits(model, chunked, tokens[s:s + 64])
    with monkeypatch.context() as m:  # as before: the rated groups wait for the next append
        m.setattr(_core.KVCache, "flush_rated", lambda self, layer=0: None)
        logits(model, late, tokens)
    size = [sum(c.nbytes for c in cache) for cache in (one, chunked, late)]
    assert size[0] <= 1.1 * size[1] and size[2] > 1.5 * size[1], size
    for c in one:
        core = c._core
        assert core.mixed_group_blocks and core.rated_tokens(0) == len(tokens)
        assert core.window_tokens(0) <= core.segment_plan(0).window_rows
    assert late[0]._core.window_tokens(0) > 200
    after = [run(model, cache, TOKENS[:8], prefill=1) for cache in (one, late)]
    np.testing.assert_array_equal(after[0], after[1])
    for a, b in zip(one, late):
        assert a._core.to_bytes() == b._core.to_bytes()


def test_mixed_takes_the_gpu_store(monkeypatch):
    # (test_mlx_metal_mixed.py: the GPU store's mixed precision against the core's)
    import turboquant.mlx_metal as mm
    from turboquant import gpu_path

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", mm.ReferenceKernels())
    plain = dict(key_bits=4, value_bits=4, key_split=False, debias=False, fp16_window=16)
    assert tq_mlx.TurboQuantKVCache(**plain)._use_gpu(64)
    c = tq_mlx.TurboQuantKVCache(mixed_bits=2, mixed_keep=0.5, **plain)
    assert c._use_gpu(64) and c.gpu_refusal(64) is None


def test_eval_grammar():
    s = Setting.parse("4+s4+w64+m2:0.5")
    assert (s.mixed_bits, s.mixed_keep, s.fp16_window) == (2, 0.5, 64)
    assert s.name == "tq-4bit+s4+w64+m2:0.5"
    s = Setting.parse("4+s4+w64+m2:0.25:64")
    assert (s.mixed_keep, s.block_tokens, s.name) == (0.25, 16, "tq-4bit+s4+w64+m2:0.25:64")
    c = tq_mlx.make_prompt_cache(tiny_model("llama"), preset="codes-only",
                                 key_bits=4, value_bits=4, fp16_window=8,
                                 mixed_bits=2, mixed_keep=0.25, block_tokens=16)
    assert c[0].block_tokens == 16
    for spec, token in (("4+w64+m2", "m2"), ("4+w64+m0:0.5", "m0:0.5"), ("4+w64+m2:1", "m2:1"),
                        ("4+w64+m2:x", "m2:x"), ("4+w64+m2:0.5:33", "m2:0.5:33")):
        with pytest.raises(ValueError, match=f"bad option '{token}'"):
            Setting.parse(spec)


def test_info_cli_shows_mixed_precision(tmp_path, capsys):
    from turboquant import _core
    from turboquant.__main__ import main

    kv = _core.KVCache(16, n_q_heads=2, n_kv_heads=1, key_bits=3, value_bits=2, decay_bits=1,
                       fp16_window=2, fp16_sinks=1, block_tokens=2, mixed_group_blocks=2,
                       mixed_keep_blocks=1)
    x = np.random.default_rng(0).standard_normal((1, 20, 16)).astype(np.float32)
    kv.append(x, x)
    kv.attend(np.ones((2, 1, 16), np.float32))
    kv.append(x[:, :1].copy(), x[:, :1].copy())
    path = str(tmp_path / "m.tqkv")
    kv.save(path)
    main(["info", path])
    out = capsys.readouterr().out
    assert "format version 8" in out
    # 16 coded tokens = 8 blocks per stream, half at 1 bit, over key + value streams
    assert "1 of every 2 blocks" in out and "8 blocks at 1 bits" in out


@pytest.mark.slow
def test_smollm2_mixed_beats_uniform_bits_of_the_same_average():
    """On the real model (head_dim 64, GQA 3:1), 4-bit codes with the less attended half of
    every group at 2 bits (3.0 average code bits) stay closer to fp16 than uniform 3 bits."""
    from mlx_lm import load

    from turboquant import models
    from turboquant.mlx_eval import evaluate

    model, tokenizer = load(str(models.smollm2("float32")))
    tokens = tokenizer.encode(open("/usr/share/common-licenses/GPL-3").read())
    fp16, uniform, mixed = evaluate(
        model, tokens, [Setting.parse("3+s4+w64"), Setting.parse("4+s4+w64+m2:0.5")],
        prefix=384, score=128, chunk=16, context=0, decode_tokens=0, log=lambda *a: None)
    # (KL, not the perplexity ratio: 128 scored tokens pin a ratio down only to ~±2%)
    assert mixed.logit_cosine > 0.99 and mixed.kl < 0.8 * uniform.kl, (mixed.kl, uniform.kl)


def test_a_converted_cache_is_rated_by_its_first_query():
    model = tiny_model("llama")
    fp = mlx_cache.make_prompt_cache(model)
    logits(model, fp, TOKENS[:80])
    conv = tq_mlx.to_turbo_quantized(fp, key_bits=4, value_bits=4, n_q_heads=4, fp16_window=8,
                                     fp16_sinks=2, block_tokens=4, mixed_bits=2, mixed_keep=0.5)
    core = conv[0]._core
    assert core.code_tokens(0) == 0 and core.rated_tokens(0) == 0  # all fp16, nothing rated yet
    logits(model, conv, TOKENS[80:81])  # appends 1 (nothing rated: no flush), then attends
    assert core.code_tokens(0) == 0 and core.rated_tokens(0) == 81
    assert core.window_importance(0, 0).max() > 0
    logits(model, conv, TOKENS[81:82])  # now the rated groups flush, by importance
    assert core.code_tokens(0) == 72 and core.window_tokens(0) == 8  # 2 sinks + 72 + 8 = 82


def test_builder_mixed_precision():
    import turboquant as tq

    cache = (tq.KVCacheBuilder().with_head_dim(32).with_heads(4, 2).with_bit_width(4)
             .with_block_tokens(8).with_fp16_window(16).with_mixed_precision(2).build())
    core = cache.core
    assert (core.mixed_group_blocks, core.mixed_keep_blocks, core.decay_bits) == (2, 1, 2)
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 60, 32)).astype(np.float32)
    cache.append(k, k[::-1].copy(), layer=0)
    cache.attend(rng.standard_normal((4, 1, 32)).astype(np.float32), layer=0)
    cache.append(k[:, :1].copy(), k[:, :1].copy(), layer=0)
    assert core.code_tokens(0) == 32 and core.decayed_blocks(0, 0, "key") == 2
    for kw, err in ((dict(window=0), "with_fp16_window"), (dict(low=4), "low_bits"),
                    (dict(keep=2), "keep_blocks")):
        b = tq.KVCacheBuilder().with_head_dim(32).with_bit_width(4).with_fp16_window(kw.get("window", 16))
        with pytest.raises(ValueError, match=err):
            b.with_mixed_precision(kw.get("low", 2), 2, kw.get("keep", 1)).build()
