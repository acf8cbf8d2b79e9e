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

import dataclasses
import json
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from turboquant import mlx_lm as tq_mlx
from turboquant.mlx_eval import _log_softmax, score_logits

KEY_CANDIDATES = (2, 3, 4, 5, 6)
VALUE_CANDIDATES = (2, 3, 4, 5)
DEFAULT_CANDIDATES = (2, 3, 4)  # measured widths of the kl metric (each costs a scoring run)
# Version 1 profiles (greedy, extrapolated KL) load unchanged: the fields added since
# ("allocation", "scoring", "predicted_error", "seconds") are informational.
PROFILE_VERSION = 1
METRICS = ("kl", "hybrid", "attention")


class _CaptureCache(mlx_cache.KVCache):
    """mlx-lm's fp16 cache that hands every attention call's inputs to ``sink``."""

    def __init__(self, layer: int, sink: dict):
        super().__init__()
        self._tq_layer, self._tq_sink = layer, sink

    def tq_capture(self, queries, keys, values, scale):
        self._tq_sink[self._tq_layer] = (queries, keys, values, float(scale))


def capture(model, tokens: list[int]) -> dict[int, tuple]:
    """{layer: (queries, keys, values, scale)} of one prefill of ``tokens`` (fp16 cache)."""
    tq_mlx.install_attention_route()
    sink: dict[int, tuple] = {}
    base = mlx_cache.make_prompt_cache(model)
    compressible = tq_mlx.check_architecture(model, base)
    cache = [(_CaptureCache(i, sink) if i in compressible else c) for i, c in enumerate(base)]
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    missing = [i for i in compressible if i not in sink]
    if missing:
        raise RuntimeError(f"no attention call seen for layers {missing}")
    return sink


@dataclass
class Scoring:
    """How a cache is scored on the calibration text, as the eval does it: ``prefix`` tokens
    prefilled at once, the rest fed ``chunk`` tokens at a time, the next-token KL from fp16
    averaged over the tokens after the prefix. ``fp16_sinks`` / ``fp16_window`` are those of
    the cache the profile will be used with: with a recent window only the error of the
    tokens outside it matters, and calibrating without one measures the wrong thing."""
    prefix: int
    chunk: int = 16
    fp16_sinks: int = 0
    fp16_window: int = 0

    def check(self, n_tokens: int) -> None:
        for name in ("prefix", "chunk", "fp16_sinks", "fp16_window"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < (1 if name in ("prefix", "chunk")
                                                             else 0):
                raise ValueError(f"{name} must be an integer >= "
                                 f"{1 if name in ('prefix', 'chunk') else 0}, got {v!r}")
        if self.prefix >= n_tokens - 1:
            raise ValueError(f"prefix ({self.prefix}) must leave tokens to score: the text has "
                             f"{n_tokens} tokens")


def _attend_error(model_pairs, q, k, v, scale, ref, key_bits, value_bits, seed, layer,
                 scoring=None):
    """Relative error of the layer's attention output through a TurboQuantKVCache. With
    ``scoring``, as the eval feeds it: the prefix appended and attended at once, then chunks
    (the fp16 sinks/window of the scoring in the cache); only the queries after the prefix
    count, against ``ref`` of those queries."""
    out = attend_output(model_pairs, q, k, v, scale, key_bits, value_bits, seed, layer, scoring)
    return float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))


def attend_output(model_pairs, q, k, v, scale, key_bits, value_bits, seed, layer,
                  scoring=None, **cache_options) -> np.ndarray:
    """The layer's attention output (B, H_q, T, d) through a TurboQuantKVCache (with
    ``scoring``: of the queries after the prefix, fed as the eval feeds them)."""
    if scoring is None:
        c = tq_mlx.TurboQuantKVCache(key_bits=key_bits, value_bits=value_bits, seed=seed,
                                     layer=layer, rope_pairs=model_pairs, **cache_options)
        c.update_and_fetch(k, v)
        return np.array(c.attend(q, scale=scale).astype(mx.float32))
    c = tq_mlx.TurboQuantKVCache(key_bits=key_bits, value_bits=value_bits, seed=seed,
                                 layer=layer, rope_pairs=model_pairs,
                                 fp16_window=scoring.fp16_window,
                                 fp16_sinks=scoring.fp16_sinks, **cache_options)
    P, T = scoring.prefix, k.shape[2]
    c.update_and_fetch(k[:, :, :P], v[:, :, :P])
    c.attend(q[:, :, :P], scale=scale)
    outs = []
    for i in range(P, T, scoring.chunk):
        j = min(i + scoring.chunk, T)
        c.update_and_fetch(k[:, :, i:j], v[:, :, i:j])
        outs.append(np.array(c.attend(q[:, :, i:j], scale=scale).astype(mx.float32)))
    return np.concatenate(outs, axis=2)


