"""Artifact stores: the precomputed random state of a cache (rotations, codebooks, and JL
matrices where a method exposes one), saved once and loaded by later builds.

Entries are keyed by ``ArtifactKey(method, head_dim, bits, seed)``; an entry is a dict of
named float32 arrays:

- ``rotation_kind``: 0-d array, 1 = dense, 2 = hadamard (RotationKind codes of rotation.h)
- ``rotation/L{layer}H{head}{k|v}``: ``Rotation.parameters()`` of that cache stream
  (each layer/head/role has its own stream, cache/quantizer_table.h; ``head`` is the model's KV head
  number, i.e. a cache with ``kv_head_offset`` k stores and finds its head h under k + h)
- ``codebook/centroids``, ``codebook/boundaries``: the Lloyd-Max codebook of (d, bits)

Rotations found in the store are installed into the cache instead of the seeded ones; the
codebook is checked against the library's (a stale store raises instead of silently
changing codes). ``NpyArtifactStore(dir)`` writes one ``.npy`` file per array under a
directory per key; ``MemoryArtifactStore()`` keeps them in a dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from turboquant._atomic import atomic_write


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
        manifest = _read_manifest(d)
        out = {}
        for name, meta in manifest["arrays"].items():
            p = d / (name.replace("/", "__") + ".npy")
            try:
                data = p.read_bytes()
            except OSError as e:
                raise _format_error(f"artifact {p}: cannot read ({e})") from e
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                raise _format_error(f"artifact {p}: checksum mismatch (truncated or corrupted file); "
                                    "delete the entry and rebuild")
            try:
                a = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as e:  # numpy raises ValueError, EOFError, OSError, ... on bad files
                raise _format_error(f"artifact {p}: not a readable .npy file ({e})") from e
            if a.dtype != np.float32 or list(a.shape) != list(meta.get("shape", [])):
                raise _format_error(f"artifact {p}: expected float32 {tuple(meta.get('shape', []))}, "
                                    f"got {a.dtype} {a.shape}")
            out[name] = a
        return out

    def _save(self, key: ArtifactKey, arrays: dict[str, np.ndarray]) -> None:
        d = self.root / key.dirname()
        d.mkdir(parents=True, exist_ok=True)
        manifest = {"format": _MANIFEST_FORMAT, "version": ARTIFACT_FORMAT_VERSION, "arrays": {}}
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            data = buf.getvalue()
            with atomic_write(d / (name.replace("/", "__") + ".npy")) as f:
                f.write(data)
            manifest["arrays"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "shape": list(a.shape)}
        with atomic_write(d / _MANIFEST, "w") as f:  # last: the entry exists once it is complete
            f.write(json.dumps(manifest, indent=1, sort_keys=True))


# Each entry directory has a MANIFEST.json naming its arrays with their SHA-256 and shape, so
# a truncated, bit-flipped or foreign file is refused instead of silently changing codes.
_MANIFEST = "MANIFEST.json"
_MANIFEST_FORMAT = "turboquant-artifacts"
ARTIFACT_FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_]+)?$")


def _format_error(msg: str) -> Exception:
    from turboquant import _core

    return _core.FormatError(msg)


def _read_manifest(d: Path) -> dict:
    p = d / _MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise _format_error(f"artifact entry {d} has no {_MANIFEST} (not written by this turboquant, "
                            "or damaged); delete the entry and rebuild") from e
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _format_error(f"artifact manifest {p} is corrupted ({e})") from e
    if not isinstance(m, dict) or m.get("format") != _MANIFEST_FORMAT or not isinstance(m.get("arrays"), dict):
        raise _format_error(f"artifact manifest {p} is not a turboquant artifact manifest (bad magic)")
    v = m.get("version")
    if not isinstance(v, int) or v < 1:
        raise _format_error(f"artifact manifest {p} is corrupted (version {v!r})")
    if v > ARTIFACT_FORMAT_VERSION:
        raise _format_error(f"artifact manifest {p} has format version {v}, newer than this library "
                            f"supports ({ARTIFACT_FORMAT_VERSION}); upgrade turboquant")
    for name, meta in m["arrays"].items():
        if not isinstance(name, str) or not _NAME_RE.match(name) or not isinstance(meta, dict):
            raise _format_error(f"artifact manifest {p} has a bad entry {name!r}")
    return m


_KIND_CODE = {"dense": 1, "hadamard": 2, "hadamard1": 3}  # RotationKind values (rotation.h)
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}


def stream_name(layer: int, head: int, role: str) -> str:
    return f"rotation/L{layer}H{head}{role[0]}"


def export_artifacts(core, role: str) -> dict[str, np.ndarray]:
    """The arrays of one role ("key" | "value") of a ``_core.KVCache``."""
    from turboquant import _core

    arrays: dict[str, np.ndarray] = {}
    kind = None
    first = int(getattr(core, "kv_head_offset", 0))  # named by the model's head numbers
    for layer in range(core.n_layers):
        for head in range(core.n_kv_heads):
            kind, params = core.rotation_parameters(layer, head, role)
            arrays[stream_name(layer, first + head, role)] = params
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
    kind = None
    if "rotation_kind" in arrays:
        code = np.asarray(arrays["rotation_kind"]).reshape(-1)
        if code.size != 1 or not np.isfinite(code[0]) or int(code[0]) not in _CODE_KIND:
            raise _format_error(f"artifact entry has an unknown rotation_kind {code.tolist()} "
                                "(corrupted, or written by a newer turboquant)")
        kind = _CODE_KIND[int(code[0])]
    if kind != core.rotation_parameters(0, 0, role)[0]:
        return 0  # stored for another rotation kind: this build computes its own
    d = core.head_dim
    want = {"dense": d * d, "hadamard": 2 * d, "hadamard1": d}[kind]
    todo = []
    first = int(getattr(core, "kv_head_offset", 0))  # named by the model's head numbers
    for layer in range(core.n_layers):
        for head in range(core.n_kv_heads):
            name = stream_name(layer, first + head, role)
            params = arrays.get(name)
            if params is None:
                continue
            params = np.asarray(params)
            if params.dtype != np.float32 or params.size != want:
                raise _format_error(f"artifact {name}: expected {want} float32 values for a {kind} rotation "
                                    f"of head_dim={d}, got {params.size} {params.dtype} (another config?)")
            todo.append((layer, head, params))
    # All or nothing: a stream the C++ check refuses (e.g. a non-orthogonal matrix) puts the
    # already installed streams back to their previous rotation.
    before = {(layer, head): core.rotation_parameters(layer, head, role) for layer, head, _ in todo}
    done = []
    try:
        for layer, head, params in todo:
            core.set_rotation_parameters(layer, head, role, kind, params)
            done.append((layer, head))
    except Exception:
        for layer, head in done:
            old_kind, old_params = before[(layer, head)]
            core.set_rotation_parameters(layer, head, role, old_kind, old_params)
        raise
    return len(done)
