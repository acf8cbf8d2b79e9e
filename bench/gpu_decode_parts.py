"""Which part of the TurboQuant cache costs GPU decode time at long context: one decode step
(built, then evaluated: host + GPU) of a 2-layer random model of Llama-3.1-8B's layer shape,
prefilled in 2,048-token chunks, with mlx-lm's fp16 cache and with the 3-bit cache under
recipe variants (each part switched off in turn), per context, in one run. Median of the
steps, per layer.

    python bench/gpu_decode_parts.py --contexts 32768,131072 \\
        --out bench/results/gpu_decode_parts.json

``--profile`` adds, per context and cache, where the host time of building a step goes
(cProfile of the builds alone, each step evaluated before the next is built: the functions
and mlx calls with the most own time); ``--trace`` the GPU time of a step's kernels and the
CUDA runtime calls (PyTorch's profiler, where PyTorch is installed: it records the whole
process's CUDA activity, mlx's kernels included), so that a step's time splits into host
building, GPU work and the gaps between; ``--blocking`` whether building a step waits for
the GPU (then mlx-lm's decode cannot overlap one step's building with the previous step's GPU
work); ``--ops`` the host time of building a step per mlx function and per turboquant kernel
launch (each wrapped in a timer while the steps are built; array methods and operators, which
cannot be wrapped, stay in the Python code's own time, listed after by cProfile);
``--lines`` the same per line of turboquant's code (a line tracer).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from gpu_common import (device_us, environment, kernel_tables, machine, prefill_and_steps,
                        write_result)

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


def two_layer_model(layer: dict = LAYER, layers: int = LAYERS):
    """A random Llama model of the given layer shape, fp16: 2 layers unless ``layers``."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = dict(layer, num_hidden_layers=layers, vocab_size=1024, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                model_type="llama")
    model = llama.Model(llama.ModelArgs.from_dict(args))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def step_us(model, context: int, options: dict | None, steps: int, profile: bool = False,
            trace: bool = False, blocking: int = 0, ops: bool = False,
            lines: bool = False) -> dict:
    """Per-layer host and total time of a decode step (medians) and the prefill speed, on a
    fresh cache: mlx-lm's fp16 one (``options`` None) or make_prompt_cache(**options);
    ``profile`` / ``trace`` / ``blocking`` (a matrix size) / ``ops`` / ``lines``: then also
    :func:`profile_steps` / :func:`trace_steps` / :func:`blocking_steps` / :func:`ops_steps` /
    :func:`lines_steps`."""
    from mlx_lm.models import cache as mlx_cache

    from turboquant.mlx_lm import make_prompt_cache

    cache = (mlx_cache.make_prompt_cache(model) if options is None
             else make_prompt_cache(model, **options))
    prefill, hosts, totals = prefill_and_steps(model, cache, context, steps)
    res = dict(host_us=float(np.median(hosts)) * 1e6 / LAYERS,
               total_us=float(np.median(totals)) * 1e6 / LAYERS,
               prefill_tok_s=context / prefill)
    name = "fp16" if options is None else str(options)
    if profile:
        res["profile"] = profile_steps(model, cache, steps)
        print(f"--- host profile, {context} tokens, {name}\n{res['profile']}", flush=True)
    if trace:
        res["trace"] = trace_steps(model, cache, min(steps, 10))
        print(f"--- GPU trace, {context} tokens, {name}\n{res['trace']}", flush=True)
    if ops:
        res["ops"] = ops_steps(model, cache, steps)
        print(f"--- host time by mlx call, {context} tokens, {name}\n{res['ops']}", flush=True)
    if lines and options is not None:
        res["lines"] = lines_steps(model, cache, steps)
        print(f"--- host time by line, {context} tokens, {name}\n{res['lines']}", flush=True)
    if blocking:
        res["blocking"] = blocking_steps(model, cache, blocking)
        print(f"--- building a step while the GPU is busy, {context} tokens, {name}\n"
              f"{res['blocking']}", flush=True)
    return res


def blocking_steps(model, cache, size: int = 8192, trials: int = 3, top: int = 12) -> str:
    """Whether building a decode step waits for the GPU: a long GPU computation (chained
    products of ``size`` x ``size`` fp16 matrices) is started without waiting
    (``mx.async_eval``), then a step is built under cProfile. A build that waits for the GPU
    takes about the computation's time, and the functions that waited come first by own time
    (mlx-lm's decode overlaps the building of one step with the GPU work of the previous one
    only where no such wait happens)."""
    import cProfile
    import time

    tok = mx.array([[1]])
    a = mx.random.normal((size, size)).astype(mx.float16)
    mx.eval(a, model(tok, cache=cache))

    def busy():
        x = a
        for _ in range(24):
            x = (x @ a) * (1.0 / size ** 0.5)
        return x

    t0 = time.perf_counter()
    mx.eval(busy())
    gpu_ms = (time.perf_counter() - t0) * 1e3
    lines, pr = [], cProfile.Profile()
    for _ in range(trials):
        t0 = time.perf_counter()
        mx.eval(model(tok, cache=cache))
        idle_ms = (time.perf_counter() - t0) * 1e3
        x = busy()
        mx.async_eval(x)
        t0 = time.perf_counter()
        pr.enable()
        out = model(tok, cache=cache)
        pr.disable()
        build_ms = (time.perf_counter() - t0) * 1e3
        mx.eval(x, out)
        lines.append(f"busy GPU computation {gpu_ms:.1f} ms; a step built while it runs "
                     f"{build_ms:.2f} ms (a step built and run on an idle GPU: {idle_ms:.2f} ms)")
    return "\n".join(lines) + "\n" + _by_own_time(pr, top)


