"""bench/serve_load.py --smoke: both servers (turboquant serve and mlx_lm.server) on a tiny
model, every phase, a complete JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("openai")

import turboquant

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_measures_both_servers(tmp_path):
    out = tmp_path / "serve_load.json"
    package_root = str(Path(turboquant.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--smoke",
                        "--out", str(out)], check=False, capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    settings = res["settings"]
    assert res["failed_requests"] == 0
    assert res["machine"]["cores"] >= 1 and res["machine"]["mlx_lm"]
    assert "serve_load.py --smoke" in res["command"]
    for name in ("turboquant", "mlx_lm"):
        load = res["results"][name]["load"]
        assert [(p["clients"], p["repeat"]) for p in load] == \
            [(n, r) for n in settings["clients"] for r in range(settings["repeats"])]
        for p in load:
            assert p["requests"] == max(p["clients"], settings["min_requests"])
            assert p["failed"] == 0 and p["errors"] == []
            assert 0 < p["completion_tokens"] <= p["requests"] * settings["max_tokens"]
            assert p["tokens_per_s"] > 0
            assert 0 < p["ttft_p50_s"] <= p["ttft_p99_s"] <= p["latency_p99_s"]
            assert p["latency_p50_s"] <= p["latency_p99_s"] <= p["wall_s"]
            assert p["peak_rss_bytes"] >= p["rss_bytes"] > 10_000_000
        cap = res["results"][name]["capacity"]
        # both stores filled their budget: least recently used entries were evicted
        assert cap["evicted"] and cap["failed"] == 0
        assert 0 < cap["bytes"] <= res["budget_bytes"]
    for n, r in zip(settings["clients"], res["ratios"]["load"]):
        assert r["clients"] == n and len(r["tokens_per_s_rounds"]) == settings["repeats"] >= 2
        assert min(r["tokens_per_s_rounds"]) <= r["tokens_per_s"] <= max(r["tokens_per_s_rounds"])
    ours = res["results"]["turboquant"]
    assert ours["server_info"]["compressed_layers"] == ours["server_info"]["layers"] > 0
    # The tiny model's weights are float32: mlx-lm's KVCache holds 2 layers x 2 KV heads x
    # 16 dims x (K, V) x 4 bytes per token; the compressed store holds more tokens.
    assert res["baseline_kv_dtype"] == "float32"
    assert res["results"]["mlx_lm"]["capacity"]["bytes_per_token"] == 512
    assert res["ratios"]["capacity"]["tokens_held"] > 2
    assert res["ratios"]["capacity"]["bytes_per_token_vs_fp16"] == pytest.approx(
        res["ratios"]["capacity"]["bytes_per_token_vs_baseline"] / 2, rel=0.01)
