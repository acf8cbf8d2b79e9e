"""Shared by the GPU benchmarks (bench/gpu_attention.py, bench/gpu_e2e.py): the machine
description written next to every result, and a timer that forces mlx's lazy graph."""

from __future__ import annotations

import contextlib
import datetime
import os
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time

import mlx.core as mx

import turboquant
from turboquant import gpu_path
from turboquant._atomic import atomic_write


def machine(path: bool = True) -> dict:
    """GPU, driver, mlx and turboquant versions, and the kernel path taken (``path=False``:
    without it, so that this process runs no first-use self-test)."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "mlx": mx.__version__,
            "turboquant": turboquant.__version__, "command": " ".join(sys.argv)}
    if path:
        info.update(mlx_kernels=gpu_path.active_path(), mlx_kernels_reason=gpu_path.path_reason())
    try:
        info["device"] = {k: (v if isinstance(v, (int, float, str)) else str(v))
                          for k, v in mx.device_info().items()}
    except Exception as e:  # noqa: BLE001 - an mlx without device_info
        info["device"] = f"unknown ({e})"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    return info


def stub_kernels(make) -> None:
    """turboquant.metal's kernels replaced by ``make(which)`` (a callable with the kernel
    call's signature), the CUDA path taken, no GPU needed: the host-side benchmarks
    (gpu_host_time.py, gpu_decode_nodes.py) time or count what a step builds."""
    from turboquant import metal

    metal._kernel = lambda which, *args, **kwargs: make(which)
    metal._bounded_kernel = lambda which, *args, **kwargs: make(which)
    metal._require_gpu = lambda: None
    metal.candidate_path = lambda: "cuda"
    gpu_path.active_path = lambda: "cuda"


def chunk_seconds(model, cache, context: int, vocab: int, chunk: int = 2048) -> list[float]:
    """Seconds of each step of prefilling ``cache`` with a random prompt of ``context``
    tokens in ``chunk``-token steps (as mlx-lm's generate does), each step evaluated."""
    prompt = mx.random.randint(0, vocab, (1, context))
    mx.eval(prompt)
    out = []
    for a in range(0, context, chunk):
        t0 = time.perf_counter()
        mx.eval(model(prompt[:, a:a + chunk], cache=cache)[:, -1])
        out.append(time.perf_counter() - t0)
    return out


def prefill(model, cache, context: int, vocab: int, chunk: int = 2048) -> float:
    """Seconds to prefill ``cache`` (:func:`chunk_seconds`, summed)."""
    return sum(chunk_seconds(model, cache, context, vocab, chunk))


def _device_key(avg) -> str:
    """The GPU-time column of a PyTorch profiler's averages (its name before PyTorch 2.4)."""
    return ("self_device_time_total" if hasattr(avg[0], "self_device_time_total")
            else "self_cuda_time_total")


def kernel_tables(prof, rows: int = 25, cpu_rows: int | None = None) -> str:
    """A PyTorch profiler's kernels by GPU time and runtime calls by host time, as text."""
    avg = prof.key_averages()
    return (avg.table(sort_by=_device_key(avg), row_limit=rows, max_name_column_width=60)
            + avg.table(sort_by="self_cpu_time_total", row_limit=cpu_rows or rows // 2,
                        max_name_column_width=60))


def device_us(prof) -> float:
    """Microseconds of GPU work (kernels and copies) a PyTorch profiler recorded."""
    avg = prof.key_averages()
    key = _device_key(avg)
    return sum(getattr(e, key) for e in avg)


def prefill_and_steps(model, cache, context: int, steps: int, vocab: int = 1024,
                      chunk: int = 2048) -> tuple[float, list[float], list[float]]:
    """:func:`prefill`, one untimed decode step, then ``steps`` timed ones, each built then
    evaluated: (prefill seconds, host seconds per step (building the graph), total seconds
    per step)."""
    seconds = prefill(model, cache, context, vocab, chunk)
    tok = mx.array([[1]])
    mx.eval(model(tok, cache=cache))
    hosts, totals = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.eval(out)
        totals.append(time.perf_counter() - t0)
        hosts.append(t1 - t0)
    return seconds, hosts, totals


def _per_call(batch, fn, iters: int, repeats: int, warmup: int) -> float:
    """Median seconds per call of `batch(fn, iters)` (which runs `iters` calls of fn() and
    waits for them) over `repeats` runs, after `warmup` evaluated calls."""
    for _ in range(warmup):
        mx.eval(fn())
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch(fn, iters)
        runs.append((time.perf_counter() - t0) / iters)
    return statistics.median(runs)


def _each_synced(fn, iters):
    for _ in range(iters):
        mx.eval(fn())


def _built_then_evaluated(fn, iters):
    mx.eval([fn() for _ in range(iters)])


def _evaluated_as_built(fn, iters):
    outs = []
    for _ in range(iters):
        outs.append(fn())
        mx.async_eval(outs[-1])
    mx.eval(outs)


def timed(fn, iters: int, repeats: int = 5, warmup: int = 3) -> float:
    """Median seconds per call of fn() (its result evaluated) over `repeats` runs."""
    return _per_call(_each_synced, fn, iters, repeats, warmup)


def pipelined(fn, iters: int, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of `iters` calls of fn() built lazily and evaluated together
    (one sync per run). mlx runs a lazy graph only at the eval, so this is the host time of
    building a call plus its GPU time (the GPU waits while the host builds);
    :func:`overlapped` lets the two overlap, :func:`timed` syncs after every call and adds
    one launch-and-sync latency to each."""
    return _per_call(_built_then_evaluated, fn, iters, repeats, warmup)


def overlapped(fn, iters: int, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of `iters` calls of fn(), each handed to the GPU as soon as
    it is built (mx.async_eval, as mlx-lm's generation loop does), one sync per run: the
    larger of the host time per call and the GPU time per call."""
    return _per_call(_evaluated_as_built, fn, iters, repeats, warmup)


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Achieved device memory bandwidth of a large copy in this run (read + write bytes / s):
    the measured ceiling the attention kernels are compared with."""
    a = mx.zeros((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    t = timed(lambda: a + 1.0, iters=5, repeats=3, warmup=1)
    return 2 * nbytes / t / 1e9


@contextlib.contextmanager
def environment(**values):
    """Environment variables set for the block (turboquant.metal reads them per call)."""
    saved = {n: os.environ.get(n) for n in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for n, old in saved.items():
            if old is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = old


def fill_random(store, T: int, hkv: int, d: int, chunk: int = 4096):
    """Append T random fp16 tokens of every KV head to ``store`` in chunks; codes evaluated."""
    for a in range(0, T, chunk):
        n = min(chunk, T - a)
        store.append(mx.random.normal((hkv, n, d)).astype(mx.float16),
                     mx.random.normal((hkv, n, d)).astype(mx.float16))
    mx.eval(*store.code_arrays())
    return store


def write_result(path, res: dict) -> None:
    """The benchmark's JSON result at ``path`` (folders made; written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(res, indent=1))
    print(f"wrote {path}")
