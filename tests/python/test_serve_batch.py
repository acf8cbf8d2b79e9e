"""Continuous batching in ``python -m turboquant serve``, over loopback.

Concurrent requests are decoded together (mlx-lm's BatchGenerator over TurboQuant batch
caches); each gets the greedy text it gets served alone. Bad requests sent while a batch
runs get their own error and the batch finishes. mlx-lm's own server with fp16 caches is
checked the same way."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_tiny_dir import save_tiny_model_dir
from test_serve import free_port, get, post, post_stream, running_server
from turboquant import serve

PROMPTS = ["hello world", "The quick brown fox jumps over", "a",
           "Once upon a time, in a land far away, there lived", "1 2 3 4 5 6 7 8 9"]
MAX_TOKENS = [14, 9, 14, 5, 12]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_batch_log") / "server.log"
    # windows kept fp16 in the store: a prompt served again resumes exactly, so its text is
    # that of a fresh cache (parked entries: tests/python/test_park_window.py)
    with running_server(model_dir, log, "--kv-bits", "3", "--max-tokens", "16",
                        "--park-window", "fp16") as url:
        yield url


def alone_texts(model_dir, make_cache, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    """Greedy text of each prompt generated alone, in-process (mlx-lm's generate)."""
    from mlx_lm import generate, load

    model, tok = load(str(model_dir))
    return [generate(model, tok, p, max_tokens=n, prompt_cache=make_cache(model))
            for p, n in zip(prompts, max_tokens)]


def tq_cache(model):
    from turboquant.mlx_lm import make_prompt_cache

    return make_prompt_cache(model, key_bits=3, value_bits=3)  # the server's --kv-bits 3


def completion(url, i, stream=False):
    body = {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i], "temperature": 0}
    if stream:
        return "".join(e["choices"][0]["text"] for e in post_stream(url, "/v1/completions",
                                                                     body, timeout=120))
    return post(url, "/v1/completions", body, timeout=120)["choices"][0]["text"]


def concurrently(url, n_copies=2):
    jobs = [(i, (i + c) % 2 == 1) for c in range(n_copies) for i in range(len(PROMPTS))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: completion(url, *j), jobs))
    return [texts[c * len(PROMPTS):(c + 1) * len(PROMPTS)] for c in range(n_copies)]


def test_concurrent_requests_are_batched_and_equal_each_served_alone(server, model_dir):
    expect = alone_texts(model_dir, tq_cache)
    assert len(set(expect)) == len(expect)  # distinct texts: a mix-up between rows shows
    for texts in concurrently(server):
        assert texts == expect
    info = get(server, "/v1/turboquant")
    assert info["batching"]["enabled"] and info["batching"]["off_reason"] is None
    assert info["batching"]["max_rows"] >= 2  # some requests were decoded together
    # one at a time (and from the prompt-cache store now): the same texts
    assert [completion(server, i) for i in range(len(PROMPTS))] == expect


def test_bad_requests_during_a_batch_get_errors_and_the_batch_finishes(server, model_dir):
    expect = alone_texts(model_dir, tq_cache)
    host, port = server.removeprefix("http://").split(":")

    def bad(kind):
        if kind == "empty":
            body = {"prompt": "", "max_tokens": 4}
        elif kind == "zero":
            body = {"prompt": "hi", "max_tokens": 0}
        else:  # malformed JSON
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/v1/completions", body=b'{"prompt": ',
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            status, msg = r.status, json.loads(r.read())["error"]
            conn.close()
            return status, msg
        try:
            post(server, "/v1/completions", body)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]
        return 200, ""

    def disconnect():
        """Read one streamed event of a long request, then hang up."""
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": "go on", "max_tokens": 500, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.fp.readline()
        conn.close()
        return r.status

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        good = [pool.submit(completion, server, i, i % 2 == 0) for i in range(len(PROMPTS))]
        time.sleep(0.05)
        hung_up = pool.submit(disconnect)
        bad_ones = {k: pool.submit(bad, k) for k in ("empty", "zero", "json")}
        texts = [f.result() for f in good]
        assert hung_up.result() == 200
        errors = {k: f.result() for k, f in bad_ones.items()}
    assert texts == expect
    assert errors["empty"][0] >= 400 and "prompt is empty" in errors["empty"][1]
    assert errors["zero"] == (400, "max_tokens must be at least 1")
    assert errors["json"][0] == 400 and "Invalid JSON" in errors["json"][1]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200
    assert completion(server, 0) == expect[0]


