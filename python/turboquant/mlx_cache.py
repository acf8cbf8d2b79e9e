"""The mlx-lm layer cache :class:`TurboQuantKVCache`: one layer's keys and values held
only as TurboQuant codes (the C++ core, or the GPU store on an mlx GPU device), with the
validation of its settings and the per-layer random streams (:func:`layer_seed`).

On the C++ CPU core each mlx-lm call crosses to NumPy once per layer (queries and the new
K/V in, attention output back): the graph is evaluated at that layer, the C++ kernel runs
with the GIL released, and the output is wrapped back into an ``mx.array``. On a Mac with an
mlx Metal device a layer is held instead by ``turboquant.mlx_metal.MetalCodeStore`` (codes
as mlx arrays, the ``turboquant.metal`` kernels), the defaults included: the key split runs
there (split.metal), and so do a profile's per-KV-head widths and importance-routed mixed
precision. What stays on the CPU core: temporal decay, sparse V, sliding-window layers and
the key split at head_dim < 32 (``TurboQuantKVCache.gpu_refusal`` gives the reason, and a
warning names it).
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as _mlx_cache

from turboquant import _core
from turboquant import gpu_path
from turboquant import mlx_metal as _mlx_metal
from turboquant import presets as _presets
from turboquant.mlx_batch import BatchTurboQuantKVCache
from turboquant.mlx_host import PlaceholderKeys, _host, _window_from_mask

__all__ = ["TurboQuantKVCache", "layer_seed"]

_TRIAL_BLOCK = 32  # the block of the cores a trial on the prompt encodes with

_SEED_LAYER_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio stride: distinct streams per layer
_MASK64 = (1 << 64) - 1


# Reasons a layer stayed off the GPU store that were already reported (TurboQuantKVCache._use_gpu).
_GPU_FALLBACKS_WARNED: set[str] = set()


def _centre_rows(k, v, k_mean, v_mean):
    """Centred K/V rounded to fp16 as the GPU store's window keeps them: (k - m) in float32,
    then float16 (one fused kernel per role when compiled)."""
    return ((k.astype(mx.float32) - k_mean).astype(mx.float16),
            (v.astype(mx.float32) - v_mean).astype(mx.float16))


def _add_mean(out, v_mean, dtype):
    """The attention output plus the value mean, in the queries' dtype."""
    return (out + v_mean).astype(dtype)


# A decode step's element-wise tails as single fused kernels (mx.compile keys them by shape
# and dtype, so only one-token steps take them: a prefill's chunk lengths vary). The math is
# the uncompiled functions' (float32, then one rounding), so both forms give the same bits.
_centre_rows_step = mx.compile(_centre_rows)
_add_mean_step = {dt: mx.compile(functools.partial(_add_mean, dtype=dt))
                  for dt in (mx.float16, mx.bfloat16, mx.float32)}

# The placeholders' NaN scalar per dtype (a decode step makes two placeholders per layer).
_NAN: dict = {}


def _nan(dtype):
    x = _NAN.get(dtype)
    if x is None:
        x = _NAN[dtype] = mx.array(float("nan"), dtype=dtype)
    return x


def layer_seed(seed: int, layer: int) -> int:
    """Seed of layer ``layer``'s core: each layer gets its own rotations and codebook streams."""
    return (int(seed) + (int(layer) + 1) * _SEED_LAYER_STRIDE) & _MASK64


