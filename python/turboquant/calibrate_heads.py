"""Per-KV-head bit allocation (``python -m turboquant calibrate --granularity head``).

The per-layer calibration (:mod:`turboquant.calibrate`) gives every KV head of a layer the
same widths. Heads differ, though: within one layer some heads' keys barely matter and
others carry sharp attention patterns. Here each (layer, KV head, role) is an item of the
allocation.

Measurement, from one recorded fp16 pass (:func:`turboquant.calibrate_base.capture`): for each
layer, role and candidate width b, the layer's attention runs through the very cache the
model will use (:class:`turboquant.mlx_lm.TurboQuantKVCache`, fed as the eval feeds it with
the scoring's fp16 sinks / window) with EVERY head's keys (or values) at b. The KV heads'
streams are independent (own rotations, codes, norms), so the error of KV head h's query
heads in that run is exactly the error with only head h at b: one run per (layer, role,
width) measures all heads at once, the cost of the per-layer ``attention`` metric.

Each head's error is measured where the layer uses it: through the layer's output projection
(``self_attn.o_proj``, whose columns for head h weight that head's output), relative to the
projected fp16 output, ``||W_o[:, h] (o~_h - o_h)||^2 / ||W_o o||^2``, summed over the
queries after the prefix. Heads whose output the projection shrinks cost less. (Without an
``o_proj`` weight, e.g. a quantized model, the plain attention-output error is used.)

``hybrid`` (default) then scales every role and width to KL units exactly as the per-layer
hybrid does (:func:`turboquant.calibrate_base.role_scaled_errors`: six model runs, every layer's
keys or values at 2, 3, 4 bits), so keys and values, low and high widths are weighed by their
measured effect on the next-token distribution. ``attention`` skips the scaling.

Allocation: the exact dynamic programme of :func:`turboquant.calibrate_base.allocate` over
the (layer, head) items (every head has the same head_dim, so the average over items is the
average bits per coordinate). The profile's layers hold ``key_bits`` / ``value_bits`` as lists
(one width per KV head), which :func:`turboquant.mlx_lm.make_prompt_cache` passes to the C++
core's per-head widths (``key_head_bits`` / ``value_head_bits``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from turboquant import calibrate_base as cal
from turboquant import mlx_lm as tq_mlx

GRANULARITY = "head"


@dataclass
class HeadErrors:
    layer: int
    head: int
    key: dict[int, float]
    value: dict[int, float]


def _output_projection(model, layer: int) -> np.ndarray | None:
    """The layer's attention output projection W_o (hidden, H_q * d) as float32, or None."""
    attn = getattr(model.layers[layer], "self_attn", None)
    proj = getattr(attn, "o_proj", None)
    w = getattr(proj, "weight", None)
    if w is None or getattr(proj, "scales", None) is not None:  # quantized: no plain weight
        return None
    return np.array(w.astype(mx.float32))


def head_errors(model, captured: dict[int, tuple], seed: int = 0, progress=None,
                key_candidates=cal.KEY_CANDIDATES, value_candidates=cal.VALUE_CANDIDATES,
                scoring: cal.Scoring | None = None, project: bool = True) -> list[HeadErrors]:
    """Per (layer, KV head): the relative error of the layer's (projected) attention output
    with only that head's keys, or values, at each candidate width (the other role at 8 bits)."""
    pairs = tq_mlx.rope_pairs_of(model)
    out: list[HeadErrors] = []
    layers = sorted(captured)
    for i in (progress(layers) if progress else layers):
        q32, k32, v32, scale, ref = cal.reference_attention(captured[i], scoring)
        B, Hq, T, d = ref.shape
        H = k32.shape[1]
        G = Hq // H
        w = _output_projection(model, i) if project else None
        if w is not None and w.shape[1] != Hq * d:
            w = None

        def per_head(o: np.ndarray) -> np.ndarray:
            """Error energy of each KV head's query heads: (H,)."""
            diff = o - ref  # (B, Hq, T, d)
            if w is None:
                return np.sum(diff.reshape(B, H, G, T, d) ** 2, axis=(0, 2, 3, 4))
            e = np.empty(H)
            for h in range(H):
                cols = slice(h * G * d, (h + 1) * G * d)
                # (B, T, G*d) of head h's query heads, times W_o's columns of those heads
                dh = diff[:, h * G:(h + 1) * G].transpose(0, 2, 1, 3).reshape(B * T, G * d)
                e[h] = float(np.sum((dh @ w[:, cols].T) ** 2))
            return e

        if w is None:
            total = float(np.sum(ref ** 2))
        else:
            total = float(np.sum((ref.transpose(0, 2, 1, 3).reshape(B * T, Hq * d) @ w.T) ** 2))
        total = max(total, 1e-30)
        key = {b: per_head(cal.attend_output(pairs, q32, k32, v32, scale, b, 8, seed, i, scoring))
               / total for b in key_candidates}
        value = {b: per_head(cal.attend_output(pairs, q32, k32, v32, scale, 8, b, seed, i,
                                               scoring)) / total for b in value_candidates}
        for h in range(H):
            out.append(HeadErrors(i, h, {b: float(x[h]) for b, x in key.items()},
                                  {b: float(x[h]) for b, x in value.items()}))
    return out


