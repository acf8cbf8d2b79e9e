"""The GPU operations of one decode step of one layer, counted on any machine. A
TurboQuantKVCache on the GPU store takes the new token's K/V (``update_and_fetch``) and
answers its queries (``attend``); the mlx graph this builds is exported
(``mx.export_to_dot``) and its primitives are counted. The turboquant kernels are replaced by
stubs that record their inputs, so each launch counts once and the graph feeding it is kept.

Primitives that launch no GPU work (views, reshapes, broadcasts) are left out. A
concatenation copies each of its inputs. mlx-lm's fp16 ``KVCache`` step is two slice updates
and one fused sdpa kernel (plus cuDNN's reduction on CUDA). Deterministic: a change that adds
or removes an operation shows here without a GPU, and the GPU's traces
(``gpu_decode_parts.py --trace``) give the times.

    python bench/gpu_decode_nodes.py [--context 512] [--steps 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from gpu_common import stub_kernels, write_result
from turboquant import mlx_cache

# Primitives that make views or metadata only (no kernel on mlx's GPU back ends).
VIEWS = {"Reshape", "Slice", "Broadcast", "ExpandDims", "Squeeze", "Transpose", "View",
         "AsStrided", "Flatten", "Unflatten", "StopGradient", "Depends"}


class _StubKernel:
    """A kernel launch that records its name and inputs; its outputs are evaluated zeros
    (leaves of the graph), so only the operations feeding the launch are counted."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 **kw):
        self.log.append((self.name, list(inputs)))
        outs = [mx.zeros(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)]
        mx.eval(*outs)
        return outs


def count(arrays) -> collections.Counter:
    """Primitives of the graph that makes ``arrays`` (evaluated arrays are leaves)."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *arrays)
    names = re.findall(r'label ="([A-Za-z_]+)', buf.getvalue())
    return collections.Counter(n for n in names if n not in VIEWS)


def store_arrays(store) -> list:
    out = [a for a in (store._k_sink, store._v_sink, store._k_win, store._v_win)
           if a is not None]
    return out + [a for a in store.code_arrays() if a is not None]


def recipe_cache(kv_heads: int, group: int, dim: int, **recipe):
    """One layer's cache as ``turboquant.mlx_lm.make_prompt_cache`` makes it (the default
    recipe at 3 bits unless ``recipe`` says otherwise), for a one-layer Llama model of this
    attention shape."""
    from mlx_lm.models import llama

    from turboquant.mlx_lm import make_prompt_cache

    args = dict(hidden_size=256, num_hidden_layers=1, intermediate_size=512,
                num_attention_heads=kv_heads * group, num_key_value_heads=kv_heads,
                head_dim=dim, vocab_size=64, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False, model_type="llama")
    model = llama.Model(llama.ModelArgs.from_dict(args))
    recipe = {"key_bits": 3, "value_bits": 3, **recipe}
    (cache,) = make_prompt_cache(model, **recipe)
    assert isinstance(cache, mlx_cache.TurboQuantKVCache)
    return cache


def decode_nodes(context: int, steps: int, kv_heads: int = 8, group: int = 4, dim: int = 128,
                 **cache_kw) -> dict:
    log: list = []
    stub_kernels(lambda which: _StubKernel(which, log))
    os.environ["TQ_GPU_WRITE_ASYNC_EVAL"] = "0"  # nothing evaluated inside a step
    rng = np.random.default_rng(0)

    def f16(*shape):
        x = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.float16)
        mx.eval(x)
        return x

    cache = recipe_cache(kv_heads, group, dim, **cache_kw)
    scale = dim ** -0.5
    cache.update_and_fetch(f16(1, kv_heads, context, dim), f16(1, kv_heads, context, dim))
    mx.eval(cache.attend(f16(1, kv_heads * group, context, dim), scale))
    per_step = []
    for _ in range(steps):
        k, v, q = (f16(1, kv_heads, 1, dim), f16(1, kv_heads, 1, dim),
                   f16(1, kv_heads * group, 1, dim))
        mx.eval(*store_arrays(cache._core))
        del log[:]
        cache.update_and_fetch(k, v)
        out = cache.attend(q, scale)
        launched = [name for name, _ in log]
        ops = count([out] + store_arrays(cache._core)
                    + [x for _, inputs in log for x in inputs])
        per_step.append(dict(ops=sum(ops.values()), kernels=len(launched),
                             total=sum(ops.values()) + len(launched),
                             by_primitive=dict(ops), launched=launched))
        mx.eval(out, *store_arrays(cache._core), *[x for _, inputs in log for x in inputs])
    order = [s["total"] for s in per_step]
    totals = sorted(order)
    median = totals[len(totals) // 2]
    return dict(context=context, steps=steps, kv_heads=kv_heads, group=group, dim=dim,
                median_total=median, max_total=totals[-1], min_total=totals[0],
                per_step=order, typical=per_step[order.index(median)],
                gpu_store=bool(cache._gpu))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=128, help="decode steps (a flush every "
                    "block_tokens of them)")
    ap.add_argument("--smoke", action="store_true", help="a short run (the test suite's)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.smoke:
        a.context, a.steps = 320, 8
    res = decode_nodes(a.context, a.steps)
    t = res["typical"]
    print(f"turboquant-3 (default recipe), {a.context} tokens: {res['median_total']} GPU "
          f"operations a decode step and layer (median of {a.steps} steps; "
          f"{res['min_total']}-{res['max_total']}, the most at a window flush)")
    print(f"  kernel launches: {', '.join(t['launched'])}")
    print("  mlx operations:  " + ", ".join(f"{k} {v}" for k, v in
                                            sorted(t["by_primitive"].items())))
    print("mlx-lm fp16 KVCache: 2 slice updates + 1 fused sdpa (+ cuDNN's reduction on CUDA)")
    if a.out:
        write_result(a.out, dict(rows=[res]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
