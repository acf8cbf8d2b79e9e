"""The memory soak (bench/soak_memory.py) on a tiny model: over a few hundred generated
tokens the process's resident memory grows only by what the caches account for, and an
injected leak of 256 KB per token is caught."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_tiny import tiny_model  # noqa: E402

import turboquant.mlx_lm as tq_mlx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import soak_memory  # noqa: E402

PROMPT = [(7 * i + 3) % 120 for i in range(32)]
TOKENS, WARMUP = 400, 100
TOLERANCE = 4 << 20  # 4 MiB; the injected leak below is 300 x 256 KiB = 75 MiB


def run(on_step=None, preset="tq3"):
    # Memory the tests before this one left to free (mlx's buffer cache, garbage) is freed
    # now, not during the soak, where it would hide growth.
    gc.collect()
    mx.clear_cache()
    model = tiny_model("llama")
    cache = tq_mlx.make_prompt_cache(model, preset=preset)
    return soak_memory.soak(model, cache, PROMPT, TOKENS, sample_every=50, warmup=WARMUP,
                            on_step=on_step), cache


@pytest.mark.parametrize("preset", ["tq3", "codes-only"])
def test_no_growth_beyond_the_caches_accounting(preset):
    r, cache = run(preset=preset)
    assert r["baseline_tokens"] == WARMUP and r["samples"][-1]["tokens"] == TOKENS
    assert cache[0].offset == len(PROMPT) + TOKENS  # generate_step feeds one ahead
    assert r["cache_growth"] > 0  # the caches did grow (codes of 300 more tokens)
    assert r["residual_growth"] <= TOLERANCE, r


def test_an_injected_leak_is_caught():
    kept = []

    def leak(i):
        if i > WARMUP:
            kept.append(bytearray(b"x" * (256 << 10)))  # written: resident

    r, _ = run(on_step=leak)
    assert len(kept) == TOKENS - WARMUP
    assert r["residual_growth"] > TOLERANCE
    assert r["residual_slope_bytes_per_token"] > 128 << 10
