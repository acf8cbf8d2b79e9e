"""What the per-layer (:mod:`turboquant.calibrate`) and per-head
(:mod:`turboquant.calibrate_heads`) calibrations share: the fp16 capture of a prefill, the
:class:`Scoring` of the calibration text, the attention output through the mlx-lm cache, the
``hybrid`` scaling of attention errors to KL units, and the exact bit allocation.

Both calibrations import this module and neither imports the other's internals:
``calibrate`` (the entry point, which dispatches ``granularity="head"``) depends on
``calibrate_heads``, and both depend on this module. ``turboquant.calibrate`` re-exports the
public names here, so ``calibrate.allocate``, ``calibrate.Scoring`` etc. keep working.
"""

from __future__ import annotations

import dataclasses
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


def reference_attention(layer_capture: tuple, scoring: Scoring | None = None):
    """(q, k, v as float32 mlx arrays, scale, the fp32 causal attention output as NumPy):
    of one captured layer; with ``scoring``, the output of the queries after its prefix."""
    q, k, v, scale = layer_capture
    q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
    ref = np.array(mx.fast.scaled_dot_product_attention(q32, k32, v32, scale=scale, mask="causal"))
    if scoring is not None:
        ref = ref[:, :, scoring.prefix:]
    return q32, k32, v32, scale, ref


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


def role_scaled_errors(model, tokens: list[int], errors: list, scoring: Scoring,
                       seed: int = 0, reference_bits=(2, 3, 4)) -> tuple[list, dict]:
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


def allocate(errors: list, budget: float, exact: bool = True) -> list[tuple[int, int]]:
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
