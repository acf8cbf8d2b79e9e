"""Temporal decay and fp16 attention sinks: bytes, distortion and attention error.

Synthetic heads (head_dim 128, 8 query heads over 2 KV heads, `--tokens` cached tokens):
keys and values N(0, 1), queries N(0, s^2) plus a shared direction u; the first 4 tokens'
keys are `--sink-gain` × u, so (as in trained models) much of the attention mass sits on the
first tokens. Every setting stores the same tokens; errors are against exact fp32 attention
over the original K/V: decode (1 query per head, the last position) and a 64-query prefill
(the last 64 positions, causal). "key rel MSE" is ‖K̂ − K‖² / ‖K‖² over all tokens.

    PYTHONPATH=python python bench/decay_sinks.py [--tokens 4096]
"""
import argparse

import numpy as np

from turboquant import _core

D, HQ, HKV = 128, 8, 2


def exact(K, V, q):
    n = K.shape[1]
    g = HQ // HKV
    out = np.zeros(q.shape)
    for h in range(HQ):
        for t in range(q.shape[1]):
            hi = n - q.shape[1] + t
            s = K[h // g, :hi + 1].astype(np.float64) @ q[h, t] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[h, t] = p @ V[h // g, :hi + 1] / p.sum()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--query-scale", type=float, default=1.0)
    ap.add_argument("--sink-gain", type=float, default=12.0)
    args = ap.parse_args()
    n = args.tokens
    rng = np.random.default_rng(0)
    K = rng.standard_normal((HKV, n, D)).astype(np.float32)
    V = rng.standard_normal((HKV, n, D)).astype(np.float32)
    u = rng.standard_normal(D).astype(np.float32)
    u /= np.linalg.norm(u)
    K[:, :4] = args.sink_gain * u
    q1 = (args.query_scale * rng.standard_normal((HQ, 1, D)) + 2.0 * u).astype(np.float32)
    q64 = (args.query_scale * rng.standard_normal((HQ, 64, D)) + 2.0 * u).astype(np.float32)
    ref1, ref64 = exact(K, V, q1), exact(K, V, q64)
    base = dict(n_q_heads=HQ, n_kv_heads=HKV, seed=1, block_tokens=32)
    settings = [
        ("3-bit", dict(key_bits=3, value_bits=3)),
        ("2-bit", dict(key_bits=2, value_bits=2)),
        ("3-bit, decay 3->2 after 1024", dict(key_bits=3, value_bits=3, decay_after=1024, decay_bits=2)),
        ("3-bit, decay 3->2 after 256", dict(key_bits=3, value_bits=3, decay_after=256, decay_bits=2)),
        ("3-bit, 4 sinks", dict(key_bits=3, value_bits=3, fp16_sinks=4)),
        ("3-bit, 4 sinks + window 64", dict(key_bits=3, value_bits=3, fp16_sinks=4, fp16_window=64)),
        ("3-bit, 4 sinks + window 64 + decay 3->2 after 1024",
         dict(key_bits=3, value_bits=3, fp16_sinks=4, fp16_window=64, decay_after=1024, decay_bits=2)),
        ("2-bit, 4 sinks + window 64", dict(key_bits=2, value_bits=2, fp16_sinks=4, fp16_window=64)),
    ]
    print(f"tokens={n} head_dim={D} heads={HQ}/{HKV} block_tokens=32 query_scale={args.query_scale} "
          f"sink_gain={args.sink_gain}")
    print("| setting | KV bytes | bits/coord | key rel MSE | decode rel err | prefill rel err |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cfg in settings:
        kv = _core.KVCache(D, **base, **cfg)
        state = kv.memory_bytes()  # rotations (and the decayed quantizers' copies)
        kv.append(K, V)
        data = kv.memory_bytes() - state
        Kd = np.stack([kv.decode(0, h, "key") for h in range(HKV)])
        mse = float(np.sum((Kd - K) ** 2) / np.sum(K ** 2))
        e1 = np.linalg.norm(kv.attend(q1) - ref1) / np.linalg.norm(ref1)
        e64 = np.linalg.norm(kv.attend(q64) - ref64) / np.linalg.norm(ref64)
        bits = 8 * data / (2 * HKV * n * D)
        print(f"| {name} | {data} | {bits:.2f} | {mse:.4f} | {e1:.2e} | {e64:.2e} |")


if __name__ == "__main__":
    main()
