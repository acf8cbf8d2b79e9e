"""Host cost of one launch of the decode kernels (mx.fast.cuda_kernel's call, no
evaluation): the kernels as the store builds them (the header text passed with every call)
against the same kernels whose header is a file the kernel includes by path (a few bytes a
call), and one small mlx op for scale; the two forms' outputs are checked equal. CUDA only.

    python bench/gpu_launch_cost.py [--calls 400]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from turboquant import metal


def capture_launches(context: int = 4096) -> dict:
    """The arguments of each kernel launch of one decode step of the default recipe at
    ``context`` tokens (8 KV heads, GQA 4, head_dim 128): {which: (build args, call kwargs)}."""
    from turboquant.mlx_metal import MetalCodeStore

    seen = {}
    plain, bounded = metal._kernel, metal._bounded_kernel

    def spy(make, label):
        def get(which, *args):
            kern = make(which, *args)

            def call(**kw):
                seen.setdefault(which, (label, args, kw))
                return kern(**kw)
            return call
        return get

    d, hkv, g = 128, 8, 4
    store = MetalCodeStore(d, n_layers=1, n_q_heads=hkv * g, n_kv_heads=hkv, key_bits=2,
                           value_bits=3, seed=1, block_tokens=32, n_outlier_channels=64,
                           outlier_bits=4, outlier_channels=list(range(64)),
                           outlier_roles="keys", fp16_sinks=4, fp16_window=128)
    for a in range(0, context, 2048):
        store.append(mx.random.normal((hkv, 2048, d)).astype(mx.float16),
                     mx.random.normal((hkv, 2048, d)).astype(mx.float16))
    store.append(mx.random.normal((hkv, 1, d)).astype(mx.float16),
                 mx.random.normal((hkv, 1, d)).astype(mx.float16))
    mx.eval(*store.code_arrays())
    metal._kernel, metal._bounded_kernel = spy(plain, "plain"), spy(bounded, "bounded")
    try:
        mx.eval(store.attend(mx.random.normal((hkv * g, 1, d)).astype(mx.float16)))
    finally:
        metal._kernel, metal._bounded_kernel = plain, bounded
    return seen


def included(which: str, label: str, args: tuple, folder: Path):
    """The kernel ``which`` built with its header in a file under ``folder``, included by
    path (the kernel's name still carries the digest of the whole text)."""
    target = metal.candidate_path()
    min_blocks = args[0] if label == "bounded" else 0
    rounds = args[-1] if args else 2
    spec = metal.KERNELS[which]
    header, source = metal.kernel_text(which, target, rounds)
    if min_blocks:
        header += metal.launch_bounds_header(min_blocks)
    name = metal.kernel_name(spec.name, header, source)
    path = folder / f"{name}.h"
    path.write_text(header)
    return mx.fast.cuda_kernel(name=name + "_inc", input_names=list(spec.input_names),
                               output_names=list(spec.output_names), source=source,
                               header=f'#include "{path}"\n')


def per_call_us(fn, calls: int) -> float:
    runs = []
    for _ in range(5):
        outs = []
        t0 = time.perf_counter()
        for _ in range(calls):
            outs.append(fn())
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        del outs
    return sorted(runs)[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    a = ap.parse_args(argv)
    if metal.candidate_path() != "cuda":
        raise SystemExit("needs mlx's CUDA back end")
    seen = capture_launches()
    x = mx.zeros((8, 128), mx.float16)
    print(f"{'mx.add (scale)':40s} {per_call_us(lambda: x + x, a.calls):8.2f} us a call")
    folder = Path(tempfile.mkdtemp(prefix="tq_headers_"))
    for which, (label, args, kw) in seen.items():
        make = metal._bounded_kernel if label == "bounded" else metal._kernel
        kern = make(which, *args)
        inc = included(which, label, args, folder)
        header, _ = metal.kernel_text(which, "cuda", args[-1] if args else 2)
        t_text = per_call_us(lambda: kern(**kw), a.calls)
        same = "not compared"
        try:
            t_inc = per_call_us(lambda: inc(**kw), a.calls)
            o1, o2 = kern(**kw), inc(**kw)
            mx.eval(o1, o2)
            same = all(bool(mx.array_equal(p, q)) for p, q in zip(o1, o2))
        except Exception as e:  # noqa: BLE001 - a benchmark reports what failed
            t_inc = float("nan")
            same = f"include failed: {e}"
        print(f"{which:40s} header {len(header):6d} chars: {t_text:8.2f} us a call; "
              f"included by path {t_inc:8.2f}; outputs equal: {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
