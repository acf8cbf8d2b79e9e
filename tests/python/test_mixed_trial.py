"""turboquant.mixed_trial: mixed precision only on layers where a trial on the prompt finds
that importance routing beats uniform codes of the same average width."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as mlx_cache  # noqa: E402
from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402
from turboquant import mixed_trial, presets  # noqa: E402
from turboquant.mlx_eval import Setting  # noqa: E402

D, H, G, T = 64, 1, 2, 400
SINKS, WINDOW, GROUP, KEEP = 4, 32, 32, 16


def make_core(d=D):
    return mixed_trial.make_core_factory(
        d, H, H * G, "turboquant_mse", 7, "auto", True,
        lambda b: (d // 2, b + 1, b - 1) if 2 <= b <= 7 else None, 8, 32)


def ratio(k, v, q, scale):
    return mixed_trial.error_ratio(k, v, q, scale, make_core(), (4, 4), 2, (3, 3), SINKS,
                                   WINDOW, GROUP, KEEP, 32)


def trial(k, v, q, scale):
    return mixed_trial.routing_pays(k, v, q, scale, make_core(), (4, 4), 2, (3, 3), SINKS,
                                    WINDOW, GROUP, KEEP, 32)


def test_routing_pays_where_the_window_predicts_later_attention():
    """Every other token is a 'hot' key that all queries attend to, now and later: the
    window sees which ones matter, and routing keeps them at 4 bits."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((H, T, D)).astype(np.float32)
    v = rng.standard_normal((H, T, D)).astype(np.float32)
    direction = rng.standard_normal(D).astype(np.float32)
    direction /= np.linalg.norm(direction)
    k[:, ::2] += 6 * direction
    q = (rng.standard_normal((H * G, T, D)) * 0.3 + 4 * direction).astype(np.float32)
    assert ratio(k, v, q, D ** -0.5) < 0.5
    assert trial(k, v, q, D ** -0.5)


