"""Load test: ``python -m turboquant serve`` against mlx-lm's own server, same run, loopback.

Both servers are started here on free loopback ports with the same model and the same
prompt-cache budget; one server works at a time while the other idles. Each phase sends a
bounded number of streaming completions (the official ``openai`` client, one thread per
client) and measures:

- **load**, for N = 1, 4, 16 concurrent clients (``max(N, min_requests)`` requests, distinct
  prompts): generated tokens per second of wall time, time to first token and request
  latency (p50 / p99 over the phase's requests), failed requests, and the server process's
  peak resident memory (VmHWM of /proc/PID/status, since start, after the phase). Each N
  runs ``repeats`` rounds (``--repeats``); in a round both servers serve the same new
  prompts, one after the other, the order alternating between rounds, and each ratio is the
  median of the rounds' ratios (``tokens_per_s_rounds`` lists them): a slow spell of a
  shared machine then falls on both servers;
- **capacity**: up to ``capacity_prompts`` distinct prompts of ``capacity_prompt_tokens``
  tokens (``max_tokens`` 1), one after the other, until the store first evicts one (it is
  then full), then how many tokens the prompt-cache store holds
  within the budget, by each server's own accounting (the caches' ``nbytes``, summed by
  mlx-lm's ``LRUPromptCache``): ``GET /v1/turboquant`` for ours, ``GET /v1/prompt_cache``
  for the baseline.

The baseline is ``mlx_lm.server`` itself (its handlers, batch generator and prompt-cache
store), started by this script (``--baseline-server``) with two additions: the store gets
the byte budget at insertion (``LRUPromptCache(max_bytes=...)``; mlx-lm's ``run`` applies
``--prompt-cache-bytes`` only when a request joins a batch) and ``GET /v1/prompt_cache``
reports the store. Its caches are mlx-lm's ``KVCache`` in the model's dtype (float32 for the
float32 model served here: fp16 weights are several times slower on this CPU), so the JSON
also gives the capacity ratio against fp16 caches (half the baseline's bytes per token,
exact for ``KVCache``). Both servers batch concurrent requests (mlx-lm's continuous
batching; turboquant serve with its batch cache, a TurboQuant cache per row).

Prompts are windows of the license texts in /usr/share/common-licenses (sorted by name,
tokenized by the model's tokenizer), deterministic. Settings are ``SETTINGS`` / ``SMOKE``.

Command of the committed result (bench/results/serve_load_smollm2.json; machine in the JSON):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        PYTHONPATH=python python bench/serve_load.py \\
        --model .models/SmolLM2-135M-Instruct-float32 --out bench/results/serve_load_smollm2.json

(``turboquant.models.smollm2()`` converts the model.) ``--smoke`` runs the same phases on a
tiny random model in seconds (tests/python/test_serve_load_bench.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import turboquant

ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")

SETTINGS = dict(
    clients=[1, 4, 16],
    repeats=3,  # load phases per N and server, the servers alternating (new prompts each)
    min_requests=4,  # requests per load phase: max(N, min_requests)
    prompt_tokens=128,
    max_tokens=32,
    kv_args=["--kv-bits", "3"],  # turboquant serve's KV options (the tq3 recipe)
    budget_gb=0.07,  # prompt-cache budget of both servers
    capacity_prompt_tokens=256,
    capacity_prompts=28,
    start_timeout_s=180,
    request_timeout_s=600,
)
SMOKE = dict(SETTINGS, clients=[1, 4], repeats=2, min_requests=2, prompt_tokens=24, max_tokens=4,
             budget_gb=0.0005, capacity_prompt_tokens=300, capacity_prompts=40,
             start_timeout_s=60, request_timeout_s=60)


# -- the baseline server: mlx_lm.server, its store bounded in bytes and readable over HTTP --


def baseline_server(argv: list[str]) -> None:
    from mlx_lm import server as S

    def store_info(store) -> dict:
        tokens = sum(len(t) for lru in store._lru._lrus.values() for _, t in lru)
        return {"sequences": len(store), "bytes": store.nbytes, "tokens": tokens,
                "max_bytes": store.max_bytes}

    class Handler(S.APIHandler):
        def do_GET(self):
            if self.path.rstrip("/") != "/v1/prompt_cache":
                return super().do_GET()
            body = json.dumps(store_info(self.response_generator.prompt_cache)).encode()
            self._set_completion_headers(200)
            self.end_headers()
            self.wfile.write(body)

    def run(host, port, model_provider, **_):
        args = model_provider.cli_args
        budget = args.prompt_cache_bytes if args.prompt_cache_bytes is not None else 1 << 63
        store = S.LRUPromptCache(args.prompt_cache_size, max_bytes=budget)
        S._run_http_server(host, port, S.ResponseGenerator(model_provider, store),
                           handler_class=Handler)

    S.run = run
    sys.argv = ["mlx_lm.server", *argv]
    S.main()


# -- client side ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, name: str, cmd: list[str], log: Path, timeout: float):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The turboquant this script imported (installed, or the source tree's with PYTHONPATH)
        package_root = str(Path(turboquant.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.start_timeout = timeout

    def wait(self) -> float:
        t0 = time.monotonic()
        while True:
            try:
                if get_json(self.url + "/health", timeout=2)["status"] == "ok":
                    return time.monotonic() - t0
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > self.start_timeout:
                self.stop()
                raise SystemExit(f"{self.name} did not start:\n{self.log.read_text()}")
            time.sleep(0.2)

    def memory(self) -> dict:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return {"rss_bytes": fields["VmRSS"], "peak_rss_bytes": fields["VmHWM"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def prompts_from_licenses(model_dir: Path, sizes: list[tuple[int, int]]) -> list[list[str]]:
    """For each (count, tokens) of ``sizes``, ``count`` distinct prompts of about ``tokens``
    tokens: consecutive windows of the license texts (wrapping around), none shared."""
    from mlx_lm.utils import load_tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the corpus is longer than model_max_length, on purpose

    tok = load_tokenizer(model_dir)
    text = "\n\n".join(p.read_text(errors="replace") for p in sorted(LICENSES.iterdir())
                       if p.is_file())
    ids = tok.encode(text)
    out, start = [], 0
    for count, tokens in sizes:
        out.append([])
        for _ in range(count):
            a = start % (len(ids) - tokens)
            out[-1].append(tok.decode(ids[a:a + tokens]))
            start += tokens
    return out


def stream_one(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens, prompt_tokens = None, None, None
    try:
        stream = client.completions.create(
            model="default_model", prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
                prompt_tokens = chunk.usage.prompt_tokens
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    latency = time.perf_counter() - t0
    if tokens is None:
        return {"ok": False, "error": "no usage chunk in the stream"}
    return {"ok": True, "ttft_s": ttft if ttft is not None else latency,
            "latency_s": latency, "tokens": tokens, "prompt_tokens": prompt_tokens}


def percentile(xs: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else None


def load_phase(server: Server, client, n_clients: int, prompts: list[str],
               max_tokens: int) -> dict:
    pending = list(prompts)
    lock = threading.Lock()
    results: list[dict] = []

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop(0)
            r = stream_one(client, prompt, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
        for f in [pool.submit(worker) for _ in range(n_clients)]:
            f.result()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": n_clients, "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]}),
        "wall_s": round(wall, 3), "completion_tokens": tokens,
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "tokens_per_s": round(tokens / wall, 3),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        **server.memory(),
    }


def capacity_phase(server: Server, client, prompts: list[str], info_path: str) -> dict:
    """Send distinct prompts until the prompt-cache store evicts one (it then holds what
    fits in its budget) or the prompts run out."""
    failed = sent = 0
    for p in prompts:
        failed += not stream_one(client, p, 1)["ok"]
        sent += 1
        info = get_json(server.url + info_path)
        store = info.get("prompt_cache", info)
        if store["sequences"] < sent - failed:
            break
    return {"prompts_sent": sent, "failed": failed, "sequences": store["sequences"],
            "tokens": store["tokens"], "bytes": store["bytes"],
            "bytes_per_token": round(store["bytes"] / max(1, store["tokens"]), 1),
            "evicted": store["sequences"] < sent - failed}


def machine() -> dict:
    import mlx.core as mx
    import mlx_lm

    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text()
               .splitlines() if ln.startswith("MemTotal"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "mlx_device": str(mx.default_device()), "turboquant_commit": commit,
            "ld_preload": os.environ.get("LD_PRELOAD", "")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline-server"]:
        baseline_server(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="mlx-lm model folder (default: turboquant.models.smollm2())")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--capacity-only", action="store_true",
                   help="only the cached-prompt capacity phase (no load phases)")
    p.add_argument("--capacity-prompt-tokens", type=int,
                   help="tokens per capacity prompt (default: the settings')")
    p.add_argument("--capacity-prompts", type=int, help="capacity prompts sent")
    p.add_argument("--budget-gb", type=float, help="prompt-cache budget of both servers")
    p.add_argument("--repeats", type=int,
                   help="load phases per client count and server (default: the settings')")
    p.add_argument("--park-window", choices=("codes", "fp16"),
                   help="turboquant serve's --park-window (default: the server's default)")
    args = p.parse_args(argv)
    settings = dict(SMOKE if args.smoke else SETTINGS)
    for key in ("capacity_prompt_tokens", "capacity_prompts", "budget_gb", "repeats"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.capacity_only:
        settings["clients"] = []
    if args.park_window is not None:
        settings["kv_args"] = [*settings["kv_args"], "--park-window", args.park_window]
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:
            sys.path.insert(0, str(ROOT / "tests" / "python"))
            from mlx_tiny_dir import save_tiny_model_dir

            model = save_tiny_model_dir(tmp / "tiny")
        elif args.model:
            model = Path(args.model)
        else:
            from turboquant.models import smollm2

            model = smollm2()
        budget = int(settings["budget_gb"] * 1e9)
        common = ["--model", str(model), "--prompt-cache-size", "100000",
                  "--log-level", "WARNING"]
        servers = {
            "turboquant": Server("turboquant serve", [
                sys.executable, "-m", "turboquant", "serve", *common, *settings["kv_args"],
                "--max-kv-gb", str(settings["budget_gb"])], tmp / "turboquant.log",
                settings["start_timeout_s"]),
            "mlx_lm": Server("mlx_lm.server", [
                sys.executable, str(Path(__file__).resolve()), "--baseline-server", *common,
                "--prompt-cache-bytes", str(budget)], tmp / "mlx_lm.log",
                settings["start_timeout_s"]),
        }
        try:
            startup = {k: round(s.wait(), 2) for k, s in servers.items()}
            reps = settings["repeats"]
            n_load = reps * sum(max(n, settings["min_requests"]) for n in settings["clients"])
            load_prompts, cap_prompts = prompts_from_licenses(model, [
                (n_load, settings["prompt_tokens"]),
                (settings["capacity_prompts"], settings["capacity_prompt_tokens"])])
            dtype_bytes = base_dtype_bytes(model)
            results, clients = {}, {}
            for key, server in servers.items():
                client = clients[key] = openai.OpenAI(
                    base_url=server.url + "/v1", api_key="unused",
                    timeout=settings["request_timeout_s"], max_retries=0)
                warm = stream_one(client, "Hello", 2)  # first-request set-up, not measured
                if not warm["ok"]:
                    raise SystemExit(f"{server.name}: warm-up failed: {warm['error']}")
                info = "/v1/turboquant" if key == "turboquant" else "/v1/prompt_cache"
                results[key] = {"capacity": capacity_phase(server, client, cap_prompts, info),
                                "load": []}
                print(f"{server.name}: capacity {json.dumps(results[key]['capacity'])}",
                      flush=True)
            # Load phases: per client count, `repeats` rounds; in each round both servers
            # serve the same new prompts, one after the other (the order alternating by
            # round), so a slow spell of a shared machine falls on both.
            i = 0
            for n in settings["clients"]:
                k = max(n, settings["min_requests"])
                for r in range(reps):
                    order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                    for key in order:
                        phase = load_phase(servers[key], clients[key], n,
                                           load_prompts[i:i + k], settings["max_tokens"])
                        phase["repeat"] = r
                        results[key]["load"].append(phase)
                        print(f"{servers[key].name}: {json.dumps(phase)}", flush=True)
                    i += k
            results["turboquant"]["server_info"] = get_json(servers["turboquant"].url +
                                                            "/v1/turboquant")
        finally:
            for s in servers.values():
                s.stop()

    ours, base = results["turboquant"], results["mlx_lm"]
    ratios = {"load": [], "capacity": {}}
    for n in settings["clients"]:
        pairs = [(a, b) for a, b in zip(ours["load"], base["load"]) if a["clients"] == n]

        def ratio(field, pairs=pairs):
            """Median over the rounds of ours / baseline, and each round's."""
            each = [round(a[field] / b[field], 3) for a, b in pairs]
            return round(statistics.median(each), 3), each

        tps, tps_each = ratio("tokens_per_s")
        ratios["load"].append({
            "clients": n, "tokens_per_s": tps, "tokens_per_s_rounds": tps_each,
            "ttft_p50": ratio("ttft_p50_s")[0], "latency_p50": ratio("latency_p50_s")[0],
            "peak_rss": ratio("peak_rss_bytes")[0]})
    ca, cb = ours["capacity"], base["capacity"]
    ratios["capacity"] = {
        "tokens_held": round(ca["tokens"] / max(1, cb["tokens"]), 3),
        "bytes_per_token_vs_baseline": round(cb["bytes_per_token"] / ca["bytes_per_token"], 3),
        # KVCache nbytes is proportional to the element size: fp16 is half of fp32
        "bytes_per_token_vs_fp16": round(
            cb["bytes_per_token"] * 2 / dtype_bytes / ca["bytes_per_token"], 3)}
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "model": str(model.name) if args.smoke else str(model),
        "baseline_kv_dtype": {2: "float16", 4: "float32"}[dtype_bytes],
        "settings": settings, "budget_bytes": budget, "startup_s": startup,
        "results": results, "ratios": ratios,
        "failed_requests": sum(r["failed"] for res in results.values()
                               for r in [*res["load"], res["capacity"]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))
    return 0


def base_dtype_bytes(model: Path) -> int:
    """Bytes per element of mlx-lm's KVCache for this model (the dtype of its weights)."""
    from safetensors import safe_open

    f = next(iter(sorted(Path(model).glob("*.safetensors"))))
    with safe_open(str(f), "numpy") as st:
        name = next(n for n in st.keys() if n.endswith("weight"))  # noqa: SIM118 (not a dict)
        dtype = st.get_slice(name).get_dtype()
    return {"F32": 4, "F16": 2, "BF16": 2}[dtype]


if __name__ == "__main__":
    sys.exit(main())
