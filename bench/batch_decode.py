"""Batched decode speed: mlx-lm's BatchGenerator with TurboQuant caches (the server's tq3
caches) against mlx-lm's own caches, the two alternating in one process.

B prompts of 128 tokens (windows of GPL-3) decode 40 tokens together, ``--rounds`` times per
cache kind; the result is the median of the per-round ratios of decode tokens/s. ``--out``
writes the rates, ratios and versions as JSON (``attend_batch``: whether the library answers
the batch's rows with one C++ call per layer and step). ``--without-lane`` adds ours with the
batch's decode-step lane switched off (the per-row path) to the rounds: the lane's speed-up
as lane / per-row.

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

from turboquant import _core, mlx_batch, serve

G = importlib.import_module("mlx_lm.generate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--without-lane", action="store_true",
                    help="also run turboquant with the batch's decode-step lane switched off "
                         "(every row on the per-row path), in the same rounds: the lane's "
                         "speed-up as lane / per-row")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the rounds, one more turboquant run under cProfile: its N "
                         "functions of most own time")
    args = ap.parse_args()
    model, tok = load(args.model)
    ids = tok.encode(open(args.text).read())
    prompts = [ids[i * 50:i * 50 + 128] for i in range(args.batch)]

    lane = mlx_batch.BatchTurboQuantKVCache._step_lane

    def decode_rate(tq) -> float:
        """tq: False (mlx-lm's caches), True (ours), "rows" (ours without the lane)."""
        prev = serve.install_cache_factory(serve.cache_options(kv_bits=3)) if tq else None
        if tq == "rows":
            mlx_batch.BatchTurboQuantKVCache._step_lane = lambda self, *a: None
        try:
            r = G.batch_generate(model, tok, prompts, max_tokens=args.max_tokens)
        finally:
            mlx_batch.BatchTurboQuantKVCache._step_lane = lane
            if prev is not None:
                serve.uninstall_cache_factory(prev)
        return r.stats.generation_tokens / r.stats.decode_time

    kinds = [False, True] + (["rows"] if args.without_lane else [])
    names = {False: "mlx-lm", True: "turboquant", "rows": "turboquant, no lane"}
    for tq in kinds:  # warm-up of each
        decode_rate(tq)
    rates: dict = {tq: [] for tq in kinds}
    for i in range(args.rounds):
        for tq in kinds if i % 2 == 0 else kinds[::-1]:  # the order alternating by round
            rates[tq].append(decode_rate(tq))
            print(f"{names[tq]}: {rates[tq][-1]:.1f} decode tok/s", flush=True)
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
    lane_ratios = [t / r for t, r in zip(rates[True], rates.get("rows", []))]
    if lane_ratios:
        print(f"batch {args.batch}: lane / per-row decode tok/s, median of {args.rounds} rounds: "
              f"{statistics.median(lane_ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in lane_ratios)})")
    if args.out:
        import mlx.core as mx
        import mlx_lm

        result = {
            "batch": args.batch, "rounds": args.rounds, "max_tokens": args.max_tokens,
            "model": os.path.basename(os.path.normpath(args.model)), "kv_bits": 3,
            "decode_tok_s": {"mlx_lm": rates[False], "turboquant": rates[True]},
            "ratios": ratios, "median_ratio": statistics.median(ratios),
            **({"decode_tok_s_without_lane": rates["rows"], "lane_ratios": lane_ratios,
                "median_lane_ratio": statistics.median(lane_ratios)} if lane_ratios else {}),
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
