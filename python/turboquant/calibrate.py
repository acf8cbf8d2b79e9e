"""Per-layer bit allocation for the mlx-lm cache under an average-bit budget.

For each layer and each candidate bit width, calibration measures the damage done by
quantizing only that layer's keys, or only its values, with the very cache the model will
use (:class:`turboquant.mlx_lm.TurboQuantKVCache`: centring, norm correction, key split).
Two metrics:

* ``kl``: the model runs over the text with every other layer in fp16, scored as
  the eval scores it (:class:`Scoring`: a prefix prefilled at once, then chunks; the fp16
  sinks and recent window the profile will be used with), and the error is the mean KL
  divergence of its next-token distributions after the prefix from the fp16 run's. It sees
  what the layer's error does downstream (on small models keys matter several times more
  than values at the same attention-output error). Measured at every candidate width (one
  scoring run each; default 2, 3 and 4 bits).
* ``hybrid`` (the CLI's default): the attention-output error below, measured for the
  queries after the prefix with the scoring's sinks/window, at every candidate width; then
  six scoring runs (every layer's keys, then values, at 2, 3 and 4 bits) give each role's
  KL per unit attention error at each width (:func:`role_scaled_errors`). About as fast
  as ``attention``, with the keys/values weighting and the window of ``kl``.
* ``attention``: from one recorded fp16 pass (every layer's queries, keys, values), the
  relative error of the layer's attention output alone,
  ``||attn(Q, K~_b, V) - attn(Q, K, V)||^2 / ||attn(Q, K, V)||^2`` (likewise V). Much
  faster; blind to how the error propagates and to the fp16 window.

Bits are then allocated to minimise the sum of the measured errors with the average of key
and value bits over the compressed layers equal to the budget: exactly, by dynamic
programming over the spent bits (``allocate``). Summing assumes the layers' errors add up;
``profile_kl`` measures the whole profile to check it. The result is a JSON profile that
:func:`turboquant.mlx_lm.make_prompt_cache` accepts (``profile=``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
from mlx_lm.models import cache as mlx_cache

from turboquant import calibrate_heads
from turboquant import mlx_lm as tq_mlx
# The pieces both calibrations use (turboquant.calibrate_base); the public ones re-exported.
from turboquant.calibrate_base import (  # noqa: F401
    DEFAULT_CANDIDATES,
    KEY_CANDIDATES,
    PROFILE_VERSION,
    VALUE_CANDIDATES,
    Scoring,
    _check_budget,
    _check_candidates,
    _kl,
    _score,
    allocate,
    attend_output,
    capture,
    profile_kl,
    reference_attention,
    role_scaled_errors,
)


METRICS = ("kl", "hybrid", "attention")


def _attend_error(model_pairs, q, k, v, scale, ref, key_bits, value_bits, seed, layer,
                 scoring=None):
    """Relative error of the layer's attention output through a TurboQuantKVCache. With
    ``scoring``, as the eval feeds it: the prefix appended and attended at once, then chunks
    (the fp16 sinks/window of the scoring in the cache); only the queries after the prefix
    count, against ``ref`` of those queries."""
    out = attend_output(model_pairs, q, k, v, scale, key_bits, value_bits, seed, layer, scoring)
    return float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))


@dataclass
class LayerErrors:
    layer: int
    key: dict[int, float]
    value: dict[int, float]


def layer_errors(model, captured: dict[int, tuple], seed: int = 0, progress=None,
                 key_candidates=KEY_CANDIDATES, value_candidates=VALUE_CANDIDATES,
                 scoring: Scoring | None = None) -> list[LayerErrors]:
    pairs = tq_mlx.rope_pairs_of(model)
    out = []
    layers = sorted(captured)
    it = progress(layers) if progress else layers
    for i in it:
        q32, k32, v32, scale, ref = reference_attention(captured[i], scoring)
        ke = {b: _attend_error(pairs, q32, k32, v32, scale, ref, b, 8, seed, i, scoring)
              for b in key_candidates}
        ve = {b: _attend_error(pairs, q32, k32, v32, scale, ref, 8, b, seed, i, scoring)
              for b in value_candidates}
        out.append(LayerErrors(i, ke, ve))
    return out


def _single_layer_profile(n_layers: int, layer: int, key_bits: int, value_bits: int) -> dict:
    layers = [{"fp16": True} for _ in range(n_layers)]
    layers[layer] = {"key_bits": key_bits, "value_bits": value_bits}
    return {"format": tq_mlx.PROFILE_FORMAT, "version": PROFILE_VERSION, "layers": layers}


def layer_errors_kl(model, tokens: list[int], seed: int = 0, progress=None,
                    scoring: Scoring | None = None,
                    key_candidates=KEY_CANDIDATES, value_candidates=VALUE_CANDIDATES
                    ) -> list[LayerErrors]:
    """Next-token KL vs fp16 with one layer's keys (or values) quantized at a time, measured
    at every candidate bit width (the other role of that layer at 8 bits, every other layer
    in fp16), the text scored as :class:`Scoring` says."""
    tq_mlx.install_attention_route()
    s = scoring or Scoring(prefix=len(tokens) // 2)
    s.check(len(tokens))
    base = mlx_cache.make_prompt_cache(model)
    layers = sorted(tq_mlx.check_architecture(model, base))
    ref = _score(model, tokens, s, None, seed)
    jobs = [(i, role, b) for i in layers
            for role, cands in (("key", key_candidates), ("value", value_candidates))
            for b in cands]
    table: dict[int, dict[str, dict[int, float]]] = {i: {"key": {}, "value": {}} for i in layers}
    for i, role, b in (progress(jobs) if progress else jobs):
        kb, vb = (b, 8) if role == "key" else (8, b)
        prof = _single_layer_profile(len(base), i, kb, vb)
        table[i][role][b] = _kl(ref, _score(model, tokens, s, prof, seed))
    return [LayerErrors(i, table[i]["key"], table[i]["value"]) for i in layers]


def calibrate(model, tokens: list[int], budget: float, seed: int = 0, progress=None,
              log=print, metric: str = "hybrid", scoring: Scoring | None = None,
              key_candidates=None, value_candidates=None, exact: bool = True,
              granularity: str = "layer") -> dict:
    """The profile dict for ``model`` calibrated on ``tokens``.

    ``kl`` and ``hybrid`` score the text as ``scoring`` says (default: the first half prefilled,
    no fp16 window); pass the fp16 sinks / window the profile will be used with.
    ``granularity="head"`` allocates bits per (layer, KV head, role) instead
    (:mod:`turboquant.calibrate_heads`; metrics ``hybrid`` and ``attention``)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if granularity not in ("layer", "head"):
        raise ValueError(f"granularity must be 'layer' or 'head', got {granularity!r}")
    if granularity == "head":
        return calibrate_heads.calibrate_heads(
            model, tokens, budget, seed, progress, log, metric, scoring,
            key_candidates, value_candidates, exact)
    if key_candidates is None:
        key_candidates = DEFAULT_CANDIDATES if metric == "kl" else KEY_CANDIDATES
    if value_candidates is None:
        value_candidates = DEFAULT_CANDIDATES if metric == "kl" else VALUE_CANDIDATES
    key_candidates = tuple(sorted(key_candidates))
    value_candidates = tuple(sorted(value_candidates))
    _check_candidates(key_candidates, value_candidates)
    _check_budget(budget, key_candidates, value_candidates)
    s = scoring or Scoring(prefix=len(tokens) // 2)
    t0 = time.perf_counter()
    if metric == "kl":
        s.check(len(tokens))
        errors = layer_errors_kl(model, tokens, seed, progress, s,
                                 key_candidates, value_candidates)
    else:
        windowed = metric == "hybrid" or scoring is not None
        if windowed:
            s.check(len(tokens))
        captured = capture(model, tokens)
        log(f"captured {len(captured)} layers over {len(tokens)} tokens "
            f"({time.perf_counter() - t0:.1f}s)")
        errors = layer_errors(model, captured, seed, progress, key_candidates,
                              value_candidates, s if windowed else None)
        if metric == "hybrid":
            errors, role_scale = role_scaled_errors(model, tokens, errors, s, seed)
            log("KL per unit attention error: " + "; ".join(
                f"{r}s " + ", ".join(f"{b} bits {x:.4g}" for b, x in t.items())
                for r, t in role_scale.items()))
    bits = allocate(errors, budget, exact)
    n_layers = len(model.layers)
    by_layer = {e.layer: (e, b) for e, b in zip(errors, bits)}
    layers = []
    for i in range(n_layers):
        if i not in by_layer:
            layers.append({"fp16": True})  # not a plain KVCache layer: make_prompt_cache keeps it
            continue
        e, (kb, vb) = by_layer[i]
        layers.append({"key_bits": kb, "value_bits": vb,
                       "key_error": e.key[kb], "value_error": e.value[vb]})
    avg = float(np.mean([(kb + vb) / 2 for kb, vb in bits]))
    out = {"format": tq_mlx.PROFILE_FORMAT, "version": PROFILE_VERSION, "budget": budget,
           "metric": metric, "allocation": "exact" if exact else "greedy",
           "average_bits": avg, "tokens": len(tokens), "seed": seed,
           "predicted_error": float(sum(e.key[kb] + e.value[vb]
                                        for e, (kb, vb) in zip(errors, bits))),
           "errors": {str(e.layer): {"key": e.key, "value": e.value} for e in errors},
           "layers": layers,
           "seconds": round(time.perf_counter() - t0, 1)}
    if metric == "hybrid":
        out["kl_per_attention_error"] = {r: {str(b): x for b, x in t.items()}
                                         for r, t in role_scale.items()}
    if metric != "attention" or scoring is not None:
        out["scoring"] = {"prefix": s.prefix, "chunk": s.chunk, "fp16_sinks": s.fp16_sinks,
                          "fp16_window": s.fp16_window}
    return out


def reallocate(profile, budget: float, exact: bool = True) -> dict:
    """A copy of ``profile`` (a path or dict written by :func:`calibrate`) with its bits
    allocated again for ``budget`` from the errors it measured (no model run)."""
    prof = tq_mlx.load_profile(profile)
    if prof.get("granularity") == "head":
        return calibrate_heads.reallocate_heads(prof, budget, exact)
    table = prof.get("errors")
    if not isinstance(table, dict) or not table:
        raise ValueError("profile has no measured \"errors\" to allocate from")
    try:
        errors = [LayerErrors(int(i), {int(b): float(x) for b, x in e["key"].items()},
                              {int(b): float(x) for b, x in e["value"].items()})
                  for i, e in sorted(table.items(), key=lambda kv: int(kv[0]))]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"profile \"errors\" are malformed: {e}") from None
    n_layers = len(prof["layers"])
    if any(not 0 <= e.layer < n_layers for e in errors):
        raise ValueError(f"profile \"errors\" name layers outside its {n_layers} layers")
    bits = allocate(errors, budget, exact)
    by_layer = {e.layer: (e, b) for e, b in zip(errors, bits)}
    layers = []
    for i in range(n_layers):
        if i not in by_layer:
            layers.append({"fp16": True})
            continue
        e, (kb, vb) = by_layer[i]
        layers.append({"key_bits": kb, "value_bits": vb,
                       "key_error": e.key[kb], "value_error": e.value[vb]})
    out = dict(prof)
    out.update(budget=budget, allocation="exact" if exact else "greedy", layers=layers,
               average_bits=float(np.mean([(kb + vb) / 2 for kb, vb in bits])),
               predicted_error=float(sum(e.key[kb] + e.value[vb]
                                         for e, (kb, vb) in zip(errors, bits))))
    return out


def save(profile: dict, path: str) -> None:
    from turboquant._atomic import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
