"""Bad requests to ``python -m turboquant serve`` (a tiny model, over loopback): each gets an
HTTP error whose JSON body names the problem, or (a client gone mid-stream) a clean stop, and
the server serves the next request."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_tiny_dir import save_tiny_model_dir
from test_serve import get, post, post_stream, running_server, settled_info
from turboquant import serve

BUDGET = 200_000  # bytes of the prompt-cache store (--max-kv-gb 0.0002)
GOOD = {"prompt": "hello world", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with running_server(model_dir, log, "--max-kv-gb", str(BUDGET / 1e9)) as url:
        yield url


def raw_post(url: str, path: str, body: bytes, headers: dict | None = None):
    """(status, JSON body) of a POST of raw bytes."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def refused(url: str, body: dict, path: str = "/v1/completions") -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url, path, body)
    return e.value.code, json.loads(e.value.read())["error"]


def serves_a_good_request(url: str) -> None:
    r = post(url, "/v1/completions", GOOD)
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "length"
    assert get(url, "/health")["status"] == "ok"


def test_malformed_bodies_are_400s_naming_the_problem(server):
    status, body = raw_post(server, "/v1/completions", b'{"prompt": "hi", "max_tokens": ')
    assert status == 400 and body["error"].startswith("Invalid JSON in request body")
    status, body = raw_post(server, "/v1/completions", b'{"prompt": "\xff\xfe"}')
    assert (status, body["error"]) == (400, "request body is not UTF-8 text")
    status, body = raw_post(server, "/v1/chat/completions", b'[1, 2]')
    assert (status, body["error"]) == (400, "Request should be a JSON dictionary")
    assert refused(server, {"max_tokens": 3}) == (400, "Request did not contain a prompt")
    assert refused(server, {"prompt": [1, 2, 3], "max_tokens": 3}) == \
        (400, "prompt must be a string")
    assert refused(server, {"max_tokens": 3}, "/v1/chat/completions") == \
        (400, "Request did not contain messages")
    serves_a_good_request(server)


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens must be at least 1"),
    ("max_tokens", -5, "max_tokens must be at least 1"),
    ("max_tokens", "ten", "max_tokens must be of type int"),
    ("max_tokens", 2.5, "max_tokens must be of type int"),
    ("max_tokens", True, "max_tokens must be of type int"),
    ("max_completion_tokens", 0, "max_tokens must be at least 1"),
    ("temperature", -1, "temperature must be at least 0"),
])
def test_invalid_max_tokens_and_sampling_fields_are_400s(server, field, value, message):
    assert refused(server, dict(GOOD, **{field: value})) == (400, message)
    serves_a_good_request(server)


def test_unknown_model_is_a_404_and_the_served_model_stays_loaded(server, model_dir):
    status, message = refused(server, dict(GOOD, model="no/such-model"))
    assert status == 404
    assert message.startswith("model 'no/such-model' is not served here; this server serves ")
    assert "'default_model'" in message and repr(str(model_dir)) in message
    status, message = refused(server, dict(GOOD, model="other", stream=True),
                              "/v1/completions")
    assert status == 404 and "'other'" in message
    # The served model answers under each of its names.
    for name in ("default_model", str(model_dir), str(model_dir.resolve())):
        r = post(server, "/v1/completions", dict(GOOD, model=name))
        assert r["usage"]["completion_tokens"] == 4 and r["model"] == name
    serves_a_good_request(server)


