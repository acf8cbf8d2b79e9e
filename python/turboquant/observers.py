"""Observers of a :class:`~turboquant.CompressedKVCache`: they receive an event after every
``append`` and ``attend`` (``with_observer(obs)`` on the builder, or ``cache.add_observer``).

An observer implements any of ``on_append(event)`` and ``on_attend(event)``; the event is an
:class:`Event` with the cache, the layer, the elapsed seconds and the arrays involved.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import numpy as np


@dataclasses.dataclass
class Event:
    kind: str              # "append" | "attend"
    cache: Any             # the CompressedKVCache
    layer: int
    seconds: float
    tokens: int            # tokens appended, or queries per head attended
    keys: np.ndarray | None = None      # float32/float16 views as passed to the core
    values: np.ndarray | None = None
    first_token: int = 0   # position of the first appended token in the layer


class Observer:
    """Base class: override the hooks you need."""

    def on_append(self, event: Event) -> None:  # pragma: no cover - default does nothing
        pass

    def on_attend(self, event: Event) -> None:  # pragma: no cover
        pass


class LatencyObserver(Observer):
    """Wall-clock seconds of every append and attend call."""

    def __init__(self) -> None:
        self.append_seconds: list[float] = []
        self.attend_seconds: list[float] = []
        self.appended_tokens = 0

    def on_append(self, event: Event) -> None:
        self.append_seconds.append(event.seconds)
        self.appended_tokens += event.tokens

    def on_attend(self, event: Event) -> None:
        self.attend_seconds.append(event.seconds)

    def summary(self) -> dict[str, float]:
        def med(xs: list[float]) -> float:
            return statistics.median(xs) if xs else float("nan")

        total = sum(self.append_seconds)
        return {
            "append_calls": len(self.append_seconds),
            "attend_calls": len(self.attend_seconds),
            "append_median_s": med(self.append_seconds),
            "attend_median_s": med(self.attend_seconds),
            "append_tokens_per_s": self.appended_tokens / total if total > 0 else float("nan"),
        }


class MemoryObserver(Observer):
    """The cache's exact memory after every append: a list of (tokens in layer 0, bytes)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []

    def on_append(self, event: Event) -> None:
        self.samples.append((len(event.cache), event.cache.memory_bytes()))

    @property
    def peak_bytes(self) -> int:
        return max((b for _, b in self.samples), default=0)

    def summary(self) -> dict[str, float]:
        tokens, mem = self.samples[-1] if self.samples else (0, 0)
        return {"tokens": tokens, "memory_bytes": mem, "peak_bytes": self.peak_bytes}


class DistortionObserver(Observer):
    """Relative reconstruction error ‖x − x̃‖²/‖x‖² of a random fraction of the appended key
    and value vectors (decoded back from the cache, so it measures what is stored)."""

    def __init__(self, fraction: float = 0.05, seed: int = 0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self._rng = np.random.default_rng(seed)
        self.key_errors: list[float] = []
        self.value_errors: list[float] = []
        self.sampled = 0

    def on_append(self, event: Event) -> None:
        core = event.cache.core
        keys, values = event.keys, event.values
        h_kv, t = keys.shape[0], keys.shape[1]
        picks = np.nonzero(self._rng.random((h_kv, t)) < self.fraction)
        for h, i in zip(*picks):
            pos = event.first_token + int(i)
            for role, src, errs in (("key", keys, self.key_errors), ("value", values, self.value_errors)):
                x = np.asarray(src[h, i], dtype=np.float64)
                x_hat = core.decode(event.layer, int(h), role, pos, 1)[0].astype(np.float64)
                nx = float(x @ x)
                if nx > 0:
                    errs.append(float(((x - x_hat) ** 2).sum() / nx))
            self.sampled += 1

    def summary(self) -> dict[str, float]:
        def mean(xs: list[float]) -> float:
            return float(np.mean(xs)) if xs else float("nan")

        return {"sampled_vectors": self.sampled, "key_relative_mse": mean(self.key_errors),
                "value_relative_mse": mean(self.value_errors)}