def test_routing_loses_where_attention_moves_on(monkeypatch):
    """Sharp attention to keys chosen at random per query: what the window saw says nothing
    about later queries, so half the tokens at 2 bits loses to uniform 3 bits; the layer
    drops routing once that loss exceeds MARGIN."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((H, T, D)).astype(np.float32)
    v = rng.standard_normal((H, T, D)).astype(np.float32)
    q = (3 * rng.standard_normal((H * G, T, D))).astype(np.float32)
    r = ratio(k, v, q, D ** -0.5)
    assert 1.0 < r < mixed_trial.MARGIN
    assert trial(k, v, q, D ** -0.5)
    monkeypatch.setattr(mixed_trial, "MARGIN", 1.0)
    assert not trial(k, v, q, D ** -0.5)


def test_a_short_prompt_keeps_mixed_precision():
    rng = np.random.default_rng(2)
    n = SINKS + WINDOW + GROUP + mixed_trial.MIN_QUERIES - 1
    k, v = (rng.standard_normal((H, n, D)).astype(np.float32) for _ in range(2))
    q = (3 * rng.standard_normal((H * G, n, D))).astype(np.float32)
    assert mixed_trial.trial_tokens(n, SINKS, WINDOW, GROUP) == 0
    assert ratio(k, v, q, D ** -0.5) == 0.0 and trial(k, v, q, D ** -0.5)


def test_uniform_widths_keep_the_average_code_bits():
    assert presets.uniform_widths(4, 4, 2, 0.5, True) == (3, 3)
    assert presets.uniform_widths(4, 4, 2, 0.25, True) == (3, 2)
    # 3-bit split keys at 1 bit hold parts of 2 and 1 bits (1.5): 3/7 kept averages 2.0
    assert presets.role_bits(3, 3, 1, 3 / 7, True) == pytest.approx((15 / 7, 13 / 7))
    assert presets.uniform_widths(3, 3, 1, 3 / 7, True) == (2, 2)
    assert presets.uniform_widths(3, 4) == (3, 4)


def test_make_prompt_cache_runs_the_trial_once_per_layer(tmp_path):
    """Each layer decides at its first attention call: mixed 4/2 bits, or uniform 3/3 bits
    (the same average); the decision is what a prompt-cache file records."""
    model = tiny_model("llama")
    tokens = np.random.default_rng(3).integers(0, 128, 260).tolist()
    opts = dict(preset="codes-only", key_bits=4, value_bits=4, mixed_bits=2, mixed_keep=0.5,
                fp16_sinks=4, fp16_window=32, block_tokens=16)
    cache = tq_mlx.make_prompt_cache(model, mixed_trial=True, **opts)
    assert all(c.mixed_trial for c in cache)
    model(mx.array(tokens[:240])[None], cache=cache)
    for c in cache:
        assert not c.mixed_trial  # decided
        # uniform: 3/3, or one bit moved between the roles by the width trial
        assert (c.key_bits, c.value_bits, c.mixed_bits) in ((4, 4, 2), (3, 3, 0), (4, 2, 0),
                                                            (2, 4, 0))
        assert not c.width_trial
    out = np.array(model(mx.array(tokens[240:])[None], cache=cache).astype(mx.float32))
    assert np.isfinite(out).all()
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, cache)
    loaded = mlx_cache.load_prompt_cache(path)
    assert [(c.key_bits, c.mixed_bits) for c in loaded] == [(c.key_bits, c.mixed_bits)
                                                            for c in cache]
    # without the trial every layer keeps mixed precision; a short prompt keeps it too
    plain = tq_mlx.make_prompt_cache(model, **opts)
    model(mx.array(tokens[:240])[None], cache=plain)
    assert all(c.mixed_bits == 2 for c in plain)
    short = tq_mlx.make_prompt_cache(model, mixed_trial=True, **opts)
    model(mx.array(tokens[:40])[None], cache=short)
    assert all(c.mixed_bits == 2 for c in short)


def test_presets_and_eval_grammar():
    for name in ("tq3-mixed", "tq2.5"):
        p = presets.get(name)
        assert p.mixed_trial and p.spec().endswith("/trial")
        s = Setting.parse(p.spec())
        assert s.mixed_trial and (s.mixed_bits, s.mixed_keep) == (p.mixed_bits, p.mixed_keep)
    assert not Setting.parse("4+s4+w64+m2:0.5").mixed_trial
    assert Setting.parse("4+s4+w64+m2:0.5/trial").name.endswith("/trial")


def test_best_widths_gives_the_bit_to_the_role_that_matters():
    """Queries of zero attend uniformly whatever the keys: key error costs nothing, so of
    3/3, 4/2 and 2/4 bits the trial picks 2-bit keys and 4-bit values; one layout, or too
    short a prompt, gives the first."""
    rng = np.random.default_rng(5)
    k = rng.standard_normal((H, T, D)).astype(np.float32)
    v = rng.standard_normal((H, T, D)).astype(np.float32)
    q = np.zeros((H * G, T, D), dtype=np.float32)
    layouts = [(3, 3), (4, 2), (2, 4)]
    assert mixed_trial.best_widths(k, v, q, D ** -0.5, make_core(), layouts, SINKS,
                                   WINDOW) == (2, 4)
    assert mixed_trial.best_widths(k, v, q, D ** -0.5, make_core(), layouts[:1], SINKS,
                                   WINDOW) == (3, 3)
    assert mixed_trial.best_widths(k[:, :60], v[:, :60], q[:, :60], D ** -0.5, make_core(),
                                   layouts, SINKS, WINDOW) == (3, 3)


def test_sliding_layers_take_their_widths_from_the_trial():
    """Under a mixed preset a sliding-window ring holds uniform codes of the recipe's average
    width plus its ring_extra_bits (tq3-mixed: 3/3 and one bit more, 8 bits per key + value
    coordinate pair); the width trial decides their split once, at the first attention call;
    without mixed_trial the ring keeps 4/4 (3/3 with ring_extra_bits=0)."""
    model = tiny_model("gemma3_text")
    tokens = np.random.default_rng(4).integers(0, 128, 200).tolist()
    cache = tq_mlx.make_prompt_cache(model, preset="tq3-mixed", fp16_window=8)
    rings = [c for c in cache if hasattr(c, "max_size")]
    assert rings and all(c.width_trial for c in rings)
    model(mx.array(tokens)[None], cache=cache)
    for c in rings:
        assert not c.width_trial
        assert (c.key_bits, c.value_bits) in ((4, 4), (5, 3), (3, 5))
    plain = tq_mlx.make_prompt_cache(model, preset="tq3-mixed", fp16_window=8,
                                     mixed_trial=False)
    model(mx.array(tokens)[None], cache=plain)
    assert all((c.key_bits, c.value_bits) == (4, 4) for c in plain if hasattr(c, "max_size"))
    plain = tq_mlx.make_prompt_cache(model, preset="tq3-mixed", fp16_window=8,
                                     mixed_trial=False, ring_extra_bits=0)
    model(mx.array(tokens)[None], cache=plain)
    assert all((c.key_bits, c.value_bits) == (3, 3) for c in plain if hasattr(c, "max_size"))
