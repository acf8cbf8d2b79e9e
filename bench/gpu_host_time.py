"""Host time of the GPU store's decode path, on any machine: the mlx kernels are replaced by
stubs that only make outputs of the right shapes (one mlx op per output), so what is timed
is the Python and mlx graph building a GPU decode step spends per layer before the GPU runs
anything (the part `bench/gpu_overhead.py` measures on a GPU as "host"). Against mlx-lm's
fp16 KVCache in the same run: an 8-layer random Llama-shape model (32 query heads, 8 KV
heads, head_dim 128, small hidden size so the model's own ops stay cheap), 2,000 cached
tokens (512 for the model), the default recipe at 3 bits (key split, fp16 sinks and window); and one
MetalCodeStore.attend call on its own.

    python bench/gpu_host_time.py [--steps 64] [--out bench/results/gpu_host_time.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import mlx.core as mx

from gpu_common import stub_kernels, write_result


class _StubKernel:
    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 **kw):
        return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]


def model_host_us(kind: str, steps: int) -> float:
    from mlx_lm.models import cache as mlx_cache
    from mlx_lm.models import llama

    from turboquant.mlx_lm import make_prompt_cache

    args = dict(hidden_size=256, num_hidden_layers=8, intermediate_size=512,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=256,
                rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                tie_word_embeddings=False, model_type="llama")
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(args))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    cache = (mlx_cache.make_prompt_cache(model) if kind == "fp16"
             else make_prompt_cache(model, key_bits=3, value_bits=3))
    mx.eval(model(mx.random.randint(0, 256, (1, 512)), cache=cache)[:, -1])
    tok = mx.array([[1]])
    for _ in range(3):
        mx.eval(model(tok, cache=cache))
    hosts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        hosts.append(time.perf_counter() - t0)
        mx.eval(out)
    hosts.sort()
    return hosts[len(hosts) // 2] * 1e6 / args["num_hidden_layers"]


def attend_host_us(calls: int = 300) -> float:
    from turboquant.mlx_metal import MetalCodeStore

    d, hkv, g = 128, 8, 4
    s = MetalCodeStore(d, n_layers=1, n_q_heads=hkv * g, n_kv_heads=hkv, key_bits=2,
                       value_bits=3, seed=1, block_tokens=32, n_outlier_channels=64,
                       outlier_bits=4, outlier_channels=list(range(64)), outlier_roles="keys",
                       fp16_sinks=4, fp16_window=128, check_inputs=False)
    s.append(mx.zeros((hkv, 2000, d)), mx.zeros((hkv, 2000, d)))
    q = mx.zeros((hkv * g, 1, d))
    for _ in range(50):
        s.attend(q)
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            s.attend(q)
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(runs)[len(runs) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    os.environ["TQ_GPU_WRITE_ASYNC_EVAL"] = "0"  # no evaluation inside a timed step
    stub_kernels(lambda which: _StubKernel())
    res = {"fp16 cache, host us per layer": model_host_us("fp16", a.steps),
           "turboquant cache, host us per layer": model_host_us("turboquant-3", a.steps),
           "MetalCodeStore.attend, host us per call": attend_host_us()}
    for k, v in res.items():
        print(f"{k:42s} {v:8.1f}")
    if a.out:
        write_result(a.out, dict(rows=res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
