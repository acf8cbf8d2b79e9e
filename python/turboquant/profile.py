"""Calibration profiles (``python -m turboquant calibrate``): per-layer key/value widths
that :func:`turboquant.mlx_lm.make_prompt_cache` applies, read and validated here."""

from __future__ import annotations

import json

from turboquant.mlx_cache import _check_head_bits

__all__ = ["PROFILE_FORMAT", "load_profile"]

PROFILE_FORMAT = "turboquant-profile"


def load_profile(profile) -> dict:
    """A calibration profile (``python -m turboquant calibrate``): a path or a dict."""
    if isinstance(profile, (str, bytes)) or hasattr(profile, "__fspath__"):
        with open(profile, encoding="utf-8") as f:
            try:
                profile = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"profile {profile!r} is not valid JSON: {e}") from None
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not a turboquant profile (expected \"format\": \"{PROFILE_FORMAT}\")")
    layers = profile.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError("profile has no \"layers\" list")
    for i, e in enumerate(layers):
        if not isinstance(e, dict):
            raise ValueError(f"profile layer {i}: expected an object, got {e!r}")
        if e.get("fp16"):
            continue
        for k in ("key_bits", "value_bits"):
            b = e.get(k)
            if isinstance(b, list):  # per KV head
                try:
                    _check_head_bits(b, k)
                except ValueError as err:
                    raise ValueError(f"profile layer {i}: {err}") from None
            elif isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
                raise ValueError(f"profile layer {i}: {k} must be an integer in [1, 8] or a "
                                 f"list of them (one per KV head), got {b!r}")
    return profile
