"""``python -m turboquant bench sweep``: encode (append) and decode-attend timings, memory and
compression ratio of the compressed cache over a sweep of methods, widths and context lengths."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

HELP = "append and attend timings, memory and ratio over methods, bit widths and context lengths"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="turboquant_mse", help="comma-separated key methods")
    p.add_argument("--bits", default="3", help="comma-separated bit widths (keys and values)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context-lengths", default="256,1024,4096",
                   help="comma-separated token counts")
    p.add_argument("--q-heads", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="attend calls timed per point (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import turboquant as tq
    from tqdm import tqdm

    methods = [m for m in args.methods.split(",") if m]
    bits_list = [int(b) for b in args.bits.split(",") if b]
    lengths = [int(n) for n in args.context_lengths.split(",") if n]
    for m in methods:
        if m not in tq.methods():
            raise SystemExit(f"unknown method {m!r}; available: {', '.join(tq.methods())}")
    d, hq, hkv = args.head_dim, args.q_heads, args.kv_heads
    rng = np.random.default_rng(args.seed)
    rows = []
    points = [(m, b, n) for m in methods for b in bits_list for n in lengths]
    for method, bits, n in tqdm(points, desc="bench sweep", disable=args.no_progress, leave=False):
        cache = (tq.KVCacheBuilder().with_method(method).with_head_dim(d).with_bit_width(bits)
                 .with_heads(hq, hkv).with_seed(args.seed).build())
        k = rng.standard_normal((hkv, n, d), dtype=np.float32)
        v = rng.standard_normal((hkv, n, d), dtype=np.float32)
        t0 = time.perf_counter()
        cache.append(k, v)
        enc = time.perf_counter() - t0
        q = rng.standard_normal((hq, 1, d), dtype=np.float32)
        cache.attend(q)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cache.attend(q)
            times.append(time.perf_counter() - t0)
        att = statistics.median(times)
        rows.append((method, bits, n, 2 * hkv * n / enc, att * 1e6, cache.memory_bytes(),
                     cache.compression_ratio(), cache.core.bytes_per_token() * n / att / 1e9))
    header = (f"{'method':<16}{'bits':>5}{'tokens':>8}{'encode vec/s':>14}{'attend us':>11}"
              f"{'memory B':>11}{'vs fp16':>9}{'code GB/s':>11}")
    print(f"turboquant {tq.__version__} bench sweep: head_dim {d}, {hq} query / {hkv} kv heads, "
          f"decode attend = 1 query per head, median of {args.repeats}")
    print(header)
    print("-" * len(header))
    for method, bits, n, vps, us, mem, ratio, gbs in rows:
        print(f"{method:<16}{bits:>5}{n:>8}{vps:>14,.0f}{us:>11.1f}{mem:>11}{ratio:>8.2f}x{gbs:>11.2f}")
    print("encode vec/s: key+value vectors encoded per second by append; code GB/s: bytes of codes"
          " and norms read per second by attend.")
    return 0
