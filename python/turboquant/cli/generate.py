"""``python -m turboquant generate``: mlx-lm generation with a TurboQuant KV cache."""

from __future__ import annotations

import argparse

HELP = "generate text with mlx-lm, the KV cache compressed by TurboQuant"


def add_fp16_layers(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _preset_names() -> list[str]:
    from turboquant.presets import names

    return names()


def cache_options(args: argparse.Namespace) -> dict:
    """make_prompt_cache keywords of the generate options: the preset, and every option
    given on the command line as an override."""
    key_bits = args.key_bits if args.key_bits is not None else args.kv_bits
    value_bits = args.value_bits if args.value_bits is not None else args.kv_bits
    return {"preset": args.kv_preset, "key_bits": key_bits, "value_bits": value_bits,
            "method": args.kv_method, "fp16_layers": args.fp16_layers, "seed": args.seed,
            "fp16_window": args.fp16_window, "fp16_sinks": args.fp16_sinks,
            "key_split": False if args.no_key_split else None, "profile": args.profile}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="mlx-lm model directory")
    p.add_argument("--prompt", "-p", default="Hello", help="prompt text")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--kv-preset", default=None, metavar="NAME",
                   help="named cache recipe: " + ", ".join(_preset_names()) + " (default: "
                        "tq3, or the recommended recipe at --kv-bits / --key-bits / "
                        "--value-bits; the options below override it; `python -m turboquant "
                        "info --preset NAME` prints its settings)")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="bits for keys and values (default: the preset's)")
    p.add_argument("--key-bits", type=int, default=None, help="override bits for keys")
    p.add_argument("--value-bits", type=int, default=None, help="override bits for values")
    p.add_argument("--kv-method", default=None, help="quantizer method (default: the preset's)")
    p.add_argument("--fp16-layers", type=add_fp16_layers, default=(),
                   help="comma-separated layer indices kept in fp16 (negative from the end)")
    p.add_argument("--fp16-window", type=int, default=None,
                   help="most recent tokens of every layer kept in fp16 (default: the "
                        "preset's; 0: off)")
    p.add_argument("--fp16-sinks", type=int, default=None,
                   help="first tokens of every layer kept in fp16 (attention sinks; default: "
                        "the preset's)")
    p.add_argument("--no-key-split", action="store_true",
                   help="same bits on every key channel (default: a split over RoPE pairs)")
    p.add_argument("--profile", help="per-layer bits from `python -m turboquant calibrate`")
    p.add_argument("--draft-model", metavar="DIR", default=None,
                   help="mlx-lm model directory of a smaller model with the same vocabulary: "
                        "speculative decoding (mlx-lm's draft_model); its KV cache is "
                        "compressed with the same options")
    p.add_argument("--num-draft-tokens", type=int, default=3,
                   help="tokens the draft model proposes per step (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print mlx-lm's speed report")
    p.add_argument("--sharded", nargs="?", const="auto", default=None,
                   choices=("auto", "tensor", "pipeline"),
                   help="load the model split over the processes of mlx's distributed "
                        "engine (run under `mlx.launch`): tensor parallel (each rank holds "
                        "its KV heads' codes), pipeline (each rank its layers') or auto "
                        "(mlx-lm's choice); every rank runs this command, rank 0 prints")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (per rank with --sharded): the generated "
                        "token ids and text, and what the caches hold (layers, KV heads, "
                        "bytes)")


