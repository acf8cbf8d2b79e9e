"""Memory soak: a long greedy generation on TurboQuant caches, process memory against the
caches' own byte accounting.

A bounded generation (``--tokens`` new tokens after a short chat prompt, greedy, on the
CPU) runs with ``turboquant.mlx_lm.make_prompt_cache`` caches (``--preset``, default tq3).
Every ``--sample-every`` tokens it records the process's resident memory (RSS, from
/proc/self/status), the caches' ``nbytes`` summed over the layers (codes, norms, fp16 sink
and window rows, page slack, quantizer state, host arrays), and mlx's own allocator
counters. After a warm-up (``--warmup`` tokens: mlx's buffer cache, the first code pages,
Python's arenas settle) the part of RSS that the caches do not account for,
``RSS - cache bytes``, must stay flat: a leak of anything held per generated token or per
step (placeholders, host copies of queries, pages a trim forgot) shows as growth of that
residual. The verdict: residual growth from the first sample after the warm-up to the last
at most ``--tolerance-mb`` (default 32 MB, set against 16K tokens of SmolLM2-135M: the
caches grow by ~80 MB, the same tokens take ~380 MB as fp16). The generated text past the
model's 8192 trained positions is not meaningful; the memory is what is measured.

The full run (the committed result, ~40 min on a 2-core x86-64 machine):

  PYTHONPATH=python python bench/soak_memory.py \\
      --model .models/SmolLM2-135M-Instruct-float32 --tokens 16384 \\
      --json bench/results/soak_memory_smollm2_run2.json

``soak(model, cache, prompt, tokens, ...)`` is the measurement itself, used by the tests on
a tiny model (tests/python/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cache_bytes(cache) -> int:
    """The caches' own accounting: ``nbytes`` of every layer (TurboQuant layers count their
    codes, norms, fp16 rows, page slack, quantizer state and host arrays)."""
    return int(sum(int(c.nbytes) for c in cache))


def soak(model, cache, prompt, tokens: int, sample_every: int = 256, warmup: int = 512,
         on_step=None, log=None) -> dict:
    """Generate ``tokens`` tokens greedily from ``prompt`` (token ids) into ``cache``; sample
    RSS and the caches' bytes every ``sample_every`` tokens. ``on_step(i)`` runs after every
    token (the tests inject a leak through it). Returns the samples and the residual growth
    (``RSS - cache bytes``) from the first sample at or after ``warmup`` to the last."""
    from mlx_lm.generate import generate_step

    samples = []
    t0 = time.perf_counter()

    def sample(n):
        s = {"tokens": n, "context": int(cache[0].offset), "rss": rss_bytes(),
             "cache_bytes": cache_bytes(cache), "mlx_active": int(mx.get_active_memory()),
             "mlx_buffer_cache": int(mx.get_cache_memory()),
             "seconds": round(time.perf_counter() - t0, 2)}
        samples.append(s)
        if log:
            log(s)

    sample(0)
    n = 0
    for n, _ in enumerate(generate_step(mx.array(prompt), model, max_tokens=tokens,
                                        prompt_cache=cache), 1):
        if on_step is not None:
            on_step(n)
        if n % sample_every == 0 or n == tokens:
            sample(n)
    if n != tokens:
        raise RuntimeError(f"generated {n} tokens, asked for {tokens}")
    return summarize(samples, warmup)


def _slope(samples, key) -> float:
    xs = [s["tokens"] for s in samples]
    return float(np.polyfit(xs, [key(s) for s in samples], 1)[0]) if len(xs) >= 3 else 0.0


def summarize(samples: list, warmup: int) -> dict:
    """Growth of RSS, of the caches' bytes and of the residual (RSS - cache bytes) from the
    first sample at or after ``warmup`` tokens to the last, and per-token slopes (least
    squares) over those samples and over the second half of the run. Early on, the caches'
    pages can land in memory the process already holds (freed by the prefill), so RSS grows
    less than the caches; the second half's slopes show the steady state."""
    tokens = samples[-1]["tokens"]
    base = next(s for s in samples if s["tokens"] >= min(warmup, tokens))
    last = samples[-1]
    after = [s for s in samples if s["tokens"] >= base["tokens"]]
    late = [s for s in samples if s["tokens"] >= tokens // 2]
    resid = lambda s: s["rss"] - s["cache_bytes"]  # noqa: E731
    return {
        "samples": samples,
        "baseline_tokens": base["tokens"],
        "rss_growth": last["rss"] - base["rss"],
        "cache_growth": last["cache_bytes"] - base["cache_bytes"],
        "residual_growth": resid(last) - resid(base),
        "residual_slope_bytes_per_token": _slope(after, resid),
        "second_half": {"from_tokens": late[0]["tokens"],
                        "rss_bytes_per_token": _slope(late, lambda s: s["rss"]),
                        "cache_bytes_per_token": _slope(late, lambda s: s["cache_bytes"]),
                        "residual_bytes_per_token": _slope(late, resid),
                        "residual_growth": resid(last) - resid(late[0])},
        "peak_rss": max(s["rss"] for s in samples),
        "seconds": last["seconds"],
    }


def synthetic(tokens: int, block_tokens: int = 32, fp16_window: int = 64, layers: int = 30,
              kv_heads: int = 3, head_dim: int = 64, sample_every: int = 512,
              warmup: int = 512) -> dict:
    """The C++ core alone, SmolLM2-135M's shape (30 layers, 3 KV heads, head_dim 64, 3-bit
    keys and values, 4 fp16 sinks, ``fp16_window``), no model and no Python cache layer:
    ``tokens`` single-token appends of random K/V to every layer; RSS against the core's
    ``memory_bytes()`` as in :func:`soak`. Isolates what the core's own allocations add
    beyond its accounting, which counts payload bytes: every code or norm page of
    ``block_tokens`` tokens is one allocation, with the allocator's header and rounding."""
    from turboquant import _core

    kv = _core.KVCache(head_dim, n_layers=layers, n_q_heads=3 * kv_heads, n_kv_heads=kv_heads,
                       key_bits=3, value_bits=3, block_tokens=block_tokens,
                       fp16_window=fp16_window, fp16_sinks=4 if fp16_window else 0)
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((kv_heads, 1, head_dim)).astype(np.float32) for _ in range(64)]
    samples = []
    t0 = time.perf_counter()
    for t in range(tokens + 1):
        if t:
            for layer in range(layers):
                kv.append(rows[t % 64], rows[(t + 5) % 64], layer)
        if t % sample_every == 0 or t == tokens:
            samples.append({"tokens": t, "context": int(kv.size(0)), "rss": rss_bytes(),
                            "cache_bytes": int(kv.memory_bytes()),
                            "seconds": round(time.perf_counter() - t0, 2)})
    return {"block_tokens": block_tokens, "fp16_window": fp16_window,
            **summarize(samples, warmup)}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "mlx": mx.__version__,
            "mlx_device": str(mx.default_device())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="mlx-lm model folder")
    ap.add_argument("--tokens", type=int, default=16384, help="new tokens to generate")
    ap.add_argument("--preset", default="tq3", help="turboquant.presets name")
    ap.add_argument("--sample-every", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=512)
    ap.add_argument("--tolerance-mb", type=float, default=32.0,
                    help="largest residual (RSS - cache bytes) growth that passes")
    ap.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--synthetic", action="store_true",
                    help="the C++ core alone (SmolLM2-135M's shape, random K/V, no model): "
                         "what its allocations add beyond its byte accounting")
    ap.add_argument("--block-tokens", type=int, nargs="*",
                    help="with --synthetic: page sizes to run (default: the preset's, 32)")
    ap.add_argument("--print-json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="JSON",
                    help="recompute the summary of a result file from its samples (with "
                         "--warmup and --tolerance-mb) and rewrite it; no generation")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(args.summarize, encoding="utf-8") as f:
            out = json.load(f)
        r = summarize(out["samples"], args.warmup)
        out.update({k: v for k, v in r.items() if k != "samples"},
                   passed=r["residual_growth"] <= args.tolerance_mb * 2**20,
                   tolerance_bytes=int(args.tolerance_mb * 2**20))
        out["samples"] = out.pop("samples")  # last, after the summary
        from turboquant._atomic import atomic_write

        with atomic_write(args.summarize, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
        print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))
        return 0 if out["passed"] else 1
    if args.synthetic:
        out = {"command": "python bench/soak_memory.py " + " ".join(argv or sys.argv[1:]),
               "machine": machine(), "runs": []}
        sizes = args.block_tokens or [32]
        if len(sizes) > 1:  # one process per page size: a run must not reuse another's memory
            import subprocess

            for bt in sizes:
                cmd = [sys.executable, __file__, "--synthetic", "--block-tokens", str(bt),
                       "--tokens", str(args.tokens), "--sample-every", str(args.sample_every),
                       "--warmup", str(args.warmup), "--print-json"]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                              text=True).stdout.splitlines()[-1])
                out["runs"].extend(r["runs"])
                h = r["runs"][0]["second_half"]
                print(f"block_tokens {bt}: second half, per token: RSS "
                      f"{h['rss_bytes_per_token']:.0f} B, caches "
                      f"{h['cache_bytes_per_token']:.0f} B, residual "
                      f"{h['residual_bytes_per_token']:+.0f} B", flush=True)
            sizes = []
        for bt in sizes:
            r = synthetic(args.tokens, bt, sample_every=args.sample_every, warmup=args.warmup)
            h = r["second_half"]
            if args.print_json:
                print(json.dumps({"runs": [r]}))
                return 0
            print(f"block_tokens {r['block_tokens']}: second half, per token: RSS "
                  f"{h['rss_bytes_per_token']:.0f} B, caches {h['cache_bytes_per_token']:.0f} "
                  f"B, residual {h['residual_bytes_per_token']:+.0f} B", flush=True)
            out["runs"].append(r)
        if args.json:
            from turboquant._atomic import atomic_write

            with atomic_write(args.json, "w") as f:
                f.write(json.dumps(out, indent=1) + "\n")
        return 0
    if not args.model:
        ap.error("--model is required (unless --summarize or --synthetic)")

    from mlx_lm import load

    from turboquant import __version__ as tq_version
    from turboquant.mlx_lm import make_prompt_cache

    mx.set_default_device(mx.cpu)
    model, tokenizer = load(args.model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                           add_generation_prompt=True)
    cache = make_prompt_cache(model, preset=args.preset)

    def write(out):
        from turboquant._atomic import atomic_write

        with atomic_write(args.json, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")

    head = {"command": "python bench/soak_memory.py " + " ".join(argv or sys.argv[1:]),
            "model": Path(args.model).name, "preset": args.preset,
            "prompt_tokens": len(prompt), "tokens": args.tokens, "machine": machine(),
            "turboquant": tq_version, "tolerance_bytes": int(args.tolerance_mb * 2**20)}
    partial: list = []

    def log(s):
        print(f"{s['tokens']:6d} tokens  rss {s['rss'] / 2**20:8.1f} MiB  cache "
              f"{s['cache_bytes'] / 2**20:7.1f} MiB  residual "
              f"{(s['rss'] - s['cache_bytes']) / 2**20:8.1f} MiB  {s['seconds']:8.1f} s",
              flush=True)
        partial.append(s)
        if args.json:  # a run stopped early still leaves its samples (complete: false)
            write({**head, "complete": False, "samples": partial})

    r = soak(model, cache, prompt, args.tokens, args.sample_every, args.warmup, log=log)
    ok = r["residual_growth"] <= args.tolerance_mb * 2**20
    fp16 = sum(int(c.fp16_nbytes) for c in cache if hasattr(c, "fp16_nbytes"))
    out = {**head, "complete": True, "context": int(cache[0].offset), "passed": bool(ok),
           "cache_bytes_final": cache_bytes(cache), "fp16_bytes_final": fp16,
           **{k: v for k, v in r.items() if k != "samples"}, "samples": r["samples"]}
    print(f"RSS grew {r['rss_growth'] / 2**20:.1f} MiB, the caches "
          f"{r['cache_growth'] / 2**20:.1f} MiB (fp16 would hold {fp16 / 2**20:.1f} MiB at "
          f"the end); residual growth {r['residual_growth'] / 2**20:+.1f} MiB "
          f"(tolerance {args.tolerance_mb} MB): {'PASS' if ok else 'FAIL'}")
    if args.json:
        write(out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