@dataclass
class LayerErrors:
    layer: int
    key: dict[int, float]
    value: dict[int, float]


def reference_attention(layer_capture: tuple, scoring: Scoring | None = None):
    """(q, k, v as float32 mlx arrays, scale, the fp32 causal attention output as NumPy):
    of one captured layer; with ``scoring``, the output of the queries after its prefix."""
    q, k, v, scale = layer_capture
    q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
    ref = np.array(mx.fast.scaled_dot_product_attention(q32, k32, v32, scale=scale, mask="causal"))
    if scoring is not None:
        ref = ref[:, :, scoring.prefix:]
    return q32, k32, v32, scale, ref


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


def _score(model, tokens: list[int], s: Scoring, profile: dict | None, seed: int) -> np.ndarray:
    """Log-probabilities of tokens[s.prefix + 1:] through a cache (fp16 when no profile)."""
    if profile is None:
        cache = mlx_cache.make_prompt_cache(model)
    else:
        cache = tq_mlx.make_prompt_cache(model, profile=profile, seed=seed,
                                         fp16_window=s.fp16_window, fp16_sinks=s.fp16_sinks)
    logits = score_logits(model, cache, tokens, s.prefix, s.chunk)
    return _log_softmax(logits.astype(np.float64))


def _kl(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    return float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), -1)))


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


def role_scaled_errors(model, tokens: list[int], errors: list[LayerErrors], scoring: Scoring,
                       seed: int = 0, reference_bits=(2, 3, 4)
                       ) -> tuple[list[LayerErrors], dict]:
    """The ``hybrid`` metric: attention-output errors turned into KL units per role and width.

    For each width of ``reference_bits`` (those measured), one scoring run measures the KL
    with every layer's keys at that width (values at 8 bits), one with every layer's values;
    each role's errors at that width are scaled so that their sum over layers is that KL
    (KL_role(b) ~= c_role(b) * sum_l e_l(b)); other widths take the nearest width's scale.
    The layers keep their attention-error ranking; keys and values, and low and high widths
    (the KL grows faster than the attention error at 2 bits), get their measured weights."""
    n = len(model.layers)
    ref = _score(model, tokens, scoring, None, seed)
    scale: dict[str, dict[int, float]] = {"key": {}, "value": {}}
    for role in ("key", "value"):
        widths = sorted(set(reference_bits) & set(getattr(errors[0], role)))
        if not widths:
            raise ValueError(f"hybrid: no {role} candidate among reference widths "
                             f"{list(reference_bits)}")
        for b in widths:
            layers = [{"fp16": True} for _ in range(n)]
            for e in errors:
                layers[e.layer] = ({"key_bits": b, "value_bits": 8} if role == "key"
                                   else {"key_bits": 8, "value_bits": b})
            prof = {"format": tq_mlx.PROFILE_FORMAT, "version": PROFILE_VERSION,
                    "layers": layers}
            kl = _kl(ref, _score(model, tokens, scoring, prof, seed))
            total = sum(getattr(e, role)[b] for e in errors)
            scale[role][b] = kl / max(total, 1e-30)

    def c(role, b):
        table = scale[role]
        return table[min(table, key=lambda w: (abs(w - b), w))]

    # (entries may be per layer or per KV head: calibrate_heads.HeadErrors)
    return ([dataclasses.replace(e, key={b: x * c("key", b) for b, x in e.key.items()},
                                 value={b: x * c("value", b) for b, x in e.value.items()})
             for e in errors], scale)


def profile_kl(model, tokens: list[int], profile, scoring: Scoring, seed: int = 0) -> float:
    """Next-token KL vs fp16 of the whole ``profile`` scored as :class:`Scoring` says (to
    check that the per-layer errors add up)."""
    scoring.check(len(tokens))
    ref = _score(model, tokens, scoring, None, seed)
    return _kl(ref, _score(model, tokens, scoring, tq_mlx.load_profile(profile), seed))


