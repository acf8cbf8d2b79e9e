"""Writes the cache-file fixtures of tests/python/test_file_format.py: one small saved cache per
file-format version the library has written (1-7: the version is the oldest one that
expressed the cache's features), with what it must load to (.npz: every stream's decoded rows,
sizes, and the attention output of fixed queries).

    PYTHONPATH=python python tests/data/cache_files/make_fixtures.py

They were written by the library at format version 7 and are kept as they are: a later
library must load every one of them to the same cache. Re-running this script with a later
library writes that library's format instead (the test then checks those too, but the
committed v1-v7 files are the point: do not regenerate them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from turboquant import _core

HERE = Path(__file__).resolve().parent
D = 32

# name -> (config, tokens appended in two calls, attention calls made before saving)
FIXTURES = {
    "v1_plain": dict(n_layers=2, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=2,
                     block_tokens=4, rotation="hadamard"),
    "v1_dense_prod": dict(n_layers=1, n_q_heads=2, n_kv_heads=1, key_method="turboquant_prod",
                          key_bits=3, value_bits=4, rotation="dense", block_tokens=8),
    "v2_window": dict(n_layers=2, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3,
                      block_tokens=4, fp16_window=6),
    "v3_sinks_decay": dict(n_layers=1, n_q_heads=2, n_kv_heads=2, key_bits=4, value_bits=3,
                           block_tokens=4, fp16_sinks=2, fp16_window=4, decay_after=8,
                           decay_bits=2, norm_correction=True),
    "v3_split_a16": dict(n_layers=1, n_q_heads=2, n_kv_heads=1, key_bits=2, value_bits=3,
                         n_outlier_channels=D // 2, outlier_bits=4, outlier_roles="keys",
                         split_angle_bits=16, block_tokens=4),
    "v4_split_a8": dict(n_layers=1, n_q_heads=2, n_kv_heads=1, key_bits=2, value_bits=3,
                        n_outlier_channels=D // 2, outlier_bits=4, outlier_roles="keys",
                        split_angle_bits=8, block_tokens=4, norm_correction=True),
    "v5_head_bits": dict(n_layers=2, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=3,
                         key_head_bits=[2, 4], value_head_bits=[3, 2], block_tokens=4),
    "v6_layer_head_bits": dict(n_layers=2, n_q_heads=2, n_kv_heads=2, key_bits=3, value_bits=3,
                               key_head_bits=[2, 3, 4, 3], block_tokens=4),
    "v7_mixed": dict(n_layers=1, n_q_heads=4, n_kv_heads=2, key_bits=4, value_bits=4,
                     block_tokens=4, fp16_window=4, fp16_sinks=1, decay_bits=2,
                     mixed_group_blocks=2, mixed_keep_blocks=1),
}


def tokens(rng, heads, n):
    return rng.standard_normal((heads, n, D)).astype(np.float32)


def build(name: str, cfg: dict, seed: int):
    rng = np.random.default_rng(seed)
    cache = _core.KVCache(D, seed=seed, **cfg)
    hkv, hq = cfg["n_kv_heads"], cfg["n_q_heads"]
    for n in (13, 6):
        for layer in range(cfg["n_layers"]):
            cache.append(tokens(rng, hkv, n), tokens(rng, hkv, n), layer)
            # an attention call rates the window (mixed precision flushes rated tokens)
            cache.attend(tokens(rng, hq, 1), layer)
    return cache


def expected(cache) -> dict:
    """What a file must load to: sizes, every stream's decoded rows, attention outputs."""
    out = {}
    rng = np.random.default_rng(99)
    for layer in range(cache.n_layers):
        out[f"size_{layer}"] = np.array(cache.size(layer))
        for h in range(cache.n_kv_heads):
            for role in ("key", "value"):
                out[f"rows_{layer}_{h}_{role}"] = cache.decode(layer, h, role)
        q = rng.standard_normal((cache.n_q_heads, 1, D)).astype(np.float32)
        out[f"query_{layer}"] = q
        out[f"attend_{layer}"] = cache.attend(q, layer)
    return out


def main() -> None:
    for i, (name, cfg) in enumerate(FIXTURES.items()):
        cache = build(name, cfg, seed=i + 1)
        want = int(name[1])
        assert cache.format_version == want, (name, cache.format_version)
        path = HERE / f"{name}.tqkv"
        cache.save(str(path))
        np.savez(HERE / f"{name}.npz", **expected(_core.KVCache.load(str(path))))
        print(f"{path.name}: format v{cache.format_version}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
