"""``python -m turboquant convert-gguf FILE.gguf OUT_DIR``: GGUF -> mlx-lm model directory."""

from __future__ import annotations

import argparse

HELP = ("convert a GGUF model (llama, mistral, qwen2, qwen3, gemma3) into an mlx-lm directory "
        "(safetensors + tokenizer)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="dtype of the dequantized weights (float32 runs faster on mlx's CPU)")


def run(args: argparse.Namespace) -> int:
    from turboquant.convert_gguf import GGUFConversionError, convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype)
    except (GGUFConversionError, FileNotFoundError) as e:
        raise SystemExit(f"convert-gguf: {e}") from None
    print(f"wrote {out}")
    return 0
