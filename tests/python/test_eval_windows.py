"""Multi-window evaluation (python -m turboquant eval --windows): pooling, windows, the
standard error of a perplexity ratio."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_tiny import tiny_model  # noqa: E402

from turboquant.mlx_eval import Setting, evaluate, log_ratio_se, text_windows  # noqa: E402


def test_text_windows_are_disjoint_and_ordered():
    a, b = list(range(100)), list(range(1000, 1050))
    w = text_windows([a, b], 4, 30)
    assert w == [a[0:30], a[30:60], a[60:90], b[0:30]]
    with pytest.raises(ValueError, match="hold 4 windows of 30 tokens"):
        text_windows([a, b], 5, 30)


def test_log_ratio_se_matches_the_batch_means_formula():
    rng = np.random.default_rng(0)
    d = [rng.standard_normal(64), rng.standard_normal(64)]
    # equal batches of 32: the plain standard error of the four batch means' mean
    m = np.array([x[i:i + 32].mean() for x in d for i in (0, 32)])
    assert log_ratio_se(d, batch=32) == pytest.approx(m.std(ddof=1) / 2, rel=1e-12)
    assert log_ratio_se([np.zeros(10)], batch=32) == 0.0
    # independent N(0, 1) differences: s.e. of the mean of 64k tokens ~ 1/256
    big = [rng.standard_normal(32768) for _ in range(2)]
    assert log_ratio_se(big) == pytest.approx(1 / 256, rel=0.1)


def test_windows_pool_the_per_window_runs():
    model = tiny_model("llama")
    tokens = np.random.default_rng(5).integers(0, 128, 200).tolist()
    specs = [Setting.parse(s) for s in ("3", "2+s4+w16")]
    kw = dict(prefix=24, score=72, chunk=16, context=0, decode_tokens=0, log=lambda *a: None)
    pooled = evaluate(model, [tokens], specs, windows=2, **kw)
    one = [evaluate(model, tokens[i * 96:(i + 1) * 96], specs, **kw) for i in range(2)]
    for j, r in enumerate(pooled):
        # the pooled NLL is the mean of the two windows' (equal token counts)
        log_ppl = np.mean([np.log(o[j].ppl) for o in one])
        assert np.log(r.ppl) == pytest.approx(log_ppl, rel=1e-9)
        assert r.kl == pytest.approx(np.mean([o[j].kl for o in one]), rel=1e-9)
        assert r.windows == 2 and r.scored_tokens == 144
    assert pooled[0].ppl_ratio == 1.0
    assert all(r.ppl_ratio_se > 1.0 for r in pooled[1:])  # quantized: a non-zero spread
    assert one[0][1].ppl_ratio_se == 0.0  # one window: no error given
    with pytest.raises(ValueError, match="windows of 96 tokens"):
        evaluate(model, [tokens], specs, windows=3, **kw)
