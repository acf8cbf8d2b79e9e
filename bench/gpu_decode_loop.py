"""Decode steps in a loop, for a sampling profiler of the host (where building a GPU decode
step spends its time, inside mlx's native code included):

    py-spy record --native --rate 1000 --format raw -o steps.txt -- \\
        python bench/gpu_decode_loop.py --cache tq3 --context 8192 --steps 400

An 8-layer random model of Llama-3.1-8B's layer shape (fp16), prefilled with ``--context``
random tokens in 2,048-token chunks, then ``--steps`` decode steps as mlx-lm's generation loop
runs them (each step handed to the GPU with ``mx.async_eval`` as soon as it is built, the
previous one waited for). Prints the host time of building a step and the time per step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx

from gpu_common import machine, prefill, write_result
from gpu_decode_parts import LAYER, TINY, two_layer_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", choices=("fp16", "tq3"), default="tq3")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny layer shape, 2 layers, 256 tokens, 8 steps (anywhere)")
    ap.add_argument("--out", type=Path, help="also write the two times as JSON here")
    a = ap.parse_args(argv)
    from mlx_lm.models import cache as mlx_cache

    from turboquant.mlx_lm import make_prompt_cache

    if a.smoke:
        a.context, a.steps, a.layers = 256, 8, 2
    model = two_layer_model(TINY if a.smoke else LAYER, a.layers)
    cache = (mlx_cache.make_prompt_cache(model) if a.cache == "fp16"
             else make_prompt_cache(model, key_bits=3, value_bits=3))
    prefill(model, cache, a.context, 1024)
    tok = mx.array([[1]])
    mx.eval(model(tok, cache=cache))
    build = 0.0
    t0 = time.perf_counter()
    prev = None
    for _ in range(a.steps):
        b0 = time.perf_counter()
        out = model(tok, cache=cache)
        build += time.perf_counter() - b0
        mx.async_eval(out)
        if prev is not None:
            mx.eval(prev)
        prev = out
    mx.eval(prev)
    wall = time.perf_counter() - t0
    res = {"machine": machine(), "cache": a.cache, "context": a.context, "layers": a.layers,
           "build_us_per_layer": build / a.steps * 1e6 / a.layers,
           "step_us_per_layer": wall / a.steps * 1e6 / a.layers}
    print(f"{a.cache}, {a.context} tokens, {a.layers} layers: building a step "
          f"{res['build_us_per_layer']:.1f} us a layer, a step "
          f"{res['step_us_per_layer']:.1f} us a layer")
    if a.out:
        write_result(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
