"""KV-cache memory of Gemma-3-270M's shape: mlx-lm's caches vs TurboQuant's, every layer counted.

Gemma-3-270M: 18 layers, 4 query heads, 1 KV head, head_dim 256; every 6th layer is global
(KVCache), the other 15 slide over 512 tokens (RotatingKVCache). The model is built with a
tiny vocabulary and random weights only to get its cache layout from ``make_cache``; the
caches are then filled with synthetic K/V of the right shape (memory does not depend on the
values) the way mlx-lm's generate fills them: a prefill in chunks of 2048 tokens, then one
decode step, so the context holds exactly N tokens. Bytes are the caches' own accounting
(``nbytes``: mlx-lm's allocated buffers; TurboQuant's code and norm pages, fp16 rows,
quantizer state and per-layer host arrays: centring means, key channel order).

  PYTHONPATH=python python bench/sliding_memory.py --tokens 4096 32768 --bits 3
  PYTHONPATH=python python bench/sliding_memory.py --tokens 4096 32768 --preset tq3-mixed
  PYTHONPATH=python python bench/sliding_memory.py --tokens 4096 32768 --bits 3 --ring-extra-bits 1
  PYTHONPATH=python python bench/sliding_memory.py --tokens 4096 32768 --bits 3 --ring-bits 4

``--bits B`` is make_prompt_cache(key_bits=B, value_bits=B) (the recommended recipe at B
bits); ``--preset NAME`` a named recipe (turboquant.presets).
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
import turboquant.mlx_lm as tq_mlx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import gemma3_text
from turboquant.mlx_rotating import TurboQuantRotatingKVCache

GEMMA3_270M = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
               "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 256, "rms_norm_eps": 1e-6, "vocab_size": 256, "sliding_window": 512,
               "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "rope_theta": 1e6,
               "rope_local_base_freq": 1e4, "max_position_embeddings": 32768}


def fill(caches, n_tokens: int, n_q_heads: int, head_dim: int, rng, step: int = 2048):
    """Prefill n_tokens - 1 tokens in chunks of `step`, then one decode step."""
    chunks = [step] * ((n_tokens - 1) // step) + ([(n_tokens - 1) % step] if
                                                   (n_tokens - 1) % step else []) + [1]
    for T in chunks:
        k = mx.array(rng.standard_normal((1, 1, T, head_dim)).astype(np.float16))
        v = mx.array(rng.standard_normal((1, 1, T, head_dim)).astype(np.float16))
        for c in caches:
            c.update_and_fetch(k, v)
            if isinstance(c, TurboQuantRotatingKVCache) or \
                    (isinstance(c, tq_mlx.TurboQuantKVCache) and (c._core is None or T == 1
                                                                   or c.mixed_bits)):
                # The ring appends and attends chunk by chunk; a global layer needs one
                # attention call to build its core (it encodes on append afterwards), with
                # mixed precision one per chunk (its window flushes the tokens attention
                # rated, as in generation).
                Tq = T if isinstance(c, TurboQuantRotatingKVCache) or c._core is None \
                    or c.mixed_bits else 1
                q = mx.array(rng.standard_normal((1, n_q_heads, Tq, head_dim))
                             .astype(np.float16))
                c.attend(q, scale=head_dim ** -0.5)
        mx.eval([c.keys for c in caches if isinstance(c, mlx_cache._BaseCache) and
                 getattr(c, "keys", None) is not None])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--preset", default=None, help="a named recipe instead of --bits")
    ap.add_argument("--ring-extra-bits", type=int, default=None,
                    help="make_prompt_cache's ring_extra_bits (sliding rings' extra bits)")
    ap.add_argument("--ring-bits", type=int, default=None,
                    help="the sliding rings' own recipe: codes of this many bits with "
                         "--ring-window fp16 rows (0: none) instead of the global layers'")
    ap.add_argument("--ring-value-bits", type=int, default=None,
                    help="the rings' value bits under --ring-bits (default: --ring-bits)")
    ap.add_argument("--ring-window", type=int, default=0,
                    help="fp16 window of the rings under --ring-bits")
    ap.add_argument("--ring-block-tokens", type=int, default=None,
                    help="the rings' block (page and flush) size under --ring-bits")
    args = ap.parse_args()
    # mixed precision counted routed on every global layer (mixed_trial off): the layers a
    # trial makes uniform hold the same code bits without the kept-token masks
    kw = {"preset": args.preset, "mixed_trial": False} if args.preset else \
        {"key_bits": args.bits, "value_bits": args.bits}
    kw["ring_extra_bits"] = args.ring_extra_bits
    cfg = GEMMA3_270M
    mx.random.seed(0)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(cfg))
    d, hq = cfg["head_dim"], cfg["num_attention_heads"]
    what = f"preset {args.preset}" if args.preset else f"{args.bits}-bit keys and values"
    if args.ring_extra_bits:
        what += f", rings {args.ring_extra_bits} bit(s) wider"
    if args.ring_bits:
        vb = args.ring_value_bits or args.ring_bits
        what += (f", rings {args.ring_bits}/{vb}-bit codes with a {args.ring_window}-token fp16 "
                 f"window, {args.ring_block_tokens or 'default'}-token blocks")
    print(f"Gemma-3-270M shape, {what}; bytes per layer kind")
    print(f"{'tokens':>7} {'cache':>16} {'global':>12} {'sliding':>12} {'total':>12} "
          f"{'ratio':>7}")
    for n in args.tokens:
        rng = np.random.default_rng(0)
        ref = mlx_cache.make_prompt_cache(model)
        fill(ref, n, hq, d, rng)
        rng = np.random.default_rng(0)
        tq = tq_mlx.make_prompt_cache(model, **kw)
        if args.ring_bits:  # the rings from their own recipe (eval's G=...;S=... settings)
            rings = tq_mlx.make_prompt_cache(model, key_bits=args.ring_bits,
                                             value_bits=args.ring_value_bits or args.ring_bits,
                                             ring_extra_bits=0, ring_window=args.ring_window,
                                             ring_block_tokens=args.ring_block_tokens or 32)
            tq = [r if isinstance(r, TurboQuantRotatingKVCache) else c for c, r in zip(tq, rings)]
        assert all(isinstance(c, tq_mlx.TurboQuantKVCache) for c in tq), "a layer left fp16"
        fill(tq, n, hq, d, rng)
        rows = {}
        # nbytes counts everything a layer holds: a TurboQuant cache's codes, fp16 rows and
        # its host arrays (centring means, key channel order)
        for name, caches in (("mlx-lm", ref), ("turboquant", tq)):
            g = sum(c.nbytes for c in caches if type(c).__name__.find("Rotating") < 0)
            s = sum(c.nbytes for c in caches if type(c).__name__.find("Rotating") >= 0)
            rows[name] = (g, s)
        # sliding=False: the same global layers, mlx-lm's fp16 ring on the sliding ones
        rows["tq sliding=False"] = (rows["turboquant"][0], rows["mlx-lm"][1])
        base = sum(rows["mlx-lm"])
        for name, (g, s) in rows.items():
            print(f"{n:>7} {name:>16} {g:>12,} {s:>12,} {g + s:>12,} {base / (g + s):>6.2f}x")
        assert all(c.offset == n for c in tq + ref)
        ring = [c for c in tq if isinstance(c, TurboQuantRotatingKVCache)]
        print(f"{'':>7} ring: {len(ring)} layers, {ring[0]._core.size(0)} tokens held "
              f"(max {ring[0].max_coded_tokens}), {ring[0].evicted_tokens} evicted")


if __name__ == "__main__":
    main()
