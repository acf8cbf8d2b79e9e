"""Named KV-cache recipes: the settings a user gets without choosing each option.

A preset fixes every option of an mlx-lm TurboQuant cache (bits, key split, norm
correction, fp16 attention sinks and recent window, importance-routed mixed precision).
:func:`resolve` turns a preset name, or bare ``key_bits`` / ``value_bits``, plus explicit
overrides into one :class:`Preset`; ``make_prompt_cache(model, preset=...)``,
``KVCacheBuilder.with_preset(...)``, ``python -m turboquant generate --kv-preset``, ``eval``
and ``info --preset`` all read the same table (``PRESETS``).

The recipes were chosen on SmolLM2-135M over twelve windows of the GPL-3 and GFDL-1.3
texts (``bench/mlx_eval_smollm2_windows.json``); their quality on other texts is measured
by ``bench/mlx_eval_presets.json`` (docs/presets.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Every setting of a TurboQuant mlx-lm cache; each is also a ``make_prompt_cache``
    keyword that overrides the recipe's value.

    - ``key_bits`` / ``value_bits``: code widths of keys and values.
    - ``method``: the quantizer of both roles (``turboquant_mse``, ...).
    - ``center``: subtract a per-head mean key / value first (exact for attention; the
      means come from the first block appended).
    - ``debias``: norm correction (the core's ``norm_correction``): decoded keys and values
      keep their norms.
    - ``key_split``: half of the key channels (the RoPE pairs with the most query-weighted
      key energy, chosen per head from the prefill) at ``key_bits + 1`` bits, half at
      ``key_bits - 1`` (same bytes); ``split_angle_bits`` (8 or 16) is the width of its
      per-key part angle.
    - ``fp16_sinks``: the first tokens of every layer kept fp16 (attention sinks);
      ``fp16_window``: the most recent tokens kept fp16, flushed into codes
      ``block_tokens`` at a time (None: 16 with mixed precision, 32 with a window, else 256).
    - ``mixed_bits`` / ``mixed_keep``: importance-routed mixed precision (needs a window):
      of every flush group, the fraction ``mixed_keep`` of tokens that got the most
      attention while fp16 keep the layer's bits, the rest are stored at ``mixed_bits``;
      ``mixed_trial``: only on layers where a trial on the prompt
      (:mod:`turboquant.mixed_trial`) finds that routing beats uniform codes of the same
      average width (the others hold those uniform codes); with it, every layer that holds
      uniform codes (those, and sliding-window layers) also takes its key / value widths
      from a trial on the prompt: its own, or one bit moved from values to keys or back
      (same bytes, neither below 2 bits; :func:`turboquant.mixed_trial.best_widths`).
    - ``decay_after`` / ``decay_bits``: temporal decay: code blocks with at least
      ``decay_after`` newer tokens are re-quantized to ``decay_bits`` in place.
    - ``sparse_v``: value rows whose attention weight is below ``sparse_v`` times the
      query's maximum are skipped on decode steps (0: dense).
    - ``ring_extra_bits``: sliding-window layers (bounded rings,
      :mod:`turboquant.mlx_rotating`) store keys and values this many bits wider than the
      full-attention layers' uniform codes (at most 8). A ring's bytes stop growing at its
      window, so at long context the extra bit is a small share of the cache, while its
      codes are every token the layer attends to.
    - ``ring_window`` / ``ring_block_tokens``: the sliding-window rings' fp16 window and
      block (page and flush) size, where not None (None: ``fp16_window`` and the ring's
      ``block_tokens``); ``ring_window`` resizes the recipe's window, so with
      ``fp16_window=0`` the rings have none either. A ring holds only the model's window
      (Gemma-3: 512 tokens), so its fp16 rows (the window plus up to a block of rows not yet
      flushed) are a large share of its bytes. ``tq3`` gives its rings 4-bit codes
      (``ring_extra_bits=1``) with an 8-token window and 8-token blocks: on Gemma-3-270M's
      tuning texts a perplexity ratio of 1.023 against the 3-bit rings' 1.045 (64-token
      window, 32-token blocks), and 4.02x less KV memory than mlx-lm's caches at 4K tokens
      against 3.53x (docs/sliding-window.md)."""
    name: str
    summary: str
    key_bits: int = 3
    value_bits: int = 3
    method: str = "turboquant_mse"
    center: bool = True  # subtract a per-head mean key / value (exact for attention)
    debias: bool = True  # norm correction: decoded vectors keep their norms
    key_split: bool = True  # half of the key channels at key_bits + 1, half at key_bits - 1
    split_angle_bits: int = 8
    fp16_sinks: int = 0  # first tokens of every layer kept fp16
    fp16_window: int = 0  # most recent tokens of every layer kept fp16
    block_tokens: int | None = None  # flush block (None: 16 with mixed, 32 with a window)
    mixed_bits: int = 0  # importance-routed mixed precision: low width (0: off)
    mixed_keep: float = 0.0  # fraction of each flush group kept at key/value bits
    # mixed precision only on layers where a trial on the prompt finds that it pays
    # (turboquant.mixed_trial); the others hold uniform codes of the same average width
    mixed_trial: bool = False
    decay_after: int = 0
    decay_bits: int = 0
    sparse_v: float = 0.0
    ring_extra_bits: int = 0  # sliding-window rings: keys and values this many bits wider
    ring_window: int | None = None  # sliding-window rings' fp16 window (None: fp16_window)
    ring_block_tokens: int | None = None  # sliding-window rings' block (None: their default)

    def code_bits(self) -> float:
        """Average code bits per K/V coordinate (mixed precision averages its two widths, the
        key split's low-width parts counted as stored: floor 1 bit each); norms, angles and
        fp16 tokens come on top (see ``info --preset``)."""
        return sum(role_bits(self.key_bits, self.value_bits, self.mixed_bits, self.mixed_keep,
                             self.key_split and 2 <= self.key_bits <= 7)) / 2

    def uniform_bits(self) -> tuple[int, int]:
        """(key bits, value bits) of a layer without mixed precision (a sliding-window ring,
        whose codes must stay in position order, or a layer where the mixed-precision trial
        finds routing does not pay) at the recipe's average code bits
        (:func:`uniform_widths`; ``tq3-mixed``: 3 / 3, ``tq2.5``: 3 / 2). Without mixed
        precision, the recipe's own bits."""
        return uniform_widths(self.key_bits, self.value_bits, self.mixed_bits, self.mixed_keep,
                              self.key_split and 2 <= self.key_bits <= 7)

    def cache_kwargs(self) -> dict:
        """The keyword arguments of ``turboquant.mlx_lm.make_prompt_cache``."""
        d = dataclasses.asdict(self)
        del d["name"], d["summary"]
        return d

    def spec(self) -> str:
        """The setting in the eval grammar (``python -m turboquant eval --bits``)."""
        kb, vb = self.key_bits, self.value_bits
        s = str(kb) if kb == vb else f"k{kb}v{vb}"
        if self.fp16_sinks:
            s += f"+s{self.fp16_sinks}"
        if self.fp16_window:
            s += f"+w{self.fp16_window}"
        if self.decay_after:
            s += f"+d{self.decay_after}:{self.decay_bits}"
        if self.mixed_bits:
            s += f"+m{self.mixed_bits}:{self.mixed_keep:.6g}"
            if self.block_tokens:  # the group in tokens (eval grammar mB:F:G)
                s += f":{mixed_blocks(self.mixed_keep)[0] * self.block_tokens}"
        if self.sparse_v:
            s += f"+sv{self.sparse_v:g}"
        if self.ring_extra_bits:
            s += f"+r{self.ring_extra_bits}"
        if self.ring_window is not None:
            s += f"+rw{self.ring_window}"
        if self.ring_block_tokens is not None:
            s += f"+rb{self.ring_block_tokens}"
        if not (self.center or self.debias or self.key_split):
            s += "/raw"
        elif not self.key_split:
            s += "/nosplit"
        if self.split_angle_bits == 16:
            s += "/a16"
        if self.mixed_bits and self.mixed_trial:
            s += "/trial"
        return s


