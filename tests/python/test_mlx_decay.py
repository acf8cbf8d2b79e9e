"""Temporal decay and sparse V as options of the mlx-lm cache (TurboQuantKVCache,
make_prompt_cache) and of the eval grammar (``+dA:B``, ``+svT``)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as mlx_cache  # noqa: E402
from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402
from turboquant import FormatError  # noqa: E402
from turboquant.mlx_eval import Setting, evaluate  # noqa: E402

TOKENS = np.random.default_rng(11).integers(0, 128, 90).tolist()


def logits(model, cache, tokens):
    return np.array(model(mx.array(tokens)[None], cache=cache)[0].astype(mx.float32))


def test_options_are_validated_with_clear_errors():
    C = tq_mlx.TurboQuantKVCache
    with pytest.raises(ValueError, match="decay_bits=2 needs decay_after > 0"):
        C(decay_bits=2)
    with pytest.raises(ValueError, match=r"layer 5: decay_bits must be in \[1, 2\]"):
        C(key_bits=3, value_bits=4, decay_after=64, decay_bits=3, layer=5)
    with pytest.raises(ValueError, match="decay_bits must be in"):
        C(decay_after=64, decay_bits=0)
    with pytest.raises(ValueError, match="decay_after must be an integer"):
        C(decay_after=-1, decay_bits=2)
    with pytest.raises(ValueError, match="turboquant_mse"):
        C(decay_after=64, decay_bits=2, value_method="turboquant_prod")
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="sparse_v must be a number in"):
            C(sparse_v=bad)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="decay_bits must be in"):
        tq_mlx.make_prompt_cache(model, preset="codes-only",
                                 key_bits=2, value_bits=3, decay_after=8, decay_bits=2)


def test_decay_of_the_key_split_cache_with_sinks_and_window():
    model = tiny_model("llama")
    opts = dict(key_bits=3, value_bits=3, fp16_sinks=2, fp16_window=8, block_tokens=4, seed=3)
    plain = tq_mlx.make_prompt_cache(model, preset="codes-only", **opts)
    decayed = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                       decay_after=16, decay_bits=2, **opts)
    a, b = logits(model, plain, TOKENS[:80]), logits(model, decayed, TOKENS[:80])
    for layer, (p, c) in enumerate(zip(plain, decayed)):
        core = c._core
        assert c._perm is not None and core.outlier_roles == "keys"  # the key split decays too
        assert (core.decay_after, core.decay_bits) == (16, 2)
        # code block j (tokens [2 + 4j, 6 + 4j)) decays once 16 newer tokens follow its newest
        n = core.size(0)
        want = sum(1 for j in range(core.code_tokens(0) // 4) if n - 1 - (2 + 4 * j + 3) >= 16)
        assert core.decayed_blocks(0, 0, "key") == core.decayed_blocks(0, 0, "value") == want > 0
        # sinks and the recent window stay fp16, exactly as in the undecayed cache (layer 0:
        # later layers' K/V differ once decay changed the attention below them)
        assert core.sink_tokens(0) == 2 and core.window_tokens(0) >= 8
        if layer == 0:
            np.testing.assert_array_equal(core.decode(0, 0, "key", 0, 2), p._core.decode(0, 0, "key", 0, 2))
            w = core.window_tokens(0)
            np.testing.assert_array_equal(core.decode(0, 1, "value", n - w, w),
                                          p._core.decode(0, 1, "value", n - w, w))
        assert core.token_bytes(0) < p._core.token_bytes(0)  # nbytes adds the decayed quantizers' state
        assert core.stored_bytes_per_token() < p._core.stored_bytes_per_token()
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert 0.95 < cos.mean() < 0.9999  # decay changes the answer (tiny random model: a lot)


def test_options_survive_prompt_cache_files_and_fill_from(tmp_path):
    model = tiny_model("llama")
    cache = tq_mlx.make_prompt_cache(model, preset="codes-only",
                                     decay_after=12, decay_bits=2, sparse_v=0.02,
                                     fp16_sinks=2, seed=4)
    logits(model, cache, TOKENS[:60])
    path = str(tmp_path / "d.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    for c, l in zip(cache, loaded):
        assert (l.decay_after, l.decay_bits, l.sparse_v) == (12, 2, 0.02)
        assert l._core.to_bytes() == c._core.to_bytes() and l._core.decayed_blocks(0, 0, "key") > 0
    np.testing.assert_array_equal(logits(model, cache, TOKENS[60:62]), logits(model, loaded, TOKENS[60:62]))
    # a corrupted option in the header is a FormatError naming the layer
    state, meta = cache[0].state, cache[0].meta_state
    bad = tq_mlx.TurboQuantKVCache()
    with pytest.raises(FormatError, match="layer 0: decay_bits must be in"):
        bad.state = (state[0], state[1].replace('"decay_bits": 2', '"decay_bits": 7'), *state[2:])
    assert meta
    # fill_from / to_turbo_quantized carry the options to the core
    fp = mlx_cache.make_prompt_cache(model)
    logits(model, fp, TOKENS[:50])
    conv = tq_mlx.to_turbo_quantized(fp, key_bits=3, value_bits=3, n_q_heads=4, decay_after=8,
                                     decay_bits=1, sparse_v=0.01)
    assert all(c._core.decay_after == 8 and c._core.decayed_blocks(0, 1, "value") > 0 and
               c.sparse_v == 0.01 for c in conv)


def test_sparse_v_goes_into_the_core_attend():
    rng = np.random.default_rng(2)
    H, Hq, T, d = 1, 2, 200, 32
    k = rng.standard_normal((1, H, T, d)).astype(np.float32)
    v = rng.standard_normal((1, H, T, d)).astype(np.float32)
    q = 4 * rng.standard_normal((1, Hq, 1, d)).astype(np.float32)
    outs = {}
    for t in (0.0, 0.05):
        c = tq_mlx.TurboQuantKVCache(key_split=False, center=False, sparse_v=t, seed=1)
        c.update_and_fetch(mx.array(k), mx.array(v))
        outs[t] = np.array(c.attend(mx.array(q), scale=0.3))[0]
        direct = c._core.attend(q[0], scale=0.3, sparse_v=t)
        np.testing.assert_array_equal(outs[t], direct)
    assert not np.array_equal(outs[0.0], outs[0.05])
    assert np.max(np.abs(outs[0.0] - outs[0.05])) < 0.2


def test_decay_and_sparse_v_stay_on_the_cpu_core(monkeypatch):
    import turboquant.mlx_metal as mm
    from turboquant import gpu_path

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", mm.ReferenceKernels())
    plain = dict(key_bits=3, value_bits=3, key_split=False, debias=False)
    assert tq_mlx.TurboQuantKVCache(**plain)._use_gpu(64)
    assert not tq_mlx.TurboQuantKVCache(decay_after=64, decay_bits=2, **plain)._use_gpu(64)
    assert not tq_mlx.TurboQuantKVCache(sparse_v=0.01, **plain)._use_gpu(64)


def test_eval_grammar():
    s = Setting.parse("3+s4+w64+d256:2")
    assert (s.decay_after, s.decay_bits, s.sparse_v, s.decode_scoring) == (256, 2, 0.0, False)
    assert s.name == "tq-3bit+s4+w64+d256:2"
    s = Setting.parse("k4v3+sv0.01/nosplit")
    assert (s.sparse_v, s.decode_scoring, s.key_split) == (0.01, True, False)
    assert s.name == "tq-k4v3+sv0.01/nosplit"
    assert Setting.parse("3+sv0").decode_scoring and Setting.parse("3+sv0").sparse_v == 0.0
    for spec, token in (("3+d256", "d256"), ("3+d0:2", "d0:2"), ("3+d64:x", "d64:x"),
                        ("3+sv2", "sv2"), ("3+svx", "svx"), ("3+sv-0.1", "sv-0.1"),
                        ("k3v2+d64:2", "d64:2")):
        with pytest.raises(ValueError, match=f"'{token}'"):
            Setting.parse(spec)


def test_eval_rows_reflect_decayed_memory_and_sparse_v():
    model = tiny_model("llama")
    tokens = np.random.default_rng(3).integers(0, 128, 440).tolist()
    specs = ("3+s4+w16", "3+s4+w16+d8:2", "3+s4+w16+d8:1", "3", "3+sv0", "3+sv0.5")
    res = evaluate(model, tokens, [Setting.parse(s) for s in specs], prefix=40, score=400, chunk=16,
                   context=0, decode_tokens=0, log=lambda *a: None)
    r = {x.setting.name: x for x in res}
    # (head_dim 16: the decayed quantizers' own rotations are ~5 KB, so it takes a few hundred
    # tokens before the bytes saved outweigh them)
    base, d2, d1 = (r[f"tq-3bit+s4+w16{x}"] for x in ("", "+d8:2", "+d8:1"))
    assert base.bits_per_coord > d2.bits_per_coord > d1.bits_per_coord
    assert base.kv_bytes > d2.kv_bytes > d1.kv_bytes
    assert d2.logit_cosine != base.logit_cosine
    chunked, dense, sparse = r["tq-3bit"], r["tq-3bit+sv0"], r["tq-3bit+sv0.5"]
    # one token per step on the same codes as the chunked run (no window: no flush timing
    # difference): the same quality up to rounding
    assert dense.logit_cosine == pytest.approx(chunked.logit_cosine, abs=2e-5)
    assert dense.kv_bytes == sparse.kv_bytes == chunked.kv_bytes
    assert sparse.logit_cosine < dense.logit_cosine  # (a random tiny model attends almost
    # uniformly: only a high threshold skips anything)