def test_no_batching_serves_one_at_a_time_with_the_same_texts(model_dir, tmp_path):
    expect = alone_texts(model_dir, tq_cache)
    with running_server(model_dir, tmp_path / "server.log", "--kv-bits", "3",
                        "--no-batching") as url:
        (texts,) = concurrently(url, n_copies=1)
        info = get(url, "/v1/turboquant")
    assert texts == expect
    assert not info["batching"]["enabled"]
    assert info["batching"]["off_reason"] == "turned off (--no-batching)"


def test_mlx_lm_fp16_server_batched_equals_alone(model_dir, tmp_path):
    """The same comparison for mlx-lm's own server with fp16 caches (its batched path)."""
    from mlx_lm.models.cache import make_prompt_cache

    expect = alone_texts(model_dir, make_prompt_cache)
    port = free_port()
    with open(tmp_path / "mlx_lm.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model",
                                 str(model_dir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail((tmp_path / "mlx_lm.log").read_text())
                time.sleep(0.2)
        for texts in concurrently(url):
            assert texts == expect
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_gpu_store_requests_are_batched_and_equal_each_served_alone(tmp_path, monkeypatch):
    """The server with its layers on the GPU store (as on a Mac or an NVIDIA GPU; here the
    store's reference kernels, tests/python/serve_on_gpu_store.py): concurrent requests are
    decoded together and each gets the text it gets alone on the GPU store."""
    from pathlib import Path

    import turboquant.mlx_metal as mm
    from turboquant import gpu_path

    model_dir = save_tiny_model_dir(tmp_path / "model", hidden_size=128)  # head_dim 32
    options = ("--kv-bits", "3", "--fp16-window", "0", "--max-tokens", "16")

    def gpu_cache(model):
        from turboquant.mlx_lm import make_prompt_cache

        return make_prompt_cache(model, key_bits=3, value_bits=3, fp16_window=0)

    monkeypatch.setattr(gpu_path, "active_path", lambda: "metal")
    monkeypatch.setattr(mm, "METAL_KERNELS", mm.ReferenceKernels())
    expect = alone_texts(model_dir, gpu_cache)
    assert len(set(expect)) == len(expect)
    calls = tmp_path / "gpu_calls"
    launcher = str(Path(__file__).with_name("serve_on_gpu_store.py"))
    with running_server(model_dir, tmp_path / "server.log", *options, launcher=(launcher,),
                        env={"TQ_TEST_GPU_CALLS": str(calls)}) as url:
        # one copy of each prompt: no request resumes from another's cached prefix
        (texts,) = concurrently(url, n_copies=1)
        info = get(url, "/v1/turboquant")
    assert texts == expect
    assert info["batching"]["enabled"] and info["batching"]["off_reason"] is None
    assert info["batching"]["max_rows"] >= 2
    assert calls.stat().st_size > 0  # the store's decode kernel served the requests


# -- in-process -------------------------------------------------------------------------


def test_batching_refusals():
    from mlx_lm.models.cache import KVCache, RotatingKVCache
    from turboquant import gpu_path
    from turboquant.mlx_lm import TurboQuantKVCache
    from turboquant.mlx_rotating import TurboQuantRotatingKVCache

    full, window = TurboQuantKVCache(), TurboQuantRotatingKVCache(max_size=8)
    assert serve.batching_refusal([full, KVCache(), window]) is None
    assert "draft model" in serve.batching_refusal([full], draft=True)
    assert "mix fp16 and TurboQuant" in serve.batching_refusal([window, RotatingKVCache(8)])
    assert serve.batching_refusal([window, RotatingKVCache(16)]) is None

    class Recurrent:  # no merge
        pass

    assert "without batching: Recurrent" in serve.batching_refusal([full, Recurrent()])
    saved = gpu_path.active_path
    try:
        gpu_path.active_path = lambda: "metal"  # layers on the GPU store batch too
        assert serve.batching_refusal([full, KVCache()]) is None
    finally:
        gpu_path.active_path = saved


def test_the_cache_factory_covers_the_batch_generator_and_is_undone():
    import importlib

    from mlx_lm import server as mlx_server
    from mlx_lm.generate import BatchGenerator  # noqa: F401 (its module's global is patched)

    gen_module = importlib.import_module("mlx_lm.generate")
    before = (mlx_server.make_prompt_cache, gen_module.make_prompt_cache)
    previous = serve.install_cache_factory({"key_bits": 3, "value_bits": 3})
    try:
        assert mlx_server.make_prompt_cache is gen_module.make_prompt_cache
        assert mlx_server.make_prompt_cache.turboquant_options == {"key_bits": 3,
                                                                  "value_bits": 3}
    finally:
        serve.uninstall_cache_factory(previous)
    assert (mlx_server.make_prompt_cache, gen_module.make_prompt_cache) == before
