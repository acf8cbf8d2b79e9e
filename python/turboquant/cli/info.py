"""``python -m turboquant info FILE``: describe a saved cache."""

from __future__ import annotations

import argparse
import os
import struct

HELP = "describe a saved KV cache file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a file written by cache.save(path)")


def run(args: argparse.Namespace) -> int:
    import turboquant as tq

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
    print(f"heads:           {core.n_q_heads} query / {core.n_kv_heads} kv")
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
