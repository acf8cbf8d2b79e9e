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
  decides whether requests are batched. With batching (the default), mlx-lm's
  ``BatchGenerator`` decodes the running requests together, one forward pass per step:
  it merges their caches (``TurboQuantKVCache.merge``) into a
  :class:`turboquant.mlx_batch.BatchTurboQuantKVCache`, one per-sequence cache per row,
  attention on each row's codes. The generator builds the caches of new requests through
  ``mlx_lm.generate.make_prompt_cache``, which the cache factory replaces as well. Layers
  on the C++ core and layers held by the GPU store (Metal, or mlx's CUDA back end) batch
  alike. A model is served one request at a time (mlx-lm's ``stream_generate``) when it
  has a draft model, when one kind of sliding-window layer mixes fp16 and TurboQuant caches
  (their batch masks have different layouts), or with ``batching=False``
  (``--no-batching``).
- **The prompt-cache store.** mlx-lm's ``LRUPromptCache`` (longest-prefix reuse, trimming,
  LRU eviction) is kept, with a byte budget (``--max-kv-gb``): it counts each entry by the
  caches' ``nbytes``, which for TurboQuant caches is the compressed size (codes, norms,
  fp16 window/sink rows, page slack and quantizer state), so the same budget holds ~4-5x
  more tokens than fp16 caches. An entry is parked with its caches' fp16 windows moved
  into codes (``--park-window codes``, the default; ``TurboQuantKVCache.compact_window``),
  so that short entries are not mostly fp16 rows. mlx-lm's own ``run`` applies no byte budget on the
  sequential path; :func:`run` does (on both paths). :class:`PromptCacheStore` also
  keeps every entry's key and its caches' lengths in step (mlx-lm's speculative path
  stores caches a token short of their key, and a reuse would then resume a token short),
  and reuses an entry only from a prefix that covers the tokens its caches were
  calibrated on (centring means, key-split channel order), so a reused cache's
  calibration comes from tokens the new prompt shares.

``GET /v1/turboquant`` (added by :class:`TurboQuantAPIHandler`) reports the KV options, how
many caches were built with how many compressed layers, the prompt-cache store's size, and
whether requests are batched (the most rows decoded together so far, or why not).