def _profile_layers(n_layers: int, errors: list[HeadErrors], bits) -> list[dict]:
    by_layer: dict[int, list] = {}
    for e, b in zip(errors, bits):
        by_layer.setdefault(e.layer, []).append((e, b))
    layers = []
    for i in range(n_layers):
        if i not in by_layer:
            layers.append({"fp16": True})  # not a plain KVCache layer: make_prompt_cache keeps it
            continue
        heads = sorted(by_layer[i], key=lambda eb: eb[0].head)
        if [e.head for e, _ in heads] != list(range(len(heads))):
            raise ValueError(f"layer {i}: measured heads {[e.head for e, _ in heads]} are not "
                             f"0..{len(heads) - 1}")
        layers.append({"key_bits": [kb for _, (kb, _) in heads],
                       "value_bits": [vb for _, (_, vb) in heads],
                       "key_error": [e.key[kb] for e, (kb, _) in heads],
                       "value_error": [e.value[vb] for e, (_, vb) in heads]})
    return layers


def _summary(errors: list[HeadErrors], bits) -> dict:
    return {"average_bits": float(np.mean([(kb + vb) / 2 for kb, vb in bits])),
            "predicted_error": float(sum(e.key[kb] + e.value[vb]
                                         for e, (kb, vb) in zip(errors, bits)))}


def calibrate_heads(model, tokens: list[int], budget: float, seed: int = 0, progress=None,
                    log=print, metric: str = "hybrid", scoring: cal.Scoring | None = None,
                    key_candidates=None, value_candidates=None, exact: bool = True,
                    project: bool = True) -> dict:
    """The per-head profile dict for ``model`` calibrated on ``tokens`` (see the module doc)."""
    if metric not in ("hybrid", "attention"):
        raise ValueError(f"per-head calibration measures the hybrid or attention metric, got "
                         f"{metric!r} (kl would need a model run per head, role and width)")
    key_candidates = tuple(sorted(key_candidates or cal.KEY_CANDIDATES))
    value_candidates = tuple(sorted(value_candidates or cal.VALUE_CANDIDATES))
    cal._check_candidates(key_candidates, value_candidates)
    cal._check_budget(budget, key_candidates, value_candidates)
    s = scoring or cal.Scoring(prefix=len(tokens) // 2)
    windowed = metric == "hybrid" or scoring is not None
    if windowed:
        s.check(len(tokens))
    t0 = time.perf_counter()
    captured = cal.capture(model, tokens)
    log(f"captured {len(captured)} layers over {len(tokens)} tokens "
        f"({time.perf_counter() - t0:.1f}s)")
    errors = head_errors(model, captured, seed, progress, key_candidates, value_candidates,
                         s if windowed else None, project)
    role_scale = None
    if metric == "hybrid":
        errors, role_scale = cal.role_scaled_errors(model, tokens, errors, s, seed)
        log("KL per unit attention error: " + "; ".join(
            f"{r}s " + ", ".join(f"{b} bits {x:.4g}" for b, x in t.items())
            for r, t in role_scale.items()))
    bits = cal.allocate(errors, budget, exact)
    out = {"format": tq_mlx.PROFILE_FORMAT, "version": cal.PROFILE_VERSION,
           "granularity": GRANULARITY, "budget": budget, "metric": metric,
           "allocation": "exact" if exact else "greedy", **_summary(errors, bits),
           "tokens": len(tokens), "seed": seed,
           "projected": bool(project),
           "head_errors": _errors_json(errors),
           "layers": _profile_layers(len(model.layers), errors, bits),
           "seconds": round(time.perf_counter() - t0, 1)}
    if role_scale is not None:
        out["kl_per_attention_error"] = {r: {str(b): x for b, x in t.items()}
                                         for r, t in role_scale.items()}
    if windowed:
        out["scoring"] = {"prefix": s.prefix, "chunk": s.chunk, "fp16_sinks": s.fp16_sinks,
                          "fp16_window": s.fp16_window}
    return out


def _errors_json(errors: list[HeadErrors]) -> dict:
    table: dict[str, list] = {}
    for e in sorted(errors, key=lambda e: (e.layer, e.head)):
        table.setdefault(str(e.layer), []).append(
            {"key": {str(b): x for b, x in e.key.items()},
             "value": {str(b): x for b, x in e.value.items()}})
    return table


def reallocate_heads(prof: dict, budget: float, exact: bool = True) -> dict:
    """A copy of a per-head profile with its bits allocated again for ``budget`` from the
    errors it measured (no model run)."""
    table = prof.get("head_errors")
    if not isinstance(table, dict) or not table:
        raise ValueError("per-head profile has no measured \"head_errors\" to allocate from")
    try:
        errors = [HeadErrors(int(i), h, {int(b): float(x) for b, x in e["key"].items()},
                             {int(b): float(x) for b, x in e["value"].items()})
                  for i, heads in sorted(table.items(), key=lambda kv: int(kv[0]))
                  for h, e in enumerate(heads)]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"profile \"head_errors\" are malformed: {e}") from None
    n_layers = len(prof["layers"])
    if any(not 0 <= e.layer < n_layers for e in errors):
        raise ValueError(f"profile \"head_errors\" name layers outside its {n_layers} layers")
    bits = cal.allocate(errors, budget, exact)
    out = dict(prof)
    out.update(budget=budget, allocation="exact" if exact else "greedy",
               layers=_profile_layers(n_layers, errors, bits), **_summary(errors, bits))
    return out
