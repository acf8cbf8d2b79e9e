"""Decode attention over TurboQuant codes against fp16 ``mx.fast.scaled_dot_product_attention``
on the same GPU, in one run: contexts 4K-128K, 8 KV heads, GQA 4 (32 query heads), head_dim 64
and 128, 2/3/4-bit codes (plain, and the key split of the default recipe). For each: time per
decode call two ways (each call evaluated on its own: launch and sync latency included; and
pipelined: many calls evaluated together, the GPU time per call where it exceeds the host's),
the bytes it must read (codes + norms, or fp16 K/V), achieved GB/s, and that as a share of the
nominal memory bandwidth (--peak-gbps; by default from the GPU's name) and of a copy's in this run.

    python bench/gpu_attention.py --out bench/results/gpu_attention_h200.json
    python bench/gpu_attention.py --smoke   # tiny sizes, any machine (reference kernels on CPU)
    python bench/gpu_attention.py --sweep 32768,131072 ...  # also the fast kernel's shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from gpu_common import (copy_bandwidth_gbps, environment, machine, overlapped, pipelined, timed,
                        write_result)
from turboquant import metal
from turboquant import gpu_path
from turboquant.mlx_metal import MetalCodeStore, ReferenceKernels


def store_for(d: int, hq: int, hkv: int, bits: int, split: bool, kernels):
    # check_inputs=False: no host read-back of a finiteness flag per call (as in mlx-lm)
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=bits, value_bits=bits,
              seed=1, block_tokens=256, kernels=kernels, check_inputs=False)
    if split:
        kw.update(key_bits=bits - 1, n_outlier_channels=d // 2, outlier_bits=bits + 1,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys")
    return MetalCodeStore(d, **kw)


# Nominal HBM bandwidth (GB/s) by the device's name: the goal's "% of HBM bandwidth".
NOMINAL_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))


def nominal_gbps(device: str) -> float:
    """The nominal memory bandwidth of the GPU named in ``device`` (4800, the H200's, for a
    name not in NOMINAL_GBPS)."""
    return next((g for name, g in NOMINAL_GBPS if name in device), 4800.0)


def run(contexts, dims, bits_list, hkv=8, group=4, peak_gbps=4800.0, kernels=None,
        iters=50, block_kernels=("mma", "staged", "fast", "generic")) -> dict:
    hq = hkv * group
    copy_gbps = copy_bandwidth_gbps(1 << 28 if kernels is not None else 1 << 31)
    rows = []
    for d in dims:
        scale = d ** -0.5
        for T in contexts:
            k = mx.random.normal((1, hkv, T, d)).astype(mx.float16)
            v = mx.random.normal((1, hkv, T, d)).astype(mx.float16)
            q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
            mx.eval(k, v, q)
            def sdpa():
                return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            t_fp16, p_fp16 = timed(sdpa, iters), pipelined(sdpa, iters)
            o_fp16 = overlapped(sdpa, iters)
            fp16_bytes = 2 * hkv * T * d * 2
            base = dict(head_dim=d, context=T, kv_heads=hkv, q_heads=hq)
            first = len(rows)
            rows.append(dict(base, cache="fp16 sdpa", bits=16, seconds=t_fp16,
                             pipelined_seconds=p_fp16, overlapped_seconds=o_fp16,
                             bytes=fp16_bytes,
                             gbps=fp16_bytes / t_fp16 / 1e9,
                             pipelined_gbps=fp16_bytes / p_fp16 / 1e9))
            for bits in bits_list:
                for split in (False, True):
                    if split and (bits < 2 or d < 32):
                        continue
                    store = store_for(d, hq, hkv, bits, split, kernels)
                    step = 4096
                    for a in range(0, T, step):
                        store.append(k[0, :, a:a + step], v[0, :, a:a + step])
                    mx.eval(*store.code_arrays())
                    q3 = q[0].astype(mx.float32)
                    nbytes = T * store.bytes_per_token() + hq * d * 4
                    name = f"turboquant {'key split ' if split else ''}{bits}-bit"
                    # The tensor-core block kernel, the register-tiled one and its staged
                    # variant, the generic one.
                    for kernel in block_kernels:
                        with metal.forced_attention(kernel):
                            def call():
                                return store.attend(q3, scale=scale)
                            t, p = timed(call, iters), pipelined(call, iters)
                            o = overlapped(call, iters)
                        rows.append(dict(base, cache=f"{name} ({kernel})", kernel=kernel,
                                         bits=bits, seconds=t, pipelined_seconds=p,
                                         overlapped_seconds=o,
                                         overlapped_speedup_vs_fp16=o_fp16 / o,
                                         bytes=nbytes, gbps=nbytes / t / 1e9,
                                         pipelined_gbps=nbytes / p / 1e9,
                                         speedup_vs_fp16=t_fp16 / t,
                                         pipelined_speedup_vs_fp16=p_fp16 / p))
            for r in rows[first:]:
                r["pct_of_peak"] = 100.0 * r["gbps"] / peak_gbps
                r["pct_of_copy"] = 100.0 * r["gbps"] / copy_gbps
                r["pipelined_pct_of_peak"] = 100.0 * r["pipelined_gbps"] / peak_gbps
                print(f"d={d:4d} T={T:7d} {r['cache']:36s} {r['seconds'] * 1e6:8.1f} us "
                      f"x{r.get('speedup_vs_fp16', 1.0):.2f} | pipelined "
                      f"{r['pipelined_seconds'] * 1e6:8.1f} us {r['pipelined_gbps']:7.1f} GB/s "
                      f"{r['pipelined_pct_of_peak']:5.1f}% of peak "
                      f"x{r.get('pipelined_speedup_vs_fp16', 1.0):.2f} vs fp16 | overlapped "
                      f"{r['overlapped_seconds'] * 1e6:8.1f} us "
                      f"x{r.get('overlapped_speedup_vs_fp16', 1.0):.2f}", flush=True)
    return dict(machine=machine(), peak_gbps=peak_gbps, copy_gbps=copy_gbps, rows=rows)


# Settings compared by --sweep (environment overrides of turboquant.metal): the block kernel
# (tensor-core products; register-tiled lanes that load their codes; the same with each tile
# staged in threadgroup memory), coordinates per lane, tokens in flight per stream (those two
# only for the register-tiled kernels; for mma, U is its copy ring's stages), threadgroups,
# and for mma the threadgroups per multiprocessor its registers are capped for (0: none).
SWEEP = [dict(TQ_GPU_ATTENTION=k, TQ_GPU_FAST_COORDS=c, TQ_GPU_FAST_UNROLL=u,
              TQ_GPU_ATTENTION_GROUPS=g, TQ_GPU_STAGE_TOKENS=tt,
              TQ_GPU_MMA_STAGES=u if k == "mma" else "3", TQ_GPU_MMA_MIN_BLOCKS=mb)
         for k, c, u, g, tt, mb in (
             ("mma", "16", "3", "1024", "64", "0"), ("mma", "16", "2", "1024", "64", "0"),
             ("mma", "16", "4", "1024", "64", "0"), ("mma", "16", "1", "1024", "64", "0"),
             ("mma", "16", "3", "512", "64", "0"), ("mma", "16", "3", "4096", "64", "0"),
             ("mma", "16", "2", "1024", "64", "4"), ("mma", "16", "3", "1024", "64", "4"),
             ("mma", "16", "3", "2048", "64", "0"), ("mma", "16", "4", "2048", "64", "0"),
             ("mma", "16", "3", "1024", "64", "5"), ("mma", "16", "2", "2048", "64", "5"),
             ("fast", "16", "1", "1024", "64", "0"), ("fast", "8", "4", "4096", "64", "0"),
             ("staged", "16", "1", "1024", "64", "0"), ("staged", "8", "1", "1024", "64", "0"),
             ("staged", "16", "1", "4096", "64", "0"))]


def sweep(contexts, d=128, hkv=8, group=4, iters=30, kernels=None,
          block_kernels=("mma", "staged", "fast")) -> list[dict]:
    """Decode attention of the register-tiled kernel under each SWEEP setting (3-bit plain
    and key-split codes): time per call, in one run."""
    hq, rows = hkv * group, []
    for T in contexts:
        k = mx.random.normal((1, hkv, T, d)).astype(mx.float16)
        v = mx.random.normal((1, hkv, T, d)).astype(mx.float16)
        q = mx.random.normal((hq, 1, d)).astype(mx.float32)
        for split in (False, True):
            store = store_for(d, hq, hkv, 3, split, kernels)
            for a in range(0, T, 4096):
                store.append(k[0, :, a:a + 4096], v[0, :, a:a + 4096])
            mx.eval(*store.code_arrays())
            for env in SWEEP:
                if env["TQ_GPU_ATTENTION"] not in block_kernels:
                    continue
                with environment(**env):
                    def call():
                        return store.attend(q, scale=d ** -0.5)
                    t, p = timed(call, iters), pipelined(call, iters)
                rows.append(dict(context=T, head_dim=d, split=split, seconds=t,
                                 pipelined_seconds=p, **env))
                print(f"sweep T={T:7d} split={int(split)} {env['TQ_GPU_ATTENTION']:6s} "
                      f"C={env['TQ_GPU_FAST_COORDS']:>2s} TT={env['TQ_GPU_STAGE_TOKENS']:>2s} "
                      f"U={env['TQ_GPU_FAST_UNROLL']} groups={env['TQ_GPU_ATTENTION_GROUPS']:>4s}"
                      f" min_blocks={env['TQ_GPU_MMA_MIN_BLOCKS']}"
                      f" {t * 1e6:8.1f} us, pipelined {p * 1e6:8.1f} us", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="nominal memory bandwidth of the GPU (default: by its name, "
                         "H200 4800, H100 SXM 3350; else 4800)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes with the reference kernels: checks the script anywhere")
    ap.add_argument("--sweep", default="",
                    help="contexts (comma-separated) at which to compare the register-tiled "
                         "kernel's shapes (SWEEP) before the main table")
    ap.add_argument("--kernels", default="mma,staged,fast,generic",
                    help="the block kernels to time (comma-separated, of "
                         "turboquant.metal.ATTENTION_KERNELS)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    block_kernels = tuple(k for k in a.kernels.split(",") if k)
    bad = [k for k in block_kernels if k not in metal.ATTENTION_KERNELS]
    if bad:
        ap.error(f"unknown kernels {bad}; choose from {metal.ATTENTION_KERNELS}")
    kernels = None
    if a.smoke:
        a.contexts, a.dims, a.bits, a.iters, kernels = "256,512", "64", "3", 2, ReferenceKernels()
    elif gpu_path.active_path() == "cpu":
        ap.error(f"needs a GPU kernel path ({gpu_path.path_reason()}); --smoke runs anywhere")
    swept = (sweep([int(x) for x in a.sweep.split(",")], kernels=kernels,
                   iters=2 if a.smoke else 30, block_kernels=block_kernels)
             if a.sweep else None)
    if a.peak_gbps is None:
        a.peak_gbps = nominal_gbps(str(machine().get("device", "")))
    res = run([int(x) for x in a.contexts.split(",")], [int(x) for x in a.dims.split(",")],
              [int(x) for x in a.bits.split(",")], peak_gbps=a.peak_gbps, kernels=kernels,
              iters=a.iters, block_kernels=block_kernels)
    if swept is not None:
        res["sweep"] = swept
    if a.out:
        write_result(a.out, res)
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    raise SystemExit(main())
