"""``python -m turboquant bench compare`` (``bench`` alone does the same): decode attention on
compressed codes vs fp32/fp16 baselines.

One process, one data set per context length: the same keys, values and queries go to
every method, and every ratio printed compares timings taken in this run (the machine may
be shared and noisy, so absolute times move between runs while ratios hold better).

Methods (decode: one new query per query head, GQA):
  turboquant-{2,3,4}b  turboquant._core.KVCache.attend (attention computed from the codes)
  numpy-fp32           NumPy: softmax(q K^T / sqrt(d)) V with fp32 K, V
  mlx-fp16-sdpa        mx.fast.scaled_dot_product_attention on the CPU, fp16 K, V
  mlx-q{4,8}           mlx-lm's quantized KV path: mx.quantize + mx.quantized_matmul
Also: encode throughput (vectors/s, d=128) and a roofline: bytes of K/V read per decode
step / time, against the memory bandwidth measured by a large array copy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

HELP = "decode-attention and encode benchmark vs NumPy fp32 and mlx fp16 / quantized (same run)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", default="1024,4096,16384,65536", help="comma-separated context lengths")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head (GQA)")
    p.add_argument("--bits", default="2,3,4", help="turboquant bit widths (keys and values)")
    p.add_argument("--repeat", type=int, default=7, help="timed calls per method (median reported)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls at least")
    p.add_argument("--threads", type=int, default=0, help="turboquant threads (0 = default)")
    p.add_argument("--no-mlx", action="store_true", help="skip the mlx baselines")
    p.add_argument("--mlx-quant-max-context", type=int, default=16384,
                   help="skip the (slow on CPU) mlx quantized path above this context")
    p.add_argument("--seed", type=int, default=0)


def _time(fn, repeat: int, min_time: float) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up (allocations, lazy init)
    first = time.perf_counter() - t0
    if first > 2.0:
        return first  # very slow baselines: one call is the measurement
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200 or (len(times) >= 2 and time.perf_counter() - start > 5.0):
            break  # slow baselines: two calls are enough
    return statistics.median(times)


def stream_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large array copy (read + write counted), best of 5."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """q: (H_kv, G, d); k, v: (H_kv, T, d). Per KV head, two BLAS calls on contiguous K, V
    (a batched np.matmul on K's transpose is several times slower)."""
    out = np.empty_like(q)
    for h in range(k.shape[0]):
        s = k[h] @ (q[h].T * scale)  # (T, G)
        s -= s.max(axis=0, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=0, keepdims=True)
        out[h] = s.T @ v[h]
    return out


def run(args: argparse.Namespace) -> int:
    import turboquant as tq
    from turboquant import _core

    if args.threads:
        tq.set_num_threads(args.threads)
    d, hkv, g = args.head_dim, args.kv_heads, args.group
    hq = hkv * g
    scale = 1.0 / np.sqrt(d)
    bits_list = [int(b) for b in args.bits.split(",") if b]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    mx = None
    if not args.no_mlx:
        try:
            import mlx.core as mx

            mx.set_default_device(mx.cpu)
        except ImportError:
            print("mlx not installed: mlx baselines skipped")
            mx = None

    info = tq.build_info()
    bw = stream_bandwidth()
    print(f"turboquant {tq.__version__} bench: d={d}, {hkv} KV heads, GQA {g} ({hq} query heads), "
          f"decode (1 query per head); turboquant threads={tq.get_num_threads()}, "
          f"SIMD={info['simd_targets_available'][-1]}")
    print(f"memory bandwidth (array copy, read+write): {bw / 1e9:.1f} GB/s")

    rng = np.random.default_rng(args.seed)
    for T in contexts:
        k = rng.standard_normal((hkv, T, d), dtype=np.float32)
        v = rng.standard_normal((hkv, T, d), dtype=np.float32)
        q = rng.standard_normal((hkv, g, d), dtype=np.float32)
        ref = numpy_attention(q, k, v, scale)
        rows: list[tuple[str, float, float, float]] = []  # name, seconds, bytes read, rel. error

        t_np = _time(lambda: numpy_attention(q, k, v, scale), args.repeat, args.min_time)
        rows.append(("numpy-fp32", t_np, 2 * k.nbytes, 0.0))

        t_mlx = None
        if mx is not None:
            qm = mx.array(q.reshape(1, hq, 1, d)).astype(mx.float16)
            km = mx.array(k[None]).astype(mx.float16)
            vm = mx.array(v[None]).astype(mx.float16)
            mx.eval(qm, km, vm)

            def mlx_sdpa():
                mx.eval(mx.fast.scaled_dot_product_attention(qm, km, vm, scale=scale))

            t_mlx = _time(mlx_sdpa, args.repeat, args.min_time)
            out = np.array(mx.fast.scaled_dot_product_attention(qm, km, vm, scale=scale).astype(mx.float32))
            err = float(np.linalg.norm(out.reshape(hkv, g, d) - ref) / np.linalg.norm(ref))
            rows.append(("mlx-fp16-sdpa", t_mlx, 2 * k.nbytes / 2, err))

            for qb in (4, 8) if T <= args.mlx_quant_max_context else ():
                kq = mx.quantize(km, group_size=64, bits=qb)
                vq = mx.quantize(vm, group_size=64, bits=qb)
                kq = tuple(mx.expand_dims(x, axis=-3) for x in kq)
                vq = tuple(mx.expand_dims(x, axis=-3) for x in vq)
                mx.eval(kq, vq)
                q5 = mx.reshape(qm * scale, (1, hkv, g, 1, d))

                def mlx_q(qb=qb, kq=kq, vq=vq, q5=q5):
                    s = mx.quantized_matmul(q5, *kq, transpose=True, group_size=64, bits=qb)
                    p = mx.softmax(s, axis=-1, precise=True)
                    o = mx.quantized_matmul(p, *vq, transpose=False, group_size=64, bits=qb)
                    mx.eval(o)
                    return o

                tq_s = _time(mlx_q, args.repeat, args.min_time)
                out = np.array(mlx_q().astype(mx.float32)).reshape(hkv, g, d)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                nb = sum(x.nbytes for x in kq) + sum(x.nbytes for x in vq)
                rows.append((f"mlx-q{qb}", tq_s, nb, err))
            del km, vm

        qf = q.reshape(hq, 1, d)
        for b in bits_list:
            kv = _core.KVCache(d, n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=b, value_bits=b,
                               seed=args.seed, max_tokens=T)
            kv.append(k, v)
            t_tq = _time(lambda kv=kv: kv.attend(qf), args.repeat, args.min_time)
            out = kv.attend(qf).reshape(hkv, g, d)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            qz = tq.Quantizer("turboquant_mse", dim=d, bits=b)
            rows.append((f"turboquant-{b}b", t_tq, 2 * hkv * T * qz.bytes_per_vector, err))
            del kv

        print(f"\ncontext {T}: K+V fp32 {2 * k.nbytes / 2**20:.0f} MiB"
              + ("" if mx is None or T <= args.mlx_quant_max_context
                 else f" (mlx-q4/q8 skipped above --mlx-quant-max-context {args.mlx_quant_max_context})"))
        print(f"  {'method':<16}{'time ms':>10}{'vs numpy':>10}{'vs mlx16':>10}{'MiB read':>10}"
              f"{'GB/s':>8}{'%bw':>6}{'rel.err':>9}")
        for name, t, nbytes, err in rows:
            vs_np = t_np / t
            vs_mlx = f"{t_mlx / t:>9.2f}x" if t_mlx else f"{'-':>10}"
            gbs = nbytes / t / 1e9
            print(f"  {name:<16}{t * 1e3:>10.3f}{vs_np:>9.2f}x{vs_mlx}{nbytes / 2**20:>10.1f}"
                  f"{gbs:>8.1f}{100 * nbytes / t / bw:>5.0f}%{err:>9.4f}")
        # One decode step of the whole layer, per KV head (the single-query latency goal).
        per_head = [f"{name[len('turboquant-'):]} {t / hkv * 1e6:.1f} us" for name, t, _, _ in rows
                    if name.startswith("turboquant-")]
        print(f"  per KV head (the step over {hkv} KV heads, {tq.get_num_threads()} threads): "
              + ", ".join(per_head))
        del k, v

    # Single query over 1K tokens, one KV head, one thread: the per-head decode latency.
    threads = tq.get_num_threads()
    tq.set_num_threads(1)
    k1 = rng.standard_normal((1, 1024, d), dtype=np.float32)
    q1 = rng.standard_normal((1, 1, d), dtype=np.float32)
    print("\nsingle query, 1 KV head, 1K tokens, 1 thread:")
    for b in bits_list:
        kv = _core.KVCache(d, key_bits=b, value_bits=b, seed=args.seed)
        kv.append(k1, k1)
        t = _time(lambda kv=kv: kv.attend(q1), max(args.repeat, 50), args.min_time)
        print(f"  turboquant-{b}b: {t * 1e6:.1f} us")
    tq.set_num_threads(threads)

    # Encode throughput (normalise, Hadamard rotation, quantize, pack), d=128.
    n = 1 << 16
    x = rng.standard_normal((n, d), dtype=np.float32)
    print(f"\nencode {n} vectors of d={d} (Hadamard rotation):")
    for b in bits_list:
        qz = tq.Quantizer("turboquant_mse", dim=d, bits=b, rotation="hadamard")
        for th in sorted({1, threads}):
            tq.set_num_threads(th)
            t = _time(lambda qz=qz: qz.encode(x), 3, args.min_time)
            print(f"  {b} bits, {th} thread(s): {n / t / 1e6:.2f} M vectors/s ({n / t / 1e6 / th:.2f} per thread)")
    tq.set_num_threads(threads)
    return 0
