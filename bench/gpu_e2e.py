"""End-to-end mlx-lm prefill and decode speed with a random-weight model of a real shape
(Llama-3.1-8B's, or SmolLM2-135M's), at long contexts, in one run: the TurboQuant cache
(``turboquant.mlx_lm.make_prompt_cache`` at 3 bits) against mlx-lm's ``KVCache`` (fp16) and
``QuantizedKVCache`` (4 and 8 bits), with the KV bytes each holds. Speed does not depend on
the weights' values, so random weights of the right shape stand in for the real model.

    python bench/gpu_e2e.py --shape llama-3.1-8b --contexts 8192,32768,131072 \\
        --out bench/results/gpu_e2e_llama8b_h200.json
    python bench/gpu_e2e.py --smoke   # a tiny model at 256 tokens, any machine

``--isolate`` measures each (context, cache) in a fresh process, as a user runs one model with
one kind of cache; without it all run in one process, one after another. ``--ab NAME=VALUE``
(isolated) compares a setting: each (context, cache) is measured in alternating fresh
processes without and with that environment variable, ``--repeat`` times each, and the
medians of both are printed with their ratio (processes on one machine differ by several
percent at 32K, so one process per setting does not tell two forms apart):

    python bench/gpu_e2e.py --contexts 32768 --caches turboquant-3 \\
        --ab TQ_GPU_STEP_WORDS=0 --repeat 3 --out bench/results/gpu_e2e_ab.json

A step's time is split into building its graph, handing it to the GPU and waiting, and the
time Python's garbage collector took within it is reported too (``gc``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import llama

from gpu_common import machine, prefill, write_result
from turboquant.mlx_lm import make_prompt_cache

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=256,
                 rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                 tie_word_embeddings=True),
}

CACHES = ("fp16", "turboquant-3", "mlx-q4", "mlx-q8")


def random_model(shape: str):
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(SHAPES[shape], model_type="llama")))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def new_cache(model, kind: str):
    if kind == "fp16":
        return mlx_cache.make_prompt_cache(model)
    if kind.startswith("mlx-q"):
        bits = int(kind[5:])
        return [mlx_cache.QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
    return make_prompt_cache(model, key_bits=int(kind.split("-")[1]),
                             value_bits=int(kind.split("-")[1]))


def warm_up(model, kind: str, chunk: int) -> None:
    """A short prefill (two chunks) and decode on a throwaway cache of this kind: the GPU
    kernels' first-use compilation (NVRTC / Metal) is not counted in the first measurement."""
    cache = new_cache(model, kind)
    prefill(model, cache, 2 * chunk, model.args.vocab_size, chunk)
    tok = mx.array([[1]])
    for _ in range(3):
        mx.eval(model(tok, cache=cache))


class GcTimer:
    """Seconds Python's garbage collector ran while installed (gc.callbacks), and how many
    collections of the oldest generation it made."""

    def __init__(self):
        self.seconds, self.full, self._t = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.full += info.get("generation") == 2
            self._t = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def pipelined_steps(step, tok, steps: int) -> tuple[float, float, float, float]:
    """``steps`` decode steps as mlx-lm's generate_step runs them: the next step's graph is
    built and handed to the GPU (mx.async_eval) before the previous token is read, so host
    and GPU time overlap. Returns the seconds spent building the steps' graphs (Python, the
    model and the caches), handing them to the GPU (mx.async_eval: mlx encodes every kernel
    launch on the host), waiting for the previous token (the GPU's work not hidden), and in
    all (steps + 1 tokens)."""
    build = submit = wait = 0.0
    t0 = time.perf_counter()
    nxt = step(tok)
    mx.async_eval(nxt)
    for _ in range(steps):
        t1 = time.perf_counter()
        following = step(nxt)
        t2 = time.perf_counter()
        mx.async_eval(following)
        t3 = time.perf_counter()
        tok, nxt = nxt, following
        tok.item()
        t4 = time.perf_counter()
        build, submit, wait = build + t2 - t1, submit + t3 - t2, wait + t4 - t3
    nxt.item()
    return build, submit, wait, time.perf_counter() - t0


