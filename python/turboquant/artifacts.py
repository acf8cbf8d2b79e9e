"""Artifact stores: the precomputed random state of a cache (rotations, codebooks, and JL
matrices where a method exposes one), saved once and loaded by later builds.

Entries are keyed by ``ArtifactKey(method, head_dim, bits, seed)``; an entry is a dict of
named float32 arrays:

- ``rotation_kind``: 0-d array, 1 = dense, 2 = hadamard (RotationKind codes of rotation.h)
- ``rotation/L{layer}H{head}{k|v}``: ``Rotation.parameters()`` of that cache stream
  (each layer/head/role has its own stream, kv_cache.h)
- ``codebook/centroids``, ``codebook/boundaries``: the Lloyd-Max codebook of (d, bits)

Rotations found in the store are installed into the cache instead of the seeded ones; the
codebook is checked against the library's (a stale store raises instead of silently
changing codes). ``NpyArtifactStore(dir)`` writes one ``.npy`` file per array under a
directory per key; ``MemoryArtifactStore()`` keeps them in a dict.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArtifactKey:
    method: str
    head_dim: int
    bits: int
    seed: int

    def dirname(self) -> str:
        return f"{self.method}-d{self.head_dim}-b{self.bits}-s{self.seed}"


class ArtifactStore:
    """Interface: ``get(key) -> dict | None`` and ``put(key, arrays)``. Counts hits/misses."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.puts = 0

    def get(self, key: ArtifactKey) -> dict[str, np.ndarray] | None:
        arrays = self._load(key)
        if arrays is None:
            self.misses += 1
        else:
            self.hits += 1
        return arrays

    def put(self, key: ArtifactKey, arrays: dict[str, np.ndarray]) -> None:
        self.puts += 1
        self._save(key, {k: np.array(v, dtype=np.float32, order="C") for k, v in arrays.items()})

    def update(self, key: ArtifactKey, arrays: dict[str, np.ndarray]) -> None:
        """Adds arrays to an entry (e.g. the rotations of more layers)."""
        merged = dict(self._load(key) or {})
        merged.update(arrays)
        self.put(key, merged)

    def keys(self) -> list[ArtifactKey]:
        raise NotImplementedError

    def _load(self, key: ArtifactKey) -> dict[str, np.ndarray] | None:
        raise NotImplementedError

    def _save(self, key: ArtifactKey, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


class MemoryArtifactStore(ArtifactStore):
    """Artifacts kept in this process (tests, notebooks, one process serving many caches)."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[ArtifactKey, dict[str, np.ndarray]] = {}

    def keys(self) -> list[ArtifactKey]:
        return list(self._entries)

    def _load(self, key: ArtifactKey) -> dict[str, np.ndarray] | None:
        entry = self._entries.get(key)
        return None if entry is None else {k: v.copy() for k, v in entry.items()}

    def _save(self, key: ArtifactKey, arrays: dict[str, np.ndarray]) -> None:
        self._entries[key] = arrays


# mlx-kv-quant's name for the same thing.
InMemoryArtifactStore = MemoryArtifactStore

_DIR_RE = re.compile(r"^(?P<method>[a-z0-9_]+)-d(?P<d>\d+)-b(?P<b>\d+)-s(?P<s>\d+)$")


class NpyArtifactStore(ArtifactStore):
    """Artifacts on disk: ``<root>/<method>-d<d>-b<bits>-s<seed>/<name>.npy`` ('/' in a name
    becomes '__')."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = Path(root)

    def keys(self) -> list[ArtifactKey]:
        out = []
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                m = _DIR_RE.match(p.name)
                if m and p.is_dir():
                    out.append(ArtifactKey(m["method"], int(m["d"]), int(m["b"]), int(m["s"])))
        return out

    def _load(self, key: ArtifactKey) -> dict[str, np.ndarray] | None:
        d = self.root / key.dirname()
        if not d.is_dir():
            return None
        return {p.stem.replace("__", "/"): np.load(p, allow_pickle=False) for p in sorted(d.glob("*.npy"))}

    def _save(self, key: ArtifactKey, arrays: dict[str, np.ndarray]) -> None:
        d = self.root / key.dirname()
        d.mkdir(parents=True, exist_ok=True)
        for name, a in arrays.items():
            tmp = d / (name.replace("/", "__") + ".tmp.npy")
            np.save(tmp, a, allow_pickle=False)
            os.replace(tmp, d / (name.replace("/", "__") + ".npy"))


_KIND_CODE = {"dense": 1, "hadamard": 2}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}


def stream_name(layer: int, head: int, role: str) -> str:
    return f"rotation/L{layer}H{head}{role[0]}"


def export_artifacts(core, role: str) -> dict[str, np.ndarray]:
    """The arrays of one role ("key" | "value") of a ``_core.KVCache``."""
    from turboquant import _core

    arrays: dict[str, np.ndarray] = {}
    kind = None
    for layer in range(core.n_layers):
        for head in range(core.n_kv_heads):
            kind, params = core.rotation_parameters(layer, head, role)
            arrays[stream_name(layer, head, role)] = params
    arrays["rotation_kind"] = np.array(_KIND_CODE[kind], dtype=np.float32)
    method = core.key_method if role == "key" else core.value_method
    bits = core.key_bits if role == "key" else core.value_bits
    if method in ("turboquant_mse", "turboquant_prod"):
        cb = _core.codebook(core.head_dim, bits if method == "turboquant_mse" else max(bits - 1, 1))
        arrays["codebook/centroids"] = np.asarray(cb.centroids)
        arrays["codebook/boundaries"] = np.asarray(cb.boundaries)
    return arrays


def install_artifacts(core, role: str, arrays: dict[str, np.ndarray]) -> int:
    """Installs stored rotations into an empty ``_core.KVCache``; returns how many streams
    were loaded (streams absent from the entry keep their seeded rotation)."""
    ref = export_artifacts(core, role) if "codebook/centroids" in arrays else {}
    for name in ("codebook/centroids", "codebook/boundaries"):
        if name in arrays and name in ref and not np.array_equal(arrays[name], ref[name]):
            raise ValueError(f"artifact store entry has a different {name} than this library computes "
                             "(stale or foreign artifacts); delete the entry and rebuild")
    kind = _CODE_KIND.get(int(np.asarray(arrays["rotation_kind"]).reshape(-1)[0])) if "rotation_kind" in arrays else None
    if kind != core.rotation_parameters(0, 0, role)[0]:
        return 0  # stored for another rotation kind: this build computes its own
    loaded = 0
    for layer in range(core.n_layers):
        for head in range(core.n_kv_heads):
            params = arrays.get(stream_name(layer, head, role))
            if params is not None and kind is not None:
                core.set_rotation_parameters(layer, head, role, kind, params)
                loaded += 1
    return loaded
