"""Per-layer bit allocation for the mlx-lm cache under an average-bit budget.

For each layer and each candidate bit width, calibration measures the damage done by
quantizing only that layer's keys, or only its values, with the very cache the model will
use (:class:`turboquant.mlx_lm.TurboQuantKVCache`: centring, norm correction, key split).
Two metrics:

* ``kl`` (default): the model runs over the text with every other layer in fp16, and the
  error is the mean KL divergence of its next-token distributions from the fp16 run's. It
  sees what the layer's error does downstream (on small models keys matter several times
  more than values at the same attention-output error). Measured at 3 bits (two forward
  passes per layer); other bit widths scale it by the layer's attention-output error curve.
* ``attention``: from one recorded fp16 pass (every layer's queries, keys, values), the
  relative error of the layer's attention output alone,
  ``||attn(Q, K~_b, V) - attn(Q, K, V)||^2 / ||attn(Q, K, V)||^2`` (likewise V). Much
  faster; blind to how the error propagates.

Bits are then allocated greedily: every layer starts at the smallest candidate; the step
that buys the largest error reduction per added bit (a key or value of one layer going up to
its next candidate) is taken until the average of key and value bits over the compressed
layers reaches the budget. The errors of different layers are weighted equally. The result
is a JSON profile that :func:`turboquant.mlx_lm.make_prompt_cache` accepts (``profile=``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from turboquant import mlx_lm as tq_mlx
from turboquant.mlx_eval import _log_softmax

KEY_CANDIDATES = (2, 3, 4, 5, 6)
VALUE_CANDIDATES = (2, 3, 4, 5)


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


def _attend_error(model_pairs, q, k, v, scale, ref, key_bits, value_bits, seed, layer):
    c = tq_mlx.TurboQuantKVCache(key_bits=key_bits, value_bits=value_bits, seed=seed,
                                 layer=layer, rope_pairs=model_pairs)
    c.update_and_fetch(k, v)
    out = np.array(c.attend(q, scale=scale).astype(mx.float32))
    return float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))


@dataclass
class LayerErrors:
    layer: int
    key: dict[int, float]
    value: dict[int, float]


def layer_errors(model, captured: dict[int, tuple], seed: int = 0, progress=None
                 ) -> list[LayerErrors]:
    pairs = tq_mlx.rope_pairs_of(model)
    out = []
    layers = sorted(captured)
    it = progress(layers) if progress else layers
    for i in it:
        q, k, v, scale = captured[i]
        q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
        ref = np.array(mx.fast.scaled_dot_product_attention(q32, k32, v32, scale=scale,
                                                            mask="causal"))
        ke = {b: _attend_error(pairs, q32, k32, v32, scale, ref, b, 8, seed, i)
              for b in KEY_CANDIDATES}
        ve = {b: _attend_error(pairs, q32, k32, v32, scale, ref, 8, b, seed, i)
              for b in VALUE_CANDIDATES}
        out.append(LayerErrors(i, ke, ve))
    return out


def _log_probs(logits) -> np.ndarray:
    return _log_softmax(np.array(logits[0].astype(mx.float32), dtype=np.float64))


def _mean_kl(ref_logp: np.ndarray, logits) -> float:
    lp = _log_probs(logits)
    return float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - lp), -1)))


def layer_errors_kl(model, tokens: list[int], seed: int = 0, progress=None,
                    reference_bits: int = 3) -> list[LayerErrors]:
    """Next-token KL vs fp16 with one layer's keys (or values) quantized at a time.

    The KL is measured at ``reference_bits`` (two forward passes per layer); its dependence
    on the bit width is taken from the attention-output errors of the same layer
    (:func:`layer_errors`), i.e. KL_l(b) ~= KL_l(ref) * e_l(b) / e_l(ref)."""
    tq_mlx.install_attention_route()
    pairs = tq_mlx.rope_pairs_of(model)
    x = mx.array(tokens)[None]
    captured = capture(model, tokens)
    ref_logp = _log_probs(model(x, cache=mlx_cache.make_prompt_cache(model)))
    out = []
    layers = sorted(captured)
    it = progress(layers) if progress else layers
    for i in it:
        shape = layer_errors(model, {i: captured[i]}, seed)[0]
        scaled = {}
        for role, table in (("key", shape.key), ("value", shape.value)):
            cache = mlx_cache.make_prompt_cache(model)
            kb, vb = (reference_bits, 8) if role == "key" else (8, reference_bits)
            cache[i] = tq_mlx.TurboQuantKVCache(key_bits=kb, value_bits=vb, seed=seed,
                                                layer=i, rope_pairs=pairs)
            kl = _mean_kl(ref_logp, model(x, cache=cache))
            at_ref = max(table[reference_bits], 1e-30)
            scaled[role] = {b: kl * e / at_ref for b, e in table.items()}
        out.append(LayerErrors(i, scaled["key"], scaled["value"]))
    return out


def _check_budget(budget: float) -> None:
    lo = (min(KEY_CANDIDATES) + min(VALUE_CANDIDATES)) / 2
    hi = (max(KEY_CANDIDATES) + max(VALUE_CANDIDATES)) / 2
    if not lo <= budget <= hi:
        raise ValueError(f"budget must be in [{lo}, {hi}] average bits, got {budget}")


def allocate(errors: list[LayerErrors], budget: float) -> list[tuple[int, int]]:
    """(key_bits, value_bits) per entry of ``errors``: average (kb + vb) / 2 <= budget."""
    _check_budget(budget)
    kb = [min(KEY_CANDIDATES)] * len(errors)
    vb = [min(VALUE_CANDIDATES)] * len(errors)
    spent = sum(kb) + sum(vb)
    limit = int(round(2 * budget * len(errors)))

    def step(cands, cur):
        nxt = [b for b in cands if b > cur]
        return nxt[0] if nxt else None

    while True:
        best, best_gain = None, 0.0
        for j, e in enumerate(errors):
            for role, bits, cands, table in (("k", kb, KEY_CANDIDATES, e.key),
                                             ("v", vb, VALUE_CANDIDATES, e.value)):
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
              log=print, metric: str = "kl") -> dict:
    """The profile dict for ``model`` calibrated on ``tokens``."""
    if metric not in ("kl", "attention"):
        raise ValueError(f"metric must be 'kl' or 'attention', got {metric!r}")
    _check_budget(budget)
    t0 = time.perf_counter()
    if metric == "kl":
        errors = layer_errors_kl(model, tokens, seed, progress)
    else:
        captured = capture(model, tokens)
        log(f"captured {len(captured)} layers over {len(tokens)} tokens "
            f"({time.perf_counter() - t0:.1f}s)")
        errors = layer_errors(model, captured, seed, progress)
    bits = allocate(errors, budget)
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
    return {"format": tq_mlx.PROFILE_FORMAT, "version": 1, "budget": budget, "metric": metric,
            "average_bits": avg, "tokens": len(tokens), "seed": seed,
            "errors": {str(e.layer): {"key": e.key, "value": e.value} for e in errors},
            "layers": layers}


def save(profile: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
