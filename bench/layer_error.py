"""Attention-output error of cache settings per layer, with exact inputs.

The model runs on mlx-lm's fp16 caches; each chosen layer also holds one TurboQuant cache per
setting, fed the same keys and values, and answers the same queries from its codes beside the
exact attention (which the model goes on with). Reported per layer and setting: the relative
squared error sum ||o - o_exact||^2 / sum ||o_exact||^2 of the outputs of the scored queries
(the 512 tokens after a 512-token prefill, 16 per step, as in ``turboquant eval``). Errors do
not compound across layers here, so settings can be compared layer by layer.

  PYTHONPATH=python python bench/layer_error.py --model .models/gemma-3-270m-float32 \\
      --layers global --bits 3+s4+w64,4+s4+w64+m2:0.5,2+s4+w64,4+s4+w64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models import base as mlx_base
from mlx_lm.models import cache as mlx_cache

from turboquant import mlx_eval as ev
from turboquant import mlx_route

TUNING = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3"]


class Shadow:
    """An fp16 cache that also feeds TurboQuant caches of the same layer."""

    def __init__(self, fp16, caches, layer):
        self.fp16, self.caches, self.layer = fp16, caches, layer
        self.fetched = []

    def __getattr__(self, name):
        return getattr(self.fp16, name)

    @property
    def offset(self):
        return self.fp16.offset

    def update_and_fetch(self, k, v):
        self.fetched = [c.update_and_fetch(k, v) for c in self.caches]
        return self.fp16.update_and_fetch(k, v)

    def make_mask(self, *args, **kwargs):
        return self.fp16.make_mask(*args, **kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="mlx-lm model directory")
    ap.add_argument("--texts", default=",".join(TUNING))
    ap.add_argument("--windows", type=int, default=2, help="1,024-token windows, from the start")
    ap.add_argument("--bits", required=True, help="eval settings, comma-separated")
    ap.add_argument("--layers", default="all",
                    help="all, global (full-attention), sliding, or indices (comma-separated)")
    args = ap.parse_args()
    model, tok = load(args.model)
    texts = [tok.encode(Path(p).read_text()) for p in args.texts.split(",")]
    wins = ev.text_windows(texts, args.windows, 1024)
    specs = [s for s in args.bits.split(",") if s]
    err: dict[tuple[int, int], list[float]] = {}
    exact_sdpa = mlx_route._original_sdpa

    def routed(queries, keys, values, cache, scale, mask, sinks=None):
        if not isinstance(cache, Shadow):
            return mlx_route._routed_sdpa(queries, keys, values, cache, scale, mask, sinks)
        out = exact_sdpa(queries, keys, values, cache=cache.fp16, scale=scale, mask=mask,
                         sinks=sinks)
        for j, c in enumerate(cache.caches):
            c._fetched = cache.fetched[j]
            o = mlx_route._turboquant_attention(queries, *cache.fetched[j], c, scale, mask)
            if cache.offset > 513:  # the scored queries
                e = err.setdefault((j, cache.layer), [0.0, 0.0])
                e[0] += float(mx.sum((o - out) ** 2).item())
                e[1] += float(mx.sum(out ** 2).item())
        return out

    kinds = ["S" if type(c) is mlx_cache.RotatingKVCache else "G"
             for c in mlx_cache.make_prompt_cache(model)]
    chosen = {"all": range(len(kinds)),
              "global": [i for i, k in enumerate(kinds) if k == "G"],
              "sliding": [i for i, k in enumerate(kinds) if k == "S"]}
    layers = list(chosen[args.layers] if args.layers in chosen else
                  [int(x) for x in args.layers.split(",")])
    caches = []  # made before the route is swapped (make_prompt_cache checks it)
    for _ in wins:
        fp16 = mlx_cache.make_prompt_cache(model)
        tq = [ev.make_cache(model, ev.Setting.parse(s)) for s in specs]
        caches.append([Shadow(fp16[i], [c[i] for c in tq], i) if i in layers else fp16[i]
                       for i in range(len(fp16))])
    for name, mod in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and \
                getattr(mod, "scaled_dot_product_attention", None) is mlx_route._routed_sdpa:
            mod.scaled_dot_product_attention = routed
    try:
        for toks, cache in zip(wins, caches):
            model(mx.array(toks[:512])[None], cache=cache)
            for i in range(512, 1023, 16):
                mx.eval(model(mx.array(toks[i:min(i + 16, 1023)])[None], cache=cache))
    finally:
        for name, mod in list(sys.modules.items()):
            if getattr(mod, "scaled_dot_product_attention", None) is routed:
                mod.scaled_dot_product_attention = mlx_route._routed_sdpa
    print("relative attention-output error per layer (" + ", ".join(
        f"L{i}{kinds[i]}" for i in layers) + "; G: full attention, S: sliding window)")
    for j, s in enumerate(specs):
        vals = [err[(j, i)][0] / err[(j, i)][1] for i in layers]
        print(f"{s:<32} sum {sum(vals):.4f}  " + " ".join(f"{v:.4f}" for v in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
