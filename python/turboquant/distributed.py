"""Sharded models on mlx's distributed engine, with TurboQuant caches on every rank.

``mlx_lm.utils.sharded_load`` splits a model over the processes of ``mx.distributed``:
tensor parallel (the model's ``shard``: each rank computes its share of the attention and KV
heads) or pipeline parallel (the model's ``model.pipeline``: each rank runs a run of
consecutive layers). :func:`turboquant.mlx_lm.make_prompt_cache` on a rank's model then
builds caches for that rank's heads or layers only. Launch with mlx's launcher, e.g. two
processes on this machine over the ring back end::

    mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- \\
        python -m turboquant generate --model DIR --sharded tensor -p "Hello"

(``python -m mlx._distributed_utils.launch`` is the same launcher; the command after ``--``
runs as given, so it names the interpreter). Every rank runs the same
command; rank 0 prints the text. ``python -m turboquant serve`` runs the same way (rank 0
answers HTTP; see :mod:`turboquant.serve`).

Exactness: a rank's caches draw the random streams of the model's own layer and KV head
numbers (a pipeline stage's first layer, a tensor-parallel rank's first KV head as the
cache's ``kv_head_offset``), so every code is the one a single process would store and the
greedy tokens are the single-process run's.
"""

from __future__ import annotations

MODES = ("auto", "tensor", "pipeline")


def sharded_load(model_dir: str, mode: str = "auto"):
    """(model, tokenizer, group, mode) of this rank: ``model_dir`` loaded with
    ``mlx_lm.utils.sharded_load`` over the world group. ``mode`` "tensor" or "pipeline"
    picks the split; "auto" is mlx-lm's choice (tensor parallel where the model has it).
    Pipeline loading needs ``model.safetensors.index.json`` in ``model_dir``."""
    import mlx.core as mx
    from mlx_lm.utils import sharded_load as _sharded_load

    if mode not in MODES:
        raise ValueError(f"sharding mode must be one of {', '.join(MODES)}, got {mode!r}")
    group = mx.distributed.init()
    if mode == "tensor":
        model, tokenizer = _sharded_load(model_dir, None, group)
    elif mode == "pipeline":
        model, tokenizer = _sharded_load(model_dir, group, None)
    else:
        model, tokenizer = _sharded_load(model_dir)
    inner = getattr(model, "model", None)
    split = "pipeline" if int(getattr(inner, "pipeline_size", 1) or 1) > 1 else "tensor"
    return model, tokenizer, group, split


def _kv_heads(cache) -> int | None:
    """KV heads held by one layer's cache (a TurboQuant cache or an fp16 mlx-lm one)."""
    if getattr(cache, "_core", None) is not None and getattr(cache, "_core_kv_heads", None):
        return int(cache._core_kv_heads) // max(1, int(getattr(cache, "_batch", 1)))
    keys = getattr(cache, "keys", None)
    if keys is not None and getattr(keys, "ndim", 0) == 4:
        return int(keys.shape[1])
    return None


def rank_report(model, cache, group=None) -> dict:
    """What this rank holds: its rank and the group size, the model layers its caches serve
    (the model's numbering), the KV heads of each of those caches and the model's number of
    the first (``kv_head_offsets``; None for an fp16 layer), their bytes, the total bytes
    and the tokens cached."""
    import mlx.core as mx

    from turboquant.mlx_lm import pipeline_span

    group = group if group is not None else mx.distributed.init()
    first, n_model = pipeline_span(model, len(cache))
    return {"rank": int(group.rank()), "size": int(group.size()),
            "layers": list(range(first, first + len(cache))), "model_layers": n_model,
            "kv_heads": [_kv_heads(c) for c in cache],
            "kv_head_offsets": [getattr(c, "kv_head_offset", None) for c in cache],
            "layer_bytes": [int(c.nbytes) for c in cache],
            "kv_bytes": int(sum(c.nbytes for c in cache)),
            "cache_types": [type(c).__name__ for c in cache],
            "tokens": int(cache[0].offset) if cache else 0}
