"""Prompt-cache files: mlx-lm's ``save_prompt_cache`` / ``load_prompt_cache`` for caches
holding TurboQuant layers, the save crash-safe (turboquant._atomic: a killed save leaves
the previous file or none, never a truncated one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from turboquant._atomic import atomic_path

__all__ = ["load_prompt_cache", "save_prompt_cache"]


def save_prompt_cache(path: str | os.PathLike, cache: list[Any],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write ``cache`` (a list of per-layer caches) to ``path``; like mlx, a name without
    the ``.safetensors`` extension gets it. Returns the path written."""
    from mlx_lm.models.cache import save_prompt_cache as _save

    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    with atomic_path(p) as tmp:
        _save(str(tmp), cache, metadata)
    return p


def load_prompt_cache(path: str | os.PathLike, return_metadata: bool = False):
    """mlx-lm's ``load_prompt_cache``, with the TurboQuant cache class registered."""
    from mlx_lm.models.cache import load_prompt_cache as _load

    from turboquant import mlx_lm as _tq_mlx_lm

    _tq_mlx_lm.install_attention_route()
    return _load(str(path), return_metadata=return_metadata)
