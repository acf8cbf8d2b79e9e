"""The memory soak (bench/soak_memory.py) on a tiny model: over a few hundred generated
tokens the process's resident memory grows only by what the caches account for, and an
injected leak of 256 KB per token is caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import turboquant  # noqa: E402

PROMPT = [(7 * i + 3) % 120 for i in range(32)]
TOKENS, WARMUP = 400, 100
TOLERANCE = 4 << 20  # 4 MiB; the injected leak below is 300 x 256 KiB = 75 MiB


# Each soak runs in a fresh process: in a long test process, memory freed by earlier tests
# stays resident and new allocations reuse it, which would hide growth (a leak included).
CHILD = """
import json, sys
sys.path[:0] = sys.argv[1:3]
import soak_memory
from mlx_tiny import tiny_model
import turboquant.mlx_lm as tq_mlx
preset, leak_kib = sys.argv[3], int(sys.argv[4])
prompt, tokens, warmup = json.loads(sys.argv[5])
kept = []
def on_step(i):
    if leak_kib and i > warmup:
        kept.append(bytearray(b"x" * (leak_kib << 10)))  # written: resident
model = tiny_model("llama")
cache = tq_mlx.make_prompt_cache(model, preset=preset)
r = soak_memory.soak(model, cache, prompt, tokens, sample_every=50, warmup=warmup,
                     on_step=on_step)
r["offset"], r["leaked"] = int(cache[0].offset), len(kept)
print(json.dumps(r))
"""


def run(preset="tq3", leak_kib=0) -> dict:
    here = Path(__file__).resolve()
    env = dict(os.environ, PYTHONPATH=str(Path(turboquant.__file__).resolve().parents[1])
               + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, str(here.parents[2] / "bench"),
                          str(here.parent), preset, str(leak_kib),
                          json.dumps([PROMPT, TOKENS, WARMUP])],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", ["tq3", "codes-only"])
def test_no_growth_beyond_the_caches_accounting(preset):
    r = run(preset=preset)
    assert r["baseline_tokens"] == WARMUP and r["samples"][-1]["tokens"] == TOKENS
    assert r["offset"] == len(PROMPT) + TOKENS  # generate_step feeds one ahead
    assert r["cache_growth"] > 0  # the caches did grow (codes of 300 more tokens)
    assert r["residual_growth"] <= TOLERANCE, r


def test_an_injected_leak_is_caught():
    r = run(leak_kib=256)
    assert r["leaked"] == TOKENS - WARMUP
    assert r["residual_growth"] > TOLERANCE
    assert r["residual_slope_bytes_per_token"] > 128 << 10
