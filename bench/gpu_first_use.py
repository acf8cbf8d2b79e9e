"""Time to first use of the CUDA path in a fresh process: ``import turboquant`` and
``build_info()`` (the first-use self-test compiles and runs every kernel), then one decode
step of a store with the default recipe's shape (head_dim 128, 8 KV heads, GQA 4, 3-bit, 4K
tokens). Each mode runs in its own process:

- ``off``: TQ_CUDA_KERNEL_CACHE=0, mlx compiles every kernel (as every process did before
  turboquant.cuda_cache);
- ``cold``: the cache on, in an empty folder (a machine's first process: it compiles and
  writes every module);
- ``warm``: the cache on, in the folder ``cold`` filled (every later process).

    python bench/gpu_first_use.py [--modes off,cold,warm] [--profile 40] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import cProfile, io, json, os, pstats, sys, time
t0 = time.perf_counter()
import mlx.core as mx
import numpy as np
import turboquant
from turboquant import cuda_cache
from turboquant.mlx_metal import MetalCodeStore
rows = int(os.environ.get("TQ_FIRST_USE_PROFILE", "0"))
prof = cProfile.Profile() if rows else None
if prof:
    prof.enable()
info = turboquant.build_info()
if prof:
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(rows)
    print(text.getvalue(), file=sys.stderr)
t1 = time.perf_counter()
if info["mlx_kernels"] == "cpu":  # no GPU kernels here: the process's import and path only
    print(json.dumps({"self_test_s": t1 - t0, "first_step_s": None, "path": "cpu",
                      "reason": info["mlx_kernels_reason"], "cache": cuda_cache.status()}))
    raise SystemExit(0)
d, hkv, g, T = 128, 8, 4, 4096
store = MetalCodeStore(d, n_layers=1, n_q_heads=hkv * g, n_kv_heads=hkv, key_bits=3,
                       value_bits=3, seed=1, norm_correction=True, fp16_sinks=4,
                       fp16_window=128, rotation="hadamard1")
rng = np.random.default_rng(0)
kv = lambda n: mx.array(rng.standard_normal((hkv, n, d)).astype(np.float32))
store.append(kv(T), kv(T))
store.append(kv(1), kv(1))
out = store.attend(mx.array(rng.standard_normal((hkv * g, 1, d)).astype(np.float32)),
                   scale=d ** -0.5)
mx.eval(out)
t2 = time.perf_counter()
print(json.dumps({"self_test_s": t1 - t0, "first_step_s": t2 - t1, "path": info["mlx_kernels"],
                  "reason": info["mlx_kernels_reason"], "cache": cuda_cache.status()}))
"""


def run(mode: str, folder: str, profile: int = 0) -> dict:
    env = dict(os.environ, MLX_PTX_CACHE_DIR=folder, TQ_FIRST_USE_PROFILE=str(profile))
    if mode == "off":
        env["TQ_CUDA_KERNEL_CACHE"] = "0"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(mode=mode, process_s=wall)
    if profile:
        print(f"--- {mode}: where import + self-test went (cProfile, cumulative)\n"
              f"{proc.stderr[-12000:]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="off,cold,warm")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print each child's N functions of most cumulative time in "
                         "build_info() (the self-test)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("off", "cold", "warm")]
    if bad:
        raise SystemExit(f"unknown modes {bad}: off, cold, warm")
    from gpu_common import machine

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            row = run(mode, folder, args.profile)
            rows.append(row)
            c = row["cache"]
            step = row["first_step_s"]
            print(f"{mode:5s} process {row['process_s']:7.2f} s  (import + self-test "
                  f"{row['self_test_s']:7.2f} s, first decode step "
                  f"{'-' if step is None else format(step, '6.2f')} s)"
                  f"  path {row['path']}, cache {c['state']}, modules written {c['written']}, "
                  f"found {c['found']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            # the children report the path; this process runs no self-test of its own
            json.dump({"machine": machine(path=False), "runs": rows}, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
