"""Quality and speed of KV-cache settings on a real mlx-lm model, against mlx-lm's fp16 cache.

Protocol (the way a cache is really used): the first ``prefix`` tokens of the text are
prefilled through the cache, then the next ``score`` tokens are fed through the same cache
in chunks of ``chunk`` tokens, so every scored token attends to K/V that went through the
cache's quantizer (its own chunk included). Each setting runs the same tokens; the
reference is mlx-lm's ``KVCache`` (the model's own dtype). Per setting: perplexity of the
scored tokens and its ratio to the reference, mean cosine of the logit vectors and mean
KL(ref || setting) of the next-token distributions, top-1 agreement, KV bytes after the run.

Decode speed: the reference cache is prefilled with ``context`` tokens once; every setting
starts from a copy of it (``KVCache.to_quantized`` for mlx-lm's quantized cache,
:func:`turboquant.mlx_lm.to_turbo_quantized` for ours), then decodes ``decode_tokens`` tokens
one at a time; tok/s is measured over those steps (model + cache + attention, evaluated).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from turboquant import mlx_host, presets
from turboquant import mlx_lm as tq_mlx


@dataclass
class Setting:
    """One KV-cache configuration: ``kind`` is fp16 (mlx-lm KVCache), mlx (mlx-lm
    QuantizedKVCache, ``bits``, group 64) or turboquant."""
    name: str
    kind: str
    key_bits: int = 0
    value_bits: int = 0
    method: str = "turboquant_mse"
    fp16_layers: tuple[int, ...] = ()
    center: bool = True
    key_split: bool = True
    fp16_window: int = 0
    fp16_sinks: int = 0
    profile: str | None = None
    split_angle_bits: int = 8
    decay_after: int = 0
    decay_bits: int = 0
    sparse_v: float = 0.0
    mixed_bits: int = 0
    mixed_keep: float = 0.0
    mixed_trial: bool = False
    block_tokens: int | None = None
    # score one token per step (the decode path): sparse V acts only there, the multi-token
    # steps of chunked scoring take the dense GEMM path
    decode_scoring: bool = False
    debias: bool | None = None  # norm correction (None: with centring)
    preset: str | None = None  # a named recipe (turboquant.presets), else the options above
    ring_extra_bits: int = 0  # sliding-window rings' extra bits (eval grammar +rN)
    ring_window: int | None = None  # sliding-window rings' fp16 window (+rwN)
    ring_block_tokens: int | None = None  # sliding-window rings' block tokens (+rbN)

    @staticmethod
    def from_preset(name: str) -> Setting:
        """The setting of preset ``name`` (turboquant.presets), every option spelled out."""
        p = presets.get(name)
        return Setting(p.name, "turboquant", p.key_bits, p.value_bits, method=p.method,
                       center=p.center, debias=p.debias, key_split=p.key_split,
                       fp16_window=p.fp16_window, fp16_sinks=p.fp16_sinks,
                       split_angle_bits=p.split_angle_bits, decay_after=p.decay_after,
                       decay_bits=p.decay_bits, sparse_v=p.sparse_v, mixed_bits=p.mixed_bits,
                       mixed_keep=p.mixed_keep, mixed_trial=p.mixed_trial,
                       block_tokens=p.block_tokens, decode_scoring=p.sparse_v > 0,
                       preset=p.name, ring_extra_bits=p.ring_extra_bits,
                       ring_window=p.ring_window, ring_block_tokens=p.ring_block_tokens)

    @staticmethod
    def parse(spec: str) -> "Setting":
        """``fp16`` | ``mlx4`` | ``mlx8`` | PRESET | BITS[+OPTION...][/FLAG...]. PRESET is a
        name of turboquant.presets (``tq3``, ``tq3-mixed``, ...); otherwise BITS is ``3`` or
        ``k4v3`` (or ``p`` with a profile option), OPTION is ``fp16:0,-1`` (fp16 layers),
        ``w64`` (fp16 recent window of 64 tokens), ``s4`` (4 fp16 sink tokens),
        ``d256:2`` (temporal decay: code blocks with at least 256 newer tokens re-quantized
        to 2 bits), ``m2:0.5`` (mixed precision: the most attended half of the tokens of each
        flush group keep BITS, the rest 2 bits; ``m2:0.5:64``: groups of 64 tokens instead of
        the default 16-token blocks' group), ``sv0.01`` (sparse V threshold 0.01; such a
        setting is scored one token per step, the decode path where sparse V acts, so ``sv0``
        is its dense control), ``r1`` (sliding-window rings' keys and values 1 bit wider),
        ``rw8`` / ``rb8`` (sliding-window rings with an 8-token fp16 window / 8-token blocks),
        ``b16`` (16-token blocks: code pages and window flushes) or
        ``profile:PATH`` (per-layer bits from ``turboquant calibrate``), FLAG is ``raw``
        (plain codes: no centring, no norm correction, no key split), ``nosplit`` (no key
        split), ``a16`` (the key split's part angle in 16 bits instead of 8) or ``trial``
        (mixed precision only on layers where the prompt's trial finds it pays). A BITS
        setting has exactly the options it names (no fp16 tokens unless ``s``/``w`` say so),
        like the ``codes-only`` preset."""
        spec = spec.strip()
        if spec in presets.PRESETS:
            return Setting.from_preset(spec)
        body, flags = spec, []
        for _ in range(4):  # trailing /FLAG suffixes (a profile path may contain "/")
            head, sep, tail = body.rpartition("/")
            if sep and tail in ("raw", "nosplit", "a16", "trial"):
                body, flags = head, [tail] + flags
        if body == "fp16" and not flags:
            return Setting("fp16", "fp16")
        if body.startswith("mlx") and not flags:
            b = int(body[3:])
            return Setting(f"mlx-q{b}", "mlx", b, b)
        bits, *opts = body.split("+")
        fp16, window, sinks, profile = (), 0, 0, None
        decay, sparse_v, decode_scoring = (0, 0), 0.0, False
        mixed, group, ring, blocks = (0, 0.0), 0, 0, 0
        ring_window = ring_blocks = None
        for o in opts:
            if o.startswith("sv"):
                try:
                    sparse_v = float(o[2:])
                except ValueError:
                    sparse_v = -1.0
                if not 0.0 <= sparse_v < 1.0:
                    raise ValueError(f"bad option {o!r} in setting {spec!r}: svT needs a sparse V "
                                     "threshold T in [0, 1), e.g. sv0.01")
                decode_scoring = True
            elif o.startswith("d") and o[1:2].isdigit():
                a, sep, b = o[1:].partition(":")
                if not (sep and a.isdigit() and b.isdigit() and int(a) > 0 and int(b) > 0):
                    raise ValueError(f"bad option {o!r} in setting {spec!r}: dA:B needs A > 0 "
                                     "tokens and B >= 1 bits, e.g. d256:2")
                decay = (int(a), int(b))
            elif o.startswith("m") and o[1:2].isdigit():
                a, sep, b = o[1:].partition(":")
                b, _, g = b.partition(":")
                try:
                    mixed, group = (int(a), float(b)), int(g or 0)
                except ValueError:
                    mixed = (0, 0.0)
                if not (sep and mixed[0] > 0 and 0.0 < mixed[1] < 1.0 and group >= 0):
                    raise ValueError(f"bad option {o!r} in setting {spec!r}: mB:F[:G] needs B >= 1 "
                                     "bits, a kept fraction F in (0, 1) and optionally G group "
                                     "tokens, e.g. m2:0.5 or m2:0.5:64")
            elif o.startswith("fp16:"):
                fp16 = tuple(int(x) for x in o[5:].split(",") if x)
            elif o.startswith("rw") and o[2:].isdigit():
                ring_window = int(o[2:])
            elif o.startswith("rb") and o[2:].isdigit():
                ring_blocks = _block_option(o, spec, "rbN needs N tokens a ring block", "rb8")
            elif o.startswith("r") and o[1:].isdigit():
                ring = int(o[1:])
                if not 1 <= ring <= 6:
                    raise ValueError(f"bad option {o!r} in setting {spec!r}: rN needs N in "
                                     "[1, 6] extra bits for sliding-window rings, e.g. r1")
            elif o.startswith("w") and o[1:].isdigit():
                window = int(o[1:])
            elif o.startswith("b") and o[1:].isdigit():
                blocks = _block_option(o, spec, "bN needs N tokens a block", "b16")
            elif o.startswith("s") and o[1:].isdigit():
                sinks = int(o[1:])
            elif o.startswith("profile:"):
                profile = o[8:]
            else:
                raise ValueError(f"unknown option {o!r} in setting {spec!r}")
        raw = "raw" in flags
        if bits == "p":
            if profile is None:
                raise ValueError(f"setting {spec!r}: 'p' needs a +profile:PATH option")
            kb = vb = 0
            name = "tq-profile"
        else:
            try:
                if bits.startswith("k"):
                    kb_s, vb_s = bits[1:].split("v")
                    kb, vb = int(kb_s), int(vb_s)
                    name = f"tq-k{kb}v{vb}"
                else:
                    kb = vb = int(bits)
                    name = f"tq-{kb}bit"
            except ValueError:
                raise ValueError(f"bad setting {spec!r}: expected BITS (e.g. 3, k4v3, p) "
                                 "[+fp16:L,..][+wN][+profile:PATH][/raw][/nosplit][/a16]") from None
        if decay[0] and bits != "p" and not decay[1] < min(kb, vb):
            raise ValueError(f"bad option 'd{decay[0]}:{decay[1]}' in setting {spec!r}: decay "
                             f"bits must be below the key and value bits ({kb}/{vb})")
        if fp16:
            name += "+fp16[" + ",".join(map(str, fp16)) + "]"
        if sinks:
            name += f"+s{sinks}"
        if window:
            name += f"+w{window}"
        if decay[0]:
            name += f"+d{decay[0]}:{decay[1]}"
        block_tokens = blocks or None
        if blocks:
            name += f"+b{blocks}"
        if mixed[0]:
            if blocks:
                raise ValueError(f"setting {spec!r}: bN and mixed precision exclude each other "
                                 "(a mixed setting's blocks follow its group: mB:F:G)")
            name += f"+m{mixed[0]}:{mixed[1]:g}" + (f":{group}" if group else "")
            if group:
                try:
                    r = tq_mlx.mixed_blocks(mixed[1])[0]
                except ValueError:
                    r = None
                if r is None or group % r:
                    raise ValueError(f"bad option {o!r} in setting {spec!r}: G={group} group "
                                     f"tokens must split into the fraction's blocks")
                block_tokens = group // r
        if decode_scoring:
            name += f"+sv{sparse_v:g}"
        if ring:
            name += f"+r{ring}"
        if ring_window is not None:
            name += f"+rw{ring_window}"
        if ring_blocks is not None:
            name += f"+rb{ring_blocks}"
        if profile:
            import os
            name += f"[{os.path.basename(profile)}]"
        for f in flags:
            name += "/" + f
        return Setting(name, "turboquant", kb, vb, fp16_layers=fp16, center=not raw,
                       key_split=not raw and "nosplit" not in flags, fp16_window=window,
                       fp16_sinks=sinks, profile=profile, decay_after=decay[0],
                       decay_bits=decay[1], sparse_v=sparse_v, decode_scoring=decode_scoring,
                       mixed_bits=mixed[0], mixed_keep=mixed[1], block_tokens=block_tokens,
                       mixed_trial="trial" in flags, ring_extra_bits=ring,
                       ring_window=ring_window, ring_block_tokens=ring_blocks,
                       split_angle_bits=16 if "a16" in flags else 8)


def _block_option(o: str, spec: str, needs: str, example: str) -> int:
    """The token count of a block option (``bN``, ``rbN``): a power of two."""
    n = int(o.lstrip("rb"))
    if n < 1 or n & (n - 1):
        raise ValueError(f"bad option {o!r} in setting {spec!r}: {needs}, a power of two, "
                         f"e.g. {example}")
    return n


@dataclass
class Result:
    setting: Setting
    ppl: float = 0.0
    ppl_ratio: float = 1.0
    logit_cosine: float = 1.0
    kl: float = 0.0
    top1: float = 1.0
    kv_bytes: int = 0
    kv_ratio_fp16: float = 1.0
    decode_tok_s: float = 0.0
    # decode-step breakdown (TurboQuant settings): ms per token in the C++ attention kernel
    # and in the mx -> NumPy -> mx crossings (copies only; graph evaluation excluded)
    kv_bytes_context: int = 0  # cache bytes at the decode benchmark's context
    context_tokens: int = 0  # tokens in the cache when kv_bytes_context was measured
    bits_per_coord: float = 0.0  # 16 / kv_ratio_fp16: cache bits per K/V coordinate
    bits_per_coord_context: float = 0.0  # the same at the decode benchmark's context
    attend_ms: float = 0.0
    crossing_ms: float = 0.0
    # several windows (evaluate(windows=N)): one standard error of the ppl ratio as a factor
    # (ratio ×/÷ this), by batch means of the per-token NLL differences (0 with one window)
    ppl_ratio_se: float = 0.0
    windows: int = 1
    scored_tokens: int = 0
    speed_vs_fp16: float = 1.0
    speed_vs_mlx: dict = field(default_factory=dict)

    def as_dict(self):
        d = asdict(self)
        d["setting"] = asdict(self.setting)
        d["name"] = self.setting.name
        return d


def mlx_group_size(model) -> int:
    """mlx-lm's default group of 64, or the 32 for head_dim 32, 96, ...."""
    d = int(model.layers[0].self_attn.head_dim)
    if d % 32:
        raise ValueError(f"mlx QuantizedKVCache needs head_dim divisible by 32, got {d}")
    return 64 if d % 64 == 0 else 32


def make_cache(model, s: Setting, seed: int = 0):
    n = len(model.layers)
    if s.kind == "fp16":
        return mlx_cache.make_prompt_cache(model)
    if s.kind == "mlx":
        g = mlx_group_size(model)
        return [mlx_cache.QuantizedKVCache(group_size=g, bits=s.key_bits) for _ in range(n)]
    debias = s.center if s.debias is None else s.debias
    return tq_mlx.make_prompt_cache(model, preset=s.preset or "codes-only",
                                    key_bits=s.key_bits or 3,
                                    value_bits=s.value_bits or 3, method=s.method,
                                    fp16_layers=s.fp16_layers, seed=seed, center=s.center,
                                    debias=debias, key_split=s.key_split,
                                    fp16_window=s.fp16_window, fp16_sinks=s.fp16_sinks,
                                    profile=s.profile, decay_after=s.decay_after,
                                    decay_bits=s.decay_bits, sparse_v=s.sparse_v,
                                    mixed_bits=s.mixed_bits, mixed_keep=s.mixed_keep,
                                    mixed_trial=s.mixed_trial, block_tokens=s.block_tokens,
                                    split_angle_bits=s.split_angle_bits,
                                    ring_extra_bits=s.ring_extra_bits,
                                    ring_window=s.ring_window,
                                    ring_block_tokens=s.ring_block_tokens)


def kv_bytes(cache) -> int:
    return int(sum(c.nbytes for c in cache))


def fp16_kv_bytes(model, tokens: int) -> int:
    """Exact bytes of K and V in fp16 for ``tokens`` tokens (no allocation slack)."""
    total = 0
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        h = getattr(attn, "n_kv_heads", None) or getattr(attn, "num_key_value_heads", None)
        d = getattr(attn, "head_dim", None)
        if h is None or d is None:
            raise ValueError("cannot read n_kv_heads/head_dim from the model's attention")
        total += 2 * 2 * int(h) * int(d) * tokens
    return total


def score_logits(model, cache, tokens: list[int], prefix: int, chunk: int) -> np.ndarray:
    """Float32 logits predicting tokens[prefix:], computed through ``cache`` chunk by chunk."""
    out = []
    logits = model(mx.array(tokens[:prefix])[None], cache=cache)
    out.append(np.array(logits[0, -1:].astype(mx.float32)))
    for i in range(prefix, len(tokens) - 1, chunk):
        ids = tokens[i: min(i + chunk, len(tokens) - 1)]
        logits = model(mx.array(ids)[None], cache=cache)
        out.append(np.array(logits[0].astype(mx.float32)))
    return np.concatenate(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_quality(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    """Per scored token: NLL of the target, KL(ref || got), logit cosine, top-1 agreement."""
    lp_ref, lp = _log_softmax(ref.astype(np.float64)), _log_softmax(got.astype(np.float64))
    nll = -lp[np.arange(len(targets)), targets]
    cos = np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp), -1)
    return {"nll": nll, "kl": kl, "cos": cos,
            "top1": (ref.argmax(-1) == got.argmax(-1)).astype(np.float64)}


def quality(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    t = token_quality(ref, got, targets)
    return {"ppl": float(np.exp(t["nll"].mean())), "logit_cosine": float(t["cos"].mean()),
            "kl": float(t["kl"].mean()), "top1": float(t["top1"].mean())}


# Tokens per batch in the standard error of a perplexity ratio: neighbouring tokens' NLL
# differences are correlated, so the error is that of the means of consecutive batches.
SE_BATCH = 32


def log_ratio_se(diff_per_window: list[np.ndarray], batch: int = SE_BATCH) -> float:
    """Standard error of mean(nll_setting - nll_ref) by batch means (batches never straddle
    two windows); 0 when there are fewer than two batches."""
    means, sizes = [], []
    for d in diff_per_window:
        for i in range(0, len(d), batch):
            means.append(d[i:i + batch].mean())
            sizes.append(len(d[i:i + batch]))
    if len(means) < 2:
        return 0.0
    m, w = np.array(means), np.array(sizes, dtype=np.float64)
    mu = float(np.sum(m * w) / w.sum())
    # weighted batch-means variance of the overall mean
    var = float(np.sum(w ** 2 * (m - mu) ** 2) / w.sum() ** 2 * len(m) / (len(m) - 1))
    return float(np.sqrt(var))


def text_windows(texts: list[list[int]], n_windows: int, length: int) -> list[list[int]]:
    """``n_windows`` disjoint windows of ``length`` tokens: consecutive windows from the start
    of the first text, then of the next, ..., in order (deterministic)."""
    out = []
    for toks in texts:
        for i in range(0, len(toks) - length + 1, length):
            if len(out) == n_windows:
                return out
            out.append(toks[i:i + length])
    if len(out) < n_windows:
        have = sum(len(t) // length for t in texts)
        raise ValueError(f"the text(s) hold {have} windows of {length} tokens (prefix + scored), "
                         f"{n_windows} asked for: add texts or lower --windows")
    return out


class _Timers:
    """Wraps the core's attend and the mx<->NumPy conversions of turboquant.mlx_host with
    wall-clock timers; graph evaluation is forced before each conversion is timed."""

    def __init__(self):
        self.attend = self.crossing = 0.0

    def __enter__(self):
        self._to_numpy, self._attend = mlx_host._to_numpy, tq_mlx.TurboQuantKVCache.attend
        timers, to_numpy = self, self._to_numpy

        def timed_to_numpy(x):
            mx.eval(x)
            t0 = time.perf_counter()
            out = to_numpy(x)
            timers.crossing += time.perf_counter() - t0
            return out

        def timed_attend(cache, queries, scale, causal=True, window=None):
            core = cache._core
            if core is not None and not hasattr(core, "_tq_timed"):
                cache._core = _TimedCore(core, timers)
            out = timers_attend(cache, queries, scale, causal, window)
            t0 = time.perf_counter()
            mx.eval(out)
            timers.crossing += time.perf_counter() - t0
            return out

        timers_attend = self._attend
        mlx_host._to_numpy = timed_to_numpy
        tq_mlx.TurboQuantKVCache.attend = timed_attend
        return self

    def __exit__(self, *exc):
        mlx_host._to_numpy, tq_mlx.TurboQuantKVCache.attend = self._to_numpy, self._attend


class _TimedCore:
    _tq_timed = True

    def __init__(self, core, timers):
        self._core, self._timers = core, timers

    def attend(self, *a, **k):
        t0 = time.perf_counter()
        out = self._core.attend(*a, **k)
        self._timers.attend += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self._core, name)


def decode_speed(model, base: list, s: Setting, first_token: int, steps: int,
                 seed: int = 0, breakdown: bool = False):
    """tok/s of ``steps`` greedy decode steps from a copy of the prefilled fp16 ``base``."""
    if s.kind == "fp16":
        cache = [copy.copy(c) for c in base]
        for c, b in zip(cache, base):
            c.keys, c.values = mx.array(b.keys), mx.array(b.values)
    elif s.kind == "mlx":
        cache = [c.to_quantized(group_size=mlx_group_size(model), bits=s.key_bits) for c in base]
    else:
        # the setting's own cache layout (fp16 layers, profile bits), filled from the base
        n_q = model.layers[0].self_attn.n_heads
        cache = make_cache(model, s, seed)
        for i, (c, b) in enumerate(zip(cache, base)):
            if isinstance(c, tq_mlx.TurboQuantKVCache):
                c.fill_from(b, n_q_heads=n_q)
            else:
                cc = copy.copy(b)
                cc.keys, cc.values = mx.array(b.keys), mx.array(b.values)
                cache[i] = cc
    mx.eval([c.state for c in cache if not isinstance(c, tq_mlx.TurboQuantKVCache)])
    y = mx.array([[first_token]])
    # two warm-up steps, then the timed ones (a converted mixed-precision cache encodes its
    # prompt at the second: its first query rates it)
    for _ in range(2):
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(y)
    dt = time.perf_counter() - t0
    if not breakdown or s.kind != "turboquant":
        return steps / dt, kv_bytes(cache)
    # a second, instrumented run of the same steps for the time breakdown
    with _Timers() as timers:
        for _ in range(steps):
            logits = model(y, cache=cache)
            y = mx.argmax(logits[:, -1:], axis=-1)
            mx.eval(y)
    for c in cache:
        if isinstance(getattr(c, "_core", None), _TimedCore):
            c._core = c._core._core
    return steps / dt, kv_bytes(cache), 1e3 * timers.attend / steps, \
        1e3 * timers.crossing / steps


def evaluate(model, tokens, settings: list[Setting], prefix: int, score: int,
             chunk: int, context: int, decode_tokens: int, seed: int = 0,
             log=print, windows: int = 1) -> list[Result]:
    """``tokens``: one text's tokens, or a list of texts' tokens. Quality is pooled over
    ``windows`` disjoint windows of prefix + score tokens (:func:`text_windows`); every
    setting sees the same windows, each starting from an empty cache."""
    texts = tokens if tokens and isinstance(tokens[0], (list, tuple)) else [tokens]
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if windows == 1 and prefix + score > len(texts[0]):
        raise ValueError(f"text has {len(texts[0])} tokens, prefix+score needs {prefix + score}")
    wins = text_windows(texts, windows, prefix + score)
    ref_setting = Setting.parse("fp16")
    all_settings = [ref_setting] + [s for s in settings if s.kind != "fp16"]
    per_token = {s.name: [] for s in all_settings}
    caches = {}
    for w, toks in enumerate(wins):
        targets = np.array(toks[prefix:])
        ref = None
        for s in all_settings:
            t0 = time.perf_counter()
            cache = make_cache(model, s, seed)
            logits = score_logits(model, cache, toks, prefix, 1 if s.decode_scoring else chunk)
            if ref is None:
                ref = logits
            q = token_quality(ref, logits, targets)
            per_token[s.name].append(q)
            caches[s.name] = kv_bytes(cache)
            where = f" window {w + 1}/{len(wins)}" if len(wins) > 1 else ""
            log(f"  quality {s.name}{where}: ppl {np.exp(q['nll'].mean()):.3f} "
                f"cos {q['cos'].mean():.4f} ({time.perf_counter() - t0:.1f}s)")
    results = []
    ref_nll = [q["nll"] for q in per_token[ref_setting.name]]
    for s in all_settings:
        qs = per_token[s.name]
        cat = {k: np.concatenate([q[k] for q in qs]) for k in qs[0]}
        r = Result(s, ppl=float(np.exp(cat["nll"].mean())),
                   logit_cosine=float(cat["cos"].mean()), kl=float(cat["kl"].mean()),
                   top1=float(cat["top1"].mean()))
        diffs = [q["nll"] - b for q, b in zip(qs, ref_nll)]
        r.ppl_ratio_se = float(np.exp(log_ratio_se(diffs))) if len(wins) > 1 else 0.0
        r.windows, r.scored_tokens = len(wins), int(len(cat["nll"]))
        r.kv_bytes = caches[s.name]
        r.kv_ratio_fp16 = fp16_kv_bytes(model, prefix + score - 1) / r.kv_bytes
        r.bits_per_coord = 16.0 / r.kv_ratio_fp16
        results.append(r)
    base_ppl = results[0].ppl
    for r in results:
        r.ppl_ratio = r.ppl / base_ppl
    tokens = texts[0]
    if context > 0 and decode_tokens > 0:
        ctx = tokens[:context] if len(tokens) >= context else \
            (tokens * (context // len(tokens) + 1))[:context]
        base = mlx_cache.make_prompt_cache(model)
        t0 = time.perf_counter()
        for i in range(0, context, 512):
            model(mx.array(ctx[i:i + 512])[None], cache=base)
            mx.eval([c.state for c in base])
        log(f"  prefilled {context} tokens ({time.perf_counter() - t0:.1f}s)")
        speed = {}
        for r in results:
            out = decode_speed(model, base, r.setting, ctx[-1], decode_tokens, seed,
                               breakdown=True)
            r.decode_tok_s, r.kv_bytes_context = out[0], out[1]
            r.context_tokens = context + 1 + decode_tokens * (2 if len(out) == 4 else 1)
            r.bits_per_coord_context = 16.0 * r.kv_bytes_context / fp16_kv_bytes(
                model, r.context_tokens)
            if len(out) == 4:
                r.attend_ms, r.crossing_ms = out[2], out[3]
            speed[r.setting.name] = r.decode_tok_s
            log(f"  decode {r.setting.name}: {r.decode_tok_s:.2f} tok/s "
                f"({1e3 / r.decode_tok_s:.1f} ms/token; C++ attention {r.attend_ms:.1f} ms, "
                f"mx<->NumPy copies {r.crossing_ms:.1f} ms)")
        mlx_extra = {}
        for b in (4, 8):
            name = f"mlx-q{b}"
            if name not in speed:
                mlx_extra[name], *_ = decode_speed(model, base, Setting.parse(f"mlx{b}"),
                                                  ctx[-1], decode_tokens, seed)
                log(f"  decode {name}: {mlx_extra[name]:.2f} tok/s")
        speed.update(mlx_extra)
        for r in results:
            r.speed_vs_fp16 = r.decode_tok_s / speed["fp16"]
            r.speed_vs_mlx = {k: r.decode_tok_s / speed[k] for k in ("mlx-q4", "mlx-q8")}
    return results


def format_table(results: list[Result], context: int) -> str:
    head = (f"{'setting':<22}{'ppl':>8}{'ratio':>8}{'s.e.x':>7}{'cos':>8}{'KL':>8}{'top1':>7}"
            f"{'KV bytes':>11}{'x fp16':>7}{'tok/s@' + str(context):>11}{'/fp16':>7}"
            f"{'/q4':>6}{'/q8':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        q = r.speed_vs_mlx
        lines.append(
            f"{r.setting.name:<22}{r.ppl:>8.3f}{r.ppl_ratio:>8.4f}"
            f"{(f'{r.ppl_ratio_se:.4f}' if r.ppl_ratio_se else '-'):>7}{r.logit_cosine:>8.4f}"
            f"{r.kl:>8.4f}{r.top1:>7.3f}{r.kv_bytes:>11,}{r.kv_ratio_fp16:>7.2f}"
            f"{r.decode_tok_s:>11.2f}{r.speed_vs_fp16:>7.2f}"
            f"{q.get('mlx-q4', 0):>6.2f}{q.get('mlx-q8', 0):>6.2f}")
    return "\n".join(lines)


def markdown_table(results: list[dict], context: int) -> str:
    """The ``eval --json`` results as a Markdown table (README)."""
    se = any(r.get("ppl_ratio_se") for r in results)
    lines = [f"| setting | ppl | ratio |{' s.e. (×) |' if se else ''} logit cos | KL | top-1 | "
             f"KV bytes | bits/coord | bits/coord @{context} | tok/s @{context} | /fp16 | /q4 | "
             f"/q8 | C++ attn ms/tok |",
             "|---|---:|---:|" + ("---:|" if se else "") +
             "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        q = r["speed_vs_mlx"]
        bits = r.get("bits_per_coord") or 16.0 / r["kv_ratio_fp16"]
        bctx = r.get("bits_per_coord_context", 0.0)
        lines.append(
            f"| {r['name']} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} | "
            + (f"{r.get('ppl_ratio_se', 0):.3f} | " if se else "") +
            f"{r['logit_cosine']:.4f} | "
            f"{r['kl']:.4f} | {r['top1']:.3f} | {r['kv_bytes']:,} | {bits:.2f} | "
            f"{bctx:.2f} | {r['decode_tok_s']:.2f} | {r['speed_vs_fp16']:.2f} | "
            f"{q.get('mlx-q4', 0):.2f} | {q.get('mlx-q8', 0):.2f} | {r.get('attend_ms', 0):.1f} |")
    return "\n".join(lines)
