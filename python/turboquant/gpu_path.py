"""The GPU path this process takes, and its safe first use.

:func:`turboquant.metal.candidate_path` picks the GPU kernel path a machine could take
(``"metal"``, ``"cuda"`` or ``"cpu"``). :func:`active_path` is the path the caches take:
the candidate GPU path only after its first-use self-test
(:func:`turboquant.mlx_metal.self_test`: every kernel compiled and run once against the
C++ core) passed; otherwise ``"cpu"``, with one ``RuntimeWarning`` naming the error, so a
kernel that fails to compile or computes wrong codes never breaks a generation.
``turboquant.build_info()`` reports the choice under ``"mlx_kernels"`` and why
(:func:`path_reason`) under ``"mlx_kernels_reason"``.

This module sits above both the kernels (:mod:`turboquant.metal`) and the store built on
them (:mod:`turboquant.mlx_metal`), which the self-test runs; neither imports it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

from turboquant import metal  # its functions looked up on the module (tests replace them)

__all__ = ["active_path", "path_reason", "self_test_result"]

# The outcome of the first-use self-test per target: None (passed) or the error's text.
_SELF_TESTS: dict[str, str | None] = {}


def self_test_result(target: str) -> str | None:
    """Runs the self-test of ``target``'s kernels once per process (cached): None when every
    kernel compiled and matched the C++ core, else the error."""
    metal._check_target(target)
    if target not in _SELF_TESTS:
        from turboquant import mlx_metal  # the store (needs mlx: imported on first use)

        _SELF_TESTS[target] = mlx_metal.self_test()
    return _SELF_TESTS[target]


@functools.lru_cache(maxsize=None)
def active_path() -> str:
    """"metal" or "cuda" when mlx arrays are processed by these kernels on the GPU (the
    candidate path, once its self-test passed), else "cpu" (the C++ CPU core)."""
    path = metal.candidate_path()
    if path == "cpu":
        return "cpu"
    error = self_test_result(path)
    if error is None:
        return path
    warnings.warn(f"turboquant: the {path} kernels failed their first-use self-test ({error}); "
                  "the C++ CPU core holds the KV caches instead", RuntimeWarning, stacklevel=2)
    return "cpu"


def path_reason() -> str:
    """Why :func:`active_path` took its path, in words (``build_info()["mlx_kernels_reason"]``)."""
    env = os.environ.get("TURBOQUANT_MLX_KERNELS")
    path = metal.candidate_path()
    if path != "cpu":
        if active_path() == path:
            return f"{path}: mlx has a {path} device and the kernels passed their self-test"
        return f"cpu: the {path} kernels failed their first-use self-test ({_SELF_TESTS[path]})"
    if env is not None and env.strip().lower() not in ("", "auto"):
        return f"cpu: TURBOQUANT_MLX_KERNELS={env.strip()} (no such device or the choice is cpu)"
    if metal.source_dir() is None:
        return "cpu: the GPU kernel sources (metal/*.metal) are not installed"
    if importlib.util.find_spec("mlx") is None:
        return "cpu: mlx is not installed"
    return "cpu: mlx has no Metal or CUDA device here"
