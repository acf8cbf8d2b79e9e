"""turboquant: 2-4 bit KV-cache compression with attention on the compressed codes.

Quantizers (TurboQuant MSE/prod, PolarQuant, QJL) live in the C++ core, exposed here.
The README has the quick starts; the pages in docs/ describe each part.
"""

from turboquant._core import (  # noqa: F401
    Codebook,
    FormatError,
    Quantizer,
    __version__,
    bytes_per_vector,
    codebook,
    effective_bits,
    get_num_threads,
    methods,
    pack_indices,
    select_outlier_channels,
    set_num_threads,
    unpack_indices,
)
from turboquant._core import KVCache  # noqa: F401
from turboquant.artifacts import InMemoryArtifactStore, MemoryArtifactStore, NpyArtifactStore  # noqa: F401
from turboquant.builder import KVCacheBuilder  # noqa: F401
from turboquant.kv_cache import CompressedKVCache  # noqa: F401
from turboquant.observers import DistortionObserver, LatencyObserver, MemoryObserver  # noqa: F401

from turboquant._core import backends as _core_backends
from turboquant._core import build_info as _core_build_info


# Old names of public classes: still importable, with a DeprecationWarning naming the new one.
_RENAMED = {"TurboQuantKVCache": "CompressedKVCache"}


def __getattr__(name: str):
    """``turboquant.TurboQuantKVCache`` (the builder's cache before it was renamed, distinct
    from the mlx-lm layer cache ``turboquant.mlx_lm.TurboQuantKVCache``) still resolves, to
    :class:`CompressedKVCache`, with a DeprecationWarning."""
    new = _RENAMED.get(name)
    if new is None:
        raise AttributeError(f"module 'turboquant' has no attribute {name!r}")
    import warnings

    warnings.warn(f"turboquant.{name} is deprecated: use turboquant.{new} (the same class); "
                  f"the mlx-lm layer cache is turboquant.mlx_lm.TurboQuantKVCache",
                  DeprecationWarning, stacklevel=2)
    return globals()[new]


def backends() -> list[str]:
    """The backends a KV cache can run on here: the C++ core's ("cpu", and "metal" on a
    Mac with a Metal device), plus "cuda" when mlx has a CUDA device and the GPU kernels
    passed their first-use self-test (the mlx-resident code store on mx.fast.cuda_kernel)."""
    from turboquant import gpu_path

    found = list(_core_backends())
    if gpu_path.active_path() == "cuda":
        found.append("cuda")
    return found


def build_info() -> dict:
    """Compiler, SIMD targets and backends of this build; "mlx_kernels" says whether mlx
    arrays are processed by the GPU kernels ("metal" or "cuda") or by the C++ CPU core
    ("cpu"), and "mlx_kernels_reason" why; on the CUDA path "cuda_kernel_cache" says whether
    compiled kernels are kept across processes (turboquant.cuda_cache.status())."""
    from turboquant import gpu_path

    info = _core_build_info()
    info["backends"] = backends()
    info["mlx_kernels"] = gpu_path.active_path()
    info["mlx_kernels_reason"] = gpu_path.path_reason()
    if info["mlx_kernels"] == "cuda":
        from turboquant import cuda_cache

        info["cuda_kernel_cache"] = cuda_cache.status()
    return info


__all__ = [
    "Codebook",
    "FormatError",
    "Quantizer",
    "__version__",
    "backends",
    "build_info",
    "bytes_per_vector",
    "codebook",
    "effective_bits",
    "get_num_threads",
    "methods",
    "pack_indices",
    "select_outlier_channels",
    "set_num_threads",
    "unpack_indices",
    "KVCache",
    "KVCacheBuilder",
    "CompressedKVCache",
    "NpyArtifactStore",
    "MemoryArtifactStore",
    "InMemoryArtifactStore",
    "LatencyObserver",
    "MemoryObserver",
    "DistortionObserver",
]