def _check_candidates(key_candidates, value_candidates) -> None:
    for role, cands in (("key", key_candidates), ("value", value_candidates)):
        if not cands or any(not isinstance(b, (int, np.integer)) or not 1 <= b <= 8
                            for b in cands) or len(set(cands)) != len(cands):
            raise ValueError(f"{role} candidates must be distinct integers in [1, 8], "
                             f"got {list(cands)!r}")


def _check_budget(budget: float, key_candidates=KEY_CANDIDATES,
                  value_candidates=VALUE_CANDIDATES) -> None:
    lo = (min(key_candidates) + min(value_candidates)) / 2
    hi = (max(key_candidates) + max(value_candidates)) / 2
    if not lo <= budget <= hi:
        raise ValueError(f"budget must be in [{lo}, {hi}] average bits, got {budget}")


def allocate(errors: list[LayerErrors], budget: float, exact: bool = True
             ) -> list[tuple[int, int]]:
    """(key_bits, value_bits) per entry of ``errors`` whose errors sum to the least under the
    budget: sum over layers of (kb + vb) == round(2 * budget * layers) (the average of key
    and value bits is the budget, up to the rounding of an odd total).

    ``exact`` (default) solves the choice exactly by dynamic programming over the spent bits
    (a multiple-choice knapsack: each layer's key and value is an item choosing one of its
    measured widths); otherwise the greedy marginal-gain steps of older versions (every
    entry starts at its smallest width, then the step buying the most error per bit)."""
    if not errors:
        raise ValueError("no layers to allocate bits to")
    key_c = sorted(errors[0].key)
    value_c = sorted(errors[0].value)
    for e in errors:
        if sorted(e.key) != key_c or sorted(e.value) != value_c:
            raise ValueError(f"layer {e.layer}: measured widths differ from layer "
                             f"{errors[0].layer}'s")
    _check_budget(budget, key_c, value_c)
    limit = int(round(2 * budget * len(errors)))
    if not exact:
        return _allocate_greedy(errors, limit, key_c, value_c)
    items = [(e.key, key_c) for e in errors] + [(e.value, value_c) for e in errors]
    lo = sum(min(c) for _, c in items)
    # best[t]: least error of the items so far spending t bits above their minimum
    inf = float("inf")
    best = [0.0]
    choice = []
    for table, cands in items:
        width = len(best) + max(cands) - min(cands)
        nxt, arg = [inf] * width, [0] * width
        for t, e0 in enumerate(best):
            if e0 == inf:
                continue
            for b in cands:
                u = t + b - min(cands)
                e = e0 + table[b]
                if e < nxt[u]:
                    nxt[u], arg[u] = e, b
        best = nxt
        choice.append(arg)
    t = limit - lo
    picks = []
    for (table, cands), arg in zip(reversed(items), reversed(choice)):
        b = arg[t]
        picks.append(b)
        t -= b - min(cands)
    picks.reverse()
    n = len(errors)
    return list(zip(picks[:n], picks[n:]))


def _allocate_greedy(errors, limit, key_c, value_c) -> list[tuple[int, int]]:
    kb = [min(key_c)] * len(errors)
    vb = [min(value_c)] * len(errors)
    spent = sum(kb) + sum(vb)

    def step(cands, cur):
        nxt = [b for b in cands if b > cur]
        return nxt[0] if nxt else None

    while True:
        best, best_gain = None, 0.0
        for j, e in enumerate(errors):
            for role, bits, cands, table in (("k", kb, key_c, e.key),
                                             ("v", vb, value_c, e.value)):
                nb = step(cands, bits[j])
                if nb is None or spent + nb - bits[j] > limit:
                    continue
                gain = (table[bits[j]] - table[nb]) / (nb - bits[j])
                if gain > best_gain:
                    best, best_gain = (role, j, nb), gain
        if best is None:
            break
        role, j, nb = best
        bits = kb if role == "k" else vb
        spent += nb - bits[j]
        bits[j] = nb
    return list(zip(kb, vb))


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
        from turboquant import calibrate_heads
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
        from turboquant import calibrate_heads
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
