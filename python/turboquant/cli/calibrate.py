"""``python -m turboquant calibrate``: per-layer key/value bits for an mlx-lm model under an
average-bit budget, saved as a JSON profile for ``make_prompt_cache(profile=...)``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "allocate per-layer key/value bits under an average-bit budget (JSON profile)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="mlx-lm model directory (default: SmolLM2-135M, fetched)")
    p.add_argument("--text", help="calibration text file (required unless --reuse)")
    p.add_argument("--reuse", metavar="PROFILE",
                   help="allocate again from the errors measured in PROFILE (no model run; "
                        "e.g. another --budget)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="average bits per coordinate over keys and values (default 3.0)")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the text used")
    p.add_argument("--metric", choices=("kl", "hybrid", "attention"), default="hybrid",
                   help="hybrid (default): attention-output errors (with the fp16 "
                        "sinks/window) in KL units per role and width (7 model runs); kl: "
                        "next-token KL vs fp16 with one layer quantized at each width (one "
                        "model run per layer, role and width: ~30x slower); attention: "
                        "attention-output error alone")
    p.add_argument("--fp16-sinks", type=int, default=0,
                   help="fp16 sink tokens of the cache the profile is for (kl; default 0)")
    p.add_argument("--fp16-window", type=int, default=0,
                   help="fp16 recent window of the cache the profile is for (kl; default 0)")
    p.add_argument("--prefix", type=int, default=None,
                   help="kl: tokens prefilled before scoring (default: half of --tokens)")
    p.add_argument("--chunk", type=int, default=16,
                   help="kl: tokens per forward call after the prefix (default 16)")
    p.add_argument("--key-candidates", default=None,
                   help="bit widths measured for keys, e.g. 2,3,4 (default: kl 2,3,4; "
                        "attention 2-6)")
    p.add_argument("--value-candidates", default=None,
                   help="bit widths measured for values (default: kl 2,3,4; attention 2-5)")
    p.add_argument("--granularity", choices=("layer", "head"), default="layer",
                   help="layer (default): one key and one value width per layer; head: one "
                        "per (layer, KV head), measured through the layer's output "
                        "projection (metrics hybrid and attention; the profile's key_bits / "
                        "value_bits are then lists, one width per KV head)")
    p.add_argument("--greedy", action="store_true",
                   help="greedy allocation instead of the exact dynamic programme")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="profile.json", help="profile file to write")


def run(args: argparse.Namespace) -> int:
    from mlx_lm import load
    from tqdm import tqdm

    from turboquant import calibrate, models

    if args.reuse is not None:
        try:
            profile = calibrate.reallocate(args.reuse, args.budget, exact=not args.greedy)
        except (OSError, ValueError) as e:
            print(f"calibrate: {e}", file=sys.stderr)
            return 2
        calibrate.save(profile, args.out)
        _report(args, profile)
        return 0
    if args.text is None:
        print("calibrate: --text is required (or --reuse PROFILE)", file=sys.stderr)
        return 2
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
        cands = [_widths(x, name) for x, name in ((args.key_candidates, "--key-candidates"),
                                                  (args.value_candidates, "--value-candidates"))]
        scoring = calibrate.Scoring(prefix=len(tokens) // 2 if args.prefix is None
                                    else args.prefix, chunk=args.chunk,
                                    fp16_sinks=args.fp16_sinks, fp16_window=args.fp16_window)
        profile = calibrate.calibrate(
            model, tokens, args.budget, args.seed, metric=args.metric, scoring=scoring,
            key_candidates=cands[0], value_candidates=cands[1], exact=not args.greedy,
            granularity=args.granularity,
            progress=lambda xs: tqdm(xs, desc="measurements", unit="run", file=sys.stderr))
    except ValueError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    profile["model"] = model_dir
    profile["text"] = str(args.text)
    calibrate.save(profile, args.out)
    _report(args, profile)
    return 0


def _report(args, profile: dict) -> None:
    bits = [(e["key_bits"], e["value_bits"]) for e in profile["layers"] if not e.get("fp16")]
    per = " (per KV head)" if profile.get("granularity") == "head" else ""
    print(f"wrote {args.out}: {len(bits)} layers{per}, average {profile['average_bits']:.3f} bits "
          f"(budget {args.budget}); key bits {[k for k, _ in bits]}; "
          f"value bits {[v for _, v in bits]}"
          + (f" ({profile['seconds']:.0f}s)" if "seconds" in profile else ""))


def _widths(text: str | None, name: str):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