**Sharded models.** Under ``mlx.launch`` with several processes (``mlx.launch --backend
ring --hosts 127.0.0.1 -n 2 -- python -m turboquant serve --model DIR [--pipeline]``) the
model is split with mlx-lm's ``sharded_load`` (tensor parallel, or pipeline with
``--pipeline``) and every rank builds TurboQuant caches for its KV heads or its layers.
Rank 0 serves HTTP and shares each request with the other ranks, which run the same
generation loop in step (mlx-lm's ``ResponseGenerator``); batching works as in one
process. Each rank's :class:`PromptCacheStore` takes its decisions on all ranks' values
together (an entry's bytes are the ranks' bytes summed, so ``--max-kv-gb`` is the budget of
the whole sharded cache), and :class:`KVCost` measures the whole sharded cache, so every
rank fetches, stores and evicts the same entries. ``/v1/turboquant`` reports each rank's
layers, KV heads (with their model numbers) and share of the store. Draft models and
adapters are refused when sharded (mlx-lm loads them in one process only).

Bad requests get an HTTP error with a JSON body ``{"error": message}`` naming the problem,
before any generation work, and the server goes on serving: mlx-lm's own checks (malformed
JSON: 400, ``max_tokens`` and the other sampling fields: 400), plus a body that is not UTF-8
(400), a model this server does not serve (404), a prompt whose compressed cache alone would
exceed the prompt-cache budget (413, :class:`KVCost`). A client that disconnects mid-stream
stops its generation at the next token (mlx-lm's ``ctx.stop()``); the handler logs one line
instead of a traceback and counts it in ``/v1/turboquant``'s ``disconnects``.
"""

from __future__ import annotations

import bisect
import copy
import importlib
import inspect
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlx_lm import server as _server
from mlx_lm.models import cache as _mlx_cache
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from turboquant import mlx_batch as _mlx_batch
from turboquant import mlx_lm as _tq_mlx_lm
from turboquant import mlx_rotating as _mlx_rotating

__all__ = [
    "KVCost",
    "PromptCacheStore",
    "ResponseGenerator",
    "TurboQuantAPIHandler",
    "TurboQuantModelProvider",
    "batching_refusal",
    "cache_options",
    "install_cache_factory",
    "main",
    "run",
]

# the module (mlx_lm's package exports a function of the same name)
_generate = importlib.import_module("mlx_lm.generate")
_log = logging.getLogger("turboquant.serve")
_stats_lock = threading.Lock()
_stats = {"caches_built": 0, "compressed_layers": 0, "layers": 0, "disconnects": 0,
          "refused": 0}


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
    previous = (_server.make_prompt_cache, _generate.make_prompt_cache)
    factory = _make_factory(dict(options))
    # the server's sequential path and probe, and BatchGenerator.insert for new requests
    _server.make_prompt_cache = _generate.make_prompt_cache = factory
    return previous


def uninstall_cache_factory(previous) -> None:
    _server.make_prompt_cache, _generate.make_prompt_cache = previous


def stats() -> dict:
    with _stats_lock:
        return dict(_stats)


def _count(name: str) -> None:
    with _stats_lock:
        _stats[name] += 1


def _group():
    import mlx.core as mx

    return mx.distributed.init()


def _gather(values: list[int], group=None) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), row r from rank r; one
    ``all_sum``. Without a distributed group: ``[values]``, no communication. A collective:
    every rank calls it at the same point of its generation thread."""
    import mlx.core as mx

    group = group if group is not None else _group()
    if group.size() == 1:
        return [list(values)]
    rows = mx.zeros((group.size(), len(values)), dtype=mx.int64)
    rows[group.rank()] = mx.array(values, dtype=mx.int64)
    return mx.distributed.all_sum(rows, group=group).tolist()


def _gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), index r from rank r: two ``all_sum`` (see
    :func:`_gather`)."""
    import pickle

    import mlx.core as mx
    import numpy as np

    group = group if group is not None else _group()
    data = pickle.dumps(obj)
    if group.size() == 1:
        return [obj]
    sizes = [row[0] for row in _gather([len(data)], group)]
    buf = mx.zeros((group.size(), max(sizes)), dtype=mx.uint8)
    buf[group.rank(), :len(data)] = mx.array(np.frombuffer(data, dtype=np.uint8))
    buf = np.array(mx.distributed.all_sum(buf, group=group))
    return [pickle.loads(buf[r, :n].tobytes()) for r, n in enumerate(sizes)]


class KVCost:
    """Bytes of a model's prompt cache (TurboQuant caches, the draft model's included) as a
    function of its length, measured once on the model; an upper bound of the ``nbytes`` the
    prompt-cache store counts for a prompt of that many tokens.

    The bytes are not linear in the length: a cache holds fixed fp16 rows (sinks, and the
    window, allocated whole at its first token), codes in whole pages of ``block_tokens``
    (a mixed-precision flush group's pages at once: ``flush_tokens``; mlx-lm's fp16
    ``KVCache`` in steps of 256 tokens), and quantizer state. :meth:`measure`
    therefore prefills fresh caches (built by the installed factory) at probe lengths
    (1 to 8 tokens, then about x1.5 apart up to 256, then doubling up to ``top``, 1024 or
    more) and reads their ``nbytes``. A length up to ``top`` is priced at the bytes of the
    next probe at or above it (the bytes never decrease with the length). Past ``steady``
    tokens (every cache's sinks, window and two pages: from there each further page of
    codes costs the same) a length n is also priced at ``bytes(p) + per_token * (n - p +
    page)`` from the longest probe p <= n, where ``per_token`` is the slope between the two
    longest probes and the extra page covers the page that n starts; the smaller of the two
    is taken, and past ``top`` only the second applies. Added: with ``--park-window codes``,
    past ``parked_from`` tokens (the sinks), ``min(parked, n) + page`` code tokens at
    ``per_token`` (a cache resumed from a parked entry holds codes for up to ``parked``, a
    window's rows, of the tokens a fresh cache holds as fp16 rows, its new window allocated
    whole all the same, and a page more where the codes end elsewhere), ``spare`` (the fp16
    rows of a flushed window block a cache keeps after a decode step flushed it,
    ``TurboQuantKVCache.spare_nbytes``) once a window can have flushed, and for caches on
    the GPU store the code pages it allocates ahead (an eighth of the codes, and a page).
    A mixed preset's layers decide on the prompt whether importance routing pays
    (``mixed_trial``); the probes skip that trial and price the routed layout, which holds
    more bytes than the uniform codes a layer may fall back to.

    On a sharded model (``mx.distributed`` with several processes) the prefills are
    collective and the bytes are those of every rank's caches together (the whole sharded
    cache, as the store counts them), the same on every rank."""

    SHORT_PROBES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

    def __init__(self, lengths, sizes, *, page: int = 256, steady: int = 0,
                 spare: int = 0, flushes_from: int = 1, gpu: bool = False, parked: int = 0,
                 parked_from: int = 0):
        if len(lengths) != len(sizes) or len(lengths) < 2:
            raise ValueError("KVCost needs the bytes of at least two probe lengths")
        self.lengths = tuple(int(n) for n in lengths)
        self.sizes = tuple(int(b) for b in sizes)
        self.per_token = max(0.0, (self.sizes[-1] - self.sizes[-2])
                             / (self.lengths[-1] - self.lengths[-2]))
        self.page, self.steady, self.spare = int(page), int(steady), int(spare)
        self.flushes_from, self.gpu = int(flushes_from), bool(gpu)
        self.parked, self.parked_from = int(parked), int(parked_from)

    def __call__(self, tokens: int) -> int:
        n = max(1, int(tokens))
        est = math.inf
        i = bisect.bisect_left(self.lengths, n)
        if i < len(self.lengths):
            est = self.sizes[i]
        j = bisect.bisect_right(self.lengths, n) - 1
        if j >= 0 and (self.lengths[j] >= self.steady or i == len(self.lengths)):
            est = min(est, self.sizes[j] + self.per_token * (n - self.lengths[j] + self.page))
        if n >= self.flushes_from:
            est += self.spare
        if self.parked and n > self.parked_from:
            est += self.per_token * (min(self.parked, n) + self.page)
        if self.gpu:
            est += self.per_token * (n / 8 + self.page)
        return math.ceil(est)

    @classmethod
    def measure(cls, model, draft_model=None, top: int = 1024,
                park_window: str = "codes") -> KVCost:
        import mlx.core as mx

        def probe(n):
            total, caches = 0, []
            for m in (model, draft_model):
                if m is None:
                    continue
                cache = _server.make_prompt_cache(m)
                for c in cache:  # mixed presets: price the routed layout (see above)
                    if getattr(c, "mixed_trial", False):
                        c.mixed_trial = False
                mx.eval(m(mx.zeros((1, n), dtype=mx.int32), cache=cache))
                total += sum(c.nbytes for c in cache)
                caches += cache
            return total, caches

        first, caches = probe(1)
        page = max([int(getattr(c, "flush_tokens", getattr(c, "step", 256))) for c in caches]
                   + [1])
        windows = [int(getattr(c, "fp16_sinks", 0)) + int(getattr(c, "fp16_window", 0))
                   for c in caches]
        steady = max([w + 2 * page for w in windows] + [page])
        flushes_from = min([w + int(getattr(c, "block_tokens", 0)) + 1
                            for c, w in zip(caches, windows) if hasattr(c, "spare_nbytes")]
                           + [1 << 62])
        # the same probes on every rank (each prefill is a collective on a sharded model)
        steady = max(row[0] for row in _gather([steady]))
        while top // 2 < steady:
            top *= 2
        lengths = [n for n in cls.SHORT_PROBES if n < top]
        n = lengths[-1] * 2
        while n <= top:
            lengths.append(n)
            n *= 2
        if lengths[-1] != top:
            lengths.append(top)
        sizes = [first]
        for n in lengths[1:]:
            total, caches = probe(n)
            sizes.append(total)
        spare = sum(c.spare_nbytes() for c in caches if hasattr(c, "spare_nbytes"))
        gpu = int(any(getattr(c, "_gpu", False) for c in caches))
        parked, parked_from = 0, 1 << 62
        if park_window == "codes":  # the rows of a window that parking moves into codes
            for c in caches:
                if hasattr(c, "compact_window") and getattr(c, "fp16_window", 0):
                    parked = max(parked, int(c.fp16_window) + int(c.flush_tokens))
                    parked_from = min(parked_from, int(getattr(c, "fp16_sinks", 0)))
        rows = _gather(sizes + [spare, gpu, page, steady, flushes_from, parked, parked_from])
        k = len(sizes)
        sizes = [sum(col) for col in zip(*(r[:k] for r in rows))]
        return cls(lengths, sizes, spare=sum(r[k] for r in rows),
                   gpu=any(r[k + 1] for r in rows), page=max(r[k + 2] for r in rows),
                   steady=max(r[k + 3] for r in rows),
                   flushes_from=min(r[k + 4] for r in rows), parked=max(r[k + 5] for r in rows),
                   parked_from=min(r[k + 6] for r in rows))


class TurboQuantModelProvider(_server.ModelProvider):
    """mlx-lm's model provider; a loaded model must take TurboQuant caches. It is served
    with continuous batching when :func:`batching_refusal` finds nothing against it (and
    ``batching`` is on), else one request at a time (see the module docstring)."""

    def __init__(self, cli_args, cache_options: dict, batching: bool = True,
                 park_window: str = "codes"):
        super().__init__(cli_args)
        self.cache_options = dict(cache_options)
        self.batching = bool(batching)
        self.park_window = _check_park_window(park_window)
        self.load_error: BaseException | None = None
        self.batching_off_reason: str | None = None
        self.kv_cost: KVCost | None = None
        self.loaded = False  # the last _load finished (its measurements included)
        # sharded: every rank's turboquant.distributed.rank_report of a probe cache (load)
        self.rank_reports: list[dict] | None = None

    @property
    def sharding(self) -> str | None:
        """"pipeline" or "tensor" on a sharded model (several processes), else None."""
        if not self.is_distributed:
            return None
        return "pipeline" if self.pipeline_group is not None else "tensor"

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        self.loaded = False
        try:
            super()._load(model_path, adapter_path, draft_model_path)
            # Builds caches for this model: refuses MLA / SSM / custom-attention models and
            # options the model cannot take (e.g. a profile for another layer count).
            cache = _tq_mlx_lm.make_prompt_cache(self.model, **self.cache_options)
            if self.draft_model is not None:
                _tq_mlx_lm.make_prompt_cache(self.draft_model, **self.cache_options)
            # Collectives on a sharded model: the generation thread (this one) is the only
            # thread that talks to the other ranks, and every rank loads here.
            if self.cli_args.prompt_cache_bytes is not None:
                self.kv_cost = KVCost.measure(self.model, self.draft_model,
                                              park_window=self.park_window)
            if self.is_distributed:
                self.rank_reports = _gather_object(_probe_report(self.model,
                                                                 self.cache_options))
        except Exception as e:
            self.load_error = e
            self.reset()
            raise
        self.load_error = None
        why = "turned off (--no-batching)" if not self.batching else \
            batching_refusal(cache, self.draft_model is not None)
        self.batching_off_reason = why
        self.is_batchable = self.is_batchable and why is None
        if why is not None:
            _log.info("serving one request at a time: %s", why)
        self.loaded = True


def _probe_report(model, options: dict) -> dict:
    """:func:`turboquant.distributed.rank_report` of a fresh cache of this rank after an
    8-token prefill (a collective on a sharded model): the layers and KV heads it holds."""
    import mlx.core as mx

    from turboquant.distributed import rank_report

    cache = _tq_mlx_lm.make_prompt_cache(model, **options)
    mx.eval(model(mx.zeros((1, 8), dtype=mx.int32), cache=cache))
    return rank_report(model, cache)


def batching_refusal(cache: list, draft: bool = False) -> str | None:
    """Why requests with these per-layer caches cannot be decoded together (None: they
    can)."""
    if draft:
        return "speculative decoding (a draft model) runs one request at a time in mlx-lm"
    missing = sorted({type(c).__name__ for c in cache if not hasattr(c, "merge")})
    if missing:
        return f"cache types without batching: {', '.join(missing)}"
    sliding_fp16 = {c.max_size for c in cache if type(c) is _mlx_cache.RotatingKVCache}
    sliding_tq = {c.max_size for c in cache
                  if isinstance(c, _mlx_rotating.TurboQuantRotatingKVCache)}
    if sliding_fp16 & sliding_tq:
        return ("sliding-window layers of one window mix fp16 and TurboQuant caches, whose "
                "batch masks have different layouts (compress all of them or none)")
    return None


def _calibration_tokens(prompt_cache: list) -> int:
    """The most leading tokens any cache of a prompt cache was calibrated on (0: none;
    ``TurboQuantKVCache.calibration_tokens``)."""
    return max((int(getattr(c, "calibration_tokens", 0)) for c in prompt_cache), default=0)


PARK_WINDOW = ("codes", "fp16")


def _check_park_window(park_window: str) -> str:
    if park_window not in PARK_WINDOW:
        raise ValueError(f"park_window must be one of {', '.join(PARK_WINDOW)}, "
                         f"got {park_window!r}")
    return park_window


def park(prompt_cache: list) -> int:
    """Compact the caches of an entry being parked in the store: each TurboQuant layer's
    fp16 window moved into codes (``TurboQuantKVCache.compact_window``; layers that keep
    their windows, and mlx-lm's own caches, are left as they are). Returns the tokens
    moved, all layers together."""
    return sum(int(c.compact_window()) for c in prompt_cache if hasattr(c, "compact_window"))


class PromptCacheStore(_server.LRUPromptCache):
    """mlx-lm's LRU prompt-cache store, with each entry's key and its caches' lengths made
    to agree on insertion, and the same decisions on every rank of a sharded model.

    Reuse trims a stored cache by the length of its key, so a cache must hold exactly one
    position per key token. mlx-lm's speculative path (``--draft-model``) stores caches one
    token short (the last sampled token is never fed to the models): resumed from such an
    entry, the model would miss one prompt token. Here the entry is stored under the prefix
    its caches hold (trimming any cache that holds more); caches that disagree and cannot
    be trimmed are not stored.

    Sharded (``mx.distributed`` with several processes): every rank holds its own store of
    its own caches (its layers, or its KV heads), and the ranks must fetch, store and evict
    the same entries, or they would prefill different tokens and hang. Every decision that
    depends on a rank's caches is taken on all ranks' values together (collectives, in the
    generation thread, where every rank makes the same calls in the same order): an
    entry's bytes are the sum of the ranks' bytes (the whole sharded cache: the byte
    budget is for all ranks together), a cache is trimmable when every rank's is, an
    insertion keeps the prefix every rank's caches hold. ``rank_bytes`` reports each rank's
    share.

    Parking (``park_window``): with ``"codes"`` (the default) an entry's caches are compacted
    as they are stored (:func:`park`): every TurboQuant layer's fp16 window goes into codes,
    its memory given back, so a short entry is not mostly fp16 rows (a 257-token SmolLM2
    entry takes 4.1x fewer bytes than fp16 caches instead of 1.8x). A reused entry then
    hands back its last window tokens (up to ``fp16_window + block_tokens``) as codes;
    tokens computed after the reuse get a window of fp16 rows as usual
    (``bench/park_window_quality.py`` measures the cost). ``"fp16"`` stores the caches as
    they are. mlx-lm stores caches no generation uses afterwards: the sequential path the
    request's own cache after its last token, the batched path ``extract`` copies of a
    batch row (``BatchTurboQuantKVCache.extract``), so compacting them in place changes no
    running request."""

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63, group=None,
                 park_window: str = "codes"):
        super().__init__(max_size, max_bytes)
        self._group_ = group if group is not None else _group()
        self.rank_bytes = [0] * self._group_.size()
        self.park_window = _check_park_window(park_window)
        self.parked_tokens = 0  # tokens moved into codes by parking, all entries so far

    def fetch_nearest_cache(self, model, tokens):
        """mlx-lm's lookup (exact entry, else a longer entry trimmed back to the common
        prefix, else the longest shorter entry), where an entry is reused only from a prefix
        that covers its calibration, and a longer entry only if every cache can take the
        trim.

        Calibration: a TurboQuant cache's centring means and key-split channel order (and a
        mixed preset's trial) are computed from the first tokens it was given
        (``TurboQuantKVCache.calibration_tokens``, normally the first prefill chunk of the
        request that made the entry) and stay with it when it is trimmed. An entry is
        reused only when the new prompt shares at least those tokens, so what a reused
        cache is calibrated on is part of the prompt; otherwise the prompt gets a fresh
        cache. Trim: a sliding-window layer that has evicted tokens takes only what leaves
        the next query its window (``max_trim``). A longer entry is resumed from where its
        caches hold what a fresh run of this prompt holds
        (``TurboQuantKVCache.reuse_prefix``: codes are never turned back into fp16 window
        rows, so an entry whose window flushed past this prompt's flush point resumes from
        an earlier flush boundary), so a reused prompt keeps its most recent fp16 window
        tokens exact, as a fresh one does; an entry parked with its window in codes
        (``park_window="codes"``) is resumed from the common prefix, its tokens as codes."""
        result = self._trie.search(model, tokens)
        if result.exact is not None:
            entry = self._trie.get(result.model, result.exact)
            if self._covers(entry, len(result.exact)):
                return copy.deepcopy(entry.prompt_cache), []
            return None, tokens
        short = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > short:
            entry = self._trie.get(result.model, result.longer)
            prefix = min(len(tokens) - 1, result.common_prefix)
            prefix = min([prefix] + [c.reuse_prefix(prefix, len(tokens))
                                     for c in entry.prompt_cache if hasattr(c, "reuse_prefix")])
            if prefix < _calibration_tokens(entry.prompt_cache):
                prefix = 0  # the entry's calibration read tokens this prompt does not share
            prefix = min(row[0] for row in _gather([prefix], self._group_))  # one point, all ranks
            n = len(result.longer) - prefix
            ok = prefix > short and can_trim_prompt_cache(entry.prompt_cache) and all(
                getattr(c, "max_trim", lambda: n)() >= n for c in entry.prompt_cache)
            if all(row[0] for row in _gather([int(ok)], self._group_)):
                cache = copy.deepcopy(entry.prompt_cache)
                trim_prompt_cache(cache, n)
                return cache, tokens[prefix:]
        if short > 0:
            entry = self._trie.get(result.model, result.shorter)
            if self._covers(entry, short):
                return copy.deepcopy(entry.prompt_cache), tokens[short:]
        return None, tokens

    def _covers(self, entry, prefix: int) -> bool:
        """Whether ``prefix`` tokens of an entry cover its caches' calibration on every rank
        (a collective)."""
        need = _calibration_tokens(entry.prompt_cache)
        return all(row[0] for row in _gather([int(need <= prefix)], self._group_))

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type: str = "assistant"):
        offsets = [getattr(c, "offset", None) for c in prompt_cache]
        known = bool(offsets) and all(isinstance(o, int) for o in offsets)
        rows = _gather([int(known), min(offsets) if known else 0, max(offsets) if known else 0,
                        int(can_trim_prompt_cache(prompt_cache))], self._group_)
        rows_known = [r for r in rows if r[0]]
        if rows_known:
            n = min(min(r[1] for r in rows_known), len(tokens))
            if n != len(tokens) or any(r[1] != n or r[2] != n for r in rows_known):
                if any(r[1] != n or r[2] != n for r in rows_known) and \
                        not all(r[3] for r in rows):
                    return
                for c in prompt_cache:
                    if c.offset > n:
                        c.trim(c.offset - n)
                tokens = tokens[:n]
        if not tokens:
            return
        if self.park_window == "codes":
            self.parked_tokens += park(prompt_cache)
        trimmable = all(r[3] for r in rows)
        per_rank = [r[0] for r in _gather([sum(c.nbytes for c in prompt_cache)], self._group_)]
        entry = _server.LRUPromptCache.CacheEntry(prompt_cache, sum(per_rank), cache_type)
        entry.rank_bytes = per_rank
        self._add(entry.nbytes, per_rank, cache_type)
        prev = self._trie.add(model, tokens, entry)
        if prev is not None:
            self._sub(prev)
            self._lru.remove(model, tokens)
        self._lru.push(model, tokens, cache_type)
        if trimmable:  # a trimmable cache makes its prefixes' entries redundant
            for prefix_len, old in self._trie.pop_prefixes(model, tokens):
                self._sub(old)
                self._lru.remove(model, tokens[:prefix_len])
        if len(self._lru) > self.max_size:
            self._evict()
        while self._n_bytes > self.max_bytes:
            self._evict()

    def trim_to(self, *, n_sequences: int | None = None, n_bytes: int | None = None):
        """mlx-lm's trim. mlx-lm passes ``n_bytes`` as the budget less the bytes of the
        running batch's caches, which on a sharded model are this rank's: the ranks' running
        bytes are summed so that ``n_bytes`` is the budget less the whole running batch."""
        if n_bytes is not None and self._group_.size() > 1:
            running = sum(r[0] for r in _gather([self.max_bytes - n_bytes], self._group_))
            n_bytes = self.max_bytes - running
        n_sequences = max(0, n_sequences) if n_sequences is not None else 1 << 63
        n_bytes = max(0, n_bytes) if n_bytes is not None else 1 << 63
        while len(self._lru) > n_sequences:
            self._evict()
        while self._n_bytes > n_bytes:
            self._evict()

    def _add(self, nbytes: int, per_rank: list[int], cache_type: str) -> None:
        self._n_bytes += nbytes
        self._n_bytes_by_type[cache_type] += nbytes
        self.rank_bytes = [a + b for a, b in zip(self.rank_bytes, per_rank)]

    def _sub(self, entry) -> None:
        per_rank = getattr(entry, "rank_bytes", None) or [entry.nbytes]
        self._n_bytes -= entry.nbytes
        self._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        self.rank_bytes = [a - b for a, b in zip(self.rank_bytes, per_rank)]

    def _evict(self) -> None:
        model, tokens = self._lru.pop()
        self._sub(self._trie.pop(model, tokens))

    @property
    def ntokens(self) -> int:
        """Tokens held by all entries (the sum of their keys' lengths)."""
        return sum(len(tokens) for lru in self._lru._lrus.values() for _, tokens in lru)


class TurboQuantAPIHandler(_server.APIHandler):
    """mlx-lm's request handler plus ``GET /v1/turboquant``: KV options, prompt-cache store
    size and budget, and counters of the caches built through the factory (mlx-lm's
    load-time batchability probe included) and of their compressed layers; and the checks
    of bad requests listed in the module docstring."""

    kv_cost: KVCost | None = None  # set by run() when the store has a byte budget
    served_models: frozenset | None = None  # names of the --model (run()); None: any

    def send_response(self, code, message=None):
        self._responded = True
        super().send_response(code, message)

    def _send_error(self, status: int, message: str) -> None:
        _count("refused")
        body = json.dumps({"error": message}).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_POST(self):
        self._responded = False
        try:
            super().do_POST()
        except (BrokenPipeError, ConnectionResetError) as e:
            # ctx.stop() (mlx-lm's handle_completion) has already stopped the generation.
            _count("disconnects")
            _log.info("client disconnected during %s (%s); its generation stopped",
                      self.path, type(e).__name__)
            self.close_connection = True
        except UnicodeDecodeError:
            if self._responded:
                raise
            self._send_error(400, "request body is not UTF-8 text")

    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        if isinstance(self.max_tokens, bool):  # bool is an int to isinstance
            raise ValueError("max_tokens must be of type int")  # noqa: TRY004 (a 400)

    def handle_completion(self, request, stop_words):
        problem = self._refusal(request)
        if problem is not None:
            return self._send_error(*problem)
        return super().handle_completion(request, stop_words)

    def _refusal(self, request) -> tuple[int, str] | None:
        """(status, message) for a request refused before generation, or None."""
        if self.served_models is not None and self.requested_model not in self.served_models:
            names = ", ".join(repr(n) for n in sorted(self.served_models))
            return 404, (f"model {self.requested_model!r} is not served here; "
                         f"this server serves {names}")
        if request.request_type == "text" and not isinstance(request.prompt, str):
            return 400, "prompt must be a string"
        provider = self.response_generator.model_provider
        if getattr(provider, "is_distributed", False):
            for field in ("draft_model", "adapters"):
                if self.body.get(field) not in (None, "default_model"):
                    return 400, (f"{field} {self.body[field]!r}: this server runs a sharded "
                                 f"model ({provider.sharding} parallel over "
                                 f"{_group().size()} processes), which takes no draft models "
                                 "or adapters")
        store = getattr(self.response_generator, "prompt_cache", None)
        if self.kv_cost is None or store is None:
            return None
        try:
            prompt = self.response_generator._tokenize(
                provider.tokenizer, request,
                SimpleNamespace(chat_template_kwargs=self.chat_template_kwargs))[0]
        except Exception:  # noqa: BLE001 - the generation thread reports it as usual
            return None
        need = self.kv_cost(len(prompt))
        if need > store.max_bytes:
            return 413, (f"prompt of {len(prompt)} tokens needs about {need:,} bytes of KV "
                         f"cache, over this server's prompt-cache budget (--max-kv-gb) of "
                         f"{store.max_bytes:,} bytes; send a shorter prompt")
        return None

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
                "tokens": getattr(store, "ntokens", None),
                "by_type": store.stats_by_type(),
                "park_window": getattr(store, "park_window", None),
                "parked_tokens": getattr(store, "parked_tokens", None)},
            **stats(),
            "batching": {"enabled": bool(getattr(gen.model_provider, "is_batchable", False)),
                         "off_reason": getattr(gen.model_provider, "batching_off_reason", None),
                         "max_rows": _mlx_batch.stats()["max_rows"]},
            "sharding": _sharding_report(gen.model_provider, store),
        }
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(body, default=str).encode())
        self.wfile.flush()


