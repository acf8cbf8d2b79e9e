"""An OpenAI-compatible HTTP server: mlx-lm's own server with TurboQuant KV caches.

Everything a client sees (``/v1/completions``, ``/v1/chat/completions``, streaming, stop
sequences, chat templates, ``/v1/models``, ``/health``) is ``mlx_lm.server``'s code. Three
things are swapped in, each through the narrowest seam mlx-lm offers:

- **The cache factory.** ``mlx_lm.server`` builds every new prompt cache by calling its
  module-level ``make_prompt_cache(model)`` (``ResponseGenerator._serve_single``, and the
  batchability probe of ``ModelProvider._load``). :func:`install_cache_factory` points that
  one name at :func:`turboquant.mlx_lm.make_prompt_cache` with the server's KV options, so
  every full-attention layer gets a :class:`~turboquant.mlx_lm.TurboQuantKVCache` and
  every sliding-window layer a :class:`~turboquant.mlx_rotating.TurboQuantRotatingKVCache`.
- **The model provider.** :class:`TurboQuantModelProvider` checks at load time that the
  model can run on TurboQuant caches (a clear error instead of a failed first request) and
  marks it not batchable: mlx-lm's ``BatchGenerator`` merges per-request caches into one
  left-padded batch cache (``merge`` / ``extract``) and attends with per-sequence padding
  masks, which the compressed caches do not implement yet, so every request takes mlx-lm's
  sequential path (``stream_generate``), one at a time.
- **The prompt-cache store.** mlx-lm's ``LRUPromptCache`` (longest-prefix reuse, trimming,
  LRU eviction) is kept, with a byte budget (``--max-kv-gb``): it counts each entry by the
  caches' ``nbytes``, which for TurboQuant caches is the compressed size (codes, norms,
  fp16 window/sink rows, page slack and quantizer state), so the same budget holds ~4-5x
  more tokens than fp16 caches. mlx-lm's own ``run`` applies no byte budget on the
  sequential path; :func:`run` does. :class:`PromptCacheStore` also keeps every entry's
  key and its caches' lengths in step (mlx-lm's speculative path stores caches a token
  short of their key, and a reuse would then resume a token short).

``GET /v1/turboquant`` (added by :class:`TurboQuantAPIHandler`) reports the KV options, how
many caches were built with how many compressed layers, and the prompt-cache store's size.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mlx_lm import server as _server
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from turboquant import mlx_lm as _tq_mlx_lm

__all__ = [
    "PromptCacheStore",
    "TurboQuantAPIHandler",
    "TurboQuantModelProvider",
    "cache_options",
    "install_cache_factory",
    "main",
    "run",
]

_log = logging.getLogger("turboquant.serve")
_stats_lock = threading.Lock()
_stats = {"caches_built": 0, "compressed_layers": 0, "layers": 0}


def cache_options(kv_bits: int | None = None, key_bits: int | None = None,
                  value_bits: int | None = None, preset: str | None = None,
                  **extra: Any) -> dict:
    """Keyword arguments of :func:`turboquant.mlx_lm.make_prompt_cache` for the server.

    ``key_bits`` / ``value_bits`` override ``kv_bits``; without a preset the default is 3
    bits. ``preset`` (a named configuration) is passed through as ``preset=`` when this
    turboquant's ``make_prompt_cache`` accepts it, and refused with a clear error otherwise.
    ``extra`` goes to ``make_prompt_cache`` as is (the model checks the rest at load)."""
    opts = {k: v for k, v in extra.items() if v is not None}
    if preset is not None:
        params = inspect.signature(_tq_mlx_lm.make_prompt_cache).parameters
        if "preset" not in params:
            raise ValueError(f"--kv-preset {preset!r}: this turboquant's make_prompt_cache has no "
                             "named presets; use --kv-bits / --kv-key-bits / --kv-value-bits")
        opts["preset"] = preset
    elif kv_bits is None:
        kv_bits = 3
    for name, b in (("kv_bits", kv_bits), ("key_bits", key_bits), ("value_bits", value_bits)):
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8):
            raise ValueError(f"{name} must be an integer in [1, 8], got {b!r}")
    if kv_bits is not None or key_bits is not None:
        opts["key_bits"] = kv_bits if key_bits is None else key_bits
    if kv_bits is not None or value_bits is not None:
        opts["value_bits"] = kv_bits if value_bits is None else value_bits
    return opts


def _make_factory(options: dict) -> Callable[[Any], list]:
    def make_prompt_cache(model, max_kv_size=None):
        if max_kv_size is not None:
            raise ValueError("TurboQuant caches have no max_kv_size (rotating fp16 cache); "
                             "bound the prompt-cache store with --max-kv-gb instead")
        cache = _tq_mlx_lm.make_prompt_cache(model, **options)
        n = sum(isinstance(c, _tq_mlx_lm.TurboQuantKVCache) for c in cache)
        with _stats_lock:
            _stats["caches_built"] += 1
            _stats["compressed_layers"] += n
            _stats["layers"] += len(cache)
        return cache

    make_prompt_cache.turboquant_options = options  # type: ignore[attr-defined]
    return make_prompt_cache


def install_cache_factory(options: dict) -> Callable[[Any], list]:
    """Make ``mlx_lm.server`` build every prompt cache with TurboQuant caches (``options``:
    keyword arguments of :func:`turboquant.mlx_lm.make_prompt_cache`). Returns the factory
    it replaced, for :func:`uninstall_cache_factory`."""
    previous = _server.make_prompt_cache
    _server.make_prompt_cache = _make_factory(dict(options))
    return previous


def uninstall_cache_factory(previous: Callable[[Any], list]) -> None:
    _server.make_prompt_cache = previous


def stats() -> dict:
    with _stats_lock:
        return dict(_stats)


class TurboQuantModelProvider(_server.ModelProvider):
    """mlx-lm's model provider; a loaded model must take TurboQuant caches, and is served
    on the sequential path (see the module docstring)."""

    def __init__(self, cli_args, cache_options: dict):
        super().__init__(cli_args)
        self.cache_options = dict(cache_options)
        self.load_error: BaseException | None = None

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        try:
            super()._load(model_path, adapter_path, draft_model_path)
            # Builds caches for this model: refuses MLA / SSM / custom-attention models and
            # options the model cannot take (e.g. a profile for another layer count).
            _tq_mlx_lm.make_prompt_cache(self.model, **self.cache_options)
            if self.draft_model is not None:
                _tq_mlx_lm.make_prompt_cache(self.draft_model, **self.cache_options)
        except Exception as e:
            self.load_error = e
            self.reset()
            raise
        self.load_error = None
        self.is_batchable = False


class PromptCacheStore(_server.LRUPromptCache):
    """mlx-lm's LRU prompt-cache store, with each entry's key and its caches' lengths made
    to agree on insertion.

    Reuse trims a stored cache by the length of its key, so a cache must hold exactly one
    position per key token. mlx-lm's speculative path (``--draft-model``) stores caches one
    token short (the last sampled token is never fed to the models): resumed from such an
    entry, the model would miss one prompt token. Here the entry is stored under the prefix
    its caches hold (trimming any cache that holds more); caches that disagree and cannot
    be trimmed are not stored."""

    def fetch_nearest_cache(self, model, tokens):
        """mlx-lm's lookup (exact entry, else a longer entry trimmed back to the common
        prefix, else the longest shorter entry), where a longer entry is used only if every
        cache can take that trim: a sliding-window layer that has evicted tokens takes only
        what leaves the next query its window (``max_trim``)."""
        result = self._trie.search(model, tokens)
        if result.exact is not None:
            return super().fetch_nearest_cache(model, tokens)
        short = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > short:
            entry = self._trie.get(result.model, result.longer)
            prefix = min(len(tokens) - 1, result.common_prefix)
            n = len(result.longer) - prefix
            if can_trim_prompt_cache(entry.prompt_cache) and all(
                    getattr(c, "max_trim", lambda: n)() >= n for c in entry.prompt_cache):
                cache = copy.deepcopy(entry.prompt_cache)
                trim_prompt_cache(cache, n)
                return cache, tokens[prefix:]
        if short > 0:
            entry = self._trie.get(result.model, result.shorter)
            return copy.deepcopy(entry.prompt_cache), tokens[short:]
        return None, tokens

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type: str = "assistant"):
        offsets = [getattr(c, "offset", None) for c in prompt_cache]
        if offsets and all(isinstance(o, int) for o in offsets):
            n = min(min(offsets), len(tokens))
            if n != len(tokens) or any(o != n for o in offsets):
                if any(o != n for o in offsets) and not can_trim_prompt_cache(prompt_cache):
                    return
                for c in prompt_cache:
                    if c.offset > n:
                        c.trim(c.offset - n)
                tokens = tokens[:n]
        if not tokens:
            return
        super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)


class TurboQuantAPIHandler(_server.APIHandler):
    """mlx-lm's request handler plus ``GET /v1/turboquant``: KV options, prompt-cache store
    size and budget, and counters of the caches built through the factory (mlx-lm's
    load-time batchability probe included) and of their compressed layers."""

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/turboquant":
            return self._handle_turboquant()
        return super().do_GET()

    def _handle_turboquant(self):
        gen = self.response_generator
        store = getattr(gen, "prompt_cache", None)
        body = {
            "kv_cache": "turboquant",
            "options": _server.make_prompt_cache.__dict__.get("turboquant_options"),
            "max_kv_bytes": getattr(store, "max_bytes", None),
            "prompt_cache": None if store is None else {
                "sequences": len(store), "bytes": store.nbytes,
                "by_type": store.stats_by_type()},
            **stats(),
        }
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(body, default=str).encode())
        self.wfile.flush()


def _wait_for_model(provider: TurboQuantModelProvider, gen) -> None:
    """Wait until the generation thread has loaded the default model; raise its error."""
    if provider.cli_args.model is None:
        return
    while provider.model is None:
        if provider.load_error is not None or not gen.generation_available():
            gen.stop_and_join()
            err = provider.load_error or RuntimeError("the generation thread stopped")
            raise SystemExit(f"serve: cannot serve {provider.cli_args.model}: {err}")
        time.sleep(0.05)


def run(host: str, port: int, cli_args, options: dict, max_kv_bytes: int | None = None) -> None:
    """Serve ``cli_args`` (an ``mlx_lm.server`` argument namespace) with TurboQuant caches
    built from ``options`` until interrupted."""
    import mlx.core as mx

    if mx.distributed.init().size() > 1:
        raise SystemExit("serve: distributed (sharded) serving is not supported with "
                         "TurboQuant caches yet; run one process")
    if getattr(cli_args, "kv_bits", None) is not None:
        raise SystemExit("serve: mlx-lm's own KV quantization (kv_bits) cannot be combined "
                         "with TurboQuant caches")
    if max_kv_bytes is None:
        max_kv_bytes = cli_args.prompt_cache_bytes
    cli_args.prompt_cache_bytes = max_kv_bytes
    install_cache_factory(options)
    provider = TurboQuantModelProvider(cli_args, options)
    store = PromptCacheStore(cli_args.prompt_cache_size,
                             max_bytes=max_kv_bytes if max_kv_bytes is not None else 1 << 63)
    gen = _server.ResponseGenerator(provider, store)
    _wait_for_model(provider, gen)
    _log.info("TurboQuant KV caches: %s; prompt-cache budget: %s", options,
              "none" if max_kv_bytes is None else f"{max_kv_bytes:,} bytes")
    _server._run_http_server(host, port, gen, handler_class=TurboQuantAPIHandler)


def main(model: str, passthrough: list[str], options: dict,
         max_kv_bytes: int | None = None) -> int:
    """Parse ``passthrough`` with mlx-lm's own server arguments (``mlx_lm.server --help``)
    and serve ``model``."""
    captured: dict = {}

    def capture(host, port, model_provider):
        captured.update(host=host, port=port, cli_args=model_provider.cli_args)

    argv, saved_run = sys.argv, _server.run
    sys.argv = ["mlx_lm.server", "--model", str(model), *passthrough]
    _server.run = capture  # mlx-lm's main() parses, sets up logging, then calls run()
    try:
        _server.main()
    finally:
        sys.argv, _server.run = argv, saved_run
    run(captured["host"], captured["port"], captured["cli_args"], options, max_kv_bytes)
    return 0
