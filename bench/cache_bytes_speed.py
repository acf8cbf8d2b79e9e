"""Speed of a cache's file bytes and copies: ``KVCache.to_bytes``, ``KVCache.from_bytes`` and
``KVCache.copy`` (what a batch's merge, extract and split, and the server's prompt store, copy
a cache with; ``from_bytes(to_bytes())`` was that copy before ``copy``), for one layer of
SmolLM2-135M's shape (3 KV heads, head_dim 64, 9 query heads) at a few token counts, in two
settings:

- ``plain``: 3-bit codes, fp16 sinks 4 and window 128;
- ``tq3``: the layer the ``tq3`` recipe builds for SmolLM2 (2-bit keys split with 32 outlier
  channels at 4 bits, 8-bit part angles, 3-bit values, norm correction, fp16 sinks 4 and
  window 64, 32-token blocks; its split's block-diagonal rotations are dense matrices).

Median microseconds of ``--repeats`` rounds of ``--calls`` calls.

    python bench/cache_bytes_speed.py [--tokens 127,168,4096] [--calls 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from turboquant import _core

SETTINGS = {
    "plain": {"key_bits": 3, "value_bits": 3, "fp16_sinks": 4, "fp16_window": 128,
              "norm_correction": True},
    "tq3": {"key_bits": 2, "value_bits": 3, "n_outlier_channels": 32, "outlier_roles": "keys",
            "outlier_bits": 4, "split_angle_bits": 8, "rotation": "hadamard1",
            "norm_correction": True, "fp16_sinks": 4, "fp16_window": 64, "block_tokens": 32},
}


def per_call_us(fn, calls: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="127,168,4096")
    ap.add_argument("--settings", default="plain,tq3")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for name in args.settings.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            kv = _core.KVCache(64, n_layers=1, n_q_heads=9, n_kv_heads=3, seed=1,
                               **SETTINGS[name])
            x = rng.standard_normal((3, tokens, 64)).astype(np.float32)
            kv.append(x, x)
            data = kv.to_bytes()
            if _core.KVCache.from_bytes(data).to_bytes() != data or kv.copy().to_bytes() != data:
                raise SystemExit("the bytes do not round-trip")
            save = per_call_us(kv.to_bytes, args.calls, args.repeats)
            load = per_call_us(lambda: _core.KVCache.from_bytes(data), args.calls, args.repeats)
            both = per_call_us(lambda: _core.KVCache.from_bytes(kv.to_bytes()), args.calls,
                               args.repeats)
            copy = per_call_us(kv.copy, args.calls, args.repeats)
            print(f"{name:5s} {tokens:6d} tokens, {len(data):8d} bytes: to_bytes {save:7.1f} us, "
                  f"from_bytes {load:7.1f} us, from_bytes(to_bytes()) {both:7.1f} us, "
                  f"copy {copy:6.1f} us", flush=True)


if __name__ == "__main__":
    main()
