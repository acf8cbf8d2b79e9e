"""``KVCacheBuilder``: the fluent builder of mlx-kv-quant, extended (DESIGN §4).

    cache = (KVCacheBuilder().with_method("turboquant_mse").with_head_dim(128)
             .with_bit_width(3).with_seed(42).build())

Everything is validated in ``build()``, with a message naming the bad value and the range.

Mapping of the mlx-kv-quant arguments onto the C++ cache:

- ``with_method(m)`` sets the key method. Values need a reconstruction, not an inner-product
  estimate, so they use ``m`` when it reconstructs (``turboquant_mse``, ``polar``) and
  ``turboquant_mse`` for ``turboquant_prod`` / ``qjl``; ``with_value_method`` overrides.
- ``with_bit_width(b)`` sets key and value bits; ``with_key_bits`` / ``with_value_bits``
  set one side. ``with_bit_width(inlier=i, outlier=o)`` with i != o asks for the outlier
  split (``n_outlier_channels`` channels at ``o`` bits, the rest at ``i``): this maps to the
  outlier split of quantizer_outlier.h for keys and values (the first ``n`` channels unless
  the cache is given explicit ``outlier_channels``); ``inlier=i`` alone (or i == o) is plain
  ``i``-bit quantization. ``with_split_angle_bits(8 | 16)`` sets the width of the split's
  per-vector part angle (8 by default; 16 is the layout of cache files before version 4).
- ``with_precision(dtype)``: the dtype of ``attend()`` output (float16/float32, NumPy or
  mlx; mlx bfloat16 too); storage is always codes + fp16 norms.
- ``with_preset(name)``: a named recipe of turboquant.presets (``tq3``, ``tq3-mixed``, ...),
  as far as a cache of raw vectors holds it; later ``with_*`` calls override it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from turboquant import _core
from turboquant.artifacts import ArtifactKey, ArtifactStore, export_artifacts, install_artifacts
from turboquant.kv_cache import CompressedKVCache

_RECONSTRUCTING = ("turboquant_mse", "polar")
_ROTATIONS = ("auto", "hadamard", "hadamard1", "dense")
_DESIGN_METHODS = ("turboquant_mse", "turboquant_prod", "polar", "qjl")


def _precision_name(p: Any) -> str:
    if type(p).__module__.startswith("mlx"):
        return str(p).rsplit(".", 1)[-1]
    try:
        return np.dtype(p).name
    except TypeError:
        return repr(p)


# How to get mlx with each GPU device, for the builder's refusals.
_INSTALL = {"metal": "pip install mlx, on Apple silicon", "cuda": "pip install 'mlx[cuda13]'"}


class KVCacheBuilder:
    def __init__(self) -> None:
        self._method = "turboquant_mse"
        self._value_method: str | None = None
        self._head_dim = 128
        self._key_bits: Any = 3
        self._value_bits: Any = 3
        self._inlier: Any = None
        self._outlier: Any = None
        self._n_outlier = 0
        self._split_angle_bits = 8
        self._jl_dim = 0
        self._seed: Any = 0
        self._precision: Any = np.float32
        self._store: ArtifactStore | None = None
        self._layers = 1
        self._q_heads = 1
        self._kv_heads = 1
        self._kv_head_offset = 0
        self._rotation: str | None = None  # None: presets.default_rotation(head_dim)
        self._backend = "auto"
        self._observers: list[Any] = []
        self._block_tokens = 256
        self._fp16_window = 0
        self._fp16_layers: list[int] = []
        self._fp16_sinks = 0
        self._decay_after = 0
        self._decay_bits = 0
        self._max_coded_tokens = 0
        self._mixed = (0, 0)  # (group blocks, kept blocks); low width in _decay_bits
        self._sparse_v = 0.0
        self._max_tokens = 0
        self._norm_correction = False

    # --- mlx-kv-quant ----------------------------------------------------------------------
    def with_method(self, method: str) -> KVCacheBuilder:
        self._method = method
        return self

    def with_head_dim(self, head_dim: int) -> KVCacheBuilder:
        self._head_dim = head_dim
        return self

    def with_bit_width(self, bits: int | None = None, *, inlier: int | None = None,
                       outlier: int | None = None) -> KVCacheBuilder:
        if bits is not None and (inlier is not None or outlier is not None):
            raise ValueError("with_bit_width takes either bits or inlier=/outlier=, not both")
        if bits is None and inlier is None:
            raise ValueError("with_bit_width needs bits or inlier=")
        if bits is not None:
            self._key_bits = self._value_bits = bits
            self._inlier = self._outlier = None
        else:
            self._inlier, self._outlier = inlier, outlier
            self._key_bits = self._value_bits = inlier
        return self

    def with_jl_dim(self, jl_dim: int) -> KVCacheBuilder:
        self._jl_dim = jl_dim
        return self

    def with_n_outlier_channels(self, n: int) -> KVCacheBuilder:
        self._n_outlier = n
        return self

    def with_split_angle_bits(self, bits: int) -> KVCacheBuilder:
        """Width of the outlier split's per-vector part angle: 8 (default) or 16."""
        self._split_angle_bits = bits
        return self

    def with_seed(self, seed: int) -> KVCacheBuilder:
        self._seed = seed
        return self

    def with_precision(self, dtype: Any) -> KVCacheBuilder:
        self._precision = dtype
        return self

    def with_artifact_store(self, store: ArtifactStore) -> KVCacheBuilder:
        self._store = store
        return self

    # --- extensions --------------------------------------------------------------------
    def with_key_bits(self, bits: int) -> KVCacheBuilder:
        self._key_bits = bits
        return self

    def with_value_bits(self, bits: int) -> KVCacheBuilder:
        self._value_bits = bits
        return self

    def with_value_method(self, method: str) -> KVCacheBuilder:
        self._value_method = method
        return self

    def with_layers(self, n_layers: int) -> KVCacheBuilder:
        self._layers = n_layers
        return self

    def with_heads(self, n_q_heads: int, n_kv_heads: int | None = None) -> KVCacheBuilder:
        self._q_heads = n_q_heads
        self._kv_heads = n_q_heads if n_kv_heads is None else n_kv_heads
        return self

    def with_kv_head_offset(self, offset: int) -> KVCacheBuilder:
        """The cache holds the model's KV heads offset, offset + 1, ... (a tensor-parallel
        rank's slice): head h draws the random streams of model head offset + h, so it encodes
        exactly as that head of a whole-model cache. 0 (default): the heads from the first."""
        self._kv_head_offset = offset
        return self

    def with_rotation(self, rotation: str) -> KVCacheBuilder:
        """``"hadamard1"``, ``"hadamard"``, ``"dense"`` or ``"auto"`` (two Hadamard rounds on
        power-of-two head dims, dense on others). Without it: ``"hadamard1"`` (one round) on
        power-of-two head dims, ``"auto"`` on others
        (:func:`turboquant.presets.default_rotation`)."""
        self._rotation = rotation
        return self

    def _resolved_rotation(self) -> str:
        from turboquant.presets import default_rotation

        return default_rotation(self._head_dim) if self._rotation is None else self._rotation

    def with_backend(self, backend: str) -> KVCacheBuilder:
        self._backend = backend
        return self

    def with_observer(self, observer: Any) -> KVCacheBuilder:
        self._observers.append(observer)
        return self

    def with_block_tokens(self, block_tokens: int) -> KVCacheBuilder:
        self._block_tokens = block_tokens
        return self

    def with_fp16_window(self, n: int, layers: Any = ()) -> KVCacheBuilder:
        """Keep the most recent n tokens of every layer (and all tokens of `layers`) in fp16."""
        self._fp16_window = n
        self._fp16_layers = list(layers)
        return self

    def with_fp16_sinks(self, n: int) -> KVCacheBuilder:
        """Keep the first n tokens of every (non-fp16) layer in fp16 forever (attention sinks)."""
        self._fp16_sinks = n
        return self

    def with_decay(self, after: int, bits: int) -> KVCacheBuilder:
        """Re-quantize code blocks to `bits` once `after` newer tokens follow them (turboquant_mse)."""
        self._decay_after = after
        self._decay_bits = bits
        return self

    def with_mixed_precision(self, low_bits: int, group_blocks: int = 2,
                             keep_blocks: int = 1) -> KVCacheBuilder:
        """Importance-routed mixed precision (needs with_fp16_window): of every group of
        group_blocks flushed blocks, the keep_blocks × block_tokens most attended tokens keep
        the key/value bits, the others are stored at low_bits (turboquant_mse)."""
        self._mixed = (group_blocks, keep_blocks)
        self._decay_bits = low_bits
        return self

    def with_eviction(self, max_coded_tokens: int) -> KVCacheBuilder:
        """Drop the oldest code blocks (after the sinks) beyond max_coded_tokens (StreamingLLM)."""
        self._max_coded_tokens = max_coded_tokens
        return self

    def with_sparse_v(self, threshold: float) -> KVCacheBuilder:
        """Skip value rows whose attention weight is below threshold x the query's max weight."""
        self._sparse_v = threshold
        return self

    def with_norm_correction(self, on: bool = True) -> KVCacheBuilder:
        """Store each vector's norm divided by its decoded unit vector's norm, so decoded keys
        and values keep their norms (turboquant_mse keys and values; same bytes)."""
        self._norm_correction = bool(on)
        return self

    def with_preset(self, name: str) -> KVCacheBuilder:
        """The settings of a named recipe (turboquant.presets: tq4, tq3, tq3-mixed, tq2.5,
        tq2, codes-only) that a cache of raw vectors can hold: key/value bits and method,
        norm correction, fp16 sinks and window with their flush block, mixed precision,
        decay, sparse V. Later with_* calls override them. Centring and the key split over
        RoPE pairs need the model's queries and RoPE layout: the mlx-lm cache
        (``make_prompt_cache(model, preset=name)``) applies them."""
        from turboquant import presets
        from turboquant.presets import mixed_blocks

        p = presets.get(name)
        self._method, self._value_method = p.method, None
        self._key_bits, self._value_bits = p.key_bits, p.value_bits
        self._inlier = self._outlier = None
        self._norm_correction = p.debias
        self._fp16_sinks, self._fp16_window = p.fp16_sinks, p.fp16_window
        self._decay_after, self._decay_bits = p.decay_after, p.decay_bits
        self._mixed = (0, 0)
        if p.mixed_bits:
            self._mixed, self._decay_bits = mixed_blocks(p.mixed_keep), p.mixed_bits
        # the flush block of the mlx-lm cache: 16 with mixed precision, 32 with fp16 tokens
        if p.block_tokens is not None:
            self._block_tokens = p.block_tokens
        elif p.mixed_bits:
            self._block_tokens = 16
        elif p.fp16_window or p.fp16_sinks or p.decay_after:
            self._block_tokens = 32
        self._sparse_v = p.sparse_v
        return self

    def with_max_tokens(self, max_tokens: int) -> KVCacheBuilder:
        self._max_tokens = max_tokens
        return self

    # --- build -------------------------------------------------------------------------
    def _validate(self) -> tuple[str, str]:
        def is_int(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def check_int(name: str, x: Any, lo: int, hi: int) -> None:
            if not is_int(x) or not lo <= x <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {x!r}"
                                 if not is_int(x) else f"{name} must be in [{lo}, {hi}], got {x}")

        methods = _core.methods()
        if self._method not in methods:
            if self._method in _DESIGN_METHODS:
                raise NotImplementedError(
                    f"method {self._method!r} is not registered in this build of the C++ core "
                    f"(registered: {', '.join(methods)})")
            raise ValueError(f"unknown method {self._method!r}; available: {', '.join(methods)}")
        value_method = self._value_method or (self._method if self._method in _RECONSTRUCTING
                                              else "turboquant_mse")
        if value_method not in methods:
            raise ValueError(f"unknown value method {value_method!r}; available: {', '.join(methods)}")
        check_int("head_dim", self._head_dim, 16, 512)
        check_int("key bits", self._key_bits, 1, 8)
        check_int("value bits", self._value_bits, 1, 8)
        if self._outlier is not None:
            check_int("outlier bits", self._outlier, 1, 8)
        check_int("jl_dim", self._jl_dim, 0, 4096)
        check_int("n_outlier_channels", self._n_outlier, 0, self._head_dim - 1)
        if self._split_angle_bits not in (8, 16) or isinstance(self._split_angle_bits, bool):
            raise ValueError(f"split_angle_bits must be 8 or 16, got {self._split_angle_bits!r}")
        check_int("seed", self._seed, 0, 2**64 - 1)
        check_int("n_layers", self._layers, 1, 65536)
        check_int("n_q_heads", self._q_heads, 1, 1 << 20)
        check_int("n_kv_heads", self._kv_heads, 1, 65536)
        if self._q_heads % self._kv_heads:
            raise ValueError(f"n_q_heads ({self._q_heads}) must be a multiple of n_kv_heads ({self._kv_heads})")
        # the model's head numbers offset .. offset + n_kv_heads - 1 stay below 65536
        check_int("kv_head_offset (65536 - n_kv_heads at most)", self._kv_head_offset, 0,
                  65536 - self._kv_heads)
        check_int("block_tokens", self._block_tokens, 1, 1 << 20)
        check_int("fp16_window", self._fp16_window, 0, 1 << 24)
        for layer in self._fp16_layers:
            check_int("fp16_layers entry", layer, 0, self._layers - 1)
        check_int("fp16_sinks", self._fp16_sinks, 0, 1 << 24)
        check_int("decay_after", self._decay_after, 0, 1 << 40)
        if self._max_coded_tokens:
            check_int("max_coded_tokens", self._max_coded_tokens, self._block_tokens, 1 << 40)
        if self._mixed[0]:
            check_int("mixed precision group_blocks", self._mixed[0], 2, 4096)
            check_int("mixed precision keep_blocks", self._mixed[1], 1, self._mixed[0] - 1)
            check_int("mixed precision low_bits", self._decay_bits, 1,
                      min(self._key_bits, self._value_bits) - 1)
            if not self._fp16_window:
                raise ValueError("mixed precision needs with_fp16_window(n > 0): token importance "
                                 "is measured while tokens are fp16")
            if self._decay_after or self._max_coded_tokens:
                raise ValueError("mixed precision does not combine with decay or eviction")
        elif self._decay_after:
            check_int("decay_bits", self._decay_bits, 1, min(self._key_bits, self._value_bits) - 1)
        elif self._decay_bits:
            raise ValueError(f"decay_bits ({self._decay_bits}) needs decay_after > 0")
        if not isinstance(self._sparse_v, (int, float)) or isinstance(self._sparse_v, bool) \
                or not 0.0 <= float(self._sparse_v) < 1.0:
            raise ValueError(f"sparse_v threshold must be a number in [0, 1), got {self._sparse_v!r}")
        check_int("max_tokens", self._max_tokens, 0, 2**62)
        if self._rotation is not None and self._rotation not in _ROTATIONS:
            raise ValueError(f"rotation must be one of {_ROTATIONS}, got {self._rotation!r}")
        if self._rotation in ("hadamard", "hadamard1") and self._head_dim & (self._head_dim - 1):
            raise ValueError(f"{self._rotation} rotation needs a power-of-two head_dim, got "
                             f"{self._head_dim} (use 'dense' or 'auto')")
        name = _precision_name(self._precision)
        if name not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"precision must be float16, float32 (NumPy or mlx) or mlx bfloat16, got {name}")
        if name == "bfloat16" and not type(self._precision).__module__.startswith("mlx"):
            raise ValueError("bfloat16 precision needs mlx (mlx.core.bfloat16)")
        if self._store is not None and not isinstance(self._store, ArtifactStore):
            raise TypeError("with_artifact_store needs an ArtifactStore (NpyArtifactStore, MemoryArtifactStore)")
        if self._split():
            if self._n_outlier < 1:
                raise ValueError("with_bit_width(inlier=, outlier=) needs with_n_outlier_channels(n) with n >= 1")
        return self._method, value_method

    def _norm_correction_on(self) -> bool:
        key_method, value_method = self._method, self._value_method or self._method
        return self._norm_correction and key_method == value_method == "turboquant_mse"

    def _split(self) -> bool:
        return self._outlier is not None and self._outlier != self._inlier

    def build(self) -> CompressedKVCache:
        key_method, value_method = self._validate()
        requested = self._backend
        if requested not in ("auto", "cpu", "metal", "cuda"):
            raise ValueError(f"backend must be 'auto', 'cpu', 'metal' or 'cuda', got "
                             f"{requested!r}")
        from turboquant import gpu_path

        if requested == "cuda":
            # The C++ core has no CUDA backend: "cuda" is the mlx-resident store of
            # mlx_metal.py on the same kernels compiled by mx.fast.cuda_kernel.
            backend, explicit = "cuda", True
        else:
            backend = _core.resolve_backend(requested)  # honours TURBOQUANT_BACKEND for "auto"
            env = os.environ.get("TURBOQUANT_BACKEND", "auto")
            explicit = requested != "auto" or env != "auto"
            if backend == "cpu" and not explicit and gpu_path.active_path() == "cuda":
                backend = "cuda"  # "auto" on an NVIDIA GPU: the CUDA store when it can serve
        if backend != "cpu":
            # "metal" (only ever resolved on a Mac with a Metal device) or "cuda": the cache is
            # the mlx-resident store of mlx_metal.py on the turboquant.metal kernels, when it
            # can hold this configuration and mlx has such a device; otherwise "auto" falls
            # back to the CPU cache and an explicit request is refused, saying why.
            why = self._metal_unsupported(key_method, value_method)
            if why is None and gpu_path.active_path() != backend:
                name = {"metal": "Metal", "cuda": "CUDA"}[backend]
                why = (f"the {name} KV cache runs on mlx: it needs mlx with a {name} device "
                       f"({_INSTALL[backend]}; TURBOQUANT_MLX_KERNELS not 'cpu'); here: "
                       f"{gpu_path.path_reason()}")
            if why is None:
                return self._metal_cache(key_method, value_method, backend=backend)
            if explicit:
                raise RuntimeError(f"backend {backend!r} cannot serve this cache: {why}; "
                                   "use with_backend('cpu')")
            backend = "cpu"
        core = _core.KVCache(
            self._head_dim, n_layers=self._layers, n_q_heads=self._q_heads, n_kv_heads=self._kv_heads,
            key_method=key_method, key_bits=int(self._key_bits), value_method=value_method,
            value_bits=int(self._value_bits), seed=int(self._seed),
            rotation=self._resolved_rotation(),
            jl_dim=int(self._jl_dim), block_tokens=int(self._block_tokens), max_tokens=int(self._max_tokens),
            n_outlier_channels=int(self._n_outlier) if self._split() else 0,
            outlier_bits=int(self._outlier) if self._split() else 0,
            split_angle_bits=int(self._split_angle_bits),
            fp16_window=int(self._fp16_window), fp16_layers=[int(x) for x in self._fp16_layers],
            fp16_sinks=int(self._fp16_sinks), decay_after=int(self._decay_after), decay_bits=int(self._decay_bits),
            max_coded_tokens=int(self._max_coded_tokens), mixed_group_blocks=int(self._mixed[0]),
            mixed_keep_blocks=int(self._mixed[1]), norm_correction=self._norm_correction_on(),
            kv_head_offset=int(self._kv_head_offset))
        loaded = {}
        if self._store is not None:
            for role, method, bits in (("key", key_method, self._key_bits), ("value", value_method, self._value_bits)):
                # An outlier split has its own (block-diagonal) rotations: key it separately.
                name = f"{method}+outliers{self._n_outlier}@{self._outlier}" if self._split() else method
                key = ArtifactKey(name, self._head_dim, int(bits), int(self._seed))
                arrays = self._store.get(key)
                n = install_artifacts(core, role, arrays) if arrays is not None else 0
                loaded[role] = n
                if n < self._layers * self._kv_heads:
                    self._store.update(key, export_artifacts(core, role))
        desc = {"key_method": key_method, "value_method": value_method, "backend": backend,
                "precision": _precision_name(self._precision), "artifacts_loaded": loaded,
                "env_backend": os.environ.get("TURBOQUANT_BACKEND")}
        return CompressedKVCache(core, precision=self._precision, observers=self._observers,
                                 backend=backend, description=desc, sparse_v=float(self._sparse_v))

    # --- the Metal cache (Apple) ---------------------------------------------------------
    def _metal_unsupported(self, key_method: str, value_method: str) -> str | None:
        """None when the mlx-resident Metal store can hold the configured cache, else why not."""
        from turboquant.mlx_metal import store_supports

        why = store_supports(self._head_dim, key_method, value_method, self._resolved_rotation())
        if why:
            return why
        extras = [name for name, on in (
            ("an outlier split", self._split()), ("fp16 layers", bool(self._fp16_layers)),
            ("decay", self._decay_after > 0), ("eviction", self._max_coded_tokens > 0),
            ("an artifact store", self._store is not None),
            ("sparse V", self._sparse_v > 0), ("max_tokens", self._max_tokens > 0),
            ("jl_dim", self._jl_dim > 0)) if on]
        if extras:
            return "the Metal store does not support " + ", ".join(extras)
        return None

    def _metal_cache(self, key_method: str, value_method: str, kernels: Any = None,
                     backend: str = "metal") -> CompressedKVCache:
        """The cache on the mlx-resident store (turboquant.mlx_metal.MetalKVCache) with the
        given kernel set (default turboquant.metal: an mlx Metal or CUDA device; the tests
        pass the reference kernels). build() returns this for backend "metal" or "cuda"."""
        from turboquant.mlx_metal import MetalKVCache, MetalCompressedKVCache

        core = MetalKVCache(self._head_dim, n_layers=self._layers, n_q_heads=self._q_heads,
                            n_kv_heads=self._kv_heads, key_method=key_method,
                            key_bits=int(self._key_bits),
                            value_method=value_method, value_bits=int(self._value_bits),
                            seed=int(self._seed), rotation=self._resolved_rotation(),
                            block_tokens=int(self._block_tokens),
                            fp16_window=int(self._fp16_window), fp16_sinks=int(self._fp16_sinks),
                            norm_correction=self._norm_correction_on(), kernels=kernels,
                            kv_head_offset=int(self._kv_head_offset),
                            **(dict(mixed_group_blocks=int(self._mixed[0]),
                                    mixed_keep_blocks=int(self._mixed[1]),
                                    decay_bits=int(self._decay_bits)) if self._mixed[0] else {}))
        desc = {"key_method": key_method, "value_method": value_method, "backend": backend,
                "precision": _precision_name(self._precision), "artifacts_loaded": {},
                "env_backend": os.environ.get("TURBOQUANT_BACKEND"),
                "store": "mlx (turboquant.mlx_metal.MetalKVCache)"}
        return MetalCompressedKVCache(core, precision=self._precision, observers=self._observers,
                                      backend=backend, description=desc)
