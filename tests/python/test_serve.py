"""turboquant.serve: mlx-lm's OpenAI-compatible server with TurboQuant caches, over loopback.

One server subprocess (a tiny random model folder) serves every HTTP test of the module;
it is shut down at the end."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_tiny_dir import save_tiny_model_dir
import turboquant
from turboquant import serve

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "hello world"
BUDGET = 4_000_000  # bytes of the prompt-cache store (--max-kv-gb 0.004)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


def wait_until_healthy(url: str, proc, log, timeout: float, what: str = "server") -> None:
    """Polls ``url``/health until it answers 200; fails the test with the server's log if
    the process exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_server(model_dir, log, *args, start_timeout=40, launcher=("-m", "turboquant"),
                   env=None):
    """``python -m turboquant serve`` on a free loopback port; yields its URL. ``launcher``
    replaces ``-m turboquant`` (a script taking the same arguments); ``env`` adds
    environment variables."""
    port = free_port()
    # The child imports the turboquant this test imported (installed, or a source tree).
    package_root = str(Path(turboquant.__file__).resolve().parents[1])
    env = dict(os.environ, **(env or {}),
               PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *launcher, "serve", "--model", str(model_dir),
             "--port", str(port), "--log-level", "WARNING", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log, start_timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    # windows kept fp16 in the store: a reused prompt's text is then that of a fresh cache,
    # which these tests compare with (parked entries: tests/python/test_park_window.py)
    with running_server(model_dir, log, "--kv-bits", "3", "--max-kv-gb", str(BUDGET / 1e9),
                        "--max-tokens", "12", "--park-window", "fp16") as url:
        yield url


def post(url: str, path: str, body: dict, timeout: float = 30) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_stream(url: str, path: str, body: dict, timeout: float = 30) -> list[dict]:
    """The JSON events of a server-sent-event stream, up to ``data: [DONE]``."""
    req = urllib.request.Request(url + path, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return events
            events.append(json.loads(data))
    pytest.fail("stream ended without data: [DONE]")


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return json.loads(r.read())


def settled_info(url: str, ready=None, timeout: float = 15.0) -> dict:
    """``/v1/turboquant`` once the prompt store has taken the last request's cache: mlx-lm's
    server ends a response, then stores its cache, so a read right after the response can
    precede the store. Polls until ``ready(info)`` holds (if given) and the store reads the
    same twice in a row, or ``timeout`` passes (then the last read, for the caller's
    assertion to report)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        info = get(url, "/v1/turboquant")
        if (last is not None and info["prompt_cache"] == last["prompt_cache"]
                and (ready is None or ready(info))):
            return info
        if time.monotonic() > deadline:
            return info
        last = info
        time.sleep(0.5)


def reference_text(model_dir, prompt, max_tokens, messages=None) -> str:
    """Greedy mlx-lm generation with the server's TurboQuant cache options, in-process."""
    from mlx_lm import generate, load
    from turboquant.mlx_lm import make_prompt_cache

    model, tok = load(str(model_dir))
    if messages is not None:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    cache = make_prompt_cache(model, key_bits=3, value_bits=3)  # the recommended 3-bit recipe
    return generate(model, tok, prompt, max_tokens=max_tokens, prompt_cache=cache)


def test_completion_matches_mlx_lm_generate_with_turboquant_cache(server, model_dir):
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    choice = r["choices"][0]
    assert choice["text"] == reference_text(model_dir, PROMPT, 10)
    assert r["usage"]["completion_tokens"] == 10 and choice["finish_reason"] == "length"
    info = get(server, "/v1/turboquant")
    assert info["kv_cache"] == "turboquant"
    assert info["options"]["key_bits"] == 3 and info["options"]["value_bits"] == 3
    assert info["caches_built"] >= 1 and info["compressed_layers"] == info["layers"] > 0


def test_streaming_completion_equals_the_plain_one(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    plain = post(server, "/v1/completions", body)["choices"][0]["text"]
    events = post_stream(server, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events) == plain
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_plain_and_streaming(server, model_dir):
    messages = [{"role": "user", "content": "Say something."}]
    body = {"messages": messages, "max_tokens": 9, "temperature": 0}
    r = post(server, "/v1/chat/completions", body)
    text = r["choices"][0]["message"]["content"]
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert text == reference_text(model_dir, None, 9, messages)
    events = post_stream(server, "/v1/chat/completions", body)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                       if e.get("choices"))
    assert streamed == text


def test_max_tokens_and_stop_sequences(server):
    body = {"prompt": "stop here", "max_tokens": 12, "temperature": 0}
    full = post(server, "/v1/completions", body)
    text = full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] == 12
    assert len(text) >= 6, text
    stop = text[4:6]
    cut = text[: text.index(stop)]
    r = post(server, "/v1/completions", dict(body, stop=[stop]))
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == cut
    events = post_stream(server, "/v1/completions", dict(body, stop=stop))
    assert "".join(e["choices"][0]["text"] for e in events) == cut
    short = post(server, "/v1/completions", dict(body, max_tokens=3))
    assert short["usage"]["completion_tokens"] == 3
    assert text.startswith(short["choices"][0]["text"])


def test_prompt_reuse_keeps_compressed_caches_within_the_budget(server):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    first = post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 4})
    again = post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 4})
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    store = get(server, "/v1/turboquant")
    assert store["max_kv_bytes"] == BUDGET
    assert 0 < store["prompt_cache"]["bytes"] <= BUDGET
    assert store["prompt_cache"]["sequences"] >= 1


