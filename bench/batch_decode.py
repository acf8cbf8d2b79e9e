"""Batched decode speed: mlx-lm's BatchGenerator with TurboQuant caches (the server's tq3
caches) against mlx-lm's own caches, the two alternating in one process.

B prompts of 128 tokens (windows of GPL-3) decode 40 tokens together, ``--rounds`` times per
cache kind; the result is the median of the per-round ratios of decode tokens/s.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
    PYTHONPATH=python python bench/batch_decode.py --model .models/SmolLM2-135M-Instruct-float32 \\
    --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib
import statistics

from mlx_lm import load

from turboquant import serve

G = importlib.import_module("mlx_lm.generate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
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
    ratios = [t / f for t, f in zip(rates[True], rates[False])]
    print(f"batch {args.batch}: turboquant / mlx-lm decode tok/s, median of {args.rounds} "
          f"rounds: {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
