"""Same-run A/B timing of KVCache append + attend on a 4K-token cache for two builds.

Each round runs one process per (configuration, build), alternating the builds, with one
thread (TURBOQUANT_NUM_THREADS=1) so that other jobs on the machine disturb both alike: a
4,096-token prefill in 8 appends of 512 (each followed by a 16-query attend), then 256
decode steps (append 1 token, attend 1 query; 32 query heads over 8 KV heads, d = 128).
Prints the median over rounds of each process's median decode step and of its prefill time,
and the speed ratio before/after (>= 1: the after build is as fast or faster).

    python bench/cache_ab_speed.py --before /tmp/base/python --after python --rounds 10

``--one CONFIG --prefill-attends N`` runs one build's prefill appends and N prefill attends
without timing, for an instruction count of each build (valgrind --tool=callgrind; the
count does not depend on what else the machine runs):

    PYTHONPATH=/tmp/base/python TURBOQUANT_NUM_THREADS=1 valgrind --tool=callgrind \\
        python bench/cache_ab_speed.py --one mixed --prefill-attends 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "plain": {"key_bits": 4, "value_bits": 3},
    "window+sinks": {"key_bits": 4, "value_bits": 3, "fp16_window": 128, "fp16_sinks": 4},
    "decay+evict": {
        "key_bits": 4,
        "value_bits": 3,
        "fp16_window": 64,
        "decay_after": 1024,
        "decay_bits": 2,
        "max_coded_tokens": 3072,
    },
    "mixed": {
        "key_bits": 4,
        "value_bits": 4,
        "fp16_window": 128,
        "mixed_group_blocks": 2,
        "mixed_keep_blocks": 1,
        "decay_bits": 2,
        "block_tokens": 64,
    },
}


def one(name, prefill_attends=None):
    import numpy as np
    import turboquant as tq

    rng = np.random.default_rng(0)
    H, Hq, d = 8, 32, 128
    c = tq.KVCache(head_dim=d, n_layers=1, n_q_heads=Hq, n_kv_heads=H, **CONFIGS[name])
    f32 = np.float32
    pre = [
        (rng.standard_normal((H, 512, d)).astype(f32), rng.standard_normal((H, 512, d)).astype(f32))
        for _ in range(8)
    ]
    pq = rng.standard_normal((Hq, 16, d)).astype(f32)
    if prefill_attends is not None:  # for an instruction count: the appends, then N attends
        for k, v in pre:
            c.append(k, v)
        for _ in range(prefill_attends):
            c.attend(pq)
        return
    t0 = time.perf_counter()
    for k, v in pre:
        c.append(k, v)
        c.attend(pq)
    prefill = time.perf_counter() - t0
    steps = 256
    ks = rng.standard_normal((steps, H, 1, d)).astype(f32)
    vs = rng.standard_normal((steps, H, 1, d)).astype(f32)
    qs = rng.standard_normal((steps, Hq, 1, d)).astype(f32)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        c.append(ks[i], vs[i])
        c.attend(qs[i])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"prefill_s": prefill, "decode_ms": 1e3 * statistics.median(times)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="PYTHONPATH of the before build")
    ap.add_argument("--after", help="PYTHONPATH of the after build")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--prefill-attends", type=int, default=None,
                    help="with --one: only the prefill appends and this many attends")
    args = ap.parse_args()
    if args.one:
        return one(args.one, args.prefill_attends)
    res = {(n, b): [] for n in CONFIGS for b in ("before", "after")}
    for _ in range(args.rounds):
        for name in CONFIGS:
            for build, path in (("before", args.before), ("after", args.after)):
                env = dict(os.environ, PYTHONPATH=path, TURBOQUANT_NUM_THREADS="1")
                out = subprocess.run(
                    [sys.executable, __file__, "--one", name],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                res[(name, build)].append(json.loads(out))
    for name in CONFIGS:
        row = [f"{name:13s}"]
        for key, unit in (("decode_ms", "ms/step"), ("prefill_s", "s prefill")):
            b = statistics.median(r[key] for r in res[(name, "before")])
            a = statistics.median(r[key] for r in res[(name, "after")])
            row.append(f"{key} {b:.4g} -> {a:.4g} {unit} (ratio {b / a:.3f})")
        print("  ".join(row))


if __name__ == "__main__":
    main()
