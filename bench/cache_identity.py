"""Fingerprints of KVCache behaviour over a grid of configurations, to compare two builds.

For every configuration the script appends, attends (decode, prefill, sliding window,
sparse V, visible sinks), decodes every stored row, trims, truncates, saves (current and
legacy format) and reloads, and records a SHA-256 of each result (or the error it raised).
Two builds behave identically when their fingerprint files are equal:

    PYTHONPATH=<build A>/python python bench/cache_identity.py --out a.json
    PYTHONPATH=<build B>/python python bench/cache_identity.py --out b.json
    python bench/cache_identity.py --compare a.json b.json
"""

# The lambdas handed to Recorder.call run at once, inside the loop that binds their names.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np


def configs():
    base = {
        "head_dim": 32,
        "n_layers": 2,
        "n_q_heads": 4,
        "n_kv_heads": 2,
        "block_tokens": 8,
        "seed": 7,
    }
    grid = []
    for method, bits in itertools.product(
        ["turboquant_mse", "turboquant_prod", "polar", "qjl"], [1, 2, 3, 4]
    ):
        grid.append(
            dict(base, key_method=method, value_method=method, key_bits=bits, value_bits=bits)
        )
    mse = dict(base, key_bits=3, value_bits=2)
    grid += [
        dict(mse, head_dim=48, key_bits=4, value_bits=3),
        dict(mse, head_dim=256, n_layers=1, block_tokens=16),
        dict(mse, fp16_window=12),
        dict(mse, fp16_window=12, fp16_layers=[1]),
        dict(mse, fp16_sinks=4),
        dict(mse, fp16_sinks=4, fp16_window=10),
        dict(mse, fp16_sinks=3, fp16_window=10, fp16_layers=[0]),
        dict(mse, decay_after=16, decay_bits=1),
        dict(
            mse, key_bits=4, value_bits=3, decay_after=20, decay_bits=2, fp16_window=9, fp16_sinks=2
        ),
        dict(mse, decay_after=16, decay_bits=1, norm_correction=True),
        dict(mse, max_coded_tokens=24),
        dict(mse, max_coded_tokens=24, fp16_window=10, fp16_sinks=4),
        dict(mse, max_coded_tokens=32, decay_after=12, decay_bits=1, fp16_window=6),
        dict(mse, norm_correction=True, fp16_window=5),
        dict(mse, n_outlier_channels=4, outlier_bits=4),
        dict(mse, n_outlier_channels=4, outlier_roles="keys", split_angle_bits=16),
        dict(
            mse,
            key_bits=3,
            value_bits=3,
            n_outlier_channels=6,
            outlier_bits=5,
            decay_after=16,
            decay_bits=2,
            norm_correction=True,
        ),
        dict(mse, key_head_bits=[2, 4], value_head_bits=[3, 1]),
        dict(mse, key_head_bits=[2, 4, 3, 3], value_head_bits=[3, 1, 2, 2], fp16_window=8),
        dict(
            mse,
            key_head_bits=[3, 4],
            value_head_bits=[3, 4],
            n_outlier_channels=4,
            outlier_head_bits=[5, 0],
            decay_after=16,
            decay_bits=2,
        ),
        dict(
            mse,
            key_bits=4,
            value_bits=4,
            fp16_window=8,
            mixed_group_blocks=2,
            mixed_keep_blocks=1,
            decay_bits=2,
        ),
        dict(
            mse,
            key_bits=4,
            value_bits=3,
            fp16_window=4,
            fp16_sinks=3,
            mixed_group_blocks=3,
            mixed_keep_blocks=1,
            decay_bits=1,
            block_tokens=4,
        ),
        dict(
            mse,
            key_bits=4,
            value_bits=4,
            fp16_window=8,
            mixed_group_blocks=2,
            mixed_keep_blocks=1,
            decay_bits=2,
            key_head_bits=[4, 3],
            value_head_bits=[4, 3],
            fp16_layers=[1],
        ),
        dict(
            base,
            key_method="turboquant_prod",
            value_method="turboquant_mse",
            key_bits=3,
            value_bits=2,
            fp16_window=10,
            fp16_sinks=2,
            n_outlier_channels=4,
        ),
        dict(
            base,
            key_method="polar",
            value_method="qjl",
            key_bits=3,
            value_bits=2,
            max_coded_tokens=16,
        ),
        dict(mse, max_tokens=120, fp16_window=6),
        dict(mse, kv_head_offset=3),
    ]
    return grid


