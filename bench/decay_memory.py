"""KV bytes and bits per coordinate of SmolLM2-135M-shaped TurboQuant caches with temporal decay.

A cache's memory depends only on its configuration and token count, not on the K/V values,
so random K/V through the mlx-lm cache (turboquant.mlx_lm.TurboQuantKVCache, 30 layers,
3 KV / 9 query heads, head_dim 64) give the exact bytes the eval reports for the same setting
after the same number of tokens (the eval's scored run leaves prefix + score - 1 = 1023).

    PYTHONPATH=python python bench/decay_memory.py [--tokens 1023] [--decay 0:0,128:2,256:2]
"""
import argparse

import mlx.core as mx
import numpy as np

import turboquant.mlx_lm as tq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1023)
    ap.add_argument("--decay", default="0:0,128:2,256:2,512:2,256:1", help="AFTER:BITS,...")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    layers, hkv, hq, d, T = 30, 3, 9, 64, args.tokens
    rng = np.random.default_rng(0)
    k = mx.array(rng.standard_normal((1, hkv, T, d)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, hq, 1, d)).astype(np.float32))
    fp16 = layers * 2 * 2 * hkv * d * T
    print(f"{T} tokens, {args.bits} bits, {args.sinks} sinks, window {args.window}")
    for spec in args.decay.split(","):
        a, b = (int(x) for x in spec.split(":"))
        total = 0
        for layer in range(layers):
            c = tq.TurboQuantKVCache(key_bits=args.bits, value_bits=args.bits, fp16_sinks=args.sinks,
                                     fp16_window=args.window, layer=layer, decay_after=a, decay_bits=b)
            c.update_and_fetch(k, k)
            c.attend(q, scale=d ** -0.5)
            total += c.nbytes
        print(f"decay {a}:{b}  KV bytes {total:>10,}  bits/coord {16 * total / fp16:.3f}  "
              f"x fp16 {fp16 / total:.2f}")


if __name__ == "__main__":
    main()