def test_prompt_over_the_budget_is_a_413_before_any_work(server):
    before = get(server, "/v1/turboquant")
    prompt = "The quick brown fox jumps over the lazy dog. " * 400  # 18,000 tokens
    status, message = refused(server, {"prompt": prompt, "max_tokens": 2})
    assert status == 413
    assert message.startswith("prompt of 18000 tokens needs about ")
    need = int(message.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert need > BUDGET and f"budget (--max-kv-gb) of {BUDGET:,} bytes" in message
    messages = [{"role": "user", "content": prompt}]
    status, message = refused(server, {"messages": messages, "max_tokens": 2},
                              "/v1/chat/completions")
    assert status == 413 and "tokens needs about" in message
    after = get(server, "/v1/turboquant")
    assert after["caches_built"] == before["caches_built"]  # refused before generation
    assert after["refused"] == before["refused"] + 2
    # A prompt that fits is served, and the store stays within the budget.
    r = post(server, "/v1/completions", {"prompt": prompt[:300], "max_tokens": 2})
    assert r["usage"]["prompt_tokens"] == 300
    store = settled_info(server, lambda i: i["prompt_cache"]["tokens"] >= 302)["prompt_cache"]
    assert 0 < store["bytes"] <= BUDGET and store["tokens"] >= 302
    serves_a_good_request(server)


@pytest.mark.parametrize("options", [{"key_bits": 3, "value_bits": 3}, {"preset": "tq4"},
                                     {"preset": "codes-only"}, {"preset": "tq3-mixed"}],
                         ids=["tq3", "tq4", "codes-only", "tq3-mixed"])
def test_kv_cost_is_an_upper_bound_of_the_bytes_the_store_counts(model_dir, options):
    """KVCost prices a prompt at no less than the ``nbytes`` of its caches, short prompts
    included (fixed fp16 sink and window rows, whole code pages), filled in one call, as
    mlx-lm's generation fills them (prefill chunks, then one token at a time) and grown by
    decode steps (which keep a flushed window block's fp16 rows); and, filled in one call,
    at most 1.5x those bytes: below the steady length it is the bytes of the next probe
    (probes at most 1.5x apart there), past it the bytes of a shorter probe plus the
    per-token slope, one page and one flushed block; with parked entries (their windows in
    codes) also of a cache resumed from one and grown."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))
    previous = serve.install_cache_factory(options)
    rng = np.random.default_rng(0)
    try:
        cost = serve.KVCost.measure(model)  # the store parks its entries (the default)
        kept = serve.KVCost.measure(model, park_window="fp16")
        for n in (1, 8, 40, 100, 130, 300, 700, 2000):
            tokens = mx.array(rng.integers(0, 90, n), dtype=mx.int32)
            cache = serve._server.make_prompt_cache(model)
            mx.eval(model(tokens[None], cache=cache))
            actual = sum(c.nbytes for c in cache)
            assert actual <= kept(n) <= 1.5 * actual, (n, kept(n), actual)
            assert kept(n) <= cost(n)
            for steps in (1, 41):  # generate_step computes one token ahead: n + steps held
                cache = serve._server.make_prompt_cache(model)
                for _ in generate_step(tokens, model, prompt_cache=cache, max_tokens=steps,
                                       prefill_step_size=256):
                    pass
                held = cache[0].offset
                actual = sum(c.nbytes for c in cache)
                assert actual <= cost(held), (n, steps, held, cost(held), actual)
            # resumed from an entry the store parked (its window compacted into codes), then
            # given new tokens: codes where a fresh cache holds window rows, and a new window
            for extra in (1, 40, 130):
                cache = serve._server.make_prompt_cache(model)
                mx.eval(model(tokens[None], cache=cache))
                serve.park(cache)
                for _ in generate_step(mx.array(rng.integers(0, 90, extra), dtype=mx.int32),
                                       model, prompt_cache=cache, max_tokens=2):
                    pass
                held = cache[0].offset
                actual = sum(c.nbytes for c in cache)
                assert actual <= cost(held), (n, extra, held, cost(held), actual)
    finally:
        serve.uninstall_cache_factory(previous)
    assert cost.per_token > 0


def test_client_disconnect_mid_stream_stops_the_generation(server):
    before = get(server, "/v1/turboquant")["disconnects"]
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "a long story", "max_tokens": 100_000, "temperature": 0,
                       "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 3:
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    # 100,000 tokens would take minutes: the next request is served within seconds only if
    # the abandoned generation stopped.
    t0 = time.monotonic()
    events = post_stream(server, "/v1/completions", GOOD, timeout=30)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while get(server, "/v1/turboquant")["disconnects"] != before + 1:
        assert time.monotonic() < deadline, "the disconnect was not seen"
        time.sleep(0.1)
    serves_a_good_request(server)
