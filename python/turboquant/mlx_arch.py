"""The architecture checks of the mlx-lm integration: which layers of a model a TurboQuant
cache can serve (:func:`check_architecture`), the RoPE channel pairs of its attention, and
the span of a sharded model that one process holds (pipeline stage, tensor-parallel rank)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from mlx_lm.models import cache as _mlx_cache

from turboquant.mlx_route import UnsupportedArchitectureError, _original_sdpa, _routed_sdpa

__all__ = ["UnsupportedArchitectureError", "check_architecture", "pipeline_span",
           "rope_pairs_of", "tensor_parallel_span"]


_MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim")


def _model_type(model) -> str:
    args = getattr(model, "args", None)
    return str(getattr(args, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1])


def check_architecture(model, base_cache: Sequence[Any] | None = None) -> list[int]:
    """Raise :class:`UnsupportedArchitectureError` unless every attention layer of ``model``
    can run on a TurboQuant cache; return the indices of layers that get one (plain
    full-attention ``KVCache`` layers). Sliding-window layers (``RotatingKVCache``) are not
    listed: :func:`make_prompt_cache` gives them a
    :class:`turboquant.mlx_rotating.TurboQuantRotatingKVCache` (or keeps them fp16)."""
    name = _model_type(model)
    for _, m in model.named_modules():
        a = getattr(m, "args", None) or m
        for f in _MLA_FIELDS:
            if getattr(a, f, None):
                raise UnsupportedArchitectureError(
                    f"{name}: multi-head latent attention (MLA, {f}={getattr(a, f)}) caches a "
                    "compressed latent and rebuilds K/V from it per head; TurboQuant compresses "
                    "per-head keys/values and cannot serve it")
    if base_cache is None:
        base_cache = _mlx_cache.make_prompt_cache(model)
    compressible, sliding = [], 0
    for i, c in enumerate(base_cache):
        kind = type(c).__name__
        if type(c) is _mlx_cache.KVCache:
            compressible.append(i)
        elif isinstance(c, _mlx_cache.RotatingKVCache):
            sliding += 1
        elif isinstance(c, (_mlx_cache.ArraysCache, _mlx_cache.CacheList)) or \
                "Mamba" in kind or "Arrays" in kind:
            raise UnsupportedArchitectureError(
                f"{name}: layer {i} keeps a recurrent state ({kind}): SSM / hybrid models "
                "(Mamba, Jamba, Qwen3-Next, Nemotron-H, ...) have no per-token key/value "
                "cache there for TurboQuant to compress")
        else:
            raise UnsupportedArchitectureError(
                f"{name}: layer {i} uses cache type {kind}, which TurboQuant cannot replace")
    if not compressible and not sliding:
        raise UnsupportedArchitectureError(f"{name}: no layer uses a plain KVCache or a "
                                           "RotatingKVCache")
    modules = {sys.modules.get(type(m).__module__) for _, m in model.named_modules()}
    routed = [mod for mod in modules if mod is not None and
              getattr(mod, "scaled_dot_product_attention", None) in (_original_sdpa, _routed_sdpa)]
    if not routed:
        raise UnsupportedArchitectureError(
            f"{name}: its attention does not go through mlx_lm.models.base."
            "scaled_dot_product_attention (custom attention, e.g. logit soft-capping), so it "
            "cannot be routed to the compressed-code kernel")
    return compressible


def rope_pairs_of(model) -> str | None:
    """The channel pairs that RoPE rotates together in ``model``'s attention: "half" for
    (i, i + d/2) (mlx ``RoPE(traditional=False)``, Llama/Qwen/Mistral...), "adjacent" for
    (2i, 2i + 1), None when unknown or partial (then channels are chosen one by one)."""
    for layer in getattr(model, "layers", []):
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None)
        if rope is None:
            continue
        d = getattr(attn, "head_dim", None)
        dims = getattr(rope, "dims", None) or getattr(rope, "_dims", None)
        if d is not None and dims is not None and int(dims) != int(d):
            return None
        trad = getattr(rope, "traditional", None)
        if trad is None:
            return None
        return "adjacent" if trad else "half"
    return None


def pipeline_span(model, n_local: int) -> tuple[int, int]:
    """(first layer, the model's layer count) of a pipeline stage of ``model``
    (``mlx_lm.utils.sharded_load`` with a pipeline group; rank r holds the layers after those
    of ranks r+1 ... size-1); (0, n_local) for a whole model."""
    inner = getattr(model, "model", None)
    if int(getattr(inner, "pipeline_size", 1) or 1) <= 1:
        return 0, n_local
    first = int(getattr(inner, "start_idx", 0) or 0)
    n_model = getattr(getattr(model, "args", None), "num_hidden_layers", None)
    return first, int(n_model) if n_model else first + n_local


# mlx's sharded linear layers (mlx.nn.layers.distributed), which mlx-lm's ``shard`` puts in the
# attention of a tensor-parallel model; "all-to-sharded" is the K/V projections' split.
_SHARDED_LINEARS = ("AllToShardedLinear", "QuantizedAllToShardedLinear")
# Attention modules and their (per-rank, after ``shard``) KV head count in mlx-lm models.
_ATTENTION_NAMES = ("self_attn", "attention", "attn")
_KV_HEAD_NAMES = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")


def _attention_of(layer):
    for name in _ATTENTION_NAMES:
        attn = getattr(layer, name, None)
        if attn is not None:
            return attn
    return None


def tensor_parallel_span(model) -> tuple[int, int]:
    """(rank, size) of the group whose ranks share ``model``'s attention heads
    (``mlx_lm.utils.sharded_load`` with a tensor group: mlx-lm's ``shard`` makes the K/V
    projections mlx's all-to-sharded linear layers, rank r of n computing KV heads
    [r·H/n, (r+1)·H/n)); (0, 1) for a model that is not tensor parallel."""
    for layer in getattr(model, "layers", None) or []:
        attn = _attention_of(layer)
        if attn is None:
            continue
        for _, m in attn.named_modules():
            group = getattr(m, "group", None)
            if type(m).__name__ in _SHARDED_LINEARS and group is not None:
                return int(group.rank()), int(group.size())
    return 0, 1


def _local_kv_heads(model, i: int) -> int | None:
    """KV heads that layer ``i``'s attention computes on this rank (its count after mlx-lm's
    ``shard``), or None when the model does not say."""
    layers = getattr(model, "layers", None) or []
    attn = _attention_of(layers[i]) if i < len(layers) else None
    for name in _KV_HEAD_NAMES:
        n = getattr(attn, name, None)
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0:
            return int(n)
    return None
