"""Softmax bias of attention on coded keys, and whether correcting it pays.

A coded key's score is the exact one plus a noise term e of variance sigma^2; under softmax
exp(s + e) is larger than exp(s) by exp(sigma^2 / 2) on average, so codes draw attention away
from the exact fp16 rows (sinks, window). Per layer this prints, for the recipe's key codes
(keys centred, channels ordered by energy, the split: half at key_bits + 1, half at
key_bits - 1; values exact, so only the keys' effect is seen) and 48 queries of the prompt's
second half: the mean sigma, the attention-output error ||o - o_exact||^2 / ||o_exact||^2
without correction ("none"), with scores lowered by sigma^2 / 2 from each half's mean
relative distortion ("corr") and from each token's own error ("oracle"), and the attention
mass on the fp16 rows, exact / coded / corrected. The model runs on mlx-lm's fp16 cache (one
prefill call, all layers seen as full attention).

  PYTHONPATH=python python bench/score_bias.py --model .models/gemma-3-270m-float32 \\
      --tokens 2048 --bits 3
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models import base as mlx_base
from mlx_lm.models import cache as mlx_cache

from turboquant import mixed_trial

SINKS, WINDOW, QUERIES = 4, 64, 48


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def capture(model, ids):
    """(queries, keys, values, scale) of every attention call of one prefill."""
    calls, orig = [], mlx_base.scaled_dot_product_attention

    def spy(q, k, v, cache=None, scale=1.0, mask=None, **kw):
        calls.append(tuple(np.array(a[0].astype(mx.float32)) for a in (q, k, v)) + (scale,))
        return orig(q, k, v, cache=cache, scale=scale, mask=mask, **kw)

    modules = [m for m in sys.modules.values()
               if getattr(m, "scaled_dot_product_attention", None) is orig
               and getattr(m, "__name__", "").startswith("mlx_lm.models.")]
    for m in modules:
        m.scaled_dot_product_attention = spy
    try:
        model(mx.array([ids]), cache=mlx_cache.make_prompt_cache(model))
    finally:
        for m in modules:
            m.scaled_dot_product_attention = orig
    return calls


def layer_report(li, q, k, v, scale, bits):
    H, n, d = k.shape
    g, half = q.shape[0] // H, d // 2
    kc = k - k.mean(1, keepdims=True)
    perm = np.argsort(-(kc ** 2).sum((0, 1)))
    kp, qp = np.ascontiguousarray(kc[:, :, perm]), q[:, :, perm]
    mk = mixed_trial.make_core_factory(
        d, H, q.shape[0], "turboquant_mse", 7 + li, "hadamard1", True,
        lambda b: (half, b + 1, b - 1) if 2 <= b <= 7 else None, 8, 32)
    core = mk(bits, bits, 0)
    core.append(kp, np.ascontiguousarray(v))
    kd, _ = mixed_trial._decoded(core, n, H)
    err2 = (kd - kp) ** 2
    rel = [(err2[..., s].sum(-1) / ((kp[..., s] ** 2).sum(-1) + 1e-12)).mean()
           for s in (slice(0, half), slice(half, d))]
    rows = np.linspace(n // 2, n - 1, QUERIES).astype(int)
    pos = np.arange(n)
    causal = pos[None, :] <= rows[:, None]
    coded = (pos[None, :] >= SINKS) & (rows[:, None] - pos[None, :] > WINDOW)
    exact_rows = causal & ~coded
    acc = dict.fromkeys(("none", "corr", "oracle", "ref", "sigma", "m_exact", "m_none",
                         "m_corr"), 0.0)
    for h in range(H):
        k2 = [(kp[h, :, s] ** 2).sum(-1) for s in (slice(0, half), slice(half, d))]
        e2 = [err2[h, :, s].sum(-1) for s in (slice(0, half), slice(half, d))]
        for j in range(g):
            qq = qp[h * g + j][rows]
            q2 = [(qq[:, s] ** 2).sum(-1) for s in (slice(0, half), slice(half, d))]
            s_exact = np.where(causal, (qq @ kp[h].T) * scale, -np.inf)
            s_coded = np.where(coded, (qq @ kd[h].T) * scale, s_exact)
            var = scale ** 2 * sum(q2[i][:, None] * rel[i] * k2[i][None] / half for i in (0, 1))
            var_o = scale ** 2 * sum(q2[i][:, None] * e2[i][None] / half for i in (0, 1))
            p = _softmax(s_exact)
            ps = {"none": _softmax(s_coded),
                  "corr": _softmax(np.where(coded, s_coded - var / 2, s_coded)),
                  "oracle": _softmax(np.where(coded, s_coded - var_o / 2, s_coded))}
            o = p @ v[h]
            for name, pc in ps.items():
                acc[name] += float(((pc @ v[h] - o) ** 2).sum())
            acc["ref"] += float((o ** 2).sum())
            acc["sigma"] += float(np.sqrt((var * coded).sum() / coded.sum()))
            acc["m_exact"] += float((p * exact_rows).sum(-1).mean())
            acc["m_none"] += float((ps["none"] * exact_rows).sum(-1).mean())
            acc["m_corr"] += float((ps["corr"] * exact_rows).sum(-1).mean())
    hg = H * g
    return (f"layer {li:2d}  sigma {acc['sigma'] / hg:.3f}  "
            f"error none {acc['none'] / acc['ref']:.5f}"
            f" corr {acc['corr'] / acc['ref']:.5f} oracle {acc['oracle'] / acc['ref']:.5f}  "
            f"fp16-row mass exact {acc['m_exact'] / hg:.4f} coded {acc['m_none'] / hg:.4f} "
            f"corrected {acc['m_corr'] / hg:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=3)
    a = ap.parse_args(argv)
    model, tok = load(a.model)
    ids = tok.encode(open(a.text).read())[:a.tokens]
    for li, (q, k, v, scale) in enumerate(capture(model, ids)):
        print(layer_report(li, q, k, v, scale, a.bits), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
