"""Which part of the TurboQuant cache costs GPU decode time at long context: one decode step
(built, then evaluated: host + GPU) of a 2-layer random model of Llama-3.1-8B's layer shape,
prefilled in 2,048-token chunks, with mlx-lm's fp16 cache and with the 3-bit cache under
recipe variants (each part switched off in turn), per context, in one run. Median of the
steps, per layer.

    python bench/gpu_decode_parts.py --contexts 32768,131072 \\
        --out bench/results/gpu_decode_parts.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from gpu_common import environment, machine, prefill_and_steps, write_result

VARIANTS = {
    "tq3 (default recipe)": (dict(key_bits=3, value_bits=3), {}),
    "tq3, no fp16 sinks/window": (dict(key_bits=3, value_bits=3, fp16_sinks=0, fp16_window=0), {}),
    "tq3, no key split": (dict(key_bits=3, value_bits=3, key_split=False), {}),
    "tq3, no centring": (dict(key_bits=3, value_bits=3, center=False), {}),
    "codes-only": (dict(preset="codes-only"), {}),
    "tq3, staged kernel": (dict(key_bits=3, value_bits=3), {"TQ_GPU_ATTENTION": "staged"}),
    "tq3, no async_eval after a page write": (dict(key_bits=3, value_bits=3),
                                               {"TQ_GPU_WRITE_ASYNC_EVAL": "0"}),
}


# The 8B model's layer shape; --smoke: a tiny one (the script checked anywhere, on the core).
LAYER = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128)
TINY = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)
LAYERS = 2


def two_layer_model(layer: dict = LAYER):
    """A random 2-layer Llama model of the given layer shape, fp16."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = dict(layer, num_hidden_layers=LAYERS, vocab_size=1024, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                model_type="llama")
    model = llama.Model(llama.ModelArgs.from_dict(args))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def step_us(model, context: int, options: dict | None, steps: int) -> dict:
    """Per-layer host and total time of a decode step (medians) and the prefill speed, on a
    fresh cache: mlx-lm's fp16 one (``options`` None) or make_prompt_cache(**options)."""
    from mlx_lm.models import cache as mlx_cache

    from turboquant.mlx_lm import make_prompt_cache

    cache = (mlx_cache.make_prompt_cache(model) if options is None
             else make_prompt_cache(model, **options))
    prefill, hosts, totals = prefill_and_steps(model, cache, context, steps)
    return dict(host_us=float(np.median(hosts)) * 1e6 / LAYERS,
                total_us=float(np.median(totals)) * 1e6 / LAYERS,
                prefill_tok_s=context / prefill)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help="semicolon-separated names of VARIANTS (fp16 always runs)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny layer shape at 256 tokens: checks the script anywhere")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    layer = LAYER
    if a.smoke:
        a.contexts, a.steps, layer = "256", 2, TINY
    model = two_layer_model(layer)
    rows = []
    for T in (int(x) for x in a.contexts.split(",")):
        base = step_us(model, T, None, a.steps)
        rows.append(dict(context=T, cache="fp16", **base))
        print(f"T={T:7d} {'fp16':40s} host {base['host_us']:7.1f} us/layer  step "
              f"{base['total_us']:7.1f} us/layer  prefill {base['prefill_tok_s']:8.0f} tok/s",
              flush=True)
        for name in a.variants.split(";"):
            options, env = VARIANTS[name]
            with environment(**env):
                step_us(model, min(T, 4096), options, 2)  # first-use compilation, untimed
                r = step_us(model, T, options, a.steps)
            rows.append(dict(context=T, cache=name, **r))
            print(f"T={T:7d} {name:40s} host {r['host_us']:7.1f} us/layer  step "
                  f"{r['total_us']:7.1f} us/layer  x{base['total_us'] / r['total_us']:.2f} vs "
                  f"fp16  prefill {r['prefill_tok_s']:8.0f} tok/s", flush=True)
    if a.out:
        write_result(a.out, dict(machine=machine(), steps=a.steps, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
