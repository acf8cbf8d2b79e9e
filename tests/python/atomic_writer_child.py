"""A writer for the kill tests of test_atomic.py: saves versions of a cache in a loop.

    python atomic_writer_child.py core|prompt PATH START

prints "ready" once the first save is complete, then saves version START+1, START+2, ...
(modulo VERSIONS) until it is killed."""

from __future__ import annotations

import sys

import numpy as np

VERSIONS = 3


def core_version(v: int):
    """A C++ KVCache of ~3.4 MB (2 layers, 4 KV heads, 8192 tokens, 3 bits), saved by the
    core's own KVCache.save."""
    from turboquant import _core

    kv = _core.KVCache(64, n_layers=2, n_q_heads=8, n_kv_heads=4, key_method="turboquant_mse",
                       key_bits=3, value_method="turboquant_mse", value_bits=3, seed=v)
    x = np.random.default_rng(v).standard_normal((4, 8192, 64)).astype(np.float32)
    for layer in range(2):
        kv.append(x, x, layer)
    return kv


def prompt_version(v: int):
    """An mlx-lm prompt cache of two TurboQuant layers (512 tokens), saved by
    turboquant.prompt_cache.save_prompt_cache."""
    import mlx.core as mx
    from turboquant.mlx_lm import TurboQuantKVCache

    rng = np.random.default_rng(100 + v)
    cache = []
    for layer in range(2):
        c = TurboQuantKVCache(3, 3, layer=layer)
        k, v_ = (mx.array(rng.standard_normal((1, 4, 512, 64)).astype(np.float16))
                 for _ in range(2))
        c.update_and_fetch(k, v_)
        c.attend(mx.zeros((1, 8, 1, 64), mx.float16), scale=0.125)
        cache.append(c)
    return cache


def save(kind: str, obj, path: str) -> None:
    if kind == "core":
        obj.save(path)
    else:
        from turboquant.prompt_cache import save_prompt_cache

        save_prompt_cache(path, obj)


def main(kind: str, path: str, start: int) -> None:
    make = core_version if kind == "core" else prompt_version
    versions = [make(v) for v in range(VERSIONS)]
    i = start
    save(kind, versions[i % VERSIONS], path)
    print("ready", flush=True)
    while True:
        i += 1
        save(kind, versions[i % VERSIONS], path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
