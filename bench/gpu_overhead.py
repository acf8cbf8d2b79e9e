"""Where the time of a GPU decode step goes: per-call cost of the pieces of the mlx-resident
code store on the GPU (mlx's CUDA back end or Metal), each measured two ways in one run:
``host`` (building the lazy graph of n calls, no evaluation) and ``total`` (n calls, then one
evaluation), per call. The pieces: a plain mlx op, a trivial custom kernel with a small and
with turboquant's full kernel header, the same with a fresh parameter array per call, the
query rotation, decode attention on codes with and without fp16 sinks/window, fp16 sdpa, and
one decode step of a 2-layer random model of Llama-3.1-8B's layer shape (fp16 cache vs the
TurboQuant cache) at 8K context.

    python bench/gpu_overhead.py --out bench/results/gpu_overhead_h200.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gpu_common import environment, fill_random, machine, prefill_and_steps, write_result
from turboquant import metal
from turboquant import gpu_path
from turboquant.mlx_metal import MetalCodeStore


def per_call(fn, n: int) -> dict:
    mx.eval(fn())  # warm-up (compiles)
    t0 = time.perf_counter()
    outs = [fn() for _ in range(n)]
    t1 = time.perf_counter()
    mx.eval(outs)
    t2 = time.perf_counter()
    return dict(host_us=(t1 - t0) / n * 1e6, total_us=(t2 - t0) / n * 1e6)


def probe_kernel(target: str, big_header: bool, with_params: bool):
    idx = ("uint i = thread_position_in_grid.x;" if target == "metal" else
           "unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;")
    body = idx + " if (i < 256u) y[i] = x[i] + (float)p[0];"
    header = metal.kernel_header(target) if big_header else ""
    make = mx.fast.metal_kernel if target == "metal" else mx.fast.cuda_kernel
    k = make(name=f"tq_probe_{int(big_header)}", input_names=["x", "p"], output_names=["y"],
             source=body, header=header)
    x = mx.zeros((256,), mx.float32)
    fixed = mx.array(np.array([1], np.uint32))
    mx.eval(x, fixed)

    def call():
        p = mx.array(np.array([1], np.uint32)) if with_params else fixed
        return k(inputs=[x, p], output_shapes=[(256,)], output_dtypes=[mx.float32],
                 grid=(256, 1, 1), threadgroup=(256, 1, 1))[0]
    return call


def store(T: int, sinks: int, window: int, d: int = 128, hkv: int = 8, group: int = 4):
    s = MetalCodeStore(d, n_layers=1, n_q_heads=hkv * group, n_kv_heads=hkv, key_bits=3,
                       value_bits=3, seed=1, block_tokens=256, fp16_sinks=sinks,
                       fp16_window=window, check_inputs=False)
    return fill_random(s, T, hkv, d)


def model_step(kind: str, context: int, steps: int, profile: bool = False) -> dict:
    from mlx_lm.models import cache as mlx_cache
    from mlx_lm.models import llama

    from turboquant.mlx_lm import make_prompt_cache

    mx.random.seed(0)
    args = dict(hidden_size=4096, num_hidden_layers=2, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=1024,
                rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                tie_word_embeddings=False, model_type="llama")
    model = llama.Model(llama.ModelArgs.from_dict(args))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    cache = (mlx_cache.make_prompt_cache(model) if kind == "fp16"
             else make_prompt_cache(model, key_bits=3, value_bits=3))
    _, hosts, totals = prefill_and_steps(model, cache, context, steps)
    tok = mx.array([[1]])
    res = dict(host_us=sum(hosts) / steps * 1e6, total_us=sum(totals) / steps * 1e6,
               host_median_us=float(np.median(hosts)) * 1e6, host_max_us=max(hosts) * 1e6,
               total_median_us=float(np.median(totals)) * 1e6)
    if profile:  # where the host time of a step goes: the functions with the most own time
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        outs = [model(tok, cache=cache) for _ in range(steps)]
        pr.disable()
        mx.eval(outs)
        buf = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(30)
        res["profile"] = buf.getvalue()
        print(res["profile"])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="calls per measurement")
    ap.add_argument("--profile", action="store_true",
                    help="also print where the host time of a turboquant decode step goes")
    ap.add_argument("--model-only", action="store_true",
                    help="only the decode steps of the 2-layer model (e.g. under nsys)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    target = gpu_path.active_path()
    if target == "cpu":
        ap.error(f"needs a GPU kernel path ({gpu_path.path_reason()})")
    rows = {}

    def record(name, r):
        rows[name] = r
        extra = (f"  (median host {r['host_median_us']:.1f} / total {r['total_median_us']:.1f},"
                 f" max host {r['host_max_us']:.1f})" if "host_median_us" in r else "")
        print(f"{name:52s} host {r['host_us']:9.1f} us  total {r['total_us']:9.1f} us{extra}",
              flush=True)

    if a.model_only:
        for kind in ("fp16", "turboquant-3"):
            record(f"2-layer 8B-shape decode step, 8K, {kind}", model_step(kind, 8192, 20))
        with environment(TQ_GPU_WRITE_ASYNC_EVAL="0"):
            record("the same, no async_eval after a page write",
                   model_step("turboquant-3", 8192, 20))
        return 0
    x = mx.zeros((256,), mx.float32)
    record("mlx op (x + 1)", per_call(lambda: x + 1.0, a.n))
    for big in (False, True):
        for params in (False, True):
            record(f"custom kernel, {'full' if big else 'small'} header"
                   f"{', fresh params array' if params else ''}",
                   per_call(probe_kernel(target, big, params), a.n))
    s = store(4096, 0, 0)
    q = mx.random.normal((32, 1, 128)).astype(mx.float32)
    mx.eval(q)
    qg = q.reshape(8, 4, 128)
    record("query rotation (rotate_heads, 8x4x128)",
           per_call(lambda: metal.rotate_heads(s.key_tables, qg), a.n))
    record("decode attend, 4K codes, no fp16 rows", per_call(lambda: s.attend(q), a.n))
    k = mx.random.normal((1, 8, 4096, 128)).astype(mx.float16)
    q16 = q.reshape(1, 32, 1, 128).astype(mx.float16)
    mx.eval(k)
    record("fp16 sdpa, 4K",
           per_call(lambda: mx.fast.scaled_dot_product_attention(q16, k, k, scale=0.088), a.n))
    s2 = store(4096, 4, 64)
    record("decode attend, 4K, 4 sinks + 64 window", per_call(lambda: s2.attend(q), a.n))
    s3 = store(131072, 0, 0)
    record("decode attend, 128K codes, no fp16 rows", per_call(lambda: s3.attend(q), 20))
    del s, s2, s3
    for kind in ("fp16", "turboquant-3"):
        record(f"2-layer 8B-shape decode step, 8K, {kind}",
               model_step(kind, 8192, 20, profile=a.profile and kind != "fp16"))
    res = dict(machine=machine(), n=a.n, rows=rows)
    if a.out:
        write_result(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