def test_a_prompt_sharing_a_short_prefix_is_served_as_on_a_fresh_server(server, model_dir):
    """A stored prompt is not reused by one that shares fewer tokens than its caches were
    calibrated on (no cached tokens: the text of a fresh cache); its next turn is."""
    a = "Zephyrs whisper over quiet meadows while the old mill turns slowly"
    b = "Zephyrs whisper about rain"  # 16 tokens shared with a
    body = {"max_tokens": 8, "temperature": 0}
    first = post(server, "/v1/completions", dict(body, prompt=a))["choices"][0]["text"]
    r = post(server, "/v1/completions", dict(body, prompt=b))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert r["choices"][0]["text"] == reference_text(model_dir, b, 8)
    r = post(server, "/v1/completions", dict(body, prompt=a + first[:4] + " and then?"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(a) - 1


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/completions", body=b'{"prompt": "hi", "max_tokens": ',
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400
    assert "Invalid JSON" in json.loads(r.read())["error"]
    conn.close()
    with pytest.raises(urllib.error.HTTPError) as e:
        post(server, "/v1/nothing", {"prompt": "hi"})
    assert e.value.code == 404
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert r["usage"]["completion_tokens"] == 2


def test_openai_client(server):
    import openai  # a test dependency (pyproject test extra)
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=30, max_retries=0)
    plain = client.completions.create(model="default_model", prompt=PROMPT, max_tokens=6,
                                      temperature=0)
    assert plain.usage.completion_tokens == 6
    stream = client.completions.create(model="default_model", prompt=PROMPT, max_tokens=6,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model="default_model", messages=messages,
                                          max_tokens=5, temperature=0)
    text = chat.choices[0].message.content
    chunks = client.chat.completions.create(model="default_model", messages=messages,
                                            max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    stopped = client.completions.create(model="default_model", prompt=PROMPT, max_tokens=6,
                                        temperature=0, stop=[plain.choices[0].text[2:4]])
    assert stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_all_served(server):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    expected = post(server, "/v1/completions", body)["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: post(server, "/v1/completions", body)["choices"][0]
                              ["text"], range(4)))
    assert texts == [expected] * 4


def test_speculative_decoding_with_a_draft_model(model_dir, tmp_path):
    """mlx-lm's --draft-model: the draft's caches are TurboQuant caches too (trimmed when
    draft tokens are rejected); greedy output equals plain generation."""
    draft = save_tiny_model_dir(tmp_path / "draft", seed=1)
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    with running_server(model_dir, tmp_path / "server.log", "--draft-model", str(draft),
                        "--num-draft-tokens", "3", "--park-window", "fp16") as url:
        # the second and third through the prompt-cache store (PromptCacheStore keeps the
        # entries' keys and cache lengths in step; mlx-lm's own store resumes a token short)
        texts = [post(url, "/v1/completions", body)["choices"][0]["text"] for _ in range(3)]
        info = get(url, "/v1/turboquant")
    assert texts == [reference_text(model_dir, PROMPT, 10)] * 3
    assert info["compressed_layers"] == info["layers"] > 0


# -- options (in-process) ------------------------------------------------------------------


def test_cache_options_defaults_and_overrides():
    assert serve.cache_options() == {"key_bits": 3, "value_bits": 3}
    assert serve.cache_options(kv_bits=4, value_bits=2, fp16_window=16, method=None) == \
        {"key_bits": 4, "value_bits": 2, "fp16_window": 16}
    with pytest.raises(ValueError, match="key_bits must be an integer in \\[1, 8\\], got 9"):
        serve.cache_options(key_bits=9)


def test_kv_preset_is_passed_through_only_when_make_prompt_cache_takes_it(monkeypatch):
    import inspect

    from turboquant import mlx_lm as tq_mlx

    if "preset" not in inspect.signature(tq_mlx.make_prompt_cache).parameters:
        with pytest.raises(ValueError, match="--kv-preset 'fast'.*no named presets"):
            serve.cache_options(preset="fast")

    def with_presets(model, preset=None, key_bits=3, value_bits=3):
        return []

    monkeypatch.setattr(tq_mlx, "make_prompt_cache", with_presets)
    assert serve.cache_options(preset="fast") == {"preset": "fast"}
    assert serve.cache_options(preset="fast", key_bits=4) == {"preset": "fast", "key_bits": 4}


def test_cli_refuses_a_bad_budget_and_unknown_options_of_other_commands(capsys):
    from turboquant.__main__ import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--max-kv-gb", "-1"])
    assert "--max-kv-gb must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "file", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_unsupported_model_fails_at_start_with_a_clear_error(tmp_path, monkeypatch):
    from mlx_lm import server as mlx_server

    class Args:  # the fields ModelProvider reads
        model, adapter_path, draft_model = str(tmp_path), None, None
        pipeline, trust_remote_code, chat_template = False, False, ""
        use_default_chat_template = False

    provider = serve.TurboQuantModelProvider(Args(), {"key_bits": 3, "value_bits": 3})

    def bad_load(self, *a, **k):
        from mlx_tiny import tiny_model

        self.model = tiny_model("mamba")

    monkeypatch.setattr(mlx_server.ModelProvider, "_load", bad_load)
    with pytest.raises(ValueError, match="recurrent state"):
        provider._load(str(tmp_path))
    assert provider.model is None and "recurrent state" in str(provider.load_error)


@pytest.mark.slow
def test_smollm2_chat_over_http(tmp_path):
    from turboquant.models import smollm2

    model_dir = smollm2()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with running_server(model_dir, tmp_path / "server.log", start_timeout=120) as url:
        r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12,
                                               "temperature": 0}, timeout=300)
        info = get(url, "/v1/turboquant")
    text = r["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert text == reference_text(model_dir, None, 12, messages)
    assert info["compressed_layers"] == info["layers"] == 30 * info["caches_built"]
