"""``python -m turboquant info FILE``: describe a saved cache; ``info --preset NAME``: a
named cache recipe's exact settings and its memory at 4K and 32K tokens."""

from __future__ import annotations

import argparse
import os
import struct

HELP = "describe a saved KV cache file, or a named cache recipe (--preset)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a file written by cache.save(path)")
    p.add_argument("--preset", metavar="NAME",
                   help="print the settings of a named cache recipe (tq4, tq3, tq3-mixed, "
                        "tq2.5, tq2, codes-only) and its memory, everything counted")
    p.add_argument("--shape", action="append", metavar="SHAPE",
                   help="model shape for --preset's memory: smollm2-135m, llama-3.1-8b or "
                        "LAYERS,Q_HEADS,KV_HEADS,HEAD_DIM (repeatable; default: both names)")
    p.add_argument("--tokens", default="4096,32768",
                   help="context lengths for --preset's memory, comma-separated")


def run_preset(args: argparse.Namespace) -> int:
    from turboquant import preset_memory, presets

    try:
        p = presets.get(args.preset)
        shapes = [presets.parse_shape(s) for s in (args.shape or list(presets.SHAPES))]
        tokens = [int(t) for t in str(args.tokens).split(",") if t.strip()]
        if not tokens or min(tokens) < 2:
            raise ValueError(f"--tokens needs context lengths >= 2, got {args.tokens!r}")
    except ValueError as e:
        print(f"error: {e}")
        return 1
    for line in presets.describe(p):
        print(line)
    print("memory (everything counted: codes, norms, part angles, rotations, fp16 sinks and "
          "window, page slack; measured by the cache after a prompt and one decode step):")
    for name, shape in shapes:
        layers, n_q, n_kv, d = shape
        for t in tokens:
            b = preset_memory.memory_bytes(p, shape, t)
            f = presets.fp16_bytes(shape, t)
            print(f"  {name} ({layers} layers, {n_q} q / {n_kv} kv heads, head_dim {d}) at "
                  f"{t} tokens: {b:,} bytes = {b / t:,.1f} bytes/token, "
                  f"{16 * b / f:.3f} bits/coord, {f / b:.2f}x smaller than fp16 K/V")
    return 0


def run(args: argparse.Namespace) -> int:
    import turboquant as tq

    if args.preset is not None:
        if args.file is not None:
            print("error: give a cache file or --preset NAME, not both")
            return 1
        return run_preset(args)
    if args.file is None:
        print("error: info needs a cache file or --preset NAME")
        return 1

    try:
        core = tq.KVCache.load(args.file)
    except (FileNotFoundError, tq.FormatError) as e:
        print(f"error: {e}")
        return 1
    with open(args.file, "rb") as f:
        version = struct.unpack("<I", f.read(12)[8:12])[0]
    mem = core.memory_bytes()
    print(f"file:            {args.file} ({os.path.getsize(args.file)} bytes, format version {version})")
    print(f"head_dim:        {core.head_dim}")
    print(f"layers:          {core.n_layers}")
    print(f"heads:           {core.n_q_heads} query / {core.n_kv_heads} kv"
          + (f" (the model's KV heads {core.kv_head_offset}-"
             f"{core.kv_head_offset + core.n_kv_heads - 1})" if core.kv_head_offset else ""))
    print(f"keys:            {core.key_method}, {core.key_bits} bits")
    print(f"values:          {core.value_method}, {core.value_bits} bits")
    print(f"rotation:        {core.rotation}, seed {core.seed}, jl_dim {core.jl_dim or core.head_dim}")
    if core.n_outlier_channels or core.outlier_channels:
        print(f"outlier split:   {len(core.outlier_channels)} channels at {core.outlier_bits or 'bits + 1'} bits "
              f"({core.outlier_roles}), {core.split_angle_bits}-bit part angle")
    print(f"pages:           {core.block_tokens} tokens" + (f", max {core.max_tokens}" if core.max_tokens else ""))
    sizes = [core.size(layer) for layer in range(core.n_layers)]
    shown = ", ".join(str(s) for s in sizes[:8]) + (" ..." if len(sizes) > 8 else "")
    print(f"tokens/layer:    {shown}")
    if core.fp16_window or core.fp16_layers:
        win = ", ".join(str(core.window_tokens(layer)) for layer in range(min(8, core.n_layers)))
        print(f"fp16 window:     {core.fp16_window} tokens, fp16 layers {core.fp16_layers or 'none'}; "
              f"window tokens/layer: {win}" + (" ..." if core.n_layers > 8 else ""))
    if core.fp16_sinks:
        print(f"fp16 sinks:      {core.fp16_sinks} tokens per layer")
    if core.decay_after:
        dec = sum(core.decayed_blocks(layer, h, r) for layer in range(core.n_layers)
                  for h in range(core.n_kv_heads) for r in ("key", "value"))
        print(f"decay:           to {core.decay_bits} bits after {core.decay_after} tokens; {dec} blocks decayed")
    if core.mixed_group_blocks:
        low = sum(core.decayed_blocks(layer, h, r) for layer in range(core.n_layers)
                  for h in range(core.n_kv_heads) for r in ("key", "value"))
        print(f"mixed precision: {core.mixed_keep_blocks} of every {core.mixed_group_blocks} blocks "
              f"(the most attended tokens) at the stream's bits, the rest at {core.decay_bits} bits; "
              f"{low} blocks at {core.decay_bits} bits")
    print(f"memory:          {mem} bytes in memory, fp16 K+V would be {core.fp16_bytes()} bytes"
          + (f" ({core.fp16_bytes() / mem:.2f}x)" if sizes[0] else ""))
    coords = 2 * core.n_layers * core.n_kv_heads * core.head_dim
    fresh = 8 * core.bytes_per_token() / coords
    if sizes[0]:  # stored: decayed blocks at their bits, fp16 sink/window rows at 16 bits
        bits = 8 * core.stored_bytes_per_token() / coords
        print(f"effective bits:  {bits:.3f} per coordinate over the stored tokens (codes at each "
              f"block's bits + fp16 norms + fp16 sink/window rows); {fresh:.3f} per freshly coded token")
    else:
        print(f"effective bits:  {fresh:.3f} per coordinate (codes + fp16 norms)")
    return 0