def role_bits(key_bits: int, value_bits: int, mixed_bits: int = 0, keep: float = 0.0,
              key_split: bool = False) -> tuple[float, float]:
    """Average code bits of the keys and of the values. With mixed precision the fraction
    ``keep`` of the tokens holds key_bits / value_bits and the rest ``mixed_bits``; split
    keys (half of the channels at key_bits + 1, half at key_bits - 1) drop both parts by
    key_bits - mixed_bits, floor 1 bit, as the core stores them (3-bit keys at 1 bit hold
    their parts at 2 and 1 bits: 1.5)."""
    if not mixed_bits:
        return float(key_bits), float(value_bits)
    low_key = float(mixed_bits)
    if key_split:
        drop = key_bits - mixed_bits
        low_key = (max(1, key_bits - 1 - drop) + max(1, key_bits + 1 - drop)) / 2
    return (keep * key_bits + (1 - keep) * low_key,
            keep * value_bits + (1 - keep) * mixed_bits)


def uniform_widths(key_bits: int, value_bits: int, mixed_bits: int = 0, keep: float = 0.0,
                   key_split: bool = False) -> tuple[int, int]:
    """(key bits, value bits) of uniform codes with the average code bits of a mixed layout
    (:func:`role_bits`): the pair's bits rounded to a whole number, the keys taking the odd
    bit (on Gemma-3's global layers the key error dominates). Without mixed precision, the
    given widths."""
    if not mixed_bits:
        return key_bits, value_bits
    total = round(sum(role_bits(key_bits, value_bits, mixed_bits, keep, key_split)))
    key = min(8, max(1, -(-total // 2)))
    return key, max(1, total - key)


# The recommended recipe at any bits: 4 fp16 sink tokens and a 64-token fp16 window around
# the codes (centring, norm correction and the key split on).
_RECIPE = {"fp16_sinks": 4, "fp16_window": 64}

# Mixed precision (tq3-mixed, tq2.5, tq2): importance routing on the layers where a trial on
# the prompt finds that it pays (turboquant.mixed_trial), uniform codes of the same average
# width elsewhere (and on sliding-window layers), their key / value split chosen per layer by
# a trial too (mixed_trial.best_widths).
_MIXED = {"mixed_trial": True, **_RECIPE}

# Sliding-window rings one bit wider than the uniform codes, with an 8-token fp16 window and
# 8-token blocks (tq3, tq3-mixed, tq2.5): chosen on Gemma-3-270M's tuning texts
# (bench/results/preset_tuning_gemma3_rings_d.json for tq3,
# preset_tuning_gemma3_mixed_rings_{a,b}.json for the mixed recipes; tq2's 3-bit rings with
# the short window lost perplexity there, so tq2 keeps its rings as they were).
_RINGS = {"ring_extra_bits": 1, "ring_window": 8, "ring_block_tokens": 8}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tq4", "4-bit codes, 4 fp16 sinks, 64-token fp16 window", 4, 4, **_RECIPE),
    Preset("tq3", "3-bit codes, 4 fp16 sinks, 64-token fp16 window; sliding-window rings "
           "at 4 bits with an 8-token fp16 window (the default)", 3, 3, **_RINGS, **_RECIPE),
    Preset("tq3-mixed", "3.0 average code bits: the most attended half of each 32-token "
           "flush group at 4 bits, the rest at 2, on layers where that pays (else 3-bit "
           "codes); 4 fp16 sinks, 64-token fp16 window; sliding-window rings one bit wider "
           "with an 8-token fp16 window", 4, 4,
           mixed_bits=2, mixed_keep=0.5, **_RINGS, **_MIXED),
    Preset("tq2.5", "2.5 average code bits: the most attended quarter of each 64-token "
           "flush group at 4 bits, the rest at 2, on layers where that pays (else 3-bit keys "
           "and 2-bit values); 4 fp16 sinks, 64-token fp16 window; sliding-window rings one "
           "bit wider with an 8-token fp16 window", 4, 4,
           mixed_bits=2, mixed_keep=0.25, **_RINGS, **_MIXED),
    Preset("tq2", "2.0 average code bits: the most attended 3 of every 7 tokens (56-token "
           "flush groups) at 3 bits, the rest at 1 (split keys: 1.5), on layers where that "
           "pays (else 2-bit codes); 4 fp16 sinks, 64-token fp16 window", 3, 3,
           mixed_bits=1, mixed_keep=3 / 7, block_tokens=8, **_MIXED),
    Preset("codes-only", "3-bit codes for every token, no fp16 tokens (centring, norm "
           "correction and key split on; the behaviour before presets)", 3, 3),
)}

DEFAULT = "tq3"

# The rotation of every preset (make_prompt_cache's and KVCacheBuilder's default): one
# random-sign Hadamard round ("hadamard1", Π = H·D₁; docs/rotation.md) on power-of-two head
# dims, "auto" (a dense Haar rotation) on the others.
DEFAULT_ROTATION = "hadamard1"


def default_rotation(head_dim: int) -> str:
    """The rotation a cache of ``head_dim`` gets by default: :data:`DEFAULT_ROTATION` for a
    power-of-two head_dim, else ``"auto"`` (dense there)."""
    d = int(head_dim)
    return DEFAULT_ROTATION if d > 0 and d & (d - 1) == 0 else "auto"

# The settings of a recipe (Preset's fields but its name and summary).
SETTINGS = tuple(f.name for f in dataclasses.fields(Preset) if f.name not in ("name", "summary"))


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def recommended(key_bits: int, value_bits: int) -> Preset:
    """The recommended recipe at these bits: ``tq2``, ``tq3`` or ``tq4`` when both are 2, 3
    or 4 (``tq2`` is a mixed recipe of 2.0 average code bits), else the uniform recipe
    (sinks + window around the codes) at the given widths."""
    if key_bits == value_bits and f"tq{key_bits}" in PRESETS:
        return PRESETS[f"tq{key_bits}"]
    return Preset(f"k{key_bits}v{value_bits}", f"{key_bits}-bit keys, {value_bits}-bit values, "
                  "4 fp16 sinks, 64-token fp16 window", key_bits, value_bits, **_RECIPE)


def resolve(preset: str | None = None, key_bits: int | None = None,
            value_bits: int | None = None, **overrides) -> Preset:
    """The settings a cache gets.

    With ``preset`` the named recipe, its bits replaced by ``key_bits`` / ``value_bits`` when
    given. Without it: ``key_bits`` / ``value_bits`` alone select the recommended recipe at
    those bits (:func:`recommended`; a missing one is the default preset's, 3), and neither
    gives the default preset (``tq3``). Then every keyword in ``overrides`` whose value is
    not None replaces that setting (explicit arguments win over the preset)."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown cache setting(s) {', '.join(unknown)}; settings: "
                         f"{', '.join(SETTINGS)}")
    if preset is not None:
        base = get(preset)
        bits = {k: v for k, v in (("key_bits", key_bits), ("value_bits", value_bits))
                if v is not None}
        base = dataclasses.replace(base, **bits)
    elif key_bits is None and value_bits is None:
        base = PRESETS[DEFAULT]
    else:
        d = PRESETS[DEFAULT]
        base = recommended(d.key_bits if key_bits is None else key_bits,
                           d.value_bits if value_bits is None else value_bits)
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given) if given else base


def describe(p: Preset) -> list[str]:
    """Lines listing every setting of ``p`` (``python -m turboquant info --preset``)."""
    split = (f"on: half of the key channels at {p.key_bits + 1} bits, half at "
             f"{p.key_bits - 1} ({p.split_angle_bits}-bit part angle)"
             if p.key_split and 2 <= p.key_bits <= 7 else "off")
    mixed = "off"
    block = p.block_tokens or (16 if p.mixed_bits else 32)
    if p.mixed_bits:
        r, k = mixed_blocks(p.mixed_keep)
        group = r * block
        mixed = (f"the most attended {k}/{r} of each {group}-token flush group at the "
                 f"key/value bits, the rest at {p.mixed_bits} bits")
        if p.mixed_trial:
            kb, vb = p.uniform_bits()
            mixed += (f", on layers where a trial on the prompt finds that routing pays; "
                      f"elsewhere (and on sliding-window layers) {kb}-bit keys, {vb}-bit values"
                      f" or, where a trial on the prompt finds it better, one bit moved "
                      f"between keys and values (same bytes, neither below 2 bits)")
    lines = [
        f"preset:          {p.name}: {p.summary}",
        f"eval setting:    {p.spec()}",
        f"keys:            {p.method}, {p.key_bits} bits",
        f"values:          {p.method}, {p.value_bits} bits",
        f"code bits:       {p.code_bits():g} on average per K/V coordinate",
        f"rotation:        {DEFAULT_ROTATION} (one random-sign Hadamard round) on power-of-two "
        "head dims, dense on others",
        f"key split:       {split}",
        f"centring:        {'on' if p.center else 'off'}",
        f"norm correction: {'on' if p.debias else 'off'}",
        f"fp16 sinks:      {p.fp16_sinks} tokens per layer",
        f"fp16 window:     {p.fp16_window} tokens per layer"
        + (f" (flushed into codes {block} tokens at a time)" if p.fp16_window else ""),
        f"mixed precision: {mixed}",
        "temporal decay:  " + (f"to {p.decay_bits} bits after {p.decay_after} tokens"
                                if p.decay_after else "off"),
        f"sparse V:        {p.sparse_v:g}" if p.sparse_v else "sparse V:        off",
        "sliding rings:   " + (f"codes {p.ring_extra_bits} bit(s) wider than the other layers'"
                                if p.ring_extra_bits else "the other layers' uniform widths")
        + (f", fp16 window {p.ring_window} tokens" if p.ring_window is not None else "")
        + (f", blocks of {p.ring_block_tokens} tokens" if p.ring_block_tokens is not None else ""),
        "python:          make_prompt_cache(model, " + ", ".join(
            f"{k}={v!r}" for k, v in p.cache_kwargs().items()) + ")",
    ]
    return lines


# Model shapes for ``info --preset``: (layers, query heads, KV heads, head_dim).
SHAPES = {
    "smollm2-135m": (30, 9, 3, 64),
    "llama-3.1-8b": (32, 32, 8, 128),
}


def parse_shape(s: str) -> tuple[str, tuple[int, int, int, int]]:
    """A name of ``SHAPES`` or ``LAYERS,Q_HEADS,KV_HEADS,HEAD_DIM``."""
    if s in SHAPES:
        return s, SHAPES[s]
    try:
        dims = tuple(int(x) for x in s.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1 or dims[1] % dims[2]:
        raise ValueError(f"unknown model shape {s!r}: a name ({', '.join(SHAPES)}) or "
                         "LAYERS,Q_HEADS,KV_HEADS,HEAD_DIM with Q_HEADS a multiple of KV_HEADS")
    return s, dims


def mixed_blocks(keep: float) -> tuple[int, int]:
    """(group blocks r, kept blocks k) of a kept fraction k/r, the smallest r <= 8 (0.333 is
    1/3); ValueError for any other fraction."""
    for r in range(2, 9):
        k = round(keep * r)
        if 1 <= k < r and abs(k / r - keep) < 1e-3:
            return r, k
    raise ValueError(f"mixed_keep must be a fraction k/r in (0, 1) with r <= 8 (e.g. 0.5, 0.25, "
                     f"0.75), got {keep!r}")


def fp16_bytes(shape: tuple[int, int, int, int], tokens: int) -> int:
    layers, _, n_kv, d = shape
    return 2 * 2 * layers * n_kv * d * tokens
