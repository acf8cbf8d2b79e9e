"""``python -m turboquant eval``: perplexity / logit agreement / KV bytes / decode speed of
TurboQuant KV-cache settings against mlx-lm's fp16 and quantized caches on a real model."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

HELP = "evaluate KV-cache settings on an mlx-lm model (quality vs fp16 KV, memory, decode speed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="mlx-lm model directory (default: SmolLM2-135M, fetched)")
    p.add_argument("--config", help="JSON file with any of the options below (CLI wins)")
    p.add_argument("--text", help="English text file(s) to score, comma-separated (windows "
                   "are taken from the first, then the next; config: \"text\" or \"texts\")")
    p.add_argument("--windows", type=int, default=None,
                   help="disjoint windows of prefix + max-tokens tokens pooled into each "
                        "result (each from an empty cache); > 1 adds a standard error of the "
                        "ppl ratio")
    p.add_argument("--bits", default=None,
                   help="comma-separated settings: fp16 | mlx4 | mlx8 | PRESET | "
                        "BITS[+OPT...][/FLAG...]; PRESET a named recipe (tq4, tq3, tq3-mixed, "
                        "tq2.5, tq2, codes-only: `info --preset NAME` shows its settings); "
                        "BITS 2, 3, k4v3 or p (profile) with exactly the options given (no "
                        "fp16 tokens unless sN / wN); OPT fp16:L,.. (fp16 layers), wN "
                        "(fp16 window of N tokens), sN (N fp16 sinks), dA:B (decay code blocks "
                        "with A newer tokens to B bits), svT (sparse V threshold T, scored one "
                        "token per step; sv0 = its dense control), profile:PATH; FLAG raw or "
                        "nosplit. E.g. 3+s4+w64+d256:2")
    p.add_argument("--prefix", type=int, default=None, help="tokens prefilled before scoring")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens scored after the prefix")
    p.add_argument("--chunk", type=int, default=None, help="tokens per scoring step")
    p.add_argument("--context", type=int, default=None, help="context for the decode benchmark")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed (0: skip)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown-from", metavar="JSON",
                   help="only print the Markdown table of a saved --json output")


DEFAULTS = {"text": "/usr/share/common-licenses/GPL-3", "bits": "2,3,4", "prefix": 512,
            "max_tokens": 512, "chunk": 16, "context": 4096, "decode_tokens": 32, "seed": 0,
            "windows": 1}


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx
    from mlx_lm import load

    from turboquant import models
    from turboquant.mlx_eval import Setting, evaluate, format_table

    if args.markdown_from:
        from turboquant.mlx_eval import markdown_table

        saved = json.loads(Path(args.markdown_from).read_text())
        print(markdown_table(saved["results"], saved["options"]["context"]))
        return 0
    opts = dict(DEFAULTS)
    if args.config:
        opts.update(json.loads(Path(args.config).read_text()))
    for k in DEFAULTS:
        v = getattr(args, k)
        if v is not None:
            opts[k] = v
    model_dir = args.model or opts.get("model") or str(models.smollm2("float32"))
    model, tokenizer = load(model_dir)
    paths = opts.get("texts") if args.text is None and opts.get("texts") else \
        [t for t in str(opts["text"]).split(",") if t.strip()]
    texts = []
    for path in paths:
        try:
            texts.append(tokenizer.encode(Path(path).read_text()))
        except OSError as e:
            raise SystemExit(f"eval: cannot read text {path!r}: {e.strerror}") from None
    settings = [Setting.parse(s) for s in str(opts["bits"]).split(",") if s.strip()]
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log(f"model {model_dir}: {len(model.layers)} layers; text(s) "
        + ", ".join(f"{p} ({len(t)} tokens)" for p, t in zip(paths, texts))
        + f"; prefix {opts['prefix']}, scored {opts['max_tokens']}, chunk {opts['chunk']}, "
        f"windows {opts['windows']}")
    results = evaluate(model, texts, settings, prefix=opts["prefix"], score=opts["max_tokens"],
                       chunk=opts["chunk"], context=opts["context"],
                       decode_tokens=opts["decode_tokens"], seed=opts["seed"], log=log,
                       windows=int(opts["windows"]))
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    if args.json:
        print(json.dumps({"model": model_dir, "options": opts, "machine": machine,
                          "mlx": mx.__version__, "results": [r.as_dict() for r in results]},
                         indent=2))
    else:
        print(format_table(results, opts["context"]))
        print("ratio: ppl / fp16-KV ppl; cos, KL, top1: next-token logits vs the fp16-KV run; "
              "x fp16: exact fp16 K+V bytes / measured cache bytes; /fp16, /q4, /q8: decode "
              "speed vs mlx-lm KVCache, QuantizedKVCache(4), QuantizedKVCache(8).")
    return 0