class Recorder:
    def __init__(self):
        self.items = {}

    def put(self, name, value):
        if isinstance(value, np.ndarray):
            data = (
                value.dtype.str.encode()
                + str(value.shape).encode()
                + np.ascontiguousarray(value).tobytes()
            )
        elif isinstance(value, bytes):
            data = value
        else:
            data = repr(value).encode()
        self.items[name] = hashlib.sha256(data).hexdigest()[:24]

    def call(self, name, fn):
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 (the refusal itself is behaviour)
            self.put(name, f"{type(e).__name__}: {e}")
            return None
        self.put(name, value)
        return value


def state(rec, tag, c, cfg):
    L, H = cfg["n_layers"], cfg["n_kv_heads"]
    rec.call(f"{tag}/memory", c.memory_bytes)
    rec.call(f"{tag}/fp16_bytes", c.fp16_bytes)
    for layer in range(L):
        rec.put(
            f"{tag}/sizes{layer}",
            (
                c.size(layer),
                c.sink_tokens(layer),
                c.code_tokens(layer),
                c.coded_tokens(layer),
                c.window_tokens(layer),
                c.evicted_tokens(layer),
                c.rated_tokens(layer),
            ),
        )
        rec.call(f"{tag}/token_bytes{layer}", lambda: c.token_bytes(layer))
        for h in range(H):
            for role in ("key", "value"):
                if c.size(layer):
                    rec.call(f"{tag}/decode{layer}{h}{role}", lambda: c.decode(layer, h, role))
                rec.call(f"{tag}/decayed{layer}{h}{role}", lambda: c.decayed_blocks(layer, h, role))
            rec.call(f"{tag}/positions{layer}{h}", lambda: np.asarray(c.mixed_positions(layer, h)))
            rec.call(
                f"{tag}/importance{layer}{h}", lambda: np.asarray(c.window_importance(layer, h))
            )
    rec.call(f"{tag}/bytes", lambda: c.to_bytes())
    rec.call(f"{tag}/legacy", lambda: c.to_bytes(legacy=True))


def attend_all(rec, tag, c, cfg, rng, T_q=1):
    d, Hq = cfg["head_dim"], cfg["n_q_heads"]
    for layer in range(cfg["n_layers"]):
        n = c.size(layer)
        if n == 0:
            continue
        tq = min(T_q, n)
        q = rng.standard_normal((Hq, tq, d)).astype(np.float32)
        rec.call(f"{tag}/attend{layer}", lambda: c.attend(q, layer=layer))
        if tq == 1:
            rec.call(f"{tag}/sparse{layer}", lambda: c.attend(q, layer=layer, sparse_v=0.02))
            rec.call(
                f"{tag}/window{layer}",
                lambda: c.attend(q, layer=layer, window=7, sinks_visible=True),
            )
            rec.call(f"{tag}/nc{layer}", lambda: c.attend(q, layer=layer, causal=False, scale=0.3))


