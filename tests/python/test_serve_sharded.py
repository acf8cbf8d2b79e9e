"""Sharded serving: ``python -m turboquant serve`` launched with ``mlx.launch`` (ring back
end, 2 processes on 127.0.0.1, CPU), tensor parallel and pipeline, against the same server in
one process. Rank 0 answers HTTP; every greedy completion must be the single process's text,
the prompt-cache store must take the same decisions (its entries and bytes summed over the
ranks equal the single process's), and each rank must hold only its KV heads' (tensor
parallel, with the model's head numbers as kv_head_offset) or layers' (pipeline) caches."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_tiny_dir import save_tiny_model_dir
from test_distributed import _env, _free_port_pair, _launcher
from test_serve import (ROOT, free_port, get, post, running_server, settled_info,
                        wait_until_healthy)

# codes-only: every prompt token is stored as codes. The byte budget (of the whole sharded
# cache) holds about two of the requests below (~32 KB each), so the store evicts by bytes,
# identically on every rank though the pipeline ranks hold different numbers of layers.
BUDGET = 70_000
SERVER_ARGS = ["--kv-preset", "codes-only", "--max-kv-gb", str(BUDGET / 1e9),
               "--max-tokens", "16"]
PROMPTS = [
    "Tell me a long story about the sea and the wind",
    "Tell me a long story about the sea and the stars above us",  # a shared prefix
    "The quick brown fox jumps over the lazy dog, again and again and again",
    "Tell me a long story about the sea and the wind",  # reused from the store, or evicted
    "A short one",
]
# sent together (batched when batching is on); no prefix shared with any prompt above, so
# each text is that of a fresh cache whatever the order the requests run in
CONCURRENT = ["Quiet rivers run deep under the", "Zebras on the plain at noon",
              "Maybe tomorrow the rain stops and"]
START_TIMEOUT = 120


@contextlib.contextmanager
def sharded_server(model_dir: Path, mode: str, log: Path, *args: str):
    """Two ranks of ``serve`` under ``mlx.launch`` (``args``: more server options); yields
    rank 0's URL."""
    port = free_port()
    cmd = [*_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
           "--starting-port", str(_free_port_pair()), "--", sys.executable, "-m",
           "turboquant", "serve", "--model", str(model_dir), "--port", str(port),
           "--log-level", "INFO", *(["--pipeline"] if mode == "pipeline" else []),
           *SERVER_ARGS, *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log, START_TIMEOUT, "sharded server")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _complete_all(url: str) -> list[str]:
    return [post(url, "/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0.0},
                 timeout=60)["choices"][0]["text"] for p in PROMPTS]


# 720 tokens: 84 KB of KV cache for the whole model (KVCost prices it at 105 KB), over the
# budget; half of that on one tensor-parallel rank, which a rank-local measure would let in
LONG_PROMPT = "waves and wind " * 60


