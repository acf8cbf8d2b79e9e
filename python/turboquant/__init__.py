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
    get_num_threads,
    methods,
    pack_indices,
    set_num_threads,
    unpack_indices,
)

__all__ = [
    "Codebook",
    "FormatError",
    "Quantizer",
    "__version__",
    "backends",
    "build_info",
    "codebook",
    "get_num_threads",
    "methods",
    "pack_indices",
    "set_num_threads",
    "unpack_indices",
]
