"""``python -m turboquant needle``: needle-in-a-haystack retrieval and answer KL of KV-cache
settings against mlx-lm's fp16 cache at long contexts (see turboquant.needle)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

HELP = ("needle-in-a-haystack retrieval at long contexts: KV-cache settings against the "
        "fp16 cache")


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {s!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {s!r}")
    return out


def _depths(s: str) -> list[float]:
    try:
        out = [float(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1], got {s!r}")
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise argparse.ArgumentTypeError(f"expected depths in [0, 1], got {s!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="mlx-lm model directory (default: SmolLM2-135M, fetched)")
    p.add_argument("--config", help="JSON file with any of the options below (CLI wins)")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="contexts in tokens (prompt + answer), comma-separated, e.g. 2048,4096")
    p.add_argument("--depths", type=_depths, default=None,
                   help="needle depths in the filler, 0 (start) to 1 (end), comma-separated")
    p.add_argument("--kv", default=None,
                   help="comma-separated cache settings in the grammar of `eval --bits` "
                        "(fp16 | mlx4 | BITS[+sN][+wN]...; e.g. 3+s4+w64); the fp16 cache is "
                        "always run first as the reference")
    p.add_argument("--filler", help="filler text: a directory (its files, sorted) or "
                                    "comma-separated files (default /usr/share/common-licenses)")
    p.add_argument("--max-tokens", type=int, default=None, help="greedy answer tokens at most")
    p.add_argument("--prefill-step", type=int, default=None, help="prompt tokens per forward")
    p.add_argument("--seed", type=int, default=None, help="passphrases and cache seeds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown-from", metavar="JSON",
                   help="only print the Markdown table of a saved --json output")


DEFAULTS = {"lengths": [2048, 4096, 8192], "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
            "kv": "fp16,4,3,4+s4+w64,3+s4+w64", "filler": None, "max_tokens": 24,
            "prefill_step": 2048, "seed": 0}


def run(args: argparse.Namespace) -> int:
    from turboquant import needle

    if args.markdown_from:
        saved = json.loads(Path(args.markdown_from).read_text())
        print(needle.markdown_table(saved["summary"], saved["options"]["depths"]))
        return 0
    opts = dict(DEFAULTS)
    if args.config:
        try:
            opts.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"needle: cannot read config {args.config!r}: {e}") from None
        for k, parse in (("lengths", _ints), ("depths", _depths)):
            if isinstance(opts[k], str):
                opts[k] = parse(opts[k])
    for k in DEFAULTS:
        v = getattr(args, k)
        if v is not None:
            opts[k] = v
    if isinstance(opts["kv"], (list, tuple)):
        opts["kv"] = ",".join(opts["kv"])

    import mlx.core as mx
    from mlx_lm import load

    from turboquant import models
    from turboquant.mlx_eval import Setting

    try:
        settings = [Setting.parse(s) for s in str(opts["kv"]).split(",") if s.strip()]
    except ValueError as e:
        raise SystemExit(f"needle: {e}") from None
    model_dir = args.model or opts.get("model") or str(models.smollm2("float32"))
    model, tokenizer = load(model_dir)
    filler = opts["filler"]
    if filler is not None and "," in str(filler):
        filler = [f for f in str(filler).split(",") if f.strip()]
    text = needle.filler_text(filler) if filler is not None else needle.filler_text()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    log(f"model {model_dir}: {len(model.layers)} layers; lengths {opts['lengths']}, depths "
        f"{opts['depths']}, settings {opts['kv']}")
    try:
        cases = needle.evaluate(model, tokenizer, settings, opts["lengths"], opts["depths"],
                                seed=opts["seed"], max_answer_tokens=opts["max_tokens"],
                                prefill_step=opts["prefill_step"], filler=text, log=log)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rows = needle.summary(cases)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"model": model_dir, "options": opts, "machine": machine,
                          "mlx": mx.__version__, "summary": rows,
                          "cases": [asdict(c) for c in cases]}, indent=2))
    else:
        print(needle.format_table(rows, opts["depths"]))
    return 0
