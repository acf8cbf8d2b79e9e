"""Memory of a preset's cache, counted by the cache itself (``python -m turboquant info
--preset NAME``): a layer of :class:`turboquant.mlx_lm.TurboQuantKVCache` filled the way
generation fills it. Apart from :mod:`turboquant.presets` so that the recipes do not import
the mlx-lm cache that applies them."""

from __future__ import annotations

import numpy as np

from turboquant.presets import Preset


def memory_bytes(p: Preset, shape: tuple[int, int, int, int], tokens: int,
                 chunk: int = 2048, seed: int = 0) -> int:
    """Bytes of a whole model's cache with preset ``p`` holding ``tokens`` tokens, counted by
    the cache itself (``TurboQuantKVCache.nbytes``: codes, norms, part angles, rotations,
    fp16 sinks and window, mixed-precision masks, page slack). One layer is filled with
    Gaussian K/V the way generation fills it: a prompt of ``tokens - 1`` tokens in
    ``chunk``-token steps (mlx-lm's prefill step), then one decode step, each followed by
    one attention query (which rates the tokens for mixed precision); every layer of a
    model holds the same configuration, so the layer's bytes count ``layers`` times. Mixed
    precision is counted routed on every layer (the trial's uniform layers hold less)."""
    import mlx.core as mx

    from turboquant.mlx_lm import TurboQuantKVCache

    layers, n_q, n_kv, d = shape
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2 (a prompt and one decode step), got {tokens}")
    # The routed layout (mixed_trial off): a layer that the trial leaves uniform holds the
    # same code bits without the kept-token masks, so this is the larger of the two.
    # (the ring_* settings concern sliding-window layers only: these are full-attention ones.)
    kwargs = {k: v for k, v in p.cache_kwargs().items() if not k.startswith("ring_")}
    kwargs["mixed_trial"] = False
    cache = TurboQuantKVCache(layer=0, seed=seed, rope_pairs="half", **kwargs)
    rng = np.random.default_rng(seed)
    steps = [min(chunk, tokens - 1 - i) for i in range(0, tokens - 1, chunk)] + [1]
    for t in steps:
        k = mx.array(rng.standard_normal((1, n_kv, t, d), dtype=np.float32))
        v = mx.array(rng.standard_normal((1, n_kv, t, d), dtype=np.float32))
        cache.update_and_fetch(k, v)
        q = mx.array(rng.standard_normal((1, n_q, 1, d), dtype=np.float32))
        mx.eval(cache.attend(q, scale=d ** -0.5))
    return layers * int(cache.nbytes)