class TurboQuantKVCache(PlaceholderKeys, _mlx_cache._BaseCache):
    """One layer's KV cache, stored only as TurboQuant codes + fp16 norms in C++.

    Follows mlx-lm's cache protocol: ``offset``, ``update_and_fetch``, ``state`` /
    ``meta_state`` / ``from_state``, ``is_trimmable`` / ``trim``, ``size``, ``nbytes``,
    ``empty``, ``make_mask``. The C++ core is created at the first attention call, when the
    query head count is known; the first block of K/V waits for it (it is the caller's
    transient array, never a copy kept across steps).
    """

    # attend() takes the store's decode_step for a plain decode step (a subclass whose
    # _attend_calls does more, such as a ring's, turns it off)
    _direct_decode = True

    # How many leading tokens the calibration (means, channel order, trials) read.
    _calibrated = 0

    # Whether compact_window moved a window into codes (reuse_prefix then resumes anywhere).
    _parked = False

    # turboquant.mlx_batch takes these as batch rows (it knows them by this flag, not by
    # importing this module, which imports it for merge)
    turboquant_layer = True
    # ... and a batch's decode steps of such rows through its lane (mlx_batch._step_lane),
    # which makes this class's own per-row work (a subclass that changes it says False)
    batch_step_lane = True

    def __init__(self, key_bits: int = 3, value_bits: int = 3, method: str = "turboquant_mse",
                 key_method: str | None = None, value_method: str | None = None,
                 seed: int = 0, layer: int = 0, rotation: str | None = None,
                 center: bool = True,
                 debias: bool = True, key_split: bool = True, rope_pairs: str | None = "half",
                 fp16_window: int = 0, block_tokens: int | None = None, fp16_sinks: int = 0,
                 split_angle_bits: int = 8, decay_after: int = 0, decay_bits: int = 0,
                 sparse_v: float = 0.0, key_head_bits=None, value_head_bits=None,
                 mixed_bits: int = 0, mixed_keep: float = 0.0, kv_head_offset: int = 0,
                 mixed_trial: bool = False, width_trial: bool = False):
        for name, b in (("key_bits", key_bits), ("value_bits", value_bits)):
            if not isinstance(b, (int, np.integer)) or not 1 <= int(b) <= 8:
                raise ValueError(f"{name} must be an integer in [1, 8], got {b!r}")
        # Per-KV-head widths (adaptive bits, the core's key_head_bits / value_head_bits):
        # one entry per KV head of the model, overriding key_bits / value_bits.
        self.key_head_bits = _check_head_bits(key_head_bits, "key_head_bits")
        self.value_head_bits = _check_head_bits(value_head_bits, "value_head_bits")
        methods = _core.methods()
        self.key_method = key_method or method
        self.value_method = value_method or method
        for name, m in (("key method", self.key_method), ("value method", self.value_method)):
            if m not in methods:
                raise ValueError(f"unknown {name} {m!r}; available: {', '.join(methods)}")
        self.key_bits, self.value_bits = int(key_bits), int(value_bits)
        self.seed, self.layer, self.rotation = int(seed), int(layer), rotation
        # The model's number of this cache's first KV head (a tensor-parallel rank holds a
        # slice of the heads): head h gets the random streams of model head offset + h.
        self.kv_head_offset = _check_kv_head_offset(kv_head_offset)
        self.center = bool(center)
        self.debias = bool(debias)
        self.key_split = bool(key_split)
        if rope_pairs not in ("half", "adjacent", None):
            raise ValueError(f"rope_pairs must be 'half', 'adjacent' or None, got {rope_pairs!r}")
        self.rope_pairs = rope_pairs
        if not isinstance(fp16_window, (int, np.integer)) or fp16_window < 0:
            raise ValueError(f"fp16_window must be an integer >= 0, got {fp16_window!r}")
        self.fp16_window = int(fp16_window)
        if not isinstance(fp16_sinks, (int, np.integer)) or fp16_sinks < 0:
            raise ValueError(f"fp16_sinks must be an integer >= 0, got {fp16_sinks!r}")
        self.fp16_sinks = int(fp16_sinks)
        if split_angle_bits not in (8, 16) or isinstance(split_angle_bits, bool):
            raise ValueError(f"split_angle_bits must be 8 or 16, got {split_angle_bits!r}")
        self.split_angle_bits = int(split_angle_bits)  # the key split's part angle (core option)
        try:
            self.decay_after, self.decay_bits, self.sparse_v = _check_decay_sparse(
                decay_after, decay_bits, sparse_v, *self._least_bits(),
                self.key_method, self.value_method)
        except ValueError as e:
            raise ValueError(f"layer {layer}: {e}") from None
        try:
            self.mixed_bits, self.mixed_keep, self._mixed_blocks = _check_mixed(
                mixed_bits, mixed_keep, *self._least_bits(), self.key_method, self.value_method,
                self.fp16_window, self.decay_after)
        except ValueError as e:
            raise ValueError(f"layer {layer}: {e}") from None
        # Mixed precision only where a trial on the layer's first block (the prompt) finds
        # that routing beats uniform codes of the same average width (turboquant.mixed_trial)
        self.mixed_trial = bool(mixed_trial) and bool(self.mixed_bits)
        # Uniform codes (no mixed precision, or where the trial above rejects it): the key /
        # value widths of the same bytes chosen by a trial on the first block
        # (turboquant.mixed_trial.best_widths)
        self.width_trial = bool(width_trial)
        if block_tokens is None and self.mixed_bits:
            # groups of 32 tokens for keep 1/2 (64 for 1/4, ...): importance is ranked inside
            # a group, and the window holds up to fp16_window + one group
            block_tokens = 16
        if block_tokens is None:
            # small flush blocks keep the fp16 part near its nominal size; small decay blocks
            # decay tokens close to decay_after old instead of up to a 256-token page later
            block_tokens = 32 if self.fp16_window or self.fp16_sinks or self.decay_after else 256
        if not isinstance(block_tokens, (int, np.integer)) or block_tokens < 1:
            raise ValueError(f"block_tokens must be an integer >= 1, got {block_tokens!r}")
        self.block_tokens = int(block_tokens)
        # Per-KV-head channel order of the keys (key_split): the chosen high-energy channels
        # first. Applied to keys before encoding and to queries before attention (exact).
        self._perm: np.ndarray | None = None
        # Codes held as mlx arrays by a MetalCodeStore (Apple GPU) instead of the C++ core?
        # Decided at the first append (needs head_dim); see _use_gpu.
        self._gpu: bool | None = None
        self.offset = 0
        # Per-KV-head mean key / value of the first block (see _centre).
        self._k_mean: np.ndarray | None = None
        self._v_mean: np.ndarray | None = None
        self._core = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_q_heads: int | None = None
        self._batch = 1
        self._fetched: tuple[mx.array, mx.array] | None = None
        # Exact window flushes for short blocks (speculative decoding's verify steps; see
        # _append_new): the tokens of this call after the one that makes the core flush its
        # oldest window block, appended at the attention call; and that block's fp16 rows,
        # kept until a trim rewinds past the flush (then the flush is undone).
        self._held: tuple[np.ndarray, np.ndarray, int] | None = None
        self._unflush: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- mlx-lm protocol ----------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.ndim != 4 or values.ndim != 4:
            raise ValueError(f"TurboQuantKVCache expects (B, H_kv, T, d) keys/values, got "
                             f"{keys.shape} / {values.shape}")
        if keys.shape[:3] != values.shape[:3] or keys.shape[-1] != values.shape[-1]:
            raise ValueError(
                f"TurboQuantKVCache needs keys and values of one shape (B, H_kv, T, d), got "
                f"{keys.shape} and {values.shape} (different K/V head dims are not supported)")
        self._ingest(keys, values)
        B, H, T, d = keys.shape
        # A zero-memory placeholder of the shape mlx-lm expects (broadcast of one NaN), for
        # the keys and the values alike (the attention route checks it is what it gets back).
        ph = mx.broadcast_to(_nan(keys.dtype), (B, H, self.offset, d))
        self._fetched = (ph, ph)
        return ph, ph

    def _ingest(self, keys, values) -> None:
        """Append ``keys``/``values`` (B, H_kv, T, d): mlx arrays, or host (NumPy) arrays on
        a layer that is not on the GPU store (the batch cache converts a whole batch once)."""
        B, H, T, d = keys.shape
        if self._core is not None:
            cfg = self._shape
            if (B * H, d) != (cfg[0], cfg[1]):
                raise ValueError(f"layer {self.layer}: keys of shape {keys.shape} do not match the "
                                 f"cache's (B*H_kv={cfg[0]}, head_dim={cfg[1]})")
        if self._gpu is None:
            self._gpu = self._use_gpu(d)
        if self._gpu:
            k, v = keys, values
        else:
            if isinstance(keys, mx.array) and isinstance(values, mx.array):
                mx.eval(keys, values)  # one evaluation of the layer's graph for both copies
            k, v = _host(keys), _host(values)
        self._batch = B
        k, v = k.reshape(B * H, T, d), v.reshape(B * H, T, d)
        if self._gpu and self.center and self._k_mean is not None and \
                self._core is not None and self._core.windowed:
            k, v = self._centre_fp16(k, v)
        else:
            k, v = self._centre(k, v)
            if self._perm is not None:
                k = _permute(k, self._perm)
        if self._core is None:
            self._pending.append((k, v))
        else:
            self._append_new(k, v)
        self.offset += T

    @classmethod
    def merge(cls, caches):
        """mlx-lm's batching (``BatchGenerator``) merges the per-request caches of a layer
        into one batch cache: a :class:`turboquant.mlx_batch.BatchTurboQuantKVCache` of
        copies of ``caches``, one row per sequence."""
        return BatchTurboQuantKVCache.merge(caches)

    def attend(self, queries: mx.array, scale: float, causal: bool = True,
               window: int | None = None) -> mx.array:
        """Attention of ``queries`` (B, H_q, T_q, d), the last T_q positions, on the codes."""
        if (self._gpu and self._direct_decode and window is None and queries.shape[2] == 1
                and self._held is None and not self.sparse_v and not self.mixed_bits
                and self._core is not None and self._batch == 1 and queries.shape[0] == 1):
            # a decode step: the store's decode_step, past the general calls' generator
            out = self._decode_words(queries, float(scale))
            if out is not None:
                return out
            Hq, d = queries.shape[1], queries.shape[3]
            out = self._core.decode_step(self._core_queries(queries, scale), float(scale))
            return self._with_mean(out, 1, Hq, 1, d, queries.dtype).astype(queries.dtype)
        if self._gpu:  # the value mean added in the cast to the queries' dtype
            out = _run_core_calls(self._attend_calls(queries, scale, causal, window,
                                                     dtype=queries.dtype))
            return out.astype(queries.dtype)
        out = self._attend(queries, scale, causal, window)
        return mx.array(out).astype(queries.dtype)

    def _decode_words(self, queries, scale: float):
        """A decode step on the GPU store with the queries and the output in the model's dtype
        (the store's decode_step_words: the channel order, the casts and the value mean inside
        the two attention launches, three GPU operations fewer, the same bits), or None where
        it does not apply. ``TQ_GPU_STEP_WORDS=0`` keeps the longer form (a benchmark's
        comparison)."""
        if (queries.dtype not in (mx.float16, mx.bfloat16) or queries.shape[1] != self._n_q_heads
                or _mlx_metal.metal.attention_kernel() != "mma"  # (Metal's default: no)
                or _mlx_metal.metal.getenv("TQ_GPU_STEP_WORDS", "") == "0"):
            return None
        Hq, d = queries.shape[1], queries.shape[3]
        order = None if self._perm is None else _perm_index(self._perm)[2]
        out = self._core.decode_step_words(queries.reshape(Hq, 1, d), order, self._v_mean, scale)
        return None if out is None else out.reshape(1, Hq, 1, d)

    def _attend(self, queries, scale: float, causal: bool = True, window: int | None = None):
        """:meth:`attend` before the conversion to an mlx array of the queries' dtype: a
        (B, H_q, T_q, d) host array (an mlx array on the GPU store). ``queries`` may be a
        host array on a layer that is not on the GPU store."""
        return _run_core_calls(self._attend_calls(queries, scale, causal, window))

    def _attend_calls(self, queries, scale: float, causal: bool = True,
                      window: int | None = None, dtype=None):
        """:meth:`_attend` as a generator of its core calls: it yields ``(core, q, kwargs)``
        for each ``core.attend(q, **kwargs)`` it needs, is sent that call's output, and
        returns :meth:`_attend`'s result. Appends between the calls happen inside, so a
        batch (turboquant.mlx_batch) can make the calls of many rows at once.
        ``dtype`` (the GPU store's outputs): the value mean is added in the cast to it."""
        B, Hq, Tq, d = queries.shape
        q = self._core_queries(queries, scale)
        kw = {"causal": causal, "scale": float(scale), "window": window}
        if self.sparse_v:
            kw["sparse_v"] = self.sparse_v
        if self._gpu and Tq > 1 and queries.dtype in (mx.float16, mx.bfloat16):
            kw["dtype"] = queries.dtype  # a prefill on the GPU store attends in this precision
        held, self._held = self._held, None
        if held is not None and held[2] + held[0].shape[1] == Tq:
            # The queries before the flush point see the window as it was before the flush
            # (what one-token steps see), the others after it.
            j = held[2]
            part = ((lambda a: a) if self._gpu  # noqa: E731 - mlx slices stay on the GPU
                    else np.ascontiguousarray)
            first = yield self._core, part(q[:, :j]), kw
            self._core.append(held[0], held[1])
            rest = yield self._core, part(q[:, j:]), kw
            out = (mx.concatenate([first, rest], axis=1) if self._gpu
                   else np.concatenate([first, rest], axis=1))
        else:
            if held is not None:
                self._core.append(held[0], held[1])
            out = yield self._core, q, kw
        if self.mixed_bits and Tq > 1:
            # The queries rated their own tokens: flush the groups that are due now, not at
            # the next append, so that a prompt given in one call holds what one given in
            # chunks holds (a block of at most fp16_window tokens leaves nothing due).
            self._flush_rated()
        return self._with_mean(out, B, Hq, Tq, d, dtype)

    def _with_mean(self, out, B: int, Hq: int, Tq: int, d: int, dtype=None):
        """The attention output of the centred values plus their mean, (B, H_q, T_q, d);
        ``dtype`` (the GPU store's outputs): added in the cast to it."""
        if self._v_mean is not None:  # sum_t p_t (v_t - m) + m = sum_t p_t v_t
            out = out.reshape(-1, Hq // (self._core_kv_heads // B), Tq, d)
            if dtype is None:
                out = out + self._v_mean[:, None]
            else:  # one fused kernel for a decode step
                vm = getattr(self, "_v_mean_b", (None, None))
                if vm[0] is not self._v_mean:  # (H, 1, d) -> (H, 1, 1, d), made once
                    vm = self._v_mean_b = (self._v_mean, self._v_mean[:, None])
                add = _add_mean_step.get(dtype) if Tq == 1 else None
                out = add(out, vm[1]) if add is not None else _add_mean(out, vm[1], dtype)
        return out.reshape(B, Hq, Tq, d)

    def _flush_rated(self) -> None:
        """After a mixed layer's attention call: the groups its queries made due go to codes
        (a method of its own so that a test can see the rows the attention call saw)."""
        self._core.flush_rated()

    def _core_queries(self, queries, scale: float | None = None):
        """``queries`` (B, H_q, T_q, d) as the core takes them: (B·H_q, T_q, d), on the host
        unless the layer is on the GPU store, in the core's channel order; the core is built
        at the first call (it needs the query head count; ``scale``, the attention scale,
        serves the mixed-precision trial)."""
        B, Hq, Tq, d = queries.shape
        if B != self._batch:
            raise ValueError(f"queries batch {B} != cache batch {self._batch}")
        q = (queries if self._gpu else _host(queries)).reshape(B * Hq, Tq, d)
        if self._core is None:
            self._create_core(n_q_heads=Hq, n_kv_heads=self._pending_heads(), head_dim=d,
                              queries=q, scale=scale)
        elif Hq != self._n_q_heads:
            raise ValueError(f"layer {self.layer}: {Hq} query heads, cache built for "
                             f"{self._n_q_heads}")
        if self._perm is not None:
            g = (B * Hq) // self._core_kv_heads
            if getattr(self, "_perm_q", (None,))[0] is not self._perm or self._perm_q[1] != g:
                self._perm_q = (self._perm, g, np.repeat(self._perm, g, axis=0))
            q = _permute(q, self._perm_q[2])
        return q

    def fill_from(self, cache, n_q_heads: int | None = None) -> None:
        """Encode the tokens of an mlx-lm ``KVCache`` into this (empty) cache; with
        ``n_q_heads`` at once, otherwise at the first attention call."""
        if cache.keys is None or cache.offset == 0:
            return
        k = cache.keys[..., : cache.offset, :]
        v = cache.values[..., : cache.offset, :]
        self.update_and_fetch(k, v)
        self._fetched = None
        if n_q_heads is not None:
            self._create_core(n_q_heads=int(n_q_heads), n_kv_heads=self._pending_heads(),
                              head_dim=k.shape[-1])

    def _use_gpu(self, head_dim: int) -> bool:
        """The GPU path (codes as mlx arrays, turboquant.metal kernels on Metal or CUDA) is
        taken when the kernels passed their first-use self-test and :meth:`gpu_refusal`
        finds nothing the store cannot do; a layer kept off the GPU says why (one warning
        per reason and process)."""
        path = gpu_path.active_path()
        if path == "cpu":
            return False
        why = self.gpu_refusal(head_dim)
        if why is None:
            return True
        if why not in _GPU_FALLBACKS_WARNED:
            _GPU_FALLBACKS_WARNED.add(why)
            warnings.warn(f"turboquant: layers with these settings stay on the C++ CPU core, "
                          f"not the {path} GPU store: {why}", RuntimeWarning, stacklevel=4)
        return False

    def rotation_for(self, head_dim: int) -> str:
        """The rotation of this layer's codes at ``head_dim``: the configured one, or without
        one (``rotation=None``, the default) :func:`turboquant.presets.default_rotation`
        (``"hadamard1"``, one random-sign Hadamard round, on power-of-two head dims; else
        ``"auto"``). The saved state records the resolved name, so a file keeps its rotation
        whatever the default becomes."""
        return _presets.default_rotation(head_dim) if self.rotation is None else self.rotation

    def gpu_refusal(self, head_dim: int) -> str | None:
        """None when the mlx-resident store (turboquant.mlx_metal.MetalCodeStore) can hold
        this layer, else why it cannot (then the C++ core holds it). The store does
        turboquant_mse with a Hadamard rotation (one round or two) on power-of-two head dims,
        the key split (split.metal; head_dim >= 32, so that both halves have Hadamard
        rotations), norm
        correction (debias), fp16 sinks, the fp16 recent window, per-KV-head widths (a
        profile's, one launch set per width group) and importance-routed mixed precision;
        not temporal decay or sparse V."""
        why = _mlx_metal.store_supports(head_dim, self.key_method, self.value_method,
                                        self.rotation_for(head_dim))
        if why:
            return why
        if self.split_plan(head_dim) is not None and head_dim < 32:
            return (f"the GPU key split needs head_dim >= 32 (halves of 16 channels or more), "
                    f"got {head_dim}")
        if self.decay_after:
            return "temporal decay is a C++ core feature (the GPU store does not decay codes)"
        if self.sparse_v:
            return "the GPU store's decode kernel is dense (sparse_v runs on the C++ core)"
        return None

    def _centre(self, k: np.ndarray, v: np.ndarray):
        """Subtract a fixed per-head mean from keys and values before encoding.

        Exact for attention: q.(k_t - m) shifts every score of a query by the same q.m, which
        softmax ignores, and sum_t p_t (v_t - m_v) + m_v = sum_t p_t v_t. It removes the
        large common offset that RoPE'd keys of Llama-family models carry, so the codes spend
        their bits on what differs between tokens (SmolLM2: mean key norm 16 -> 9.5). The
        means come from the first block appended (the prefill) and then stay fixed."""
        if not self.center:
            return k, v
        if self._gpu:  # the same on mlx arrays, on the GPU
            k, v = k.astype(mx.float32), v.astype(mx.float32)
            if self._k_mean is None:
                self._calibrate_on(self.offset + k.shape[1])
                self._k_mean = k.mean(axis=1, keepdims=True)
                self._v_mean = v.mean(axis=1, keepdims=True)
            return k - self._k_mean, v - self._v_mean
        if self._k_mean is None:
            self._calibrate_on(self.offset + k.shape[1])
            self._k_mean = k.mean(axis=1, keepdims=True, dtype=np.float32)
            self._v_mean = v.mean(axis=1, keepdims=True, dtype=np.float32)
        return (np.ascontiguousarray(k - self._k_mean, dtype=np.float32),
                np.ascontiguousarray(v - self._v_mean, dtype=np.float32))

    def _centre_fp16(self, k, v):
        """_centre and _permute on the GPU store of a windowed layer, whose every appended
        row is first rounded to fp16: the channels permuted first (a permutation commutes
        with the per-channel mean), then the centring and the rounding, fused for a decode
        step. Bit for bit what the store makes of _centre's float32 rows."""
        km = self._k_mean
        if self._perm is not None:
            cached = getattr(self, "_k_mean_perm", None)
            if cached is None or cached[0] is not self._perm or cached[1] is not km:
                cached = self._k_mean_perm = (self._perm, km, _permute(km, self._perm))
            km = cached[2]
        if k.shape[1] == 1:  # a decode step's token: one kernel for both roles where it runs
            centre = _centre_kernel(k, v)
            if centre is not None:
                return centre(k, v, km, self._v_mean,
                              None if self._perm is None else _perm_index(self._perm)[2],
                              check=False)
        if self._perm is not None:
            k = _permute(k, self._perm)
        step = _centre_rows_step if k.shape[1] == 1 else _centre_rows
        return step(k, v, km, self._v_mean)

    def _calibrate_on(self, tokens: int) -> None:
        self._calibrated = max(self._calibrated, int(tokens))

    @property
    def calibration_tokens(self) -> int:
        """How many leading tokens of the sequence the cache's calibration was computed from:
        the centring means (the first block appended), the key split's channel order and the
        mixed-precision and width trials (the tokens held when the core is built, normally
        the same first block); 0 when nothing is calibrated (``center`` and ``key_split``
        off, no trial). The calibration stays with the cache when it is trimmed, so a cache
        trimmed to fewer tokens still depends on the trimmed ones; a prompt-cache store
        reuses it only for a prompt that shares at least these tokens."""
        return self._calibrated

    def spare_nbytes(self) -> int:
        """The most bytes this cache holds beyond a cache given the same tokens in one call:
        the fp16 rows of the last window block flushed into codes by a short append (a
        decode step), kept to undo that flush on a trim (see _flush_point; C++ core only)."""
        if self._core is None or self._gpu or not self._exact_flushes():
            return 0
        return 2 * int(self._core_kv_heads) * self.block_tokens * int(self._head_dim) * 2

    def compact_window(self) -> int:
        """Move this layer's fp16 window into codes, its last block partial, and give the
        window's memory back (``_core.KVCache.compact_window``): what a prompt-cache store
        does to a prompt it parks (``turboquant serve --park-window codes``), whose window
        rows would otherwise be most of a short entry's bytes. The fp16 sinks stay. Returns
        the tokens moved into codes (0: nothing changed), and ``nbytes`` drops by the
        window's rows less their codes. The cache stays a cache like any other: later
        tokens go to a new window and flush on from where the codes end; ``trim``,
        attention, ``state`` and ``reuse_prefix`` work as usual (a resumed prompt's window
        tokens before the compaction are codes, not fp16 rows).

        A layer held by the GPU store compacts there (``MetalCodeStore.compact_window``,
        the same plan and the same codes, on the device). Nothing is moved (0) by a layer
        without a core yet (its tokens wait for the first attention call), without an fp16
        window, or with mixed precision (its codes are stored by importance in whole flush
        groups, its window flushed once rated)."""
        if self._core is None or not self.fp16_window or self.mixed_bits:
            return 0
        self._append_held()
        moved = int(self._core.compact_window())
        if moved:
            # the window block a trim would restore as fp16 rows is gone with the window
            self._unflush = None
            self._parked = True
        return moved

    @property
    def flush_tokens(self) -> int:
        """Tokens one window flush moves into codes (their pages allocated at once):
        block_tokens, or a mixed-precision flush group's (a page at each width)."""
        return self.block_tokens * max(1, self._mixed_blocks[0])

    def size(self):
        return self.offset

    def empty(self):
        return self._core is None and not self._pending

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, int(n))
        if n <= 0:
            return 0
        if self._core is not None:
            self._append_held()
            if not self._undo_flush(n):
                self._core.trim(n)
        else:
            keep = self.offset - n
            pend, total = [], 0
            for k, v in self._pending:
                take = min(k.shape[1], keep - total)
                if take > 0:  # kept C-contiguous: the core reads pending blocks in place
                    pend.append((_first_tokens(k, take), _first_tokens(v, take)))
                total += take
            self._pending = pend
        self.offset -= n
        return n

    def reuse_prefix(self, prefix: int, total: int) -> int:
        """The longest ``p <= prefix`` such that this cache trimmed to ``p`` tokens, then given
        tokens ``[p, total)`` of a prompt, holds what a cache given all ``total`` tokens holds
        (the same tokens as codes, the same as fp16 sinks and window rows): the point a
        prompt-cache store may resume a longer stored prompt from without changing the
        output. A trim does not turn codes back into fp16 rows, so a stored prompt whose
        window had flushed past the point a fresh prompt of ``total`` tokens flushes to is
        resumed from an earlier flush boundary (its later tokens computed again). Caches
        whose layout is not a function of their length alone (mixed precision rates tokens
        by the queries seen, temporal decay by their age, a sliding-window ring evicts)
        answer ``prefix``, and so does a parked cache (:meth:`compact_window` moved its
        window into codes): a store that parks its entries trades the fp16 rows of a
        resumed prompt's last reused tokens for capacity, on this path as on the reuse of a
        shorter entry, rather than computing them again."""
        prefix = max(0, min(int(prefix), int(total), self.offset))
        if (self._core is None or not (self.fp16_window or self.fp16_sinks) or self.mixed_bits
                or self.decay_after or self._evicted() or self._parked):
            return prefix
        plan = self._segment_plan()
        held = plan.sizes(int(self._core.size(0)), int(self._core.coded_tokens(0)))
        if self._held is not None:  # tokens held for the attention call: appended next
            held = plan.append(held, int(self._held[0].shape[1])).after
        fresh = plan.append(plan.sizes(0, 0), int(total)).after

        def resumed(p: int):
            return plan.append(plan.cut(held, p).after, int(total) - p).after

        if resumed(prefix) == fresh:
            return prefix
        # Flush boundaries (sinks, then whole pieces after them) at or before both the prefix
        # and the fresh prompt's end of codes, latest first.
        S, B = plan.sink_base, plan.flush_tokens
        top = min(prefix, fresh.coded)
        p = top if top <= S else S + (top - S) // B * B
        while p > 0:
            if resumed(p) == fresh:
                return p
            p = S if S < p <= S + B else (p - B if p > S else 0)
        return 0

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        # The route handles causality itself; an explicit window is passed as an array and
        # decoded back into a window length in the route.
        return _mlx_cache.create_attention_mask(N, offset=self.offset, return_array=return_array,
                                                window_size=window_size)

    @property
    def nbytes(self):
        pending = sum(k.nbytes + v.nbytes for k, v in self._pending)
        side = sum(a.nbytes for a in (self._k_mean, self._v_mean, self._perm) if a is not None)
        if self._held is not None:
            side += self._held[0].nbytes + self._held[1].nbytes
        if self._unflush is not None:
            side += self._unflush[1].nbytes + self._unflush[2].nbytes
        # The GPU store's arrays may hold a few pages more than are in use: count them.
        held = (0 if self._core is None else
                getattr(self._core, "allocated_bytes", self._core.memory_bytes)())
        return held + pending + side

    def __deepcopy__(self, memo):
        """An independent copy (mlx-lm's prompt-cache store hands out copies of what it
        keeps; a batch merges and extracts copies): the C++ core by its ``copy`` (through its
        file bytes, in C++), the GPU store on the device (``MetalCodeStore.copy``); neither
        is decoded."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_core" and v is not None:
                v = v.copy()  # the C++ core's copy, or MetalCodeStore.copy
            elif k == "_fetched":
                v = None  # placeholders of the last call; the next update_and_fetch makes new ones
            else:
                v = copy.deepcopy(v, memo)
            new.__dict__[k] = v
        return new

    @property
    def fp16_nbytes(self):
        """Bytes the same tokens take in mlx-lm's fp16 ``KVCache`` (without its step slack)."""
        if self._core is not None:
            return int(self._core.fp16_bytes())
        return sum(2 * 2 * k.shape[0] * k.shape[2] * k.shape[1] for k, _ in self._pending)

    def compression_ratio(self) -> float:
        return self.fp16_nbytes / max(1, self.nbytes)

    # -- state (prompt-cache files) -------------------------------------------------------

    @property
    def meta_state(self):
        return (json.dumps(self._config()),)

    @meta_state.setter
    def meta_state(self, v):
        self._set_config(json.loads(v[0]))

    @property
    def state(self):
        self._append_held()
        if self._core is None:
            if self._pending:
                raise ValueError(
                    "this TurboQuantKVCache has not run attention yet, so its query head count "
                    "(needed to build the compressed cache) is unknown; run the model once or "
                    "pass n_q_heads to to_turbo_quantized before saving")
            blob = np.zeros((0,), np.uint8)
        else:
            blob = _save_core(self._core)
        arrays = [mx.array(m) if m is not None else mx.zeros((0,)) for m in
                  (self._k_mean, self._v_mean, self._perm)]
        return (mx.array(blob), json.dumps(self._config()), *arrays)

    @state.setter
    def state(self, v):
        if len(v) not in (4, 5):
            raise _core.FormatError(f"prompt cache layer {self.layer}: expected 4 or 5 state "
                                    f"arrays, got {len(v)}")
        blob, meta, k_mean, v_mean = v[:4]
        perm = v[4] if len(v) == 5 else mx.zeros((0,))
        self._set_config(json.loads(meta))
        self._gpu = None if self._head_dim is None else self._use_gpu(int(self._head_dim))
        if k_mean.size:
            if self._gpu:
                self._k_mean, self._v_mean = k_mean.astype(mx.float32), v_mean.astype(mx.float32)
            else:
                self._k_mean = np.array(k_mean, dtype=np.float32)
                self._v_mean = np.array(v_mean, dtype=np.float32)
        if perm.size:
            p = np.array(perm).astype(np.int64)
            if p.ndim != 2 or not all(np.array_equal(np.sort(r), np.arange(p.shape[1]))
                                      for r in p):
                raise _core.FormatError(f"prompt cache layer {self.layer}: the key channel "
                                        "order is not a permutation per head")
            self._perm = p.astype(np.int16)  # as _choose_channels makes it
        blob = np.array(blob, dtype=np.uint8, copy=False)
        if blob.size:
            self._core = (_mlx_metal.MetalCodeStore.from_bytes(blob.tobytes(),
                                                               check_inputs=False)
                          if self._gpu else _load_core(blob))
            self.split_angle_bits = int(getattr(self._core, "split_angle_bits",
                                                self.split_angle_bits))
            if int(self._core.kv_head_offset) != self.kv_head_offset:
                raise _core.FormatError(
                    f"prompt cache layer {self.layer}: header says kv_head_offset "
                    f"{self.kv_head_offset}, the compressed cache has "
                    f"{int(self._core.kv_head_offset)}")
            self._shape = (self._core_kv_heads, self._head_dim)
            if self._held_tokens() != self.offset:
                raise _core.FormatError(
                    f"prompt cache layer {self.layer}: header says {self.offset} tokens, the "
                    f"compressed cache holds {self._held_tokens()}")

    def _config(self) -> dict:
        cfg = {"key_bits": self.key_bits, "value_bits": self.value_bits,
               "key_method": self.key_method, "value_method": self.value_method,
               "seed": self.seed, "layer": self.layer, "rotation": self.rotation,
               "offset": self.offset, "batch": self._batch, "center": self.center,
               "debias": self.debias, "key_split": self.key_split, "rope_pairs": self.rope_pairs,
               "fp16_window": self.fp16_window, "block_tokens": self.block_tokens,
               "fp16_sinks": self.fp16_sinks, "decay_after": self.decay_after,
               "decay_bits": self.decay_bits, "sparse_v": self.sparse_v,
               "split_angle_bits": self.split_angle_bits, "mixed_bits": self.mixed_bits,
               "mixed_keep": self.mixed_keep, "calibration_tokens": self.calibration_tokens}
        if self.kv_head_offset:  # absent when 0: such states are those of before the option
            cfg["kv_head_offset"] = self.kv_head_offset
        if self.key_head_bits is not None:
            cfg["key_head_bits"] = list(self.key_head_bits)
        if self.value_head_bits is not None:
            cfg["value_head_bits"] = list(self.value_head_bits)
        if self._core is not None:
            cfg.update(n_q_heads=self._n_q_heads, n_kv_heads=self._core_kv_heads,
                       head_dim=self._head_dim)
        return cfg

    def _set_config(self, cfg: dict) -> None:
        self.key_bits, self.value_bits = int(cfg["key_bits"]), int(cfg["value_bits"])
        self.key_method, self.value_method = cfg["key_method"], cfg["value_method"]
        self.seed, self.layer, self.rotation = int(cfg["seed"]), int(cfg["layer"]), cfg["rotation"]
        self.offset, self._batch = int(cfg["offset"]), int(cfg.get("batch", 1))
        # files from before the field: the calibration may have read any token held
        self._calibrated = int(cfg.get("calibration_tokens", self.offset))
        self._pending, self._fetched = [], None
        self._held = self._unflush = None
        self.mixed_trial = False  # a restored layer keeps the widths it was saved with
        self.width_trial = False
        self.center = bool(cfg.get("center", True))
        self.debias = bool(cfg.get("debias", True))
        self.key_split = bool(cfg.get("key_split", False))
        self.rope_pairs = cfg.get("rope_pairs", "half")
        self.fp16_window = int(cfg.get("fp16_window", 0))
        self.fp16_sinks = int(cfg.get("fp16_sinks", 0))
        self.block_tokens = int(cfg.get("block_tokens", 256))
        # Files from before the option: their cores hold 16-bit angles (read from the core
        # itself when it is loaded); a layer rebuilt later uses the default.
        self.split_angle_bits = int(cfg.get("split_angle_bits", 8))
        try:
            self.kv_head_offset = _check_kv_head_offset(cfg.get("kv_head_offset", 0))
            self.key_head_bits = _check_head_bits(cfg.get("key_head_bits"), "key_head_bits")
            self.value_head_bits = _check_head_bits(cfg.get("value_head_bits"),
                                                    "value_head_bits")
            self.decay_after, self.decay_bits, self.sparse_v = _check_decay_sparse(
                cfg.get("decay_after", 0), cfg.get("decay_bits", 0), cfg.get("sparse_v", 0.0),
                *self._least_bits(), self.key_method, self.value_method)
            self.mixed_bits, self.mixed_keep, self._mixed_blocks = _check_mixed(
                cfg.get("mixed_bits", 0), cfg.get("mixed_keep", 0.0), *self._least_bits(),
                self.key_method, self.value_method, self.fp16_window, self.decay_after)
        except ValueError as e:
            raise _core.FormatError(f"prompt cache layer {self.layer}: {e}") from None
        self._k_mean = self._v_mean = None
        self._perm = None
        self._core = None
        self._n_q_heads = cfg.get("n_q_heads")
        self._core_kv_heads = cfg.get("n_kv_heads")
        self._head_dim = cfg.get("head_dim")

    # -- internals ----------------------------------------------------------------------

    def _pending_heads(self) -> int:
        if not self._pending:
            raise RuntimeError(f"layer {self.layer}: attention called on an empty cache")
        return self._pending[0][0].shape[0]

    def _least_bits(self) -> tuple[int, int]:
        """The fewest key and value bits of any KV head."""
        return (min(self.key_head_bits or (self.key_bits,)),
                min(self.value_head_bits or (self.value_bits,)))

    def split_plan(self, head_dim: int) -> tuple[int, int, int] | None:
        """(channels, their bits, the other channels' bits) of the key split, or None.

        Half of the channels (whole RoPE pairs) get key_bits + 1 bits, the other half
        key_bits - 1: the same bytes, spent where the keys' energy is. Halves keep both
        groups a power of two for power-of-two head dims (fast Hadamard rotations, small
        rotation state). With per-head key bits each head splits its own width the same way
        (every head's width must be in [2, 7])."""
        widths = self.key_head_bits or (self.key_bits,)
        if not (self.key_split and self.key_method == "turboquant_mse"
                and 2 <= min(widths) and max(widths) <= 7 and head_dim % 4 == 0):
            return None
        # With per-head widths the core's base widths are overridden per head; they only need
        # to be valid, which key_bits itself (e.g. 1 beside heads of 2 bits) need not be.
        b = self.key_bits if self.key_head_bits is None else min(widths)
        return head_dim // 2, b + 1, b - 1

    def _trial_inputs(self, queries, total_kv: int, head_dim: int):
        """(keys, values, queries, make_core, split) of a trial (turboquant.mixed_trial) on
        the pending first block and its queries (host, in the core's channel order); None
        where it cannot run (per-head widths, queries that are not the block's own)."""
        if self.key_head_bits is not None or self.value_head_bits is not None:
            return None
        from turboquant import mixed_trial

        # on the GPU store too: one read of the first block and its queries back to the host
        keys = np.concatenate([_host(k) for k, _ in self._pending], axis=1)
        values = np.concatenate([_host(v) for _, v in self._pending], axis=1)
        q = _host(queries)
        if q.shape[0] % total_kv:
            return None
        if self._perm is not None:
            q = _permute(q, np.repeat(self._perm, q.shape[0] // total_kv, axis=0))
        mse = self.key_method == self.value_method == "turboquant_mse"

        def split(bits):
            if not (self.key_split and self.key_method == "turboquant_mse" and 2 <= bits <= 7
                    and head_dim % 4 == 0):
                return None
            return head_dim // 2, bits + 1, bits - 1

        make_core = mixed_trial.make_core_factory(
            head_dim, total_kv, q.shape[0], self.key_method, layer_seed(self.seed, self.layer),
            self.rotation_for(head_dim), self.debias and mse, split, self.split_angle_bits,
            _TRIAL_BLOCK)
        return keys, values, q, make_core, split

    def _routing_pays(self, queries, scale: float, total_kv: int, head_dim: int) -> bool:
        """The mixed-precision trial (turboquant.mixed_trial) on the pending first block and
        its queries (host, in the input channel order); True where it cannot run."""
        from turboquant import mixed_trial

        t = self._trial_inputs(queries, total_kv, head_dim)
        if t is None:
            return True
        keys, values, q, make_core, split = t
        uniform = _presets.uniform_widths(self.key_bits, self.value_bits, self.mixed_bits,
                                          self.mixed_keep, split(self.key_bits) is not None)
        group, kept = (b * self.block_tokens for b in self._mixed_blocks)
        return mixed_trial.routing_pays(keys, values, q, scale, make_core,
                                        (self.key_bits, self.value_bits), self.mixed_bits,
                                        uniform, self.fp16_sinks, self.fp16_window, group, kept,
                                        _TRIAL_BLOCK)

    def _trial_widths(self, queries, scale: float, total_kv: int,
                      head_dim: int) -> tuple[int, int]:
        """The width trial (turboquant.mixed_trial.best_widths): of the layer's uniform
        (key, value) bits and one bit moved between the roles (same bytes, both widths in
        [2, 8], the key split on or off as for the layer's own widths), the layout with the
        smallest attention-output error on the prompt; the layer's own where it cannot run.
        No role drops to 1 bit: on the tuning texts (bench/preset_tuning.py) tq2's 3-bit keys
        and 1-bit values, which the trial picks on some layers, had the lower KL but the
        higher perplexity on both models (bench/results/preset_tuning_*_width_trial.json)."""
        from turboquant import mixed_trial

        own = (self.key_bits, self.value_bits)
        t = self._trial_inputs(queries, total_kv, head_dim)
        if t is None:
            return own
        keys, values, q, make_core, split = t
        kb, vb = own
        layouts = [own] + [(kb + d, vb - d) for d in (1, -1)
                           if 2 <= kb + d <= 8 and 2 <= vb - d <= 8
                           and (split(kb + d) is None) == (split(kb) is None)]
        return mixed_trial.best_widths(keys, values, q, scale, make_core, layouts,
                                       self.fp16_sinks, self.fp16_window)

    def _tiled_head_bits(self, bits, total_kv: int) -> list[int] | None:
        """Per-head widths for the core's total_kv = batch × KV heads (batch is folded into
        heads): the model's per-head list repeated per sequence."""
        if bits is None:
            return None
        B = self._batch
        if total_kv % B or len(bits) != total_kv // B:
            raise ValueError(f"layer {self.layer}: {len(bits)} per-head bit widths for "
                             f"{total_kv // max(B, 1)} KV heads")
        return list(bits) * B

    @staticmethod
    def _mean_square(xs, heads: int) -> list[np.ndarray]:
        """For each x of ``xs`` (mlx or NumPy, (heads·g, T, d) grouped into heads): the mean
        of x² per (head, channel), reduced in float32 by mlx where x lives (on the GPU path,
        only the (heads, d) results come to the host; all in one evaluation), as float64."""
        out = []
        for x in xs:
            x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
            if x.size == 0:
                out.append(np.zeros((heads, int(x.shape[-1])), np.float64))
                continue
            x = x.reshape(heads, -1, int(x.shape[-1])).astype(mx.float32)
            out.append(mx.mean(mx.square(x), axis=1))
        mx.eval([x for x in out if isinstance(x, mx.array)])
        return [np.array(x).astype(np.float64) for x in out]

    def _choose_channels(self, keys, queries, m: int):
        """Per KV head, the order that puts the m channels with the most query-weighted key
        energy first, whole RoPE pairs at a time. keys (H, T, d) centred; queries (Hq, T, d);
        mlx (reduced where they live) or NumPy arrays."""
        H, _, d = keys.shape
        if queries is not None and queries.shape[0] % H == 0 and queries.size:
            ek, eq = self._mean_square((keys, queries), H)  # one evaluation for both
            energy = ek * eq
        else:
            (energy,) = self._mean_square((keys,), H)
        # a pair's energy: the sum of its channels' (in channel order, as a bincount adds)
        if self.rope_pairs == "half":
            pair, per_pair = np.arange(d) % (d // 2), energy[:, :d // 2] + energy[:, d // 2:]
        elif self.rope_pairs == "adjacent":
            pair, per_pair = np.arange(d) // 2, energy[:, 0::2] + energy[:, 1::2]
        else:
            pair, per_pair = np.arange(d), energy
        # per head: pairs by falling energy (ties in pair order), each pair's channels in
        # channel order; the first m channels of that, then the others in channel order
        order = np.argsort(-per_pair, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[1])[None], axis=1)
        chosen = np.argsort(rank[:, pair], axis=1, kind="stable")[:, :m]
        rest = np.ones((H, d), dtype=bool)
        np.put_along_axis(rest, chosen, False, axis=1)
        # int16 (head_dim < 32768): the order stays with every stored prompt, where its
        # bytes count (an int64 order was 3% of a parked 257-token entry)
        return np.concatenate([chosen, np.nonzero(rest)[1].reshape(H, d - m)],
                              axis=1).astype(np.int16)

    def _create_core(self, n_q_heads: int, n_kv_heads: int, head_dim: int,
                     queries: np.ndarray | None = None, scale: float | None = None) -> None:
        # Batch is folded into heads: (B, H, T, d) -> (B*H, T, d); query head b*Hq+h maps to
        # KV head (b*Hq+h)//g = b*Hkv + h//g, which is the same GQA grouping.
        B = self._batch
        total_q, total_kv = n_q_heads * B, n_kv_heads
        if total_q % total_kv:
            raise ValueError(f"layer {self.layer}: {n_q_heads} query heads are not a multiple "
                             f"of {n_kv_heads // B} KV heads")
        plan = self.split_plan(head_dim)
        key_bits, split = self.key_bits, {}
        held = sum(k.shape[1] for k, _ in self._pending)  # what a calibration here reads
        kh = self._tiled_head_bits(self.key_head_bits, total_kv)
        vh = self._tiled_head_bits(self.value_head_bits, total_kv)
        heads = {}
        if vh is not None:
            heads["value_head_bits"] = vh
        if kh is not None:
            heads["key_head_bits"] = kh
        if plan is not None:
            m, hi, lo = plan
            if self._perm is None:
                # The channel order is chosen once, from the first block: the energies are
                # reduced where the keys and queries are (the GPU on the GPU path), the
                # order made on the host from their (KV heads, head_dim) means.
                blocks = [k if isinstance(k, mx.array) else mx.array(k) for k, _ in self._pending]
                keys = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=1)
                self._calibrate_on(held)
                self._perm = self._choose_channels(keys, queries, m)
                self._pending = [(_permute(k, self._perm), v) for k, v in self._pending]
        if self.mixed_trial and queries is not None and scale is not None:
            self.mixed_trial = False  # once, on the first block
            self._calibrate_on(held)
            if not self._routing_pays(queries, float(scale), total_kv, head_dim):
                self.key_bits, self.value_bits = _presets.uniform_widths(
                    self.key_bits, self.value_bits, self.mixed_bits, self.mixed_keep,
                    self.split_plan(head_dim) is not None)
                self.mixed_bits, self.mixed_keep, self._mixed_blocks = 0, 0.0, (0, 0)
                plan = self.split_plan(head_dim)
                key_bits = self.key_bits
        if self.width_trial and queries is not None and scale is not None:
            self.width_trial = False  # once, on the first block
            if not self.mixed_bits:  # uniform codes: their key / value widths by trial
                self._calibrate_on(held)
                self.key_bits, self.value_bits = self._trial_widths(queries, float(scale),
                                                                    total_kv, head_dim)
                plan = self.split_plan(head_dim)
                key_bits = self.key_bits
        if plan is not None:
            m, hi, lo = plan
            key_bits = lo
            split = dict(n_outlier_channels=m, outlier_bits=hi,
                         outlier_channels=list(range(m)), outlier_roles="keys",
                         split_angle_bits=self.split_angle_bits)
            if kh is not None:  # each head's split of its own width
                heads["key_head_bits"] = [b - 1 for b in kh]
                heads["outlier_head_bits"] = [b + 1 for b in kh]
        mse = self.key_method == self.value_method == "turboquant_mse"
        mixed = {}
        if self.mixed_bits:
            mixed = dict(mixed_group_blocks=self._mixed_blocks[0],
                         mixed_keep_blocks=self._mixed_blocks[1], decay_bits=self.mixed_bits)
        self.rotation = self.rotation_for(head_dim)  # the saved state records the kind
        common = dict(n_layers=1, n_q_heads=total_q, n_kv_heads=total_kv,
                      key_method=self.key_method, key_bits=key_bits,
                      value_method=self.value_method, value_bits=self.value_bits,
                      seed=layer_seed(self.seed, self.layer), rotation=self.rotation,
                      block_tokens=self.block_tokens, kv_head_offset=self.kv_head_offset)
        if self._gpu:
            # No per-call finiteness check on the GPU: it reads a flag back to the host (a full
            # GPU sync per layer and token, which stalls mlx's pipelined decode); the model's
            # activations go unchecked as in mlx-lm's own caches. The C++ core (CPU path) and
            # MetalCodeStore used directly keep the check.
            self._core = _mlx_metal.MetalCodeStore(head_dim, norm_correction=self.debias and mse,
                                                   fp16_window=self.fp16_window,
                                                   fp16_sinks=self.fp16_sinks, check_inputs=False,
                                                   **common, **split, **heads, **mixed)
        else:
            if mixed:
                mixed.pop("decay_bits")
            self._core = _core.KVCache(head_dim, fp16_window=self.fp16_window,
                                       fp16_sinks=self.fp16_sinks, decay_after=self.decay_after,
                                       decay_bits=self.mixed_bits or self.decay_bits, **mixed,
                                       norm_correction=self.debias and mse, **common, **split,
                                       **heads, **self._core_options())
        self._n_q_heads, self._core_kv_heads, self._head_dim = n_q_heads, total_kv, head_dim
        self._shape = (total_kv, head_dim)
        pending, self._pending = self._pending, []
        self._append_blocks(pending)

    def _append_blocks(self, blocks) -> None:
        """Encode blocks of (centred, permuted) K/V into the core (a sliding-window cache
        holds them until the attention call, see turboquant.mlx_rotating)."""
        self._unflush = None
        for k, v in blocks:
            self._core.append(k, v)

    # -- exact window flushes for short blocks ----------------------------------------
    #
    # The core flushes the oldest block_tokens tokens of the fp16 window into codes when the
    # window exceeds fp16_window + block_tokens. Decoding one token at a time, a token's query
    # sees the window as it was right after its own append. A block of a few tokens at once
    # (speculative decoding verifies the draft's tokens in one forward pass) would let its
    # first queries see a flush that one-token steps make only at a later token, and a trim
    # of the rejected tokens would keep that flush. Both are made exact for blocks of at
    # most block_tokens tokens (one flush at most): the block is appended up to the flush
    # point and the rest at the attention call, between the two halves of its queries; the
    # flushed block's fp16 rows are kept until the next flush, and a trim back before the
    # flush point undoes it (the codes are dropped, the rows appended again). Longer blocks
    # (prefill chunks) flush as before.

    def _exact_flushes(self) -> bool:
        # The GPU store keeps the same window rules (the same flush points), so the split
        # at the flush point applies to it too: both paths give the same attention.
        return self.fp16_window > 0 and not self.mixed_bits and not self.decay_after

    def _evicted(self) -> int:
        """Tokens the core dropped from the front (a sliding-window ring); positions in the
        core are positions in the sequence minus these."""
        return 0

    def _segment_plan(self):
        """The core's segment rules for this layer's settings (made once per settings: a
        decode step asks at every layer)."""
        return _segment_plan(int(self.fp16_sinks), int(self.fp16_window),
                             int(self.block_tokens))

    def _flush_point(self, T: int, k=None, v=None) -> int | None:
        """Before appending T tokens (``k``/``v``, host arrays, when given): None when they
        cause no window flush (or one that is not made exact: see above), else how many of
        them come before the token that flushes; the block it flushes is kept (fp16 rows) to
        undo the flush on a trim. That block may end inside the new tokens (a window shorter
        than a block): its rows then come from ``k``/``v``, and without them the flush is
        not undone (trims across it stay plain)."""
        if not self._exact_flushes():
            return None
        if T > self.block_tokens:
            self._unflush = None  # several flushes: not undone
            return None
        # The core's rule (_core.SegmentPlan): whether the append flushes; the window holds
        # window_rows (fp16_window + block_tokens) tokens before the token that does.
        plan = self._segment_plan()
        sizes = plan.sizes(int(self._core.size(0)), int(self._core.coded_tokens(0)))
        if not plan.append(sizes, T).flushes:
            return None
        limit, w = plan.window_rows, sizes.window
        if self._gpu:  # the split only: keeping the flushed block's rows would read them
            self._unflush = None  # back to the host at every flush (trims stay plain here)
            return limit - w
        coded, bt = int(self._core.coded_tokens(0)), self.block_tokens
        H = int(self._core_kv_heads)
        held = min(bt, w)  # of the block, the rows the window holds now
        if held < bt and k is None:
            self._unflush = None
            return limit - w
        rows = [np.stack([self._core.decode(0, h, role, coded, held) for h in range(H)])
                for role in ("key", "value")]
        if held < bt:  # the rest of the block: the first new tokens, as the window holds them
            rows = [np.concatenate([r, np.asarray(x[:, :bt - held], np.float16)
                                    .astype(np.float32)], axis=1)
                    for r, x in zip(rows, (k, v))]
        self._unflush = (coded + self._evicted(), rows[0].astype(np.float16),
                         rows[1].astype(np.float16))
        return limit - w

    def _append_new(self, k, v) -> None:
        """Append the (centred, permuted) K/V of one update_and_fetch call to the core."""
        self._append_held()
        if self._gpu and k.shape[1] == 1:  # a decode step on the GPU store: a flush it makes
            self._unflush = None  # is not undone there (_flush_point), and one token is
            self._core.append(k, v)  # never split at a flush point
            return
        j = self._flush_point(k.shape[1], k, v)
        if not j:
            if not self._exact_flushes() or k.shape[1] > self.block_tokens:
                self._unflush = None
            self._core.append(k, v)
            return
        part = (lambda a: a) if self._gpu else np.ascontiguousarray  # noqa: E731
        self._core.append(part(k[:, :j]), part(v[:, :j]))
        self._held = (part(k[:, j:]), part(v[:, j:]), j)

    def _append_held(self) -> None:
        """Append the tokens held for the attention call (none came: trim, save, append)."""
        if self._held is not None:
            held, self._held = self._held, None
            self._core.append(held[0], held[1])

    def _undo_flush(self, n: int) -> bool:
        """Trim the last n tokens of the core by undoing the last window flush when the trim
        ends before its flush point (one-token steps would not have flushed yet); False when
        the plain trim is the exact one (or the flush cannot be undone: a deep trim)."""
        u = self._unflush
        if u is None:
            return False
        pos, keys, values = u  # the flushed block: tokens [pos, pos + block_tokens)
        bt, core, ev = self.block_tokens, self._core, self._evicted()
        size = int(core.size(0)) + ev
        new_size = size - n
        if new_size < pos or int(core.coded_tokens(0)) + ev != pos + bt:
            self._unflush = None
            return False
        if new_size > pos + self.fp16_window + bt:
            return False  # one-token steps flush here too
        if new_size > pos + bt:  # the window rows after the flushed block, as stored
            H = keys.shape[0]
            tail = [np.stack([core.decode(0, h, role, pos + bt - ev, new_size - pos - bt)
                              for h in range(H)]) for role in ("key", "value")]
            keys = np.concatenate([keys.astype(np.float32), tail[0]], axis=1)
            values = np.concatenate([values.astype(np.float32), tail[1]], axis=1)
        core.trim(size - pos)
        if new_size > pos:
            m = new_size - pos
            core.append(np.ascontiguousarray(keys[:, :m], dtype=np.float32),
                        np.ascontiguousarray(values[:, :m], dtype=np.float32))
        self._unflush = None
        return True

    def _core_options(self) -> dict:
        """Extra options of the C++ core (eviction for a sliding-window cache)."""
        return {}

    def _held_tokens(self) -> int:
        """Tokens the core accounts for (held, plus any it evicted)."""
        return int(self._core.size(0))

    def mask_window(self, mask: mx.array, n_q: int) -> int | None:
        """The window length of an mlx-lm attention mask for this cache's last n_q queries
        (None: plain causal)."""
        return _window_from_mask(mask, n_q, self.offset)


def _check_head_bits(bits, name: str) -> tuple[int, ...] | None:
    """None, or a non-empty sequence of integers in [1, 8] (per-KV-head widths) as a tuple."""
    if bits is None:
        return None
    if isinstance(bits, (str, bytes)) or not hasattr(bits, "__len__") or len(bits) == 0:
        raise ValueError(f"{name} must be None or a non-empty list of integers in [1, 8] "
                         f"(one per KV head), got {bits!r}")
    for h, b in enumerate(bits):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= int(b) <= 8:
            raise ValueError(f"{name}[{h}] must be an integer in [1, 8], got {b!r}")
    return tuple(int(b) for b in bits)


def _check_kv_head_offset(offset) -> int:
    """A cache's KV head offset (the core's kv_head_offset): an integer in [0, 65535]."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or \
            not 0 <= int(offset) <= 65535:
        raise ValueError(f"kv_head_offset must be an integer in [0, 65535] (the model's number "
                         f"of the cache's first KV head), got {offset!r}")
    return int(offset)


def _check_decay_sparse(decay_after, decay_bits, sparse_v, key_bits: int, value_bits: int,
                        key_method: str, value_method: str) -> tuple[int, int, float]:
    """Validated (decay_after, decay_bits, sparse_v) of a TurboQuantKVCache.

    Temporal decay re-quantizes code blocks with at least ``decay_after`` newer tokens to
    ``decay_bits`` (the core's ``decay_after`` / ``decay_bits``; the key split decays as two
    parts, each dropping key_bits - decay_bits bits, floor 1). ``sparse_v`` is the core
    attend's threshold (value rows below it times the max weight are skipped)."""
    for name, x in (("decay_after", decay_after), ("decay_bits", decay_bits)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {x!r}")
    decay_after, decay_bits = int(decay_after), int(decay_bits)
    if decay_after == 0 and decay_bits:
        raise ValueError(f"decay_bits={decay_bits} needs decay_after > 0 (temporal decay is off)")
    if decay_after:
        _check_low_width("decay_bits", decay_bits, "temporal decay", key_bits, value_bits,
                         key_method, value_method)
    if isinstance(sparse_v, bool) or not isinstance(sparse_v, (int, float, np.floating)) \
            or not 0.0 <= float(sparse_v) < 1.0:
        raise ValueError(f"sparse_v must be a number in [0, 1) (0 = dense), got {sparse_v!r}")
    return decay_after, decay_bits, float(sparse_v)


def _check_low_width(name: str, bits: int, feature: str, key_bits: int, value_bits: int,
                     key_method: str, value_method: str) -> None:
    """The fewer-bit width of temporal decay / mixed precision: below both roles' bits, on
    turboquant_mse keys and values (re-quantization keeps the rotation)."""
    lo = min(key_bits, value_bits)
    if not 1 <= bits < lo:
        raise ValueError(f"{name} must be in [1, {lo - 1}] (fewer than key_bits and value_bits "
                         f"= {key_bits}/{value_bits}), got {bits}")
    if key_method != "turboquant_mse" or value_method != "turboquant_mse":
        raise ValueError(f"{feature} needs turboquant_mse keys and values, got "
                         f"{key_method!r} / {value_method!r}")


def _check_mixed(mixed_bits, mixed_keep, key_bits: int, value_bits: int, key_method: str,
                 value_method: str, fp16_window: int, decay_after: int):
    """Validated (mixed_bits, mixed_keep, (group blocks, kept blocks)) of a TurboQuantKVCache.

    Importance-routed mixed precision: of every flush group of the fp16 window, the fraction
    ``mixed_keep`` of tokens that got the most attention while fp16 (the sum of their
    squared softmax weights) keep key_bits / value_bits, the rest are stored at
    ``mixed_bits`` (the core's mixed_group_blocks / mixed_keep_blocks, decay_bits =
    mixed_bits)."""
    if isinstance(mixed_bits, bool) or not isinstance(mixed_bits, (int, np.integer)) \
            or mixed_bits < 0:
        raise ValueError(f"mixed_bits must be an integer >= 0 (0 = off), got {mixed_bits!r}")
    if isinstance(mixed_keep, bool) or not isinstance(mixed_keep, (int, float, np.floating)):
        raise ValueError(f"mixed_keep must be a fraction in (0, 1), got {mixed_keep!r}")
    mixed_bits, mixed_keep = int(mixed_bits), float(mixed_keep)
    if not mixed_bits:
        if mixed_keep:
            raise ValueError(f"mixed_keep={mixed_keep} needs mixed_bits > 0 (mixed precision is "
                             "off)")
        return 0, 0.0, (0, 0)
    _check_low_width("mixed_bits", mixed_bits, "mixed precision", key_bits, value_bits,
                     key_method, value_method)
    if fp16_window <= 0:
        raise ValueError("mixed precision needs an fp16 window (fp16_window > 0): a token's "
                         "importance is measured while it is fp16")
    if decay_after:
        raise ValueError("mixed precision does not combine with temporal decay (decay_after)")
    return mixed_bits, mixed_keep, mixed_blocks(mixed_keep)


mixed_blocks = _presets.mixed_blocks  # the recipes' rule, kept under its old name here


# The mlx index arrays of the permutations in use (see _permute), by the permutation
# array's identity; each entry holds its array, so an id is not reused while cached.
_PERM_INDEX: dict = {}


def _permute(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """x (H, T, d) with the channels of head h in the order perm[h]; an mlx array stays one
    (the GPU path's keys and queries never leave the GPU). The mlx index arrays of a
    permutation are made once (a decode step permutes every layer's keys and queries).

    On a GPU kernel path, a block of several tokens (a prefill chunk's keys and queries)
    goes through the kernel set's ``permute_channels`` (turboquant.metal's ``permute``
    kernel: one thread per output element, bit for bit), where mlx's ``take_along_axis``
    with a broadcast index reads at a few percent of the memory bandwidth; one token (a
    decode step) stays with ``take_along_axis``, whose call costs the host less.
    ``TQ_GPU_PERMUTE=gather`` keeps ``take_along_axis`` everywhere (a benchmark's
    comparison)."""
    if isinstance(x, mx.array):
        entry = _perm_index(perm)
        kernel = _permute_kernel(x) if x.shape[1] > 1 else None
        if kernel is not None:
            return kernel(x, entry[2])
        return mx.take_along_axis(x, entry[1], axis=2)
    if x.shape[1] == 1:  # a decode step: one flat gather (take_along_axis builds index grids)
        H, _, d = x.shape
        flat = perm + np.arange(0, H * d, d)[:, None]
        return np.ascontiguousarray(x).reshape(H * d)[flat].reshape(H, 1, d)
    return np.ascontiguousarray(np.take_along_axis(x, perm[:, None, :], axis=2))


def _perm_index(perm: np.ndarray):
    """(perm, its int32 (H, 1, d) gather index, its uint32 (H, d) order) as mlx arrays, made
    once per permutation (a decode step permutes every layer's keys and queries)."""
    entry = _PERM_INDEX.get(id(perm))
    if entry is None or entry[0] is not perm:
        if len(_PERM_INDEX) >= 4096:  # bounded: models x layers x query layouts
            _PERM_INDEX.clear()
        entry = _PERM_INDEX[id(perm)] = (perm, mx.array(perm[:, None, :].astype(np.int32)),
                                         mx.array(perm.astype(np.uint32)))
    return entry


def _centre_kernel(k, v):
    """The GPU store's kernel set's ``centre_rows`` where a decode step's centring takes it
    (turboquant.metal's on a GPU: the centring, channel order and fp16 rounding of both
    roles in one launch), else None (the fused mlx element-wise kernels and a gather).
    ``TQ_GPU_CENTRE=mlx`` keeps those (a benchmark's comparison)."""
    fn = getattr(_mlx_metal.METAL_KERNELS, "centre_rows", None)
    if (fn is None or k.dtype not in (mx.float16, mx.bfloat16) or v.dtype != k.dtype
            or _mlx_metal.metal.getenv("TQ_GPU_CENTRE", "") == "mlx"
            or gpu_path.active_path() == "cpu"):
        return None
    return fn


def _permute_kernel(x):
    """The GPU store's kernel set's ``permute_channels`` where _permute takes it for the mlx
    array x (turboquant.metal's on a GPU), else None."""
    fn = getattr(_mlx_metal.METAL_KERNELS, "permute_channels", None)
    if (fn is None or x.dtype not in (mx.float16, mx.bfloat16, mx.float32)
            or x.size * x.dtype.size >= (1 << 33)  # the kernel's 32-bit word index
            or _mlx_metal.metal.getenv("TQ_GPU_PERMUTE", "") == "gather"
            or gpu_path.active_path() == "cpu"):
        return None
    return fn


@functools.lru_cache(maxsize=256)
def _segment_plan(fp16_sinks: int, fp16_window: int, block_tokens: int):
    return _core.SegmentPlan(fp16_sinks=fp16_sinks, fp16_window=fp16_window,
                             block_tokens=block_tokens)


def _first_tokens(x, n: int):
    """Tokens [0, n) of a pending (H, T, d) block; a NumPy slice is made contiguous again."""
    y = x[:, :n]
    return y if isinstance(y, mx.array) else np.ascontiguousarray(y)


def _run_core_calls(calls):
    """Runs a generator of core calls (``TurboQuantKVCache._attend_calls``): each yielded
    ``(core, q, kwargs)`` is answered with ``core.attend(q, **kwargs)``; returns its result."""
    try:
        core, q, kw = next(calls)
        while True:
            core, q, kw = calls.send(core.attend(q, **kw))
    except StopIteration as done:
        return done.value



def _save_core(core) -> np.ndarray:
    return np.frombuffer(core.to_bytes(), dtype=np.uint8)


def _load_core(blob: np.ndarray):
    return _core.KVCache.from_bytes(blob.tobytes())
