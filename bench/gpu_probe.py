"""One decode-attention call of each kind the GPU store runs, for a kernel profiler:
plain and key-split 3-bit codes at a long context (8 KV heads, GQA 4, head_dim 128), and the
same with the fp16 sinks and window of the default recipe, each with the tensor-core (mma) and
the staged block kernel, each call evaluated on its own.
Run it under NVIDIA Nsight Compute to read each kernel's duration, DRAM throughput,
occupancy, registers and warp stall reasons:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats python bench/gpu_probe.py

The calls run between cuProfilerStart and cuProfilerStop (the CUDA driver's profiler range),
after the kernels' first-use self-test and each call's compilation: with
``--profile-from-start off`` the profiler sees exactly the probed launches.

``--trace`` instead records the calls (and one decode step of a 2-layer random model of
Llama-3.1-8B's layer shape) with PyTorch's profiler where PyTorch is installed (it reads the
CUDA activity of the whole process, mlx's kernels included) and prints the GPU time of each
kernel and runtime call.
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from gpu_common import fill_random
from turboquant import metal
from turboquant import gpu_path
from turboquant.mlx_metal import MetalCodeStore


def build(T: int, split: bool, sinks: int = 0, window: int = 0, d: int = 128, hkv: int = 8,
          group: int = 4, bits: int = 3) -> MetalCodeStore:
    kw = dict(n_layers=1, n_q_heads=hkv * group, n_kv_heads=hkv, key_bits=bits,
              value_bits=bits, seed=1, block_tokens=64, fp16_sinks=sinks, fp16_window=window,
              check_inputs=False)
    if split:
        kw.update(key_bits=bits - 1, n_outlier_channels=d // 2, outlier_bits=bits + 1,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys")
    return fill_random(MetalCodeStore(d, **kw), T, hkv, d)


def calls(T: int):
    q = mx.random.normal((32, 1, 128)).astype(mx.float32)
    mx.eval(q)
    for name, kw in (("plain", dict(split=False)), ("key split", dict(split=True)),
                     ("key split + 4 sinks + 64 window", dict(split=True, sinks=4, window=64))):
        s = build(T, **kw)
        for kernel in ("mma", "staged"):  # metal.attention_kernel() reads it per call
            def call(s=s, kernel=kernel):
                with metal.forced_attention(kernel):
                    mx.eval(s.attend(q))
            call()  # compiles
            yield f"{name}, {T} tokens, {kernel} kernel", call


def profiler_range(on: bool) -> None:
    """cuProfilerStart / cuProfilerStop of the CUDA driver (a no-op without one: Metal)."""
    if gpu_path.active_path() != "cuda":
        return
    import ctypes

    mx.synchronize()
    lib = ctypes.CDLL("libcuda.so.1")
    rc = (lib.cuProfilerStart if on else lib.cuProfilerStop)()
    if rc != 0:
        print(f"probe: cuProfiler{'Start' if on else 'Stop'} returned {rc}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--trace", action="store_true",
                    help="record with PyTorch's profiler instead (where PyTorch is installed)")
    a = ap.parse_args(argv)
    if gpu_path.active_path() == "cpu":
        ap.error(f"needs a GPU kernel path ({gpu_path.path_reason()})")
    if not a.trace:
        work = list(calls(a.context))  # built and compiled before the profiler range
        profiler_range(True)
        for name, fn in work:
            print("probe:", name, flush=True)
            fn()
        profiler_range(False)
        return 0
    import torch  # noqa: F401 - its profiler reads the process's CUDA activity
    from torch.profiler import ProfilerActivity, profile

    from gpu_overhead import model_step

    work = list(calls(a.context))
    for name, fn in work:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
        print(f"=== {name}: 5 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                        max_name_column_width=70))
    # Where the host time of a decode step goes (cProfile, Python), then the process's CUDA
    # activity of prefill + decode steps: kernels by GPU time, runtime calls by CPU time.
    print("=== 2-layer 8B-shape model, 8K context, decode steps:",
          model_step("turboquant-3", 8192, 10, profile=True))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model_step("turboquant-3", 8192, 5)
    print("=== 2-layer 8B-shape model, 8K context: prefill + 5 decode steps")
    avg = prof.key_averages()
    print(avg.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
