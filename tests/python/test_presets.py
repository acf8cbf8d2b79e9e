"""turboquant.presets: named cache recipes in make_prompt_cache, the builder, eval and the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import turboquant as tq
from turboquant import preset_memory, presets
from turboquant.__main__ import main

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
tiny_model = pytest.importorskip("mlx_tiny").tiny_model
tq_mlx = pytest.importorskip("turboquant.mlx_lm")

NAMES = ["tq4", "tq3", "tq3-mixed", "tq2.5", "tq2", "codes-only"]


def settings(cache_layer) -> dict:
    c = cache_layer
    return {"key_bits": c.key_bits, "value_bits": c.value_bits, "center": c.center,
            "debias": c.debias, "key_split": c.key_split, "fp16_sinks": c.fp16_sinks,
            "fp16_window": c.fp16_window, "mixed_bits": c.mixed_bits,
            "mixed_keep": c.mixed_keep, "block_tokens": c.block_tokens,
            "split_angle_bits": c.split_angle_bits, "sparse_v": c.sparse_v,
            "decay_after": c.decay_after}


def test_the_preset_table():
    assert presets.names() == NAMES
    assert presets.resolve() is presets.get("tq3") and presets.DEFAULT == "tq3"
    tq3 = presets.get("tq3")
    assert (tq3.key_bits, tq3.value_bits, tq3.fp16_sinks, tq3.fp16_window) == (3, 3, 4, 64)
    assert tq3.center and tq3.debias and tq3.key_split and not tq3.mixed_bits
    assert presets.get("tq3-mixed").code_bits() == 3.0
    assert presets.get("tq2.5").code_bits() == 2.5
    # layers without mixed precision (sliding-window rings) keep the average code bits
    for name in NAMES:
        p = presets.get(name)
        kb, vb = p.uniform_bits()
        assert (kb + vb) / 2 == pytest.approx(p.code_bits()), name
    assert presets.get("tq2").code_bits() == pytest.approx(2.0)  # split keys at 1 bit: 1.5
    # tq3, tq3-mixed and tq2.5: sliding-window rings one bit wider, 8-token window and blocks
    assert presets.get("tq3-mixed").spec() == "4+s4+w64+m2:0.5+r1+rw8+rb8/trial"
    assert presets.get("tq2.5").spec() == "4+s4+w64+m2:0.25+r1+rw8+rb8/trial"
    assert presets.get("tq2").spec() == "3+s4+w64+m1:0.428571:56/trial"
    assert presets.get("codes-only").spec() == "3"
    assert presets.get("tq4").spec() == "4+s4+w64"
    with pytest.raises(dataclasses.FrozenInstanceError):
        tq3.key_bits = 2


def test_bits_alone_select_the_recommended_recipe():
    assert presets.resolve(key_bits=3) is presets.get("tq3")
    assert presets.resolve(key_bits=3, value_bits=3) is presets.get("tq3")
    assert presets.resolve(key_bits=4, value_bits=4) is presets.get("tq4")
    assert presets.resolve(key_bits=2, value_bits=2) is presets.get("tq2")
    p = presets.resolve(key_bits=4)  # the other width: the default preset's (3)
    assert (p.key_bits, p.value_bits, p.fp16_sinks, p.fp16_window) == (4, 3, 4, 64)
    assert p.spec() == "k4v3+s4+w64"


def test_overrides_win_and_none_is_not_an_override():
    p = presets.resolve("tq3-mixed", key_bits=3, fp16_window=32, fp16_sinks=None)
    assert (p.key_bits, p.value_bits, p.fp16_window, p.fp16_sinks) == (3, 4, 32, 4)
    assert p.mixed_bits == 2 and p.name == "tq3-mixed"
    p = presets.resolve(key_bits=3, fp16_window=0, fp16_sinks=0, ring_extra_bits=0)
    # (no fp16 window: the rings' window size has nothing to resize, see test_mlx_rotating)
    assert dataclasses.replace(p, name="x", summary="", ring_window=None,
                               ring_block_tokens=None) == \
        dataclasses.replace(presets.get("codes-only"), name="x", summary="")
    assert presets.resolve("codes-only", key_split=False).key_split is False


def test_unknown_names_are_refused_with_the_valid_ones():
    for bad in ("tq5", "TQ3", "", "tq3 "):
        with pytest.raises(ValueError, match="unknown preset .*valid presets: tq4, tq3, "
                           "tq3-mixed, tq2.5, tq2, codes-only"):
            presets.resolve(bad)
    with pytest.raises(ValueError, match="unknown cache setting.*fp16_windw"):
        presets.resolve("tq3", fp16_windw=8)


def test_make_prompt_cache_defaults_to_tq3_and_takes_presets():
    model = tiny_model("llama")
    want = {n: presets.get(n) for n in NAMES}
    for name, p in want.items():
        got = settings(tq_mlx.make_prompt_cache(model, preset=name)[0])
        for k, v in got.items():
            exp = getattr(p, k)
            if k == "block_tokens" and exp is None:  # the cache's automatic flush block
                exp = 16 if p.mixed_bits else 32 if p.fp16_window else 256
            assert v == exp, (name, k)
    tq3 = settings(tq_mlx.make_prompt_cache(model, preset="tq3")[0])
    assert settings(tq_mlx.make_prompt_cache(model)[0]) == tq3
    assert settings(tq_mlx.make_prompt_cache(model, key_bits=3)[0]) == tq3
    assert settings(tq_mlx.make_prompt_cache(model, key_bits=3, value_bits=3)[0]) == tq3
    c = tq_mlx.make_prompt_cache(model, preset="tq3-mixed", fp16_window=32, key_split=False)[0]
    assert (c.fp16_window, c.key_split, c.mixed_bits, c.key_bits) == (32, False, 2, 4)
    with pytest.raises(ValueError, match="valid presets: tq4"):
        tq_mlx.make_prompt_cache(model, preset="tq9")
    with pytest.raises(ValueError, match="mixed precision needs an fp16 window"):
        tq_mlx.make_prompt_cache(model, preset="tq3-mixed", fp16_window=0)


def test_make_prompt_cache_takes_the_recipe_by_keyword_only():
    """The recipe's settings are keywords over the chosen recipe (RECIPE_KEYWORDS: Preset's
    settings besides the bits, the methods per role and the rotation); anything else is a
    TypeError naming it and the valid keywords."""
    model = tiny_model("llama")
    assert set(tq_mlx.RECIPE_KEYWORDS) == (set(presets.SETTINGS) - {"key_bits", "value_bits"}) | {
        "key_method", "value_method", "rotation"}
    c = tq_mlx.make_prompt_cache(model, 4, 3, fp16_sinks=None, rotation="hadamard",
                                 value_method="turboquant_mse")[0]
    assert (c.key_bits, c.value_bits, c.fp16_sinks, c.rotation) == (4, 3, 4, "hadamard")
    with pytest.raises(TypeError, match="fp16_windw.*the recipe keywords are method, center"):
        tq_mlx.make_prompt_cache(model, fp16_windw=32)
    with pytest.raises(TypeError):
        tq_mlx.make_prompt_cache(model, 3, 3, "turboquant_mse")  # the recipe is keyword-only


def test_every_preset_runs_a_model_and_the_window_recipes_beat_codes_only():
    model = tiny_model("llama")
    toks = np.random.default_rng(3).integers(0, 128, 200).tolist()

    def run(cache):
        outs = [model(mx.array(toks[:150])[None], cache=cache)]
        outs += [model(mx.array(toks[i:i + 1])[None], cache=cache) for i in range(150, 160)]
        return np.concatenate([np.array(o[0].astype(mx.float32)) for o in outs])

    from mlx_lm.models import cache as mlx_cache

    ref = run(mlx_cache.make_prompt_cache(model))
    err = {}
    for name in NAMES:
        out = run(tq_mlx.make_prompt_cache(model, preset=name))
        assert np.isfinite(out).all(), name
        err[name] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert err["tq3"] < err["codes-only"] and err["tq4"] < err["tq3"], err


@pytest.mark.parametrize("name", ["codes-only", "tq3", "tq3-mixed"])
def test_preset_memory_is_what_a_model_run_holds(name):
    """info --preset's synthetic fill (a prompt, then one decode step) leaves the cache
    holding the bytes that the same prompt and step leave through a real model."""
    model = tiny_model("llama")  # 2 layers, 4 query / 2 KV heads, head_dim 16
    toks = np.random.default_rng(4).integers(0, 128, 300).tolist()
    got = preset_memory.memory_bytes(presets.get(name), (2, 4, 2, 16), 300)
    # memory_bytes counts mixed precision routed on every layer (mixed_trial off) ...
    cache = tq_mlx.make_prompt_cache(model, preset=name, mixed_trial=False)
    model(mx.array(toks[:299])[None], cache=cache)
    mx.eval(model(mx.array(toks[299:])[None], cache=cache))
    assert got == sum(c.nbytes for c in cache)
    # ... an upper bound of what the preset itself holds (layers the trial made uniform
    # keep the code bits, without the kept-token masks)
    cache = tq_mlx.make_prompt_cache(model, preset=name)
    model(mx.array(toks[:299])[None], cache=cache)
    mx.eval(model(mx.array(toks[299:])[None], cache=cache))
    assert sum(c.nbytes for c in cache) <= got
    assert got < presets.fp16_bytes((2, 4, 2, 16), 300)


def test_builder_with_preset():
    c = tq.KVCacheBuilder().with_preset("tq3-mixed").with_head_dim(32).with_heads(4, 2).build()
    core = c.core
    assert (core.key_bits, core.value_bits, core.fp16_sinks, core.fp16_window) == (4, 4, 4, 64)
    assert (core.mixed_group_blocks, core.mixed_keep_blocks, core.decay_bits) == (2, 1, 2)
    assert core.block_tokens == 16 and core.norm_correction
    c = tq.KVCacheBuilder().with_preset("tq2.5").with_head_dim(32).build().core
    assert (c.mixed_group_blocks, c.mixed_keep_blocks, c.block_tokens) == (4, 1, 16)
    # later calls override the preset
    c = (tq.KVCacheBuilder().with_preset("tq3").with_fp16_window(16).with_key_bits(4)
         .with_head_dim(32).build().core)
    assert (c.key_bits, c.value_bits, c.fp16_window, c.fp16_sinks, c.block_tokens) == \
        (4, 3, 16, 4, 32)
    c = tq.KVCacheBuilder().with_preset("codes-only").with_head_dim(32).build().core
    assert (c.fp16_window, c.fp16_sinks, c.block_tokens, c.key_bits) == (0, 0, 256, 3)
    assert c.norm_correction
    x = np.random.default_rng(0).standard_normal((2, 100, 32)).astype(np.float32)
    cache = tq.KVCacheBuilder().with_preset("tq3").with_head_dim(32).with_heads(4, 2).build()
    cache.append(x, x)
    out = cache.attend(np.ones((4, 1, 32), np.float32))
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="valid presets"):
        tq.KVCacheBuilder().with_preset("tq-3")


def test_eval_grammar_takes_preset_names():
    from turboquant.mlx_eval import Setting, make_cache

    s = Setting.parse("tq3-mixed")
    assert s.preset == "tq3-mixed" and s.name == "tq3-mixed"
    assert (s.key_bits, s.fp16_window, s.fp16_sinks, s.mixed_bits, s.mixed_keep) == \
        (4, 64, 4, 2, 0.5)
    model = tiny_model("llama")
    for name in NAMES:
        assert settings(make_cache(model, Setting.parse(name))[0]) == \
            settings(tq_mlx.make_prompt_cache(model, preset=name)[0])
    # a BITS setting has the options it names only, as before presets
    plain = settings(make_cache(model, Setting.parse("3"))[0])
    assert plain == settings(tq_mlx.make_prompt_cache(model, preset="codes-only")[0])
    assert settings(make_cache(model, Setting.parse("3+s4+w64"))[0]) == \
        settings(tq_mlx.make_prompt_cache(model, preset="tq3")[0])
    raw = make_cache(model, Setting.parse("3/raw"))[0]
    assert not raw.center and not raw.debias and not raw.key_split and raw.fp16_window == 0


def test_info_preset(capsys):
    assert main(["info", "--preset", "tq3", "--shape", "2,4,2,16", "--tokens", "300"]) == 0
    out = capsys.readouterr().out
    assert "preset:          tq3" in out and "eval setting:    3+s4+w64" in out
    assert "fp16 sinks:      4 tokens" in out and "fp16 window:     64 tokens" in out
    assert "rotation:        hadamard1 (one random-sign Hadamard round) on power-of-two" in out
    want = preset_memory.memory_bytes(presets.get("tq3"), (2, 4, 2, 16), 300)
    assert f"at 300 tokens: {want:,} bytes" in out
    assert main(["info", "--preset", "tq3-mixed", "--shape", "2,4,2,16", "--tokens",
                 "100"]) == 0
    out = capsys.readouterr().out
    assert "most attended 1/2 of each 32-token flush group" in out and "at 2 bits" in out
    assert main(["info", "--preset", "tq7"]) == 1
    assert "valid presets: tq4, tq3" in capsys.readouterr().out
    assert main(["info", "--preset", "tq3", "--shape", "2,3,2,16"]) == 1
    assert "unknown model shape" in capsys.readouterr().out
    assert main(["info"]) == 1


def test_generate_options_resolve_through_the_preset():
    import argparse

    from turboquant.cli import generate

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    model = tiny_model("llama")

    def cache_of(*argv):
        args = p.parse_args(["--model", "m", *argv])
        return tq_mlx.make_prompt_cache(model, **generate.cache_options(args))[0]

    assert settings(cache_of()) == settings(tq_mlx.make_prompt_cache(model, preset="tq3")[0])
    c = cache_of("--kv-preset", "tq3-mixed", "--fp16-window", "32")
    assert (c.mixed_bits, c.key_bits, c.fp16_window, c.fp16_sinks) == (2, 4, 32, 4)
    c = cache_of("--kv-bits", "4", "--value-bits", "2")
    assert (c.key_bits, c.value_bits, c.fp16_window, c.fp16_sinks) == (4, 2, 64, 4)
    c = cache_of("--kv-preset", "codes-only", "--no-key-split")
    assert (c.fp16_window, c.key_split) == (0, False)
    with pytest.raises(ValueError, match="valid presets"):
        cache_of("--kv-preset", "best")


@pytest.mark.slow
def test_smollm2_default_at_3_bits_beats_codes_only_on_held_out_text():
    """One window of a text no recipe was tuned on (MPL-2.0): make_prompt_cache(model,
    key_bits=3, value_bits=3), i.e. tq3, against the same bits as codes only."""
    from mlx_lm import load
    from mlx_lm.models import cache as mlx_cache

    from turboquant import models
    from turboquant.mlx_eval import score_logits, token_quality

    model, tokenizer = load(str(models.smollm2("float32")))
    toks = tokenizer.encode(Path("/usr/share/common-licenses/MPL-2.0").read_text())[:768]
    prefix, chunk = 512, 16
    targets = np.array(toks[prefix:])
    ref = score_logits(model, mlx_cache.make_prompt_cache(model), toks, prefix, chunk)
    kl = {}
    for name, kw in (("default", {"key_bits": 3, "value_bits": 3}),
                     ("codes-only", {"preset": "codes-only"})):
        cache = tq_mlx.make_prompt_cache(model, **kw)
        kl[name] = float(token_quality(ref, score_logits(model, cache, toks, prefix, chunk),
                                       targets)["kl"].mean())
    # measured on the tuning texts: KL 0.017 (tq3) vs 0.14 (codes only), about 8x
    assert kl["default"] < 0.5 * kl["codes-only"], kl
    assert kl["default"] < 0.05, kl