def _sharding_report(provider, store) -> dict | None:
    """``/v1/turboquant``'s ``sharding``: None for one process, else the split, the number
    of processes and what each rank holds (:func:`turboquant.distributed.rank_report` of a
    probe cache built at load: its layers, KV heads and their model numbers) with its share
    of the prompt-cache store's bytes (``prompt_cache_bytes``)."""
    mode = getattr(provider, "sharding", None)
    if mode is None:
        return None
    reports = [dict(r) for r in getattr(provider, "rank_reports", None) or []]
    shares = getattr(store, "rank_bytes", None)
    for r in reports:
        for k in ("layer_bytes", "kv_bytes", "tokens"):  # those of the 8-token probe cache
            r.pop(k, None)
        if shares is not None and r["rank"] < len(shares):
            r["prompt_cache_bytes"] = shares[r["rank"]]
    return {"mode": mode, "size": _group().size(), "ranks": reports}


class ResponseGenerator(_server.ResponseGenerator):
    """mlx-lm's generation loop. A request that cannot be generated at all (an empty
    prompt) is refused when it is tokenized, which answers that request with an error on
    both paths; on the batched path mlx-lm would otherwise raise inside the generation
    thread (``BatchGenerator.insert``), which stops the server for every request."""

    def _serve_single(self, request, stream):
        if self._is_distributed:
            rqueue, req, args = request
            request = (_RunToEnd(rqueue), req, args)
        return super()._serve_single(request, stream)

    def _tokenize(self, tokenizer, request, args):
        out = super()._tokenize(tokenizer, request, args)
        if not out[0]:
            raise ValueError("the prompt is empty (no tokens to generate from)")
        return out


