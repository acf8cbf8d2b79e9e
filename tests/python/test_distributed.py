"""Sharded models on mlx's distributed engine: ``python -m turboquant generate --sharded``
launched with ``mlx.launch`` (ring back end, 2 processes on 127.0.0.1, CPU) against the same
command in one process. Greedy tokens must match; each rank must hold only its layers'
(pipeline) or KV heads' (tensor parallel) caches, about half the bytes, and a tensor-parallel
rank's heads keep the model's head numbers (kv_head_offset) for their random streams."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import turboquant
from mlx_tiny_dir import save_tiny_model_dir

PYTHONPATH = str(Path(turboquant.__file__).resolve().parents[1])
PROMPT = ("Tell me a long story about the sea and the wind and the stars above us tonight, "
          "please, friend")
# codes-only: every token of the prompt (118 with the chat template) is stored as codes
ARGS = ["--json", "-m", "24", "--kv-preset", "codes-only", "-p", PROMPT]
TIMEOUT = 180


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHONPATH, env.get("PYTHONPATH")) if p)
    return env


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring back end listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        return p
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _launcher() -> list[str]:
    exe = shutil.which("mlx.launch")
    return [exe] if exe else [sys.executable, "-m", "mlx._distributed_utils.launch"]


def _reports(out: str, n: int, err: str = "") -> list[dict]:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == n, f"{len(rows)} of {n} ranks reported:\n{out}\n{err}"
    return sorted(rows, key=lambda r: r["rank"])


def _single(model: Path) -> dict:
    cmd = [sys.executable, "-m", "turboquant", "generate", "--model", str(model), *ARGS]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return _reports(r.stdout, 1, r.stderr)[0]


def _sharded(model: Path, mode: str) -> list[dict]:
    cmd = [*_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
           "--starting-port", str(_free_port_pair()), "--", sys.executable, "-m",
           "turboquant", "generate", "--model", str(model), "--sharded", mode, *ARGS]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    # A ring that cannot start (sockets refused in a sandbox, ...) fails here with its text.
    # mlx.launch exits 0 even when a rank fails: every rank must print its report.
    assert r.returncode == 0, f"mlx.launch failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return _reports(r.stdout, 2, r.stderr)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # qwen2 offers both splits in mlx-lm (shard and model.pipeline); 4 query / 2 KV heads
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2"), model_type="qwen2",
                               num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def single(model) -> dict:
    return _single(model)


def test_pipeline_tokens_and_layers_per_rank(model, single):
    ranks = _sharded(model, "pipeline")
    for r in ranks:
        assert r["size"] == 2
        assert r["generated"] == single["generated"], (r["rank"], r["generated"])
        assert r["cache_types"] == ["TurboQuantKVCache"]
        assert r["kv_heads"] == [2]  # every head of its own layer
        assert r["kv_head_offsets"] == [0]
    # rank 0 runs the last layer, rank 1 the first (mlx-lm's pipeline order)
    assert [r["layers"] for r in ranks] == [[1], [0]]
    assert sum(r["kv_bytes"] for r in ranks) == single["kv_bytes"]
    for r in ranks:
        assert r["kv_bytes"] == pytest.approx(single["kv_bytes"] / 2, rel=0.05)


@pytest.fixture(scope="module")
def tensor(model) -> list[dict]:
    return _sharded(model, "tensor")


def test_tensor_parallel_heads_and_bytes_per_rank(tensor, single):
    for r in tensor:
        assert r["size"] == 2 and r["layers"] == [0, 1]
        assert r["kv_heads"] == [1, 1]  # 2 KV heads split over 2 ranks
        assert r["kv_head_offsets"] == [r["rank"]] * 2  # rank r holds the model's head r
        assert r["kv_bytes"] == pytest.approx(single["kv_bytes"] / 2, rel=0.05)
    assert tensor[0]["generated"] == tensor[1]["generated"]


def test_tensor_parallel_tokens_match_single_process(tensor, single):
    # Rank 1's head is the model's head 1 (kv_head_offset 1): its codes are those of head 1
    # in one process, so the greedy tokens are too.
    for r in tensor:
        assert r["generated"] == single["generated"], (r["rank"], r["generated"])
    assert sum(r["kv_bytes"] for r in tensor) == single["kv_bytes"]
