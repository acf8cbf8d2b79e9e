"""turboquant: 2-4 bit KV-cache compression with attention on the compressed codes.

Quantizers (TurboQuant MSE/prod, PolarQuant, QJL) live in the C++ core, exposed here.
See README.md for the API tour.
"""

from turboquant._core import (  # noqa: F401
    Codebook,
    FormatError,
    Quantizer,
    __version__,
    backends,
    build_info,
    codebook,
    methods,
    pack_indices,
    unpack_indices,
)
from turboquant._core import KVCache  # noqa: F401
from turboquant.artifacts import InMemoryArtifactStore, MemoryArtifactStore, NpyArtifactStore  # noqa: F401
from turboquant.builder import KVCacheBuilder  # noqa: F401
from turboquant.kv_cache import TurboQuantKVCache  # noqa: F401
from turboquant.observers import DistortionObserver, LatencyObserver, MemoryObserver  # noqa: F401

__all__ = [
    "Codebook",
    "FormatError",
    "Quantizer",
    "__version__",
    "backends",
    "build_info",
    "codebook",
    "methods",
    "pack_indices",
    "unpack_indices",
    "KVCache",
    "KVCacheBuilder",
    "TurboQuantKVCache",
    "NpyArtifactStore",
    "MemoryArtifactStore",
    "InMemoryArtifactStore",
    "LatencyObserver",
    "MemoryObserver",
    "DistortionObserver",
]