def profile_steps(step, tok, steps: int, top: int = 30) -> str:
    """cProfile of ``steps`` pipelined decode steps (pipelined_steps), the functions with the
    most own time first: where a step's host time goes."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(pipelined_steps, step, tok, steps)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def measure(model, kind: str, context: int, chunk: int, decode_steps: int,
            profile: int = 0) -> dict:
    cache = new_cache(model, kind)
    prefill_s = prefill(model, cache, context, model.args.vocab_size, chunk)
    def step(tok):
        return mx.argmax(model(tok, cache=cache)[:, -1], axis=-1)[:, None]

    tok = mx.array([[1]])
    mx.eval(model(tok, cache=cache))  # warm-up step
    with GcTimer() as collector:
        build, submit, wait, decode = pipelined_steps(step, tok, decode_steps)
    # Each step evaluated before the next is built: host time and GPU time add up.
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        tok = step(tok)
        mx.eval(tok)
    decode_sync = time.perf_counter() - t0
    kv = sum(int(c.nbytes) for c in cache)
    if profile:
        print(f"--- {kind} at {context}: host time of {profile} decode steps (cProfile)\n"
              + profile_steps(step, tok, profile), flush=True)
    return dict(cache=kind, context=context, prefill_tok_s=context / prefill_s,
                decode_tok_s=(decode_steps + 1) / decode,
                decode_sync_tok_s=decode_steps / decode_sync, kv_bytes=kv,
                step_ms={"build": 1e3 * build / decode_steps, "submit": 1e3 * submit / decode_steps,
                         "wait": 1e3 * wait / decode_steps,
                         "gc": 1e3 * collector.seconds / decode_steps},
                gc_full_collections=collector.full)


def measure_isolated(a, kind: str, context: int, setting: tuple[str, str] | None = None) -> dict:
    """measure() in a fresh process (this script, one context and one cache); ``setting``:
    (name, value) of an environment variable set in that process (--ab)."""
    cmd = [sys.executable, __file__, "--shape", a.shape, "--contexts", str(context), "--caches",
           kind, "--chunk", str(a.chunk), "--decode-steps", str(a.decode_steps), "--json-row"]
    env = dict(os.environ)
    if a.ab:
        name = a.ab[0]
        env.pop(name, None)
        if setting is not None:
            env[name] = setting[1]
        cmd += ["--record-env", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"the measuring process failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout)[-500:]}")
    row = json.loads(lines[-1])
    if "error" in row:
        raise RuntimeError(row["error"])
    return row


def main_ab(a) -> int:
    """--ab: each (context, cache) in alternating fresh processes, without and with the
    setting, --repeat times each; the medians of each setting and their ratio."""
    name, value = a.ab
    label = f"{name}={value}"
    rows, summary = [], []
    for context in (int(x) for x in a.contexts.split(",")):
        for kind in a.caches.split(","):
            runs: dict = {"default": [], label: []}
            for i in range(a.repeat):
                for variant, setting in (("default", None), (label, a.ab)):
                    r = measure_isolated(a, kind, context, setting)
                    r.update(variant=variant, run=i)
                    rows.append(r)
                    runs[variant].append(r["decode_tok_s"])
                    print(f"{a.shape} T={context:7d} {kind:13s} {variant:24s} run {i}: decode "
                          f"{r['decode_tok_s']:7.2f} tok/s (build {r['step_ms']['build']:.2f} "
                          f"submit {r['step_ms']['submit']:.2f} ms a step)", flush=True)
            med = {k: float(np.median(v)) for k, v in runs.items()}
            summary.append(dict(context=context, cache=kind, median_decode_tok_s=med,
                                ratio=med[label] / med["default"]))
            print(f"{a.shape} T={context:7d} {kind:13s} median decode: default "
                  f"{med['default']:.2f}, {label} {med[label]:.2f} tok/s "
                  f"(x{med[label] / med['default']:.3f})", flush=True)
    if a.out:
        write_result(a.out, dict(machine=machine(), shape=a.shape, config=SHAPES[a.shape],
                                 isolated=True, ab=label, repeat=a.repeat, rows=rows,
                                 summary=summary))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--caches", default=",".join(CACHES))
    ap.add_argument("--chunk", type=int, default=2048, help="prefill step (mlx-lm's default)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="the tiny shape at 256 tokens")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after each measurement, cProfile N more decode steps and print "
                         "where their host time went (not with --isolate)")
    ap.add_argument("--isolate", action="store_true",
                    help="each (context, cache) measured in a fresh process")
    ap.add_argument("--ab", metavar="NAME=VALUE",
                    help="compare an environment setting in alternating fresh processes")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --ab: processes per setting and (context, cache)")
    ap.add_argument("--json-row", action="store_true", help=argparse.SUPPRESS)  # --isolate's
    ap.add_argument("--record-env", help=argparse.SUPPRESS)  # --ab's: the child's value
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.ab is not None:
        name, eq, value = a.ab.partition("=")
        if not eq or not name or "=" in name:
            ap.error(f"--ab takes NAME=VALUE, got {a.ab!r}")
        a.ab, a.isolate = (name, value), True
    if a.repeat < 1 or (a.repeat > 1 and a.ab is None):
        ap.error("--repeat takes a count of 1 or more, with --ab")
    if a.profile and a.isolate:
        ap.error("--profile runs in this process: leave out --isolate (and --ab)")
    if a.smoke:
        a.shape, a.contexts, a.chunk, a.decode_steps = "tiny", "256", 128, 4
    if a.json_row:  # one (context, cache) for --isolate: the row as the last line
        try:
            model = random_model(a.shape)
            warm_up(model, a.caches, a.chunk)
            row = measure(model, a.caches, int(a.contexts), a.chunk, a.decode_steps)
        except RuntimeError as e:
            row = dict(error=" ".join(str(e).split())[:300])
        if a.record_env:
            row["env"] = {a.record_env: os.environ.get(a.record_env)}
        print(json.dumps(row))
        return 0
    if a.ab is not None:
        return main_ab(a)
    model = None if a.isolate else random_model(a.shape)
    rows, warm = [], set()
    for context in (int(x) for x in a.contexts.split(",")):
        measured = []
        for kind in a.caches.split(","):
            try:
                if a.isolate:
                    r = measure_isolated(a, kind, context)
                else:
                    if kind not in warm:
                        warm_up(model, kind, a.chunk)
                        warm.add(kind)
                    r = measure(model, kind, context, a.chunk, a.decode_steps, a.profile)
            except RuntimeError as e:  # e.g. a quantized matmul mlx's CUDA back end lacks
                msg = " ".join(str(e).split())[:300]
                rows.append(dict(cache=kind, context=context, error=msg))
                print(f"{a.shape} T={context:7d} {kind:13s} failed: {msg}", flush=True)
                mx.clear_cache()
                continue
            measured.append(r)
            print(f"{a.shape} T={context:7d} {kind:13s} prefill {r['prefill_tok_s']:9.1f} tok/s "
                  f"decode {r['decode_tok_s']:7.2f} tok/s "
                  f"(synchronous {r['decode_sync_tok_s']:7.2f}) "
                  f"KV {r['kv_bytes'] / 2**20:9.1f} MiB; a step's ms: build "
                  f"{r['step_ms']['build']:.2f} submit {r['step_ms']['submit']:.2f} "
                  f"wait {r['step_ms']['wait']:.2f} (gc {r['step_ms']['gc']:.2f}, "
                  f"{r['gc_full_collections']} full)", flush=True)
            mx.clear_cache()
        base = next((r for r in measured if r["cache"] == "fp16"), None)
        for r in measured:
            if base is not None and r is not base:
                # ratios against the fp16 row of the same context, whatever order they ran in
                r["decode_vs_fp16"] = r["decode_tok_s"] / base["decode_tok_s"]
                r["prefill_vs_fp16"] = r["prefill_tok_s"] / base["prefill_tok_s"]
                r["kv_smaller_than_fp16"] = base["kv_bytes"] / r["kv_bytes"]
                print(f"{a.shape} T={context:7d} {r['cache']:13s} vs fp16: decode "
                      f"x{r['decode_vs_fp16']:.2f}, prefill x{r['prefill_vs_fp16']:.2f}, "
                      f"KV {r['kv_smaller_than_fp16']:.2f}x smaller", flush=True)
        rows.extend(measured)
    res = dict(machine=machine(), shape=a.shape, config=SHAPES[a.shape], isolated=a.isolate,
               rows=rows)
    if a.out:
        write_result(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
