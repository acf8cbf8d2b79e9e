"""``python -m turboquant calibrate``: per-layer key/value bits for an mlx-lm model under an
average-bit budget, saved as a JSON profile for ``make_prompt_cache(profile=...)``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "allocate per-layer key/value bits under an average-bit budget (JSON profile)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="mlx-lm model directory (default: SmolLM2-135M, fetched)")
    p.add_argument("--text", required=True, help="calibration text file")
    p.add_argument("--budget", type=float, default=3.0,
                   help="average bits per coordinate over keys and values (default 3.0)")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the text used")
    p.add_argument("--metric", choices=("kl", "attention"), default="kl",
                   help="kl: next-token KL vs fp16 with one layer quantized (default); "
                        "attention: that layer's attention-output error (faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="profile.json", help="profile file to write")


def run(args: argparse.Namespace) -> int:
    from mlx_lm import load
    from tqdm import tqdm

    from turboquant import calibrate, models

    if args.tokens < 16:
        print("calibrate: --tokens must be at least 16", file=sys.stderr)
        return 2
    model_dir = args.model or str(models.smollm2("float32"))
    model, tokenizer = load(model_dir)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    tokens = tokenizer.encode(text)[: args.tokens]
    if len(tokens) < 16:
        print(f"calibrate: {args.text} has only {len(tokens)} tokens", file=sys.stderr)
        return 2
    try:
        profile = calibrate.calibrate(
            model, tokens, args.budget, args.seed, metric=args.metric,
            progress=lambda xs: tqdm(xs, desc="layers", unit="layer", file=sys.stderr))
    except ValueError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    profile["model"] = model_dir
    profile["text"] = str(args.text)
    calibrate.save(profile, args.out)
    bits = [(e["key_bits"], e["value_bits"]) for e in profile["layers"] if not e.get("fp16")]
    print(f"wrote {args.out}: {len(bits)} layers, average {profile['average_bits']:.3f} bits "
          f"(budget {args.budget}); key bits {[k for k, _ in bits]}; "
          f"value bits {[v for _, v in bits]}")
    return 0