def run(args: argparse.Namespace) -> int:
    from mlx_lm import generate, load, stream_generate

    from turboquant.mlx_lm import UnsupportedArchitectureError, make_prompt_cache

    if args.num_draft_tokens < 1:
        raise SystemExit(f"generate: --num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
    if args.sharded and args.draft_model is not None:
        raise SystemExit("generate: --draft-model is not supported with --sharded")
    rank, group = 0, None
    if args.sharded:
        from turboquant.distributed import sharded_load

        try:
            model, tokenizer, group, _mode = sharded_load(args.model, args.sharded)
        except (ValueError, OSError) as e:
            raise SystemExit(f"generate: cannot shard {args.model}: {e}") from None
        rank = group.rank()
    else:
        model, tokenizer = load(args.model)
    draft = None
    if args.draft_model is not None:
        draft, draft_tokenizer = load(args.draft_model)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise SystemExit(f"generate: the draft model's vocabulary ({draft_tokenizer.vocab_size}"
                             f" tokens) differs from the model's ({tokenizer.vocab_size})")
    try:
        cache = make_prompt_cache(model, **cache_options(args))
        # mlx-lm's speculative decoding takes one list: the model's layers, then the draft's.
        draft_cache = [] if draft is None else make_prompt_cache(draft, **cache_options(args))
    except (UnsupportedArchitectureError, ValueError, OSError) as e:
        raise SystemExit(f"generate: {e}") from None
    prompt = args.prompt
    if not args.ignore_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True)
    if (args.json or args.sharded) and draft is None:
        return _run_collect(args, model, tokenizer, prompt, cache, group, rank)
    if draft is None:
        text = generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                        prompt_cache=cache, verbose=args.verbose)
        if not args.verbose:
            print(text)
    else:
        n = accepted = 0
        last = None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                    draft_model=draft, num_draft_tokens=args.num_draft_tokens,
                                    prompt_cache=cache + draft_cache):
            print(last.text, end="", flush=True)
            n += 1
            accepted += bool(last.from_draft)
        print()
        if args.verbose and last is not None:
            print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
            print(f"Generation: {last.generation_tokens} tokens, "
                  f"{last.generation_tps:.3f} tokens-per-sec")
        print(f"[turboquant] draft model: {accepted} of {n} tokens accepted from the draft")
    kv = sum(c.nbytes for c in cache)
    print(f"[turboquant] KV cache: {kv:,} bytes for {cache[0].offset} tokens")
    if draft_cache:
        kv = sum(c.nbytes for c in draft_cache)
        print(f"[turboquant] draft KV cache: {kv:,} bytes for {draft_cache[0].offset} tokens")
    return 0


def _run_collect(args, model, tokenizer, prompt, cache, group, rank: int) -> int:
    """Generate token by token (every rank of a sharded run takes part in every step) and
    report the token ids; with --sharded, each rank reports what its caches hold."""
    import json

    from mlx_lm import stream_generate

    from turboquant.distributed import rank_report

    tokens, text, last = [], "", None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                             prompt_cache=cache):
        tokens.append(int(r.token))
        text += r.text
        last = r
    report = rank_report(model, cache, group) if args.sharded else {
        "rank": 0, "size": 1, "kv_bytes": int(sum(c.nbytes for c in cache)),
        "tokens": int(cache[0].offset)}
    if args.sharded and group is not None and group.size() > 1:
        # every rank done before any leaves: a rank that exits with a step's send or receive
        # still in flight (mlx-lm starts each next step before handing out the current
        # token) makes its peer's pending step fail with a lost connection
        import mlx.core as mx

        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    if args.json:
        print(json.dumps({**report, "generated": tokens, "text": text}), flush=True)
        return 0
    if rank == 0:
        print(text)
        if args.verbose and last is not None:
            print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
            print(f"Generation: {last.generation_tokens} tokens, "
                  f"{last.generation_tps:.3f} tokens-per-sec")
    heads = sorted({h for h in report["kv_heads"] if h is not None})
    first = sorted({o for o in report["kv_head_offsets"] if o})
    print(f"[turboquant] rank {report['rank']}/{report['size']}: KV cache: "
          f"{report['kv_bytes']:,} bytes for {report['tokens']} tokens, layers "
          f"{report['layers'][0]}-{report['layers'][-1]} of {report['model_layers']}, "
          f"{'/'.join(map(str, heads))} KV heads per layer"
          + (f" (from the model's KV head {'/'.join(map(str, first))})" if first else ""),
          flush=True)
    return 0
