"""``python -m turboquant demo``: compress a synthetic KV cache and report the trade-off."""

from __future__ import annotations

import argparse
import time

import numpy as np

HELP = "compress a synthetic KV cache and print bits / ratio / distortion / inner-product error"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096, help="vectors to compress")
    p.add_argument("--bits", default="1,2,3,4", help="comma-separated bit widths")
    p.add_argument("--methods", default="turboquant_mse,turboquant_prod,polar,qjl",
                   help="comma-separated methods (see turboquant.methods())")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import turboquant as tq

    rng = np.random.default_rng(args.seed)
    d, n = args.head_dim, args.tokens
    # Keys with a few outlier channels and varying norms, like real K caches.
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, : max(1, d // 32)] *= 4.0
    x *= rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32)
    q = rng.standard_normal((64, d)).astype(np.float32)
    exact = q @ x.T
    fp16_bytes = 2 * d

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in tq.methods():
            raise SystemExit(f"unknown method {m!r}; available: {', '.join(tq.methods())}")
    print(f"turboquant {tq.__version__} demo: {n} vectors, head_dim {d}, fp16 = {fp16_bytes} B/vector")
    header = (f"{'method':<16}{'bits':>5}{'B/vec':>7}{'ratio':>8}{'MSE(unit)':>11}"
              f"{'rel.err':>9}{'IP corr':>9}{'IP bias':>9}{'enc Mvec/s':>12}")
    print(header)
    print("-" * len(header))
    for method in methods:
        for b in [int(s) for s in args.bits.split(",")]:
            quant = tq.Quantizer(method, dim=d, bits=b, seed=args.seed)
            t0 = time.perf_counter()
            codes, norms = quant.encode(x)
            dt = time.perf_counter() - t0
            x_hat = quant.decode(codes, norms)
            nx = np.linalg.norm(x, axis=1, keepdims=True)
            mse_unit = float(np.mean(np.sum(((x - x_hat) / nx) ** 2, axis=1)))
            rel = float(np.linalg.norm(x - x_hat) / np.linalg.norm(x))
            est = quant.inner_products(q, codes, norms)
            corr = float(np.corrcoef(est.ravel(), exact.ravel())[0, 1])
            bias = float(np.mean(est - exact) / np.std(exact))
            print(f"{method:<16}{b:>5}{quant.bytes_per_vector:>7}{fp16_bytes / quant.bytes_per_vector:>7.2f}x"
                  f"{mse_unit:>11.5f}{rel:>9.4f}{corr:>9.4f}{bias:>9.4f}{n / dt / 1e6:>12.2f}")
    print("MSE(unit): mean ||u - u~||^2 of the unit-normalised vectors (TurboQuant's D_mse);"
          " IP: estimated vs exact <q, k> for 64 queries.")
    return 0