def run_config(i, cfg):
    import turboquant as tq

    rec = Recorder()
    rng = np.random.default_rng(1000 + i)
    d, H, L = cfg["head_dim"], cfg["n_kv_heads"], cfg["n_layers"]
    c = rec.call("new", lambda: tq.KVCache(**cfg))
    if c is None:
        return rec.items
    scale = np.linspace(0.5, 3.0, d, dtype=np.float32)

    def kv(T):
        k = (rng.standard_normal((H, T, d)) * scale).astype(np.float32)
        v = rng.standard_normal((H, T, d)).astype(np.float32)
        return k, v

    def append(tag, T):
        for layer in range(L):
            k, v = kv(T)
            rec.call(f"{tag}/append{layer}", lambda: c.append(k, v, layer=layer))

    append("prefill", 37)
    attend_all(rec, "prefill", c, cfg, rng, T_q=37)
    for step in range(45):
        append(f"d{step}", 1 + (step % 4 == 0) * 2)
        attend_all(rec, f"d{step}", c, cfg, rng)
    state(rec, "a", c, cfg)
    for n in (3, 8, 16):
        rec.call(f"trim{n}", lambda: c.trim(n))
        state(rec, f"trim{n}", c, cfg)
        attend_all(rec, f"trim{n}", c, cfg, rng)
    append("more", 20)
    attend_all(rec, "more", c, cfg, rng, T_q=5)
    append("more2", 30)  # unrated (mixed precision)
    state(rec, "b", c, cfg)
    data = c.to_bytes()
    r = rec.call("load", lambda: tq.KVCache.from_bytes(data))
    if r is not None:
        state(rec, "loaded", r, cfg)
        attend_all(rec, "loaded", r, cfg, np.random.default_rng(5))
        legacy = rec.call("legacy_bytes", lambda: c.to_bytes(legacy=True))
        if legacy is not None:
            r2 = rec.call("load_legacy", lambda: tq.KVCache.from_bytes(legacy))
            if r2 is not None:
                state(rec, "loaded_legacy", r2, cfg)
    for length in (40, 25, 0):
        rec.call(f"truncate{length}", lambda: c.trim(max(0, c.size(0) - length)))
        state(rec, f"truncate{length}", c, cfg)
    append("again", 19)
    attend_all(rec, "again", c, cfg, rng, T_q=3)
    state(rec, "end", c, cfg)
    return rec.items


def invalid_configs():
    """One bad field each: the refusal (type and message) is part of the behaviour."""
    base = {"head_dim": 32, "n_layers": 2, "n_q_heads": 4, "n_kv_heads": 2, "block_tokens": 8}
    bad = [
        {"head_dim": 1},
        {"n_layers": 0},
        {"n_kv_heads": 3},
        {"kv_head_offset": 65535},
        {"key_bits": 9},
        {"value_bits": 0},
        {"key_head_bits": [3, 3, 3]},
        {"value_head_bits": [3, 9]},
        {"outlier_head_bits": [4, 4]},
        {"block_tokens": 0},
        {"jl_dim": -1},
        {"n_outlier_channels": 32},
        {"outlier_bits": 9},
        {"split_angle_bits": 12},
        {"norm_correction": True, "key_method": "qjl"},
        {"fp16_layers": [2]},
        {"fp16_sinks": 20, "max_tokens": 10},
        {"max_coded_tokens": 4},
        {"mixed_group_blocks": 2, "mixed_keep_blocks": 2, "fp16_window": 8, "decay_bits": 1},
        {"mixed_group_blocks": 2, "mixed_keep_blocks": 1, "decay_bits": 1},
        {
            "mixed_group_blocks": 2,
            "mixed_keep_blocks": 1,
            "fp16_window": 8,
            "decay_bits": 1,
            "decay_after": 9,
        },
        {"mixed_keep_blocks": 1},
        {"decay_bits": 2},
        {"decay_after": 16, "decay_bits": 3},
        {"decay_after": 16, "decay_bits": 1, "key_method": "polar"},
        {"decay_after": 16, "decay_bits": 2, "key_head_bits": [2, 4]},
    ]
    return [dict(base, **b) for b in bad]


def run_invalid():
    import turboquant as tq

    rec = Recorder()
    for i, cfg in enumerate(invalid_configs()):
        rec.call(f"invalid{i}", lambda: tq.KVCache(**cfg))
    return rec.items


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        bad = 0
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                ia, ib = a.get(key, {}), b.get(key, {})
                diff = [k for k in sorted(set(ia) | set(ib)) if ia.get(k) != ib.get(k)]
                print(f"config {key}: {len(diff)} differing results, e.g. {diff[:5]}")
                bad += 1
        n = sum(len(v) for v in a.values())
        print(
            f"{len(a)} configurations, {n} fingerprints: "
            + ("identical" if not bad else f"{bad} differ")
        )
        sys.exit(1 if bad else 0)
    out = {"invalid": run_invalid()}
    for i, cfg in enumerate(configs()):
        out[f"{i}:{json.dumps(cfg, sort_keys=True)}"] = run_config(i, cfg)
    Path(args.out).write_text(json.dumps(out, indent=0, sort_keys=True))
    print(
        f"{len(out)} configurations, {sum(len(v) for v in out.values())} fingerprints -> {args.out}"
    )


if __name__ == "__main__":
    main()
