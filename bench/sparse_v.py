"""Sparse V: speed-up and quality cost of AttentionOptions::sparse_v_threshold.

Gaussian keys, values and queries (N(0, 1), head_dim 128, 8 query heads over 2 KV heads,
3-bit turboquant_mse keys and values), 4096 cached tokens. Decode = 1 query per head,
T_q = 3 is short speculative decode (still the decode path; prefill stays dense). Reports the median time of `repeats` calls,
the fraction of (query, value row) weights below the threshold, and the error against
dense attention (max abs and relative L2) on the same codes. "skipped" counts (query, token)
weights below threshold × the query's max weight; a value row is read unless every query
row of its KV head skips it (GQA: 4 query heads per KV head here).

    PYTHONPATH=python python bench/sparse_v.py [--tokens 4096] [--repeats 30]
"""
import argparse
import time

import numpy as np

from turboquant import _core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--thresholds", default="0,0.001,0.01,0.05")
    ap.add_argument("--query-scale", type=float, default=1.0,
                    help="queries N(0, s^2): s > 1 gives the peaked attention of trained models")
    args = ap.parse_args()
    d, hq, hkv, n = 128, 8, 2, args.tokens
    rng = np.random.default_rng(0)
    kv = _core.KVCache(d, n_q_heads=hq, n_kv_heads=hkv, key_bits=3, value_bits=3, seed=1)
    kv.append(rng.standard_normal((hkv, n, d), dtype=np.float32),
              rng.standard_normal((hkv, n, d), dtype=np.float32))
    g = hq // hkv
    K = [kv.decode(0, h, "key").astype(np.float64) for h in range(hkv)]
    print(f"tokens={n} head_dim={d} heads={hq}/{hkv} bits=3/3 query_scale={args.query_scale}")
    print(f"{'T_q':>4} {'thresh':>7} {'ms/call':>8} {'speed-up':>8} {'skipped':>8} {'max|err|':>9} {'rel L2':>8}")
    for T_q in (1, 3):  # 1 and 3 query positions per head: both on the decode path
        q = args.query_scale * rng.standard_normal((hq, T_q, d), dtype=np.float32)
        # Weights of each (query, token) for the skipped fraction (relative to the max weight).
        p = []
        for h in range(hq):
            for t in range(T_q):
                s = K[h // g][:n - T_q + t + 1] @ q[h, t] / np.sqrt(d)
                p.append(np.exp(s - s.max()))
        dense = kv.attend(q)
        thresholds = [float(x) for x in args.thresholds.split(",")]
        times = {thr: [] for thr in thresholds}
        for _ in range(args.repeats):  # interleaved, so load changes hit every setting alike
            for thr in thresholds:
                t0 = time.perf_counter()
                kv.attend(q, sparse_v=thr)
                times[thr].append(time.perf_counter() - t0)
        base = 1e3 * float(np.median(times[thresholds[0]]))
        for thr in thresholds:
            out = kv.attend(q, sparse_v=thr)
            ms = 1e3 * float(np.median(times[thr]))
            skipped = sum(int((w < thr).sum()) for w in p) / sum(w.size for w in p)
            err = np.abs(out - dense).max()
            rel = np.linalg.norm(out - dense) / np.linalg.norm(dense)
            print(f"{T_q:>4} {thr:>7g} {ms:>8.3f} {base / ms:>7.2f}x {skipped:>8.1%} {err:>9.2e} {rel:>8.2e}")

if __name__ == "__main__":
    main()
