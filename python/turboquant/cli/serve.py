"""``python -m turboquant serve``: mlx-lm's OpenAI-compatible server with TurboQuant caches."""

from __future__ import annotations

import argparse

HELP = "serve a model over an OpenAI-compatible HTTP API (mlx-lm's server), KV cache compressed"

EPILOG = ("Every other option is mlx-lm's server option, passed through unchanged "
          "(see `mlx_lm.server --help`: --temp, --max-tokens, --prompt-cache-size, "
          "--chat-template, --draft-model DIR and --num-draft-tokens N for speculative "
          "decoding, the draft's caches compressed too, ...). mlx-lm's own --kv-bits "
          "quantization is replaced by TurboQuant's. Concurrent requests are decoded together "
          "(continuous batching; --decode-concurrency / --prompt-concurrency bound the batch) "
          "unless --no-batching. A sharded model runs under mlx.launch (e.g. `mlx.launch "
          "--backend ring --hosts 127.0.0.1 -n 2 -- python -m turboquant serve --model DIR`; "
          "tensor parallel, or mlx-lm's --pipeline): rank 0 serves HTTP, every rank holds the "
          "caches of its KV heads or layers, and --max-kv-gb is the whole sharded cache's "
          "budget.")


def _gigabytes(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of gigabytes, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--max-kv-gb must be > 0, got {s!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("--model", required=True, help="mlx-lm model directory (or Hugging Face repo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--kv-preset", default=None,
                   help="named KV-cache configuration of make_prompt_cache (when available)")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="bits for keys and values (default 3 without a preset)")
    p.add_argument("--kv-key-bits", type=int, default=None, help="override bits for keys")
    p.add_argument("--kv-value-bits", type=int, default=None, help="override bits for values")
    p.add_argument("--kv-method", default=None, help="quantizer method (default turboquant_mse)")
    p.add_argument("--fp16-window", type=int, default=None,
                   help="recent tokens per layer kept in fp16 (default: the recipe's)")
    p.add_argument("--fp16-sinks", type=int, default=None,
                   help="first tokens per layer kept in fp16 (default: the recipe's)")
    p.add_argument("--kv-profile", default=None,
                   help="per-layer bits from `python -m turboquant calibrate`")
    p.add_argument("--max-kv-gb", type=_gigabytes, default=None,
                   help="budget of the prompt-cache store in GB (1e9 bytes), counted in "
                        "compressed bytes; least recently used entries are evicted")
    p.add_argument("--park-window", choices=("codes", "fp16"), default="codes",
                   help="how the prompt-cache store parks an entry's fp16 window: moved into "
                        "codes, its memory given back (default; a reused prompt's last window "
                        "tokens are then codes), or kept as fp16 rows")
    p.add_argument("--no-batching", dest="batching", action="store_false",
                   help="serve one request at a time (no continuous batching)")
    p.set_defaults(passthrough=[])


def options_from_args(args: argparse.Namespace) -> dict:
    from turboquant.serve import cache_options

    # Unset options take the recipe's values: the preset's, or without one the recommended
    # recipe at the given bits (tq3 when none are given; turboquant.presets).
    window, sinks = args.fp16_window, args.fp16_sinks
    return cache_options(kv_bits=args.kv_bits, key_bits=args.kv_key_bits,
                         value_bits=args.kv_value_bits, preset=args.kv_preset,
                         method=args.kv_method, fp16_window=window, fp16_sinks=sinks,
                         profile=args.kv_profile)


def run(args: argparse.Namespace) -> int:
    from turboquant import serve

    try:
        options = options_from_args(args)
    except ValueError as e:
        raise SystemExit(f"serve: {e}") from None
    max_bytes = None if args.max_kv_gb is None else int(args.max_kv_gb * 1e9)
    passthrough = ["--host", args.host, "--port", str(args.port), *args.passthrough]
    return serve.main(args.model, passthrough, options, max_bytes,
                      batching=getattr(args, "batching", True),
                      park_window=getattr(args, "park_window", "codes"))
