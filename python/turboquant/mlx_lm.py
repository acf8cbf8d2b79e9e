"""mlx-lm integration: a TurboQuant prompt cache that runs attention on the compressed codes.

    from mlx_lm import load, generate
    from turboquant.mlx_lm import make_prompt_cache
    model, tokenizer = load("path/to/model")
    cache = make_prompt_cache(model)  # the tq3 preset; preset="tq3-mixed", key_bits=4, ...
    generate(model, tokenizer, prompt, prompt_cache=cache)

The integration is a few small modules, each re-exported here: :mod:`turboquant.mlx_cache`
(the layer cache :class:`TurboQuantKVCache`), :mod:`turboquant.mlx_route` (the attention
route, :func:`install_attention_route`), :mod:`turboquant.mlx_arch` (architecture checks,
sharded models' spans), :mod:`turboquant.profile` (calibration profiles),
:mod:`turboquant.mlx_rotating` (sliding-window layers) and :mod:`turboquant.mlx_batch`
(continuous batching). This module builds a model's prompt cache from them
(:func:`make_prompt_cache`, :func:`to_turbo_quantized`); importing it installs the route,
which also registers the cache classes by name in ``mlx_lm.models.cache``, where mlx-lm's
prompt-cache loading looks them up.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from mlx_lm.models import cache as _mlx_cache

from turboquant import presets as _presets
from turboquant.mlx_arch import (
    _KV_HEAD_NAMES,
    _local_kv_heads,
    _model_type,
    check_architecture,
    pipeline_span,
    rope_pairs_of,
    tensor_parallel_span,
)
from turboquant.mlx_cache import TurboQuantKVCache, _check_kv_head_offset, layer_seed, mixed_blocks
from turboquant.mlx_route import UnsupportedArchitectureError, install_attention_route
from turboquant.profile import PROFILE_FORMAT, load_profile

__all__ = [
    "PROFILE_FORMAT",
    "RECIPE_KEYWORDS",
    "TurboQuantKVCache",
    "UnsupportedArchitectureError",
    "check_architecture",
    "install_attention_route",
    "layer_seed",
    "load_profile",
    "make_prompt_cache",
    "mixed_blocks",
    "pipeline_span",
    "rope_pairs_of",
    "tensor_parallel_span",
    "to_turbo_quantized",
]


def _normalise_layers(layers: Iterable[int], n: int) -> set[int]:
    out = set()
    for i in layers:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise ValueError(f"fp16 layer index {i} out of range for a {n}-layer model")
        out.add(j)
    return out


# The recipe keywords of make_prompt_cache: each given (not None) overrides the recipe's
# value. The settings of a recipe (turboquant.presets.Preset, documented there) besides its
# bits, and the two settings no recipe fixes: a method per role and the rotation.
RECIPE_KEYWORDS = tuple(f for f in _presets.SETTINGS if f not in ("key_bits", "value_bits")) + (
    "key_method", "value_method", "rotation")


def make_prompt_cache(model, key_bits: int | None = None, value_bits: int | None = None, *,
                      preset: str | None = None, fp16_layers: Iterable[int] = (),
                      profile=None, sliding: bool = True, seed: int = 0,
                      kv_head_offset: int | None = None, **recipe) -> list:
    """mlx-lm prompt cache with TurboQuant caches on every full-attention layer and (with
    ``sliding``, the default) every sliding-window layer.

    **The recipe.** ``preset`` names a recipe of :mod:`turboquant.presets` (``tq4``,
    ``tq3``, ``tq3-mixed``, ``tq2.5``, ``tq2``, ``codes-only``); without one,
    ``key_bits`` / ``value_bits`` select the recommended recipe at those bits and neither
    gives ``tq3`` (3-bit codes, 4 fp16 sinks, a 64-token fp16 window, one random-sign
    Hadamard round; sliding-window rings at 4 bits with an 8-token fp16 window). Any setting
    of a recipe can be overridden by keyword (``RECIPE_KEYWORDS``, each documented on
    :class:`turboquant.presets.Preset`): ``method``, ``center``, ``debias``,
    ``key_split``, ``split_angle_bits``, ``fp16_sinks``, ``fp16_window``, ``block_tokens``,
    ``mixed_bits``, ``mixed_keep``, ``mixed_trial``, ``decay_after``, ``decay_bits``,
    ``sparse_v``, ``ring_extra_bits``, ``ring_window``, ``ring_block_tokens``; plus ``key_method`` /
    ``value_method`` (a method per role) and ``rotation`` (``"hadamard1"``,
    ``"hadamard"``, ``"dense"`` or ``"auto"``; None: :func:`turboquant.presets.default_rotation`).
    A keyword given as None keeps the recipe's value; an unknown one is a TypeError
    naming it. ``preset="codes-only"`` gives codes for every token.

    **The model.** ``fp16_layers`` (indices, negative from the end) keep mlx-lm's fp16
    caches. ``profile`` (a path or dict from ``python -m turboquant calibrate``) sets
    per-layer key/value bits and fp16 layers, overriding ``key_bits`` / ``value_bits``; a
    layer's bits may be a list with one width per KV head (``calibrate --granularity
    head``), held by the C++ core's per-head widths. Sliding-window layers (mlx-lm
    ``RotatingKVCache``) get a :class:`turboquant.mlx_rotating.TurboQuantRotatingKVCache`
    (a bounded ring of code pages; ``fp16_sinks`` and mixed precision apply to
    full-attention layers only: with mixed precision a ring holds uniform codes of the
    recipe's average width, :meth:`turboquant.presets.Preset.uniform_bits`, their key /
    value split chosen by a trial on the prompt when ``mixed_trial``);
    ``sliding=False`` keeps them fp16. ``seed`` seeds every layer's rotations (each layer
    its own, :func:`layer_seed`). Raises :class:`UnsupportedArchitectureError` for MLA and
    SSM/hybrid models.

    **Sharded models** (``mlx_lm.utils.sharded_load``, :mod:`turboquant.distributed`): a
    pipeline stage's caches take the model's layer numbers; on a tensor-parallel rank r of
    n (:func:`tensor_parallel_span`) each layer's cache holds the rank's KV heads
    [r·H/n, (r+1)·H/n) and gets ``kv_head_offset`` r·H/n, so its heads draw the random
    streams of the model's heads and encode exactly as in one process (a profile's
    per-KV-head widths are cut to the rank's heads). ``kv_head_offset`` given: every
    layer's caches start at that model head instead (e.g. a slice of the heads sharded
    some other way)."""
    unknown = sorted(set(recipe) - set(RECIPE_KEYWORDS))
    if unknown:
        raise TypeError(f"make_prompt_cache() got unexpected keyword argument(s) "
                        f"{', '.join(unknown)}; the recipe keywords are "
                        f"{', '.join(RECIPE_KEYWORDS)}")
    key_method, value_method, rotation = (recipe.pop(k, None) for k in
                                          ("key_method", "value_method", "rotation"))
    p = _presets.resolve(preset, key_bits, value_bits, **recipe)
    if not (isinstance(p.ring_extra_bits, int) and 0 <= p.ring_extra_bits <= 6):
        raise ValueError(f"ring_extra_bits must be an integer in [0, 6] (extra bits of the "
                         f"sliding-window rings' codes), got {p.ring_extra_bits!r}")
    for name, low, what in (("ring_window", 0, "fp16 window"), ("ring_block_tokens", 1, "block")):
        v = getattr(p, name)
        if v is not None and not (isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                  and v >= low):
            raise ValueError(f"{name} must be None or an integer >= {low} (the sliding-window "
                             f"rings' {what} in tokens), got {v!r}")
    key_bits, value_bits, method, center, debias = (p.key_bits, p.value_bits, p.method,
                                                     p.center, p.debias)
    key_split, fp16_window, block_tokens, fp16_sinks = (p.key_split, p.fp16_window,
                                                        p.block_tokens, p.fp16_sinks)
    split_angle_bits, decay_after, decay_bits, sparse_v = (p.split_angle_bits, p.decay_after,
                                                           p.decay_bits, p.sparse_v)
    mixed_bits, mixed_keep, mixed_trial = p.mixed_bits, p.mixed_keep, p.mixed_trial
    install_attention_route()
    base_cache = _mlx_cache.make_prompt_cache(model)
    compressible = check_architecture(model, base_cache)
    # A pipeline stage (mlx_lm.utils.sharded_load) holds the model's layers [first,
    # first + len(base_cache)): fp16_layers, profiles and the layers' random streams use the
    # model's layer numbers, so a stage's codes are those of a single-process run.
    first, n_model = pipeline_span(model, len(base_cache))
    keep = {i - first for i in _normalise_layers(fp16_layers, n_model)
            if first <= i < first + len(base_cache)}
    per_layer = {}
    if profile is not None:
        profile = load_profile(profile)
        if len(profile["layers"]) != n_model:
            raise ValueError(f"profile has {len(profile['layers'])} layers, the model "
                             f"{n_model}")
        for i, e in enumerate(profile["layers"][first:first + len(base_cache)]):
            if e.get("fp16"):
                keep.add(i)
            else:
                per_layer[i] = (e["key_bits"], e["value_bits"])
    tp_rank, tp_size = tensor_parallel_span(model)
    pairs = rope_pairs_of(model)
    cache = list(base_cache)
    from turboquant.mlx_rotating import TurboQuantRotatingKVCache
    slides = [i for i, c in enumerate(base_cache) if sliding and
              type(c) is _mlx_cache.RotatingKVCache]
    if not set(compressible + slides) - keep:
        raise UnsupportedArchitectureError(
            f"{_model_type(model)}: no layer left to compress (fp16_layers / profile cover "
            f"every full-attention layer{'' if sliding else ' and sliding=False'})")
    for i in sorted(compressible + slides):
        if i not in keep:
            kb, vb = per_layer.get(i, (key_bits, value_bits))
            offset = _kv_head_offset(model, i, kv_head_offset, tp_rank, tp_size)
            kb, vb = (_rank_head_bits(model, i, b, offset, tp_size) for b in (kb, vb))
            heads = {}
            if isinstance(kb, list):  # per-KV-head widths; key_bits: their rounded mean
                heads["key_head_bits"], kb = kb, int(round(float(np.mean(kb))))
            if isinstance(vb, list):
                heads["value_head_bits"], vb = vb, int(round(float(np.mean(vb))))
            cls, extra, mb, mk, fs = TurboQuantKVCache, {}, mixed_bits, mixed_keep, fp16_sinks
            if i in slides:  # a bounded ring: no sinks, codes in position order
                cls, extra = TurboQuantRotatingKVCache, {"max_size": base_cache[i].max_size,
                                                         "keep": base_cache[i].keep}
                mb, mk, fs = 0, 0.0, 0
                if mixed_bits and i not in per_layer:
                    # no mixed precision in a ring: uniform codes of the same average width
                    # (tq3-mixed: 3 / 3 bits), not the recipe's kept width for every token,
                    # in the ring's own blocks (a mixed recipe's block sizes its groups)
                    kb, vb = p.uniform_bits()
                    extra["block_tokens"] = None
                if p.ring_extra_bits and i not in per_layer and not heads:
                    kb, vb = (min(8, b + p.ring_extra_bits) for b in (kb, vb))
                if p.ring_block_tokens is not None:
                    extra["block_tokens"] = int(p.ring_block_tokens)
                if p.ring_window is not None and fp16_window:
                    # resizes the recipe's window: a recipe without one (fp16_window=0)
                    # keeps its rings without fp16 rows too
                    extra["fp16_window"] = int(p.ring_window)
            cache[i] = cls(key_bits=int(kb), value_bits=int(vb), method=method,
                                         key_method=key_method, value_method=value_method,
                                         seed=seed, layer=first + i, rotation=rotation,
                                         center=center,
                                         debias=debias, key_split=key_split, rope_pairs=pairs,
                                         fp16_window=extra.pop("fp16_window", fp16_window),
                                         block_tokens=extra.pop("block_tokens", block_tokens),
                                         fp16_sinks=fs, decay_after=decay_after,
                                         decay_bits=decay_bits, sparse_v=sparse_v,
                                         mixed_bits=mb, mixed_keep=mk,
                                         mixed_trial=mixed_trial and bool(mb),
                                         width_trial=mixed_trial and i not in per_layer,
                                         split_angle_bits=split_angle_bits,
                                         kv_head_offset=offset, **heads, **extra)
    return cache


def _kv_head_offset(model, i: int, given: int | None, rank: int, size: int) -> int:
    """Layer ``i``'s kv_head_offset: ``given``, else on rank ``rank`` of a tensor-parallel
    group of ``size`` the rank's first KV head rank·H_r (H_r: the layer's KV heads on the
    rank; mlx-lm shards them evenly), else 0."""
    if given is not None:
        return _check_kv_head_offset(given)
    if size <= 1:
        return 0
    h = _local_kv_heads(model, i)
    if h is None:
        raise UnsupportedArchitectureError(
            f"{_model_type(model)}: tensor-parallel rank {rank} of {size}, but layer {i}'s "
            f"attention does not say how many KV heads it holds ({' / '.join(_KV_HEAD_NAMES)})"
            "; pass kv_head_offset= (the model's number of the rank's first KV head)")
    return _check_kv_head_offset(rank * h)


def _rank_head_bits(model, i: int, bits, offset: int, size: int):
    """A profile's per-KV-head widths of layer ``i`` cut to the KV heads this rank of a
    tensor-parallel group of ``size`` holds (a list of one width per model head); anything
    else as given."""
    if not isinstance(bits, list) or size <= 1:
        return bits
    h = _local_kv_heads(model, i)
    if h is not None and len(bits) == h * size:
        return bits[offset:offset + h]
    return bits


def to_turbo_quantized(cache, key_bits: int = 3, value_bits: int = 3,
                       method: str = "turboquant_mse", seed: int = 0, layer: int = 0,
                       n_q_heads: int | None = None, **kwargs):
    """Convert an mlx-lm ``KVCache`` (or a list of caches) into TurboQuant caches.

    A list converts its ``KVCache`` entries (layer index = list position) and keeps the rest.
    With ``n_q_heads`` the tokens are encoded at once; otherwise at the first attention call
    (the head count of the queries is needed to build the compressed cache)."""
    install_attention_route()
    if isinstance(cache, (list, tuple)):
        return [to_turbo_quantized(c, key_bits, value_bits, method, seed, i, n_q_heads, **kwargs)
                if type(c) is _mlx_cache.KVCache else c for i, c in enumerate(cache)]
    if isinstance(cache, TurboQuantKVCache):
        return cache
    if type(cache) is not _mlx_cache.KVCache:
        raise TypeError(f"to_turbo_quantized converts mlx_lm KVCache, got {type(cache).__name__}")
    out = TurboQuantKVCache(key_bits=key_bits, value_bits=value_bits, method=method, seed=seed,
                            layer=layer, **kwargs)
    out.fill_from(cache, n_q_heads)
    return out


install_attention_route()