def _over_budget_status(url: str) -> tuple[int, str]:
    try:
        post(url, "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, timeout=60)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]
    return 200, ""


def _complete_concurrently(url: str) -> list[str]:
    def one(p):
        return post(url, "/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0.0},
                    timeout=60)["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(CONCURRENT)) as pool:
        return list(pool.map(one, CONCURRENT))



@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # qwen2 has both splits in mlx-lm; 4 query / 2 KV heads; 3 layers, so the pipeline
    # ranks hold different numbers of layers (and bytes)
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2_serve"), model_type="qwen2",
                               num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=3)


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> dict:
    log = tmp_path_factory.mktemp("single") / "server.log"
    with running_server(model, log, *SERVER_ARGS, start_timeout=START_TIMEOUT) as url:
        texts = _complete_all(url)
        return {"texts": texts, "info": settled_info(url), "long": _over_budget_status(url),
                "concurrent": _complete_concurrently(url)}


def _check_store(sharded: dict, single: dict) -> list[int]:
    """The sharded store holds the single process's entries (same decisions); returns the
    ranks' bytes, which sum to the single process's."""
    one, many = single["info"]["prompt_cache"], sharded["prompt_cache"]
    assert one["sequences"] < len(PROMPTS) - 1, "the byte budget should have evicted entries"
    assert one["bytes"] <= BUDGET
    assert (many["sequences"], many["tokens"]) == (one["sequences"], one["tokens"])
    assert many["bytes"] == one["bytes"]
    shares = [r["prompt_cache_bytes"] for r in sharded["sharding"]["ranks"]]
    assert sum(shares) == one["bytes"]
    return shares


@pytest.mark.parametrize("mode,batching", [("tensor", True), ("pipeline", True),
                                          ("pipeline", False)])
def test_sharded_serve_matches_one_process(model, single, mode, batching, tmp_path):
    log = tmp_path / f"{mode}.log"
    with sharded_server(model, mode, log, *([] if batching else ["--no-batching"])) as url:
        texts = _complete_all(url)
        info = settled_info(url)
        long = _over_budget_status(url)
        together = _complete_concurrently(url)
        rows = get(url, "/v1/turboquant")["batching"]["max_rows"]
    assert together == single["concurrent"], log.read_text()[-4000:]
    if batching:  # the concurrent requests were decoded together, rows of batch caches
        assert rows >= 2, rows
    assert single["info"]["sharding"] is None
    # the whole sharded cache's cost is refused as in one process (the same message)
    assert single["long"][0] == 413 and "over this server's prompt-cache budget" in \
        single["long"][1], single["long"]
    assert long == single["long"]
    for prompt, got, want in zip(PROMPTS, texts, single["texts"]):
        assert got == want, (mode, prompt, got, want, log.read_text()[-4000:])
    sharding = info["sharding"]
    assert (sharding["mode"], sharding["size"]) == (mode, 2)
    ranks = sharding["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert info["batching"]["enabled"] == batching, info["batching"]
    shares = _check_store(info, single)
    if mode == "tensor":
        for r in ranks:
            assert r["layers"] == [0, 1, 2]
            assert r["kv_heads"] == [1, 1, 1]  # 2 KV heads split over 2 ranks
            assert r["kv_head_offsets"] == [r["rank"]] * 3  # the model's head numbers
        assert shares[0] == pytest.approx(shares[1], rel=0.05)
    else:
        # mlx-lm's pipeline order: the last rank runs the first layers
        assert sorted(layer for r in ranks for layer in r["layers"]) == [0, 1, 2]
        assert ranks[0]["layers"][0] > ranks[1]["layers"][-1]
        for r in ranks:
            assert r["kv_heads"] == [2] * len(r["layers"])
            assert r["kv_head_offsets"] == [0] * len(r["layers"])
        # bytes in proportion to the layers each rank holds
        n0, n1 = (len(r["layers"]) for r in ranks)
        assert shares[0] / shares[1] == pytest.approx(n0 / n1, rel=0.05)
    # every rank logs what it holds
    text = log.read_text()
    assert "rank 0 of 2" in text and "rank 1 of 2" in text, text[-4000:]


def test_draft_model_is_refused_when_sharded(model, tmp_path):
    cmd = [*_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
           "--starting-port", str(_free_port_pair()), "--", sys.executable, "-m",
           "turboquant", "serve", "--model", str(model), "--port", str(free_port()),
           "--draft-model", str(model)]
    r = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True,
                       timeout=START_TIMEOUT)
    out = r.stdout + r.stderr
    assert "--draft-model cannot be used with a sharded model" in out, out


def test_client_gone_on_the_sequential_path_keeps_the_ranks_in_step(model, tmp_path):
    # One request at a time: a client that disconnects mid-stream must not stop its
    # generation on rank 0 only (the other ranks would be left inside its collectives);
    # every rank generates to the end, so the next request sees the store of a full run.
    gone = {"prompt": PROMPTS[2], "max_tokens": 48, "temperature": 0.0}
    after = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0.0}
    with running_server(model, tmp_path / "one.log", *SERVER_ARGS, "--no-batching",
                        start_timeout=START_TIMEOUT) as url:
        post(url, "/v1/completions", gone, timeout=60)
        want = post(url, "/v1/completions", after, timeout=60)["choices"][0]["text"]
    log = tmp_path / "gone.log"
    with sharded_server(model, "pipeline", log, "--no-batching") as url:
        body = json.dumps(dict(gone, stream=True)).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            first = sock.recv(4096)  # the headers or the first event, then the client goes
            assert first.startswith(b"HTTP/1.") and b" 200 " in first.split(b"\r\n")[0]
        got = post(url, "/v1/completions", after, timeout=60)["choices"][0]["text"]
    assert got == want, log.read_text()[-4000:]
