"""Batched decode speed: mlx-lm's BatchGenerator with TurboQuant caches (the server's tq3
caches) against mlx-lm's own caches, the two alternating in one process.

B prompts of 128 tokens (windows of GPL-3) decode 40 tokens together, ``--rounds`` times per
cache kind; the result is the median of the per-round ratios of decode tokens/s. ``--out``
writes the rates, ratios and versions as JSON (``attend_batch``: whether the library answers
the batch's rows with one C++ call per layer and step).

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
    PYTHONPATH=python python bench/batch_decode.py --model .models/SmolLM2-135M-Instruct-float32 \\
    --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics

from mlx_lm import load

from turboquant import _core, serve

G = importlib.import_module("mlx_lm.generate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the rounds, one more turboquant run under cProfile: its N "
                         "functions of most own time")
    args = ap.parse_args()
    model, tok = load(args.model)
    ids = tok.encode(open(args.text).read())
    prompts = [ids[i * 50:i * 50 + 128] for i in range(args.batch)]

    def decode_rate(tq: bool) -> float:
        prev = serve.install_cache_factory(serve.cache_options(kv_bits=3)) if tq else None
        try:
            r = G.batch_generate(model, tok, prompts, max_tokens=args.max_tokens)
        finally:
            if prev is not None:
                serve.uninstall_cache_factory(prev)
        return r.stats.generation_tokens / r.stats.decode_time

    decode_rate(False)
    decode_rate(True)  # warm-up of both
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for tq in (False, True):
            rates[tq].append(decode_rate(tq))
            print(f"{'turboquant' if tq else 'mlx-lm'}: {rates[tq][-1]:.1f} decode tok/s",
                  flush=True)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        decode_rate(True)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    ratios = [t / f for t, f in zip(rates[True], rates[False])]
    print(f"batch {args.batch}: turboquant / mlx-lm decode tok/s, median of {args.rounds} "
          f"rounds: {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")
    if args.out:
        import mlx.core as mx
        import mlx_lm

        result = {
            "batch": args.batch, "rounds": args.rounds, "max_tokens": args.max_tokens,
            "model": os.path.basename(os.path.normpath(args.model)), "kv_bits": 3,
            "decode_tok_s": {"mlx_lm": rates[False], "turboquant": rates[True]},
            "ratios": ratios, "median_ratio": statistics.median(ratios),
            "attend_batch": hasattr(_core, "attend_batch"),
            "versions": {"turboquant": _core.__version__, "mlx": mx.__version__,
                         "mlx_lm": mlx_lm.__version__},
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
