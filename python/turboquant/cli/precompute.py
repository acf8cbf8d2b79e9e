"""``python -m turboquant precompute``: write the rotations and codebooks of a cache
configuration into an NpyArtifactStore directory, for later builds to load."""

from __future__ import annotations

import argparse

HELP = "precompute rotations/codebooks into an artifact directory (NpyArtifactStore)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", type=int, nargs="+", default=[3], help="one or more bit widths")
    p.add_argument("--method", default="turboquant_mse", help="quantization method (turboquant.methods())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--rotation", default=None, choices=["auto", "hadamard", "hadamard1", "dense"],
                   help="default: hadamard1 (one Hadamard round) for a power-of-two head dim, "
                        "else auto (dense)")
    p.add_argument("--jl-dim", type=int, default=0)
    p.add_argument("--out", required=True, help="artifact directory")


def run(args: argparse.Namespace) -> int:
    import turboquant as tq

    store = tq.NpyArtifactStore(args.out)
    for bits in args.bits:
        b = (tq.KVCacheBuilder().with_method(args.method).with_head_dim(args.head_dim).with_bit_width(bits)
             .with_seed(args.seed).with_layers(args.layers).with_heads(args.kv_heads, args.kv_heads)
             .with_jl_dim(args.jl_dim).with_artifact_store(store))
        if args.rotation is not None:
            b = b.with_rotation(args.rotation)
        cache = b.build()
        loaded = cache.description["artifacts_loaded"]
        state = "already present" if all(v == args.layers * args.kv_heads for v in loaded.values()) else "written"
        print(f"{args.method} d={args.head_dim} bits={bits} seed={args.seed}: "
              f"{2 * args.layers * args.kv_heads} rotations ({cache.core.rotation}) + codebooks {state}")
    print(f"artifacts in {store.root}: {len(store.keys())} entries")
    return 0
