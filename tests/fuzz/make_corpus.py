"""Writes the seed corpora of the libFuzzer targets under tests/fuzz/corpus/<target>/.

    PYTHONPATH=python python tests/fuzz/make_corpus.py

Small valid inputs (a few hundred bytes to a few KB) so that mutations start from real
structure: saved caches of several shapes (each as its legacy file, versions 1-7, and as the
version-8 section container, *_v8), and rotation parameter blobs. Files named
regression_* (well-formed files of a configuration the loader refuses, checked by
tests/python/test_reliability.py) and finding_* (other inputs that crashed a sanitizer
build, CRCs recomputed) are inputs the fuzzers found (kept by hand; this script leaves
them alone).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from turboquant import _core

ROOT = Path(__file__).resolve().parent / "corpus"


def caches():
    rng = np.random.default_rng(0)
    out = {}
    configs = {
        "empty_d16": dict(head_dim=16),
        "hadamard_d16_t3": dict(head_dim=16, key_bits=2, value_bits=1, rotation="hadamard", _tokens=3),
        "dense_d16_t2": dict(head_dim=16, key_bits=3, value_bits=2, rotation="dense", _tokens=2),
        "gqa_2layers": dict(head_dim=16, n_layers=2, n_q_heads=4, n_kv_heads=2, block_tokens=2, _tokens=3),
        "bits8_max_tokens": dict(head_dim=16, key_bits=8, value_bits=8, max_tokens=10, seed=2**64 - 1, _tokens=1),
        "bits1_block1": dict(head_dim=32, key_bits=1, value_bits=1, block_tokens=1, _tokens=4),
        # outlier split: 8-bit part angles (format v4) and 16-bit ones on keys only (v3)
        "split_a8_d16": dict(head_dim=16, n_outlier_channels=4, block_tokens=2, _tokens=3),
        "split_a16_keys_d16": dict(head_dim=16, n_outlier_channels=4, outlier_roles="keys",
                                   split_angle_bits=16, block_tokens=2, _tokens=3),
        # per-KV-head widths (v5), and per layer and KV head (v6)
        "head_bits_v5": dict(head_dim=16, n_q_heads=2, n_kv_heads=2, key_head_bits=[2, 4],
                             value_head_bits=[3, 1], block_tokens=2, _tokens=3),
        "per_layer_head_bits_v6": dict(head_dim=16, n_layers=2, n_q_heads=2, n_kv_heads=1,
                                       key_head_bits=[2, 4], value_head_bits=[3], block_tokens=2,
                                       _tokens=3),
        # importance-routed mixed precision (v7): masks, block flags, window importance
        "mixed_v7": dict(head_dim=16, n_q_heads=2, n_kv_heads=1, key_bits=3, value_bits=2,
                         decay_bits=1, fp16_window=2, fp16_sinks=1, block_tokens=2,
                         mixed_group_blocks=2, mixed_keep_blocks=1, _tokens=8),
    }
    for name, cfg in configs.items():
        cfg = dict(cfg)
        tokens = cfg.pop("_tokens", 0)
        c = _core.KVCache(**cfg)
        if tokens:
            for layer in range(c.n_layers):
                x = rng.standard_normal((c.n_kv_heads, tokens, c.head_dim)).astype(np.float32)
                c.append(x, x[::-1].copy(), layer)
                if c.mixed_group_blocks:  # rated by a query, then flushed by the next append
                    c.attend(rng.standard_normal((c.n_q_heads, 1, c.head_dim)).astype(np.float32), layer)
                    c.append(x[:, :1].copy(), x[:, 1:2].copy(), layer)
        out[name] = c.to_bytes(legacy=True)  # versions 1-7, as older libraries wrote
        out[f"{name}_v8"] = c.to_bytes()  # the section container
    return out


def rotations():
    out = {}
    for dim_index, dim in ((2, 4), (4, 16)):
        c = _core.KVCache(max(dim, 16), rotation="hadamard")
        _, hp = c.rotation_parameters(0, 0, "key")
        q = _core.Quantizer("turboquant_mse", dim=16, bits=2, rotation="dense")
        dp = np.asarray(q.rotation_parameters(), np.float32)
        if dim == 16:
            out["hadamard_d16"] = bytes([2, dim_index]) + np.asarray(hp, np.float32).tobytes()
            out["dense_d16"] = bytes([1, dim_index]) + dp.tobytes()
        else:
            out["hadamard_d4"] = bytes([2, dim_index]) + np.array([1, -1, 1, 1, -1, 1, 1, -1], np.float32).tobytes()
            out["dense_d4_identity"] = bytes([1, dim_index]) + np.eye(4, dtype=np.float32).tobytes()
    out["dense_d2_rot90"] = bytes([1, 0]) + struct.pack("<4f", 0, -1, 1, 0)
    return out


def main() -> None:
    for target, files in (("fuzz_cache_load", caches()), ("fuzz_rotation_params", rotations())):
        d = ROOT / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        print(f"{d}: {len(files)} files, {sum(len(v) for v in files.values())} bytes")


if __name__ == "__main__":
    main()
