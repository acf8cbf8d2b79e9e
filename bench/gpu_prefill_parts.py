"""Where the TurboQuant cache's prefill time goes on a GPU, against mlx-lm's fp16 cache in the
same run: a 2-layer random model of Llama-3.1-8B's layer shape prefilled in 2,048-token
chunks (as mlx-lm's generate does), each chunk evaluated and timed, per cache; per context,
the mean chunk time of each cache and their ratio.

    python bench/gpu_prefill_parts.py --contexts 8192,32768 [--trace] [--permute]

``--trace`` adds the GPU kernels of one chunk at the end of the longest context (PyTorch's
profiler where PyTorch is installed: it reads the whole process's CUDA activity, mlx's kernels
included): the measure to read. With two layers a chunk's wall time is dominated by costs
outside the layers' kernels (on an H100 about 17-25 ms a layer in both caches against 3-5 ms
of kernels), which a 32-layer model spreads over 16 times more layers. ``--permute`` times the ways of applying the key split's per-head channel order to
a prefill chunk's keys and queries (the cache's ``_permute``), each checked for equality with
``mx.take_along_axis``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import mlx.core as mx
import numpy as np

from gpu_common import chunk_seconds, kernel_tables, machine, timed, write_result
from gpu_decode_parts import LAYER, LAYERS, TINY, two_layer_model

CACHES = {"fp16": None, "tq3 (default recipe)": dict(key_bits=3, value_bits=3)}


def chunk_ms(model, options, context: int, chunk: int = 2048, vocab: int = 1024) -> list:
    """Milliseconds of each evaluated prefill chunk of a fresh cache, in order, and the
    cache."""
    from mlx_lm.models import cache as mlx_cache

    from turboquant.mlx_lm import make_prompt_cache

    cache = (mlx_cache.make_prompt_cache(model) if options is None
             else make_prompt_cache(model, **options))
    return [s * 1e3 for s in chunk_seconds(model, cache, context, vocab, chunk)], cache


def trace_chunk(model, options, context: int, chunk: int = 2048, rows: int = 30) -> str:
    """The kernels of the last prefill chunk (context - chunk .. context), by GPU time."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        return f"(no trace: {e})"
    _, cache = chunk_ms(model, options, context - chunk, chunk)
    x = mx.random.randint(0, 1024, (1, chunk))
    mx.eval(x)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        mx.eval(model(x, cache=cache)[:, -1])
    return kernel_tables(prof, rows, 10)


def permute_ways(H: int, T: int, d: int, dtype, seed: int = 0) -> dict:
    """Microseconds per call of each way of permuting the channels of x (H, T, d) by a
    per-head order, and whether it equals take_along_axis."""
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(d) for _ in range(H)]).astype(np.int32)
    x = mx.random.normal((H, T, d)).astype(dtype)
    idx = mx.array(perm[:, None, :])
    onehot = np.zeros((H, d, d), np.float32)
    for h in range(H):
        onehot[h, perm[h], np.arange(d)] = 1.0
    onehot = mx.array(onehot).astype(dtype)
    base = mx.array(perm) + (mx.arange(H, dtype=mx.int32) * (T * d))[:, None]
    flat_perm = mx.array(perm.reshape(-1))
    mx.eval(x, idx, onehot, base, flat_perm)
    ways = {
        "take_along_axis": lambda: mx.take_along_axis(x, idx, axis=2),
        "flat take": lambda: mx.take(
            x.reshape(-1),
            (base[:, None, :] + (mx.arange(T, dtype=mx.int32) * d)[None, :, None]).reshape(-1),
        ).reshape(H, T, d),
        "per-head take": lambda: mx.stack(
            [mx.take(x[h], flat_perm[h * d:(h + 1) * d], axis=1) for h in range(H)]),
        "one-hot matmul": lambda: x @ onehot,
    }
    kernel = _permute_kernel()
    if kernel is not None:
        params = mx.array(np.array([T, d, H * T * d], np.uint32))
        mx.eval(params)
        ways["custom kernel"] = lambda: kernel(
            inputs=[x, flat_perm, params], output_shapes=[(H, T, d)], output_dtypes=[x.dtype],
            grid=(H * T * d, 1, 1), threadgroup=(256, 1, 1))[0]
    ref = ways["take_along_axis"]()
    mx.eval(ref)
    res = {}
    for name, fn in ways.items():
        y = fn()
        mx.eval(y)
        same = bool(mx.array_equal(y, ref).item())
        us = timed(fn, iters=20, repeats=5, warmup=2) * 1e6
        res[name] = dict(us=round(us, 1), equal=same,
                         gb_s=round(2 * x.nbytes / (us * 1e-6) / 1e9, 1))
    return res


def _permute_kernel():
    """An element-per-thread channel gather for the microbenchmark (CUDA or Metal)."""
    body = ("unsigned int T = params[0], D = params[1], n = params[2];\n"
            "if (e >= n) return;\n"
            "unsigned int row = e / D, c = e - row * D, h = row / T;\n"
            "y[e] = x[row * D + (unsigned int)perm[h * D + c]];\n")
    if mx.cuda.is_available():
        return mx.fast.cuda_kernel(
            name="tq_bench_permute", input_names=["x", "perm", "params"], output_names=["y"],
            source="unsigned int e = blockIdx.x * blockDim.x + threadIdx.x;\n" + body)
    if mx.metal.is_available():
        return mx.fast.metal_kernel(
            name="tq_bench_permute", input_names=["x", "perm", "params"], output_names=["y"],
            source="unsigned int e = thread_position_in_grid.x;\n" + body)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--permute", action="store_true")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (mlx-lm's default)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny layer shape, 512 tokens in 128-token chunks (anywhere)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.smoke:
        a.contexts, a.chunk = "512", 128
    res = {"machine": machine(), "chunk": a.chunk, "contexts": {}}
    if a.permute:
        res["permute"] = {}
        shapes = (((2, 64, 64, mx.float16),) if a.smoke else
                  ((8, 2048, 128, mx.float32), (8, 2048, 128, mx.float16),
                   (32, 2048, 128, mx.float16)))
        for H, T, d, dt in shapes:
            key = f"H={H} T={T} d={d} {dt}"
            res["permute"][key] = permute_ways(H, T, d, dt)
            print(f"permute {key}: {res['permute'][key]}", flush=True)
    model = two_layer_model(TINY if a.smoke else LAYER)
    contexts = [int(c) for c in a.contexts.split(",")]
    for ctx in contexts:
        row = {}
        for name, options in CACHES.items():
            ms, _ = chunk_ms(model, options, ctx, a.chunk)
            row[name] = dict(chunk_ms=[round(m, 2) for m in ms],
                             mean_ms_per_layer=round(statistics.mean(ms[1:] or ms) / LAYERS, 3))
        base = row["fp16"]["mean_ms_per_layer"]
        for name in row:
            row[name]["vs_fp16"] = round(base / row[name]["mean_ms_per_layer"], 3)
        res["contexts"][str(ctx)] = row
        print(f"{ctx} tokens: " + "; ".join(
            f"{n}: {r['mean_ms_per_layer']} ms/layer a chunk ({r['vs_fp16']}x fp16 speed)"
            for n, r in row.items()), flush=True)
    if a.trace:
        for name, options in CACHES.items():
            text = trace_chunk(model, options, contexts[-1], a.chunk)
            print(f"--- GPU trace of the chunk ending at {contexts[-1]}, {name}\n{text}",
                  flush=True)
    if a.out:
        write_result(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
