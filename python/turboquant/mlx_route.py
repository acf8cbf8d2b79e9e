"""The attention route: mlx-lm's ``scaled_dot_product_attention`` sends the layers of
TurboQuant caches to attention on the codes.

How it plugs in. mlx-lm attention layers do ``k, v = cache.update_and_fetch(k, v)`` and then
call ``scaled_dot_product_attention(q, k, v, cache=cache, ...)`` from
``mlx_lm.models.base`` (bound into each model module by ``from .base import ...``). This
module wraps that function in every loaded mlx-lm model module: calls whose ``cache`` is a
:class:`TurboQuantKVCache` go to the C++ core (``turboquant._core.KVCache.attend``); every
other cache takes mlx-lm's own path, untouched. ``update_and_fetch`` encodes the new tokens
into codes and returns zero-memory NaN placeholders of the full K/V shape, so the cache never
holds an fp16 copy of K/V, and a model that bypassed the route would produce NaN, not
plausible garbage. The placeholders are checked by identity in the route, so a model that
transforms K/V after the cache (MLA, custom kernels) is refused with a clear error.
"""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx_lm.models import base as _mlx_base
from mlx_lm.models import cache as _mlx_cache

from turboquant.mlx_cache import TurboQuantKVCache

__all__ = ["UnsupportedArchitectureError", "install_attention_route"]


# Defined here, where attention refuses a model at run time; the up-front checks
# (turboquant.mlx_arch) build on the route, so they import it from here.
class UnsupportedArchitectureError(ValueError):
    """The model's attention cannot be served from a TurboQuant KV cache."""


def _turboquant_attention(queries, keys, values, cache, scale, mask, sinks=None):
    if sinks is not None:
        raise UnsupportedArchitectureError(
            "attention sinks (e.g. gpt-oss) are not supported by TurboQuantKVCache")
    fetched = cache._fetched
    if fetched is None or keys is not fetched[0] or values is not fetched[1]:
        raise UnsupportedArchitectureError(
            "this model transforms keys/values after the cache (e.g. multi-head latent "
            "attention); TurboQuantKVCache can only serve attention over the K/V it stored")
    if getattr(cache, "turboquant_batch", False):  # turboquant.mlx_batch: row by row
        return cache.attend_masked(queries, scale, mask)
    Tq = queries.shape[2]
    window = None
    if isinstance(mask, mx.array):
        window = cache.mask_window(mask, Tq)
    elif mask is not None and mask != "causal":
        raise NotImplementedError(f"unsupported attention mask {mask!r}")
    return cache.attend(queries, scale=scale, causal=True, window=window)


_original_sdpa = _mlx_base.scaled_dot_product_attention


def _routed_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    hook = getattr(cache, "tq_capture", None)
    if hook is not None:  # calibration (turboquant.calibrate): record, then run as usual
        hook(queries, keys, values, scale)
    if isinstance(cache, TurboQuantKVCache) or getattr(cache, "turboquant_batch", False):
        return _turboquant_attention(queries, keys, values, cache, scale, mask, sinks)
    return _original_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask,
                          sinks=sinks)


_routed_sdpa.__wrapped__ = _original_sdpa  # type: ignore[attr-defined]


def install_attention_route() -> int:
    """Route ``scaled_dot_product_attention`` of every loaded mlx-lm model module (and of
    modules imported later, through ``mlx_lm.models.base``) via TurboQuant for our caches.
    Idempotent; returns the number of modules patched by this call."""
    patched = 0
    if _mlx_base.scaled_dot_product_attention is _original_sdpa:
        _mlx_base.scaled_dot_product_attention = _routed_sdpa
        patched += 1
    for name, mod in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and mod is not None and \
                getattr(mod, "scaled_dot_product_attention", None) is _original_sdpa:
            mod.scaled_dot_product_attention = _routed_sdpa
            patched += 1
    # load_prompt_cache() looks cache classes up by name in mlx_lm.models.cache (the sliding
    # one registers itself on import).
    _mlx_cache.TurboQuantKVCache = TurboQuantKVCache
    import turboquant.mlx_rotating  # noqa: F401
    return patched