class _RunToEnd:
    """A request's response queue on the one-request-at-a-time path of a sharded model:
    its generation context ignores ``stop()`` (a client that went away). mlx-lm's loop
    stops such a generation only on rank 0, which leaves the other ranks in the middle of
    the generation's collectives; here every rank generates to the end, and the tokens of
    the gone client are dropped."""

    def __init__(self, queue):
        self._queue = queue

    def put(self, item):
        if isinstance(item, _server.GenerationContext):
            item.stop = lambda: None
        self._queue.put(item)


def _wait_for_model(provider: TurboQuantModelProvider, gen) -> None:
    """Wait until the generation thread has loaded the default model; raise its error."""
    if provider.cli_args.model is None:
        return
    while not provider.loaded:
        if provider.load_error is not None or not gen.generation_available():
            gen.stop_and_join()
            err = provider.load_error or RuntimeError("the generation thread stopped")
            raise SystemExit(f"serve: cannot serve {provider.cli_args.model}: {err}")
        time.sleep(0.05)


def run(host: str, port: int, cli_args, options: dict, max_kv_bytes: int | None = None,
        batching: bool = True, park_window: str = "codes") -> None:
    """Serve ``cli_args`` (an ``mlx_lm.server`` argument namespace) with TurboQuant caches
    built from ``options`` until interrupted; ``batching=False`` serves one request at a
    time; ``park_window`` is the store's (:class:`PromptCacheStore`). On a sharded model
    (several processes) rank 0 serves HTTP and the other ranks run the generation loop
    until it stops."""
    group = _group()
    if group.size() > 1:
        for flag, value in (("--draft-model", cli_args.draft_model),
                            ("--adapter-path", cli_args.adapter_path)):
            if value is not None:
                raise SystemExit(
                    f"serve: {flag} cannot be used with a sharded model ({group.size()} "
                    "processes under mlx.launch): mlx-lm loads draft models and adapters "
                    f"only in one process; drop {flag} or serve from one process")
    if getattr(cli_args, "kv_bits", None) is not None:
        raise SystemExit("serve: mlx-lm's own KV quantization (kv_bits) cannot be combined "
                         "with TurboQuant caches")
    if max_kv_bytes is None:
        max_kv_bytes = cli_args.prompt_cache_bytes
    cli_args.prompt_cache_bytes = max_kv_bytes
    _check_park_window(park_window)
    install_cache_factory(options)
    provider = TurboQuantModelProvider(cli_args, options, batching=batching,
                                       park_window=park_window)
    store = PromptCacheStore(cli_args.prompt_cache_size,
                             max_bytes=max_kv_bytes if max_kv_bytes is not None else 1 << 63,
                             group=group, park_window=park_window)
    gen = ResponseGenerator(provider, store)
    _wait_for_model(provider, gen)
    model = cli_args.model
    if model is not None:  # without --model, mlx-lm loads the model each request names
        resolved = str(Path(model).resolve())  # the id /v1/models lists
        provider._model_map.setdefault(resolved, model)  # the same model, not a reload
        TurboQuantAPIHandler.served_models = frozenset({"default_model", model, resolved})
    if max_kv_bytes is not None:
        # measured at load, in the generation thread (collective on a sharded model)
        TurboQuantAPIHandler.kv_cost = provider.kv_cost
    if provider.sharding is not None:
        _log.info("rank %d of %d (%s parallel): %s", group.rank(), group.size(),
                  provider.sharding, json.dumps((provider.rank_reports or [{}])[group.rank()]))
    _log.info("TurboQuant KV caches: %s; prompt-cache budget: %s; parked windows: %s",
              options, "none" if max_kv_bytes is None else f"{max_kv_bytes:,} bytes",
              park_window)
    if group.rank() != 0:  # rank 0 serves HTTP and shares each request with the others
        gen.join()
        return
    _server._run_http_server(host, port, gen, handler_class=TurboQuantAPIHandler)


def main(model: str, passthrough: list[str], options: dict,
         max_kv_bytes: int | None = None, batching: bool = True,
         park_window: str = "codes") -> int:
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
    run(captured["host"], captured["port"], captured["cli_args"], options, max_kv_bytes,
        batching, park_window)
    return 0