def profile_steps(model, cache, steps: int, top: int = 25) -> str:
    """cProfile of building ``steps`` decode steps (not of evaluating them; each step is
    evaluated before the next is built), the ``top`` entries by own time."""
    import cProfile

    tok = mx.array([[1]])
    pr = cProfile.Profile()
    for _ in range(steps):
        pr.enable()
        out = model(tok, cache=cache)
        pr.disable()
        mx.eval(out)
    return _by_own_time(pr, top)


class _OpTimers:
    """Every function of ``mlx.core`` and ``mlx.core.fast`` and every turboquant kernel
    launch wrapped in a timer while the block runs: host seconds and calls by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.saved: list[tuple[object, str, object]] = []

    def _timed(self, name: str, fn):
        import time

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
        wrapper.__name__ = wrapper.__qualname__ = name.replace(".", "_").replace(":", "_")
        return wrapper

    def __enter__(self):
        from turboquant import metal

        for module, prefix in ((mx, "mx."), (mx.fast, "mx.fast.")):
            for name in dir(module):
                fn = getattr(module, name)
                if name.startswith("_") or isinstance(fn, type) or not callable(fn):
                    continue
                self.saved.append((module, name, fn))
                setattr(module, name, self._timed(prefix + name, fn))
        for attr in ("_kernel", "_bounded_kernel"):
            make = getattr(metal, attr)
            self.saved.append((metal, attr, make))

            def launcher(which, *args, _make=make, **kwargs):
                return self._timed(f"kernel:{which}", _make(which, *args, **kwargs))
            setattr(metal, attr, launcher)
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self.saved):
            setattr(module, name, fn)
        self.saved.clear()

    def table(self, per: int, top: int = 30) -> str:
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]
        lines = [f"{'mlx call':44s} {'calls':>7s} {'us':>8s} {'us/call':>8s}  (per layer-step)"]
        for name, sec in rows:
            n = self.calls[name]
            lines.append(f"{name:44s} {n / per:7.2f} {sec * 1e6 / per:8.1f} "
                         f"{sec * 1e6 / n:8.2f}")
        total = sum(self.seconds.values())
        lines.append(f"{'all wrapped calls':44s} {sum(self.calls.values()) / per:7.2f} "
                     f"{total * 1e6 / per:8.1f}")
        return "\n".join(lines)


class _LineTimes:
    """A line tracer (``sys.settrace``) over turboquant's own code while the block runs: the
    wall time from each of its lines to the next line event, summed per line, so a line's
    time includes the mlx calls and operators it makes (and any code it calls that is not
    turboquant's) but not the lines of turboquant functions it calls. The tracer's own cost
    lands on every line alike (compare lines, not totals)."""

    def __init__(self, package: str = "turboquant"):
        self.mark = f"{os.sep}{package}{os.sep}"
        self.seconds: dict[tuple[str, int], float] = {}
        self.calls: dict[tuple[str, int], int] = {}
        self.last = None
        self.t = 0.0

    def _local(self, frame, event, arg):
        import time

        now = time.perf_counter()
        if self.last is not None:
            self.seconds[self.last] = self.seconds.get(self.last, 0.0) + now - self.t
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            self.calls[key] = self.calls.get(key, 0) + 1
            self.last = key
        else:  # a return: the caller's line (if traced) resumes at its next line event
            self.last = None
        self.t = time.perf_counter()
        return self._local

    def _global(self, frame, event, arg):
        return self._local if self.mark in frame.f_code.co_filename else None

    def __enter__(self):
        import sys

        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        import sys

        sys.settrace(None)
        self.last = None

    def table(self, per: int, top: int = 40) -> str:
        import linecache

        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]
        lines = [f"{'us':>7s} {'runs':>6s}  line (per layer-step; tracer cost included)"]
        for (path, no), sec in rows:
            text = linecache.getline(path, no).strip()[:70]
            lines.append(f"{sec * 1e6 / per:7.1f} {self.calls.get((path, no), 0) / per:6.2f}  "
                         f"{Path(path).name}:{no}  {text}")
        lines.append(f"{sum(self.seconds.values()) * 1e6 / per:7.1f}         all traced lines")
        return "\n".join(lines)


def lines_steps(model, cache, steps: int) -> str:
    """Host time of building ``steps`` decode steps (each evaluated before the next is
    built) per line of turboquant's code (:class:`_LineTimes`), per layer and step."""
    import time

    tok = mx.array([[1]])
    mx.eval(model(tok, cache=cache))
    build = 0.0
    tracer = _LineTimes()
    for _ in range(steps):
        t0 = time.perf_counter()
        with tracer:
            out = model(tok, cache=cache)
        build += time.perf_counter() - t0
        mx.eval(out)
    per = steps * LAYERS
    return (f"building a step: {build * 1e6 / per:.1f} us a layer (traced)\n"
            + tracer.table(per))


def ops_steps(model, cache, steps: int, top: int = 25) -> str:
    """Host time of building ``steps`` decode steps (each evaluated before the next is
    built) per mlx function and kernel launch (:class:`_OpTimers`), per layer and step,
    against the builds' whole time; then cProfile's entries by own time over the same
    builds (the wrapped calls show under their names)."""
    import cProfile
    import time

    tok = mx.array([[1]])
    evaluate = mx.eval  # the evaluations between the builds stay out of the timers
    evaluate(model(tok, cache=cache))
    pr = cProfile.Profile()
    build = 0.0
    with _OpTimers() as timers:
        for _ in range(steps):
            t0 = time.perf_counter()
            pr.enable()
            out = model(tok, cache=cache)
            pr.disable()
            build += time.perf_counter() - t0
            evaluate(out)
    per = steps * LAYERS
    return (f"building a step: {build * 1e6 / per:.1f} us a layer (with the timers)\n"
            + timers.table(per) + "\n" + _by_own_time(pr, top))


def _by_own_time(pr, top: int) -> str:
    """A cProfile.Profile's ``top`` entries by own time, as text."""
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def trace_steps(model, cache, steps: int, rows: int = 25) -> str:
    """PyTorch's profiler over ``steps`` decode steps (each built then evaluated): the
    kernels by GPU time and the runtime calls by host time; and the steps' wall time, so the
    GPU's idle share shows. Empty where PyTorch (or its CUDA profiler) is missing."""
    try:
        import torch  # noqa: F401 - its profiler reads the process's CUDA activity
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        return f"(no trace: {e})"
    import time

    tok = mx.array([[1]])
    mx.eval(model(tok, cache=cache))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            mx.eval(model(tok, cache=cache))
        wall = time.perf_counter() - t0
    head = (f"{steps} steps: wall {wall / steps * 1e6:.1f} us/step, kernels and copies on the GPU "
            f"{device_us(prof) / steps:.1f} us/step\n")
    return head + kernel_tables(prof, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help="semicolon-separated names of VARIANTS (fp16 always runs)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny layer shape at 256 tokens: checks the script anywhere")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile of building the steps, per context and cache")
    ap.add_argument("--trace", action="store_true",
                    help="also print the steps' GPU kernels and runtime calls (PyTorch's "
                         "profiler), per context and cache")
    ap.add_argument("--blocking", action="store_true",
                    help="also check whether building a step waits for the GPU (a step built "
                         "while a long GPU computation runs, under cProfile)")
    ap.add_argument("--ops", action="store_true",
                    help="also print the host time of building a step per mlx function and "
                         "kernel launch, per context and cache")
    ap.add_argument("--lines", action="store_true",
                    help="also print the host time of building a step per line of "
                         "turboquant's code, per context (the turboquant caches)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    layer = LAYER
    blocking = 8192 if a.blocking else 0
    if a.smoke:
        a.contexts, a.steps, layer = "256", 2, TINY
        blocking = 128 if a.blocking else 0
    model = two_layer_model(layer)
    rows = []
    for T in (int(x) for x in a.contexts.split(",")):
        base = step_us(model, T, None, a.steps, a.profile, a.trace, blocking, a.ops, a.lines)
        rows.append(dict(context=T, cache="fp16", **base))
        print(f"T={T:7d} {'fp16':40s} host {base['host_us']:7.1f} us/layer  step "
              f"{base['total_us']:7.1f} us/layer  prefill {base['prefill_tok_s']:8.0f} tok/s",
              flush=True)
        for name in a.variants.split(";"):
            options, env = VARIANTS[name]
            with environment(**env):
                step_us(model, min(T, 4096), options, 2)  # first-use compilation, untimed
                r = step_us(model, T, options, a.steps, a.profile, a.trace, blocking, a.ops,
                            a.lines)
            rows.append(dict(context=T, cache=name, **r))
            print(f"T={T:7d} {name:40s} host {r['host_us']:7.1f} us/layer  step "
                  f"{r['total_us']:7.1f} us/layer  x{base['total_us'] / r['total_us']:.2f} vs "
                  f"fp16  prefill {r['prefill_tok_s']:8.0f} tok/s", flush=True)
    if a.out:
        write_result(a.out, dict(machine=machine(), steps=a.steps, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
