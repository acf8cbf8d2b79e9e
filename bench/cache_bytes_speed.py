"""Speed of a cache's file bytes: ``KVCache.to_bytes`` and ``KVCache.from_bytes`` (what a
batch's merge and extract, and the server's prompt store, copy a cache through) for one layer
of SmolLM2-135M's shape (3 KV heads, head_dim 64, 3-bit codes, fp16 sinks 4 and window 128),
at a few token counts. Median microseconds of ``--repeats`` rounds of ``--calls`` calls.

    python bench/cache_bytes_speed.py [--tokens 168,4096] [--calls 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from turboquant import _core


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
    ap.add_argument("--tokens", default="168,4096")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for tokens in (int(t) for t in args.tokens.split(",")):
        kv = _core.KVCache(64, n_layers=1, n_q_heads=9, n_kv_heads=3, key_bits=3, value_bits=3,
                           seed=1, fp16_sinks=4, fp16_window=128, norm_correction=True)
        x = rng.standard_normal((3, tokens, 64)).astype(np.float32)
        kv.append(x, x)
        data = kv.to_bytes()
        if _core.KVCache.from_bytes(data).to_bytes() != data:
            raise SystemExit("the bytes do not round-trip")
        save = per_call_us(kv.to_bytes, args.calls, args.repeats)
        load = per_call_us(lambda: _core.KVCache.from_bytes(data), args.calls, args.repeats)
        print(f"{tokens:6d} tokens, {len(data):8d} bytes: to_bytes {save:8.1f} us "
              f"({len(data) / save:7.1f} MB/s), from_bytes {load:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
