"""How much could a finer bit allocation across channels cut the quantization error?

A transform-coding estimate on SmolLM2's real keys and values (one prefill of 1,024 tokens,
centred by the mean of the first 64 tokens as the mlx-lm cache does). Per KV head, each
channel's error weight is E[k_i²]·E[q_i²] for keys (the score error q·e) and E[v_i²] for
values. Inside a group of channels a Hadamard rotation evens the energy out, so a group at
b bits costs mean(weight) × D(b), with D the Gaussian Lloyd-Max distortion. Printed: the
best integer allocation (greedy marginal gains, exact for convex D) over G equal groups of
the sorted channels at an average of 3 bits, relative to uniform 3 bits; "split42" is the
cache's key split today (the higher half at 4 bits, the rest at 2, whole RoPE pairs), and
"am/gm" the high-rate bound of unlimited groups. PCA: the same over the principal axes of
the first 256 tokens' covariance, measured on the later tokens.

    python bench/key_allocation_bound.py [--text FILE] [--start 2000]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
from mlx_lm import load

from turboquant import calibrate as cal
from turboquant import models

D = {0: 1.0, 1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499, 6: 0.000642,
     7: 0.000165, 8: 4.2e-5}


def allocate(weights: np.ndarray, groups: int, budget: int = 3) -> float:
    """Error of the best integer allocation over `groups` equal groups of sorted channels."""
    parts = np.array_split(np.sort(weights)[::-1], groups)
    mean, size = [p.mean() for p in parts], [len(p) for p in parts]
    bits, left = [0] * groups, budget * len(weights)
    while left > 0:
        gain = [(m * (D[b] - D[b + 1]) if b < 8 and n <= left else -1.0)
                for m, n, b in zip(mean, size, bits)]
        j = int(np.argmax(gain))
        bits[j] += 1
        left -= size[j]
    return sum(m * n * D[b] for m, n, b in zip(mean, size, bits)) / len(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--start", type=int, default=2000, help="first token of the 1,024")
    args = ap.parse_args()
    model, tok = load(str(models.smollm2("float32")))
    ids = tok.encode(open(args.text).read())[args.start:args.start + 1024]
    cap = cal.capture(model, ids)
    res: dict[str, list[float]] = {}
    for i in sorted(cap):
        q, k, v, _ = cap[i]
        q, k, v = (np.array(x.astype(mx.float32))[0].astype(np.float64) for x in (q, k, v))
        k = k - k[:, :64].mean(axis=1, keepdims=True)
        v = v - v[:, :64].mean(axis=1, keepdims=True)
        H, d = k.shape[0], k.shape[-1]
        g = q.shape[0] // H
        for h in range(H):
            qh = q[h * g:(h + 1) * g].reshape(-1, d)
            wk = (k[h] ** 2).mean(0) * (qh ** 2).mean(0)
            pairs = wk.reshape(2, d // 2).sum(0) / 2  # RoPE "half" pairs share a group
            wk_pairs = np.sort(np.repeat(pairs, 2))[::-1]
            u = wk_pairs.mean() * D[3]
            for G in (2, 4, 8, 16):
                res.setdefault(f"keys, {G} groups", []).append(allocate(wk_pairs, G) / u)
            res.setdefault("keys, split42 (today)", []).append(
                (wk_pairs[:d // 2].mean() * D[4] + wk_pairs[d // 2:].mean() * D[2]) / 2 / u)
            res.setdefault("keys, am/gm bound", []).append(
                np.exp(np.log(wk_pairs).mean()) / wk_pairs.mean())
            # PCA of the query-weighted keys / of the values, fitted on the first 256 tokens
            Q = qh.T @ qh / len(qh)
            w, U = np.linalg.eigh(Q)
            Qh = U @ np.diag(np.sqrt(np.maximum(w, 0))) @ U.T
            for name, y in (("keys", k[h] @ Qh), ("values", v[h])):
                _, V = np.linalg.eigh(y[:256].T @ y[:256] / 256)
                lam = ((y[256:] @ V) ** 2).mean(0)
                ch = (y[256:] ** 2).mean(0) if name == "values" else (k[h][256:] ** 2).mean(0) * np.diag(Q)
                for G in (4, 8):
                    res.setdefault(f"{name}, {G} groups of channels (later tokens)", []).append(
                        allocate(ch, G) / (ch.mean() * D[3]))
                    res.setdefault(f"{name}, {G} groups of PCA axes (later tokens)", []).append(
                        allocate(lam, G) / (ch.mean() * D[3]))
    print(f"SmolLM2-135M, {args.text} tokens {args.start}..{args.start + 1023}, "
          f"{len(res['keys, 2 groups'])} (layer, KV head) pairs; error vs uniform 3 bits, mean:")
    for name, vals in res.items():
        print(f"  {name:<48} {np.mean(vals):.3f}")


if __name__ == "__main__":
    main()
