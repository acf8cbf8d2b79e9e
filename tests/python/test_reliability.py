"""Reliability of the Python entry points: bad input raises a specific exception naming the
problem and leaves the cache exactly as it was; damaged files are refused; the thread-safety
rule holds with the GIL released; long contexts; allocation failure is a MemoryError."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import turboquant as tq
from turboquant import _core
from turboquant.artifacts import ArtifactKey, export_artifacts, install_artifacts

D = 32


def make_core(**kw):
    args = dict(n_layers=2, n_q_heads=4, n_kv_heads=2, key_bits=3, value_bits=2, seed=5, block_tokens=8,
                max_tokens=40)
    args.update(kw)
    return _core.KVCache(D, **args)


def rnd(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture
def core():
    c = make_core()
    c.append(rnd(2, 10, D, seed=1), rnd(2, 10, D, seed=2), 0)
    c.append(rnd(2, 3, D, seed=3), rnd(2, 3, D, seed=4), 1)
    return c


FIXED_Q = rnd(4, 1, D, seed=99)


def state(c):
    """Everything a failed call must leave unchanged."""
    sizes = [c.size(layer) for layer in range(c.n_layers)]
    att = c.attend(FIXED_Q, 0) if sizes[0] else None
    return sizes, c.memory_bytes(), c.fp16_bytes(), att, c.to_bytes()


def assert_same(a, b):
    assert a[:3] == b[:3]
    if a[3] is None:
        assert b[3] is None
    else:
        np.testing.assert_array_equal(a[3], b[3])
    assert a[4] == b[4]


def k(*shape, seed=7, dtype=np.float32):
    return rnd(*shape, seed=seed, dtype=dtype)


def nan_at(a, idx, value=np.nan):
    a = a.copy()
    a[idx] = value
    return a


def noncontig():
    return k(2, 10, D)[:, ::2, :]


def fortran():
    return np.asfortranarray(k(2, 5, D))


# (id, call on a filled core, exception, message regex)
BAD_CALLS = [
    ("keys float64", lambda c: c.append(k(2, 5, D).astype(np.float64), k(2, 5, D), 0), TypeError, "float32 or float16, got float64"),
    ("values int32", lambda c: c.append(k(2, 5, D), np.ones((2, 5, D), np.int32), 0), TypeError, "values must be float32 or float16, got int32"),
    ("keys strings", lambda c: c.append(np.array([["a"] * D]), k(1, D), 0), TypeError, "keys must be float32 or float16"),
    ("keys None", lambda c: c.append(None, k(2, 5, D), 0), TypeError, "keys must be"),
    ("keys object", lambda c: c.append(object(), k(2, 5, D), 0), TypeError, "keys must be"),
    ("keys rank 5", lambda c: c.append(k(1, 1, 2, 5, D), k(1, 1, 2, 5, D), 0), ValueError, r"must be \(T, d\), \(H, T, d\) or \(1, H, T, d\)"),
    ("keys rank 1", lambda c: c.append(k(D), k(D), 0), ValueError, r"at least 2 dimension|has 1 heads .* n_kv_heads=2"),
    ("keys rank 0", lambda c: c.append(np.float32(1.0), k(D), 0), ValueError, "at least 2 dimension"),
    ("head_dim mismatch", lambda c: c.append(k(2, 5, 16), k(2, 5, 16), 0), ValueError, "last dimension must be head_dim=32"),
    ("head_dim mismatch values only", lambda c: c.append(k(2, 5, D), k(2, 5, 16), 0), ValueError, "values last dimension must be head_dim=32"),
    ("head count mismatch", lambda c: c.append(k(3, 5, D), k(3, 5, D), 0), ValueError, "keys has 3 heads .* n_kv_heads=2"),
    ("(T, d) on a 2-head cache", lambda c: c.append(k(5, D), k(5, D), 0), ValueError, "n_kv_heads=2"),
    ("batch of 2", lambda c: c.append(k(2, 2, 5, D), k(2, 2, 5, D), 0), ValueError, "batch size must be 1"),
    ("keys/values shapes differ", lambda c: c.append(k(2, 5, D), k(2, 4, D), 0), ValueError, "differs from values shape"),
    ("non-contiguous keys", lambda c: c.append(noncontig(), k(2, 5, D), 0), ValueError, "C-contiguous"),
    ("Fortran-order values", lambda c: c.append(k(2, 5, D), fortran(), 0), ValueError, "C-contiguous"),
    ("NaN key", lambda c: c.append(nan_at(k(2, 5, D), (0, 2, 3)), k(2, 5, D), 0), ValueError, "NaN or Inf"),
    ("NaN key, last head", lambda c: c.append(k(2, 5, D), nan_at(k(2, 5, D), (1, 4, D - 1)), 0), ValueError, "NaN or Inf"),
    ("+Inf value", lambda c: c.append(k(2, 5, D), nan_at(k(2, 5, D), (1, 0, 0), np.inf), 0), ValueError, "NaN or Inf"),
    ("-Inf float16 key", lambda c: c.append(nan_at(k(2, 5, D, dtype=np.float16), (0, 0, 0), -np.inf), k(2, 5, D), 0), ValueError, "NaN or Inf"),
    ("NaN across a page boundary", lambda c: c.append(k(2, 20, D), nan_at(k(2, 20, D), (1, 19, 0)), 0), ValueError, "NaN or Inf"),
    ("norm above fp16 range", lambda c: c.append(np.full((2, 1, D), 3e4, np.float32), k(2, 1, D), 0), ValueError, "fp16 norm range"),
    ("past max_tokens", lambda c: c.append(k(2, 31, D), k(2, 31, D), 0), ValueError, "exceeds max_tokens=40"),
    ("layer out of range", lambda c: c.append(k(2, 1, D), k(2, 1, D), 2), ValueError, r"layer must be in \[0, 2\)"),
    ("negative layer", lambda c: c.append(k(2, 1, D), k(2, 1, D), -1), ValueError, r"layer must be in \[0, 2\)"),
    ("queries float64", lambda c: c.attend(k(4, 1, D).astype(np.float64)), TypeError, "queries must be float32 or float16"),
    ("queries head count", lambda c: c.attend(k(3, 1, D)), ValueError, "queries has 3 heads .* n_q_heads=4"),
    ("single query on GQA cache", lambda c: c.attend(k(D)), ValueError, "needs n_q_heads=1"),
    ("queries head_dim", lambda c: c.attend(k(4, 1, 64)), ValueError, "last dimension must be head_dim=32"),
    ("queries NaN", lambda c: c.attend(nan_at(k(4, 1, D), (2, 0, 5))), ValueError, "NaN or Inf"),
    ("queries non-contiguous", lambda c: c.attend(k(4, 2, D)[:, ::2, :]), ValueError, "C-contiguous"),
    ("empty queries", lambda c: c.attend(k(4, 0, D)), ValueError, "at least one query"),
    ("more queries than tokens", lambda c: c.attend(k(4, 11, D)), ValueError, "holds only 10 tokens"),
    ("window 0", lambda c: c.attend(k(4, 1, D), window=0), ValueError, "window must be >= 1"),
    ("scale inf", lambda c: c.attend(k(4, 1, D), scale=float("inf")), ValueError, "scale must be finite"),
    ("attend layer out of range", lambda c: c.attend(k(4, 1, D), layer=5), ValueError, "layer must be in"),
    ("decode past the end", lambda c: c.decode(0, 0, "key", 5, 6), ValueError, "beyond the layer's 10 tokens"),
    ("decode huge count", lambda c: c.decode(0, 0, "key", 1, 2**64 - 1), ValueError, "beyond the layer's 10 tokens"),
    ("decode bad role", lambda c: c.decode(0, 0, "query"), ValueError, "role must be 'key' or 'value'"),
    ("decode bad head", lambda c: c.decode(0, 2, "key"), ValueError, r"kv_head must be in \[0, 2\)"),
    ("set rotation on a filled layer", lambda c: c.set_rotation_parameters(0, 0, "key", *c.rotation_parameters(0, 0, "key")), ValueError, "needs an empty layer"),
    ("rotation of another head_dim", lambda c: c.set_rotation_parameters(1, 0, "key", "hadamard", np.ones(16, np.float32)), ValueError, "needs an empty layer|expects 64"),
    ("save into a missing directory", lambda c: c.save("/nonexistent-dir/x/cache.tq"), ValueError, "cannot open"),
]


@pytest.mark.parametrize("call,exc,msg", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call_is_refused_and_cache_unchanged(core, call, exc, msg):
    before = state(core)
    with pytest.raises(exc, match=msg):
        call(core)
    assert_same(before, state(core))
    # and the cache still works
    core.append(k(2, 1, D, seed=5), k(2, 1, D, seed=6), 0)
    assert core.size(0) == 11


WRAPPED = [c for c in BAD_CALLS if not any(w in c[0] for w in ("decode", "rotation", "save"))]


@pytest.mark.parametrize("call,exc,msg", [c[1:] for c in WRAPPED], ids=[c[0] for c in WRAPPED])
def test_bad_call_through_the_python_cache(core, call, exc, msg):
    """The same appends/attends through CompressedKVCache (its conversions must not mask them)."""
    cache = tq.CompressedKVCache(core)

    class Proxy:
        def append(self, keys, values, layer=0):
            return cache.append(keys, values, layer)

        def attend(self, queries, layer=0, causal=True, scale=None, window=None):
            return cache.attend(queries, layer=layer, causal=causal, scale=scale, window=window)

    before = state(core)
    with pytest.raises(exc, match=msg):
        call(Proxy())
    assert_same(before, state(core))


def test_read_only_inputs_are_read_in_place(core):
    """Read-only arrays are fine to read: the cache never writes to its inputs."""
    keys, values, q = k(2, 5, D, seed=11), k(2, 5, D, seed=12), k(4, 1, D, seed=13)
    other = make_core()
    other.append(rnd(2, 10, D, seed=1), rnd(2, 10, D, seed=2), 0)
    other.append(rnd(2, 3, D, seed=3), rnd(2, 3, D, seed=4), 1)
    other.append(keys.copy(), values.copy(), 0)
    for a in (keys, values, q):
        a.setflags(write=False)
    core.append(keys, values, 0)
    np.testing.assert_array_equal(core.attend(q), other.attend(q.copy()))
    assert core.to_bytes() == other.to_bytes()
    # broadcast views are read-only and non-contiguous: refused for layout, not for read-only
    with pytest.raises(ValueError, match="C-contiguous"):
        core.append(np.broadcast_to(keys[:, :1], (2, 5, D)), values, 0)


def test_empty_append_is_a_noop(core):
    before = state(core)
    core.append(k(2, 0, D), k(2, 0, D), 0)
    tq.CompressedKVCache(core).append(k(2, 0, D), k(2, 0, D), 1)
    assert_same(before, state(core))


def test_attend_on_an_empty_cache_names_the_problem():
    c = make_core()
    before = state(c)
    with pytest.raises(ValueError, match="empty cache: layer 0 holds no tokens"):
        c.attend(k(4, 1, D))
    with pytest.raises(ValueError, match="empty cache"):
        tq.CompressedKVCache(c).attend(k(4, 1, D), layer=1)
    assert_same(before, state(c))


BAD_CONFIGS = [
    (dict(key_bits=0), ValueError, r"key_bits must be in \[1, 8\], got 0"),
    (dict(key_bits=9), ValueError, "key_bits must be in"),
    (dict(value_bits=-3), ValueError, "value_bits must be in"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64 - 1\], got -1"),
    (dict(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64 - 1\], got 18446744073709551616"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed="1"), TypeError, "seed must be an int"),
    (dict(n_q_heads=3), ValueError, "must be a multiple of n_kv_heads"),
    (dict(n_layers=0), ValueError, "n_layers must be in"),
    (dict(block_tokens=0), ValueError, "block_tokens must be in"),
    (dict(key_method="nope"), ValueError, "nope"),
    (dict(rotation="spiral"), ValueError, "spiral"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_cache_config(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        make_core(**kw)


def test_seed_extremes_are_accepted():
    assert make_core(seed=0).seed == 0
    assert make_core(seed=2**64 - 1).seed == 2**64 - 1
    assert tq.Quantizer("turboquant_mse", dim=D, bits=2, seed=2**64 - 1).seed == 2**64 - 1


BAD_QUANTIZER = [
    (lambda: tq.Quantizer("turboquant_mse", dim=D, bits=0), ValueError, "bits must be in"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D, bits=9), ValueError, "bits must be in"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D, seed=-5), ValueError, "seed must be in"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D, seed=2**70), ValueError, "seed must be in"),
    (lambda: tq.Quantizer("turboquant_mse", dim=1), ValueError, "head_dim must be in"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).encode(k(3, D).astype(np.float64)), TypeError, "float64"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).encode(k(3, 16)), ValueError, "head_dim=32"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).encode(nan_at(k(3, D), (1, 1))), ValueError, "NaN or Inf"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).encode(k(6, D)[::2]), ValueError, "C-contiguous"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).decode(np.zeros((3, 5), np.uint8), np.zeros(3, np.float16)),
     ValueError, "code"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).decode(np.zeros((3, 12), np.int8), np.zeros(3, np.float16)),
     TypeError, "codes must be uint8"),
    (lambda: tq.Quantizer("turboquant_mse", dim=D).decode(np.zeros((3, 12), np.uint8), np.zeros(3, np.float32)),
     TypeError, "norms must be float16"),
    (lambda: tq.KVCacheBuilder().with_head_dim(D).with_seed(-1).build(), ValueError, "seed"),
    (lambda: tq.KVCacheBuilder().with_head_dim(D).with_seed(2**64).build(), ValueError, "seed"),
    (lambda: tq.KVCacheBuilder().with_head_dim(D).with_bit_width(0).build(), ValueError, "bits"),
]


@pytest.mark.parametrize("call,exc,msg", BAD_QUANTIZER, ids=[f"q{i}-{c[2]}" for i, c in enumerate(BAD_QUANTIZER)])
def test_bad_quantizer_and_builder_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# --- mixing configurations -------------------------------------------------------------

def test_artifacts_of_another_config_are_refused_and_leave_rotations_alone():
    small = _core.KVCache(16, n_layers=1, rotation="hadamard")
    big = _core.KVCache(D, n_layers=1, rotation="hadamard")
    before = big.rotation_parameters(0, 0, "key")[1].copy()
    foreign = export_artifacts(small, "key")
    foreign.pop("codebook/centroids"), foreign.pop("codebook/boundaries")
    with pytest.raises(tq.FormatError, match="expected 64 float32 values .* head_dim=32"):
        install_artifacts(big, "key", foreign)
    np.testing.assert_array_equal(big.rotation_parameters(0, 0, "key")[1], before)
    # a codebook of another bit width is "stale or foreign"
    other_bits = export_artifacts(_core.KVCache(D, n_layers=1, key_bits=2, rotation="hadamard"), "key")
    with pytest.raises(ValueError, match="stale or foreign"):
        install_artifacts(big, "key", other_bits)
    np.testing.assert_array_equal(big.rotation_parameters(0, 0, "key")[1], before)


def test_partial_artifact_install_is_rolled_back():
    c = _core.KVCache(D, n_layers=2, n_kv_heads=2, n_q_heads=2, rotation="dense")
    before = [c.rotation_parameters(l, h, "key")[1].copy() for l in range(2) for h in range(2)]
    donor = _core.KVCache(D, n_layers=2, n_kv_heads=2, n_q_heads=2, rotation="dense", seed=9)
    arrays = export_artifacts(donor, "key")
    bad = arrays["rotation/L1H1k"].copy()
    bad[3] += 0.5  # no longer orthogonal: refused by the C++ check after 3 streams went in
    arrays["rotation/L1H1k"] = bad
    with pytest.raises(tq.FormatError, match="not orthogonal"):
        install_artifacts(c, "key", arrays)
    after = [c.rotation_parameters(l, h, "key")[1] for l in range(2) for h in range(2)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_loaded_cache_keeps_its_own_config(tmp_path, core):
    p = tmp_path / "c.tq"
    core.save(str(p))
    other = make_core(key_bits=4)
    loaded = _core.KVCache.load(str(p))
    assert (loaded.key_bits, loaded.value_bits, loaded.max_tokens) == (3, 2, 40)
    # a (different-config) cache's codes are never mixed in: attention equals the original's
    np.testing.assert_array_equal(loaded.attend(FIXED_Q), core.attend(FIXED_Q))
    assert other.size(0) == 0


# --- corrupted files ---------------------------------------------------------------------

def saved_bytes():
    c = make_core(max_tokens=0)
    c.append(rnd(2, 12, D, seed=1), rnd(2, 12, D, seed=2), 0)
    c.append(rnd(2, 5, D, seed=3), rnd(2, 5, D, seed=4), 1)
    return c, c.to_bytes()


def test_cache_file_truncated_at_every_length_is_refused(tmp_path):
    c, data = saved_bytes()
    assert _core.KVCache.from_bytes(data).to_bytes() == data
    step = max(1, len(data) // 400)
    cuts = sorted(set(range(0, len(data), step)) | {1, 7, 8, 15, 16, 27, 28, len(data) - 4, len(data) - 1})
    for n in cuts:
        with pytest.raises(tq.FormatError):
            _core.KVCache.from_bytes(data[:n])
    p = tmp_path / "t.tq"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(tq.FormatError, match="truncated or corrupted"):
        _core.KVCache.load(str(p))


def test_cache_file_bit_flips_are_refused():
    _, data = saved_bytes()
    rng = np.random.default_rng(0)
    positions = sorted(set(rng.integers(0, len(data), 300).tolist()) | set(range(0, 64)))
    for pos in positions:
        for bit in (0, 7):
            b = bytearray(data)
            b[pos] ^= 1 << bit
            with pytest.raises(tq.FormatError):
                _core.KVCache.from_bytes(bytes(b))


def test_fuzzer_findings_are_format_errors():
    """Inputs libFuzzer found (tests/fuzz/corpus/fuzz_cache_load/regression_*), well-formed
    files (valid CRCs) that describe a configuration the library refuses: a FormatError,
    never another exception type (the fuzz target treats anything else as a crash)."""
    corpus = os.path.join(os.path.dirname(__file__), "..", "fuzz", "corpus", "fuzz_cache_load")
    found = sorted(f for f in os.listdir(corpus) if f.startswith("regression_"))
    assert found, corpus
    for name in found:
        with open(os.path.join(corpus, name), "rb") as f:
            data = f.read()
        with pytest.raises(tq.FormatError, match="invalid cache file"):
            _core.KVCache.from_bytes(data)


def test_cache_file_wrong_magic_future_version_and_trailing_bytes(tmp_path):
    _, data = saved_bytes()
    with pytest.raises(tq.FormatError, match="bad magic"):
        _core.KVCache.from_bytes(b"GGUF" + data[4:])
    with pytest.raises(tq.FormatError, match="bad magic"):
        _core.KVCache.from_bytes(b"\x93NUMPY" + bytes(100))
    future = bytearray(data)
    future[8:12] = (99).to_bytes(4, "little")
    with pytest.raises(tq.FormatError, match="version 99 is newer than this library supports"):
        _core.KVCache.from_bytes(bytes(future))
    with pytest.raises(tq.FormatError, match="unexpected bytes"):
        _core.KVCache.from_bytes(data + b"\0")
    with pytest.raises(tq.FormatError):
        _core.KVCache.from_bytes(b"")
    p = tmp_path / "empty.tq"
    p.write_bytes(b"")
    with pytest.raises(tq.FormatError):
        tq.CompressedKVCache.load(str(p))
    with pytest.raises(FileNotFoundError, match="no such cache file"):
        tq.CompressedKVCache.load(str(tmp_path / "missing.tq"))
    assert issubclass(tq.FormatError, ValueError)


def npy_store(tmp_path):
    store = tq.NpyArtifactStore(tmp_path)
    b = tq.KVCacheBuilder().with_head_dim(D).with_bit_width(2).with_seed(3).with_rotation("dense")
    b.with_artifact_store(store).build()
    entry = tmp_path / ArtifactKey("turboquant_mse", D, 2, 3).dirname()
    return b, entry


def rebuild(b, tmp_path):
    return b.with_artifact_store(tq.NpyArtifactStore(tmp_path)).build()


def fix_manifest(entry, name, data):
    m = json.loads((entry / "MANIFEST.json").read_text())
    m["arrays"][name]["sha256"] = hashlib.sha256(data).hexdigest()
    (entry / "MANIFEST.json").write_text(json.dumps(m))


def test_npy_store_round_trip_and_manifest(tmp_path):
    b, entry = npy_store(tmp_path)
    m = json.loads((entry / "MANIFEST.json").read_text())
    assert m["version"] == 1 and "rotation/L0H0k" in m["arrays"]
    first, second = rebuild(b, tmp_path), rebuild(b, tmp_path)
    x = rnd(8, D, seed=5)
    first.append(x, x)
    second.append(x, x)
    np.testing.assert_array_equal(first.attend(x[-1]), second.attend(x[-1]))


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "bit flip in header", "empty"])
def test_npy_store_damaged_array_is_refused(tmp_path, damage):
    b, entry = npy_store(tmp_path)
    f = entry / "rotation__L0H0k.npy"
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "bit flip":
        data[len(data) - 17] ^= 0x10
    elif damage == "bit flip in header":
        data[20] ^= 0x01
    else:
        data = bytearray()
    f.write_bytes(bytes(data))
    with pytest.raises(tq.FormatError, match="checksum mismatch"):
        rebuild(b, tmp_path)


def test_npy_store_wrong_magic_and_future_npy_version_with_a_matching_checksum(tmp_path):
    b, entry = npy_store(tmp_path)
    f = entry / "rotation__L0H0k.npy"
    for data, msg in ((b"PK\x03\x04" + f.read_bytes()[4:], "not a readable .npy"),
                      (f.read_bytes()[:6] + b"\x09\x00" + f.read_bytes()[8:], "not a readable .npy"),
                      (f.read_bytes()[:-4], "not a readable .npy")):
        f.write_bytes(data)
        fix_manifest(entry, "rotation/L0H0k", data)
        with pytest.raises(tq.FormatError, match=msg):
            rebuild(b, tmp_path)


def test_npy_store_array_of_another_shape_is_refused(tmp_path):
    b, entry = npy_store(tmp_path)
    f = entry / "rotation__L0H0k.npy"
    np.save(f, np.eye(16, dtype=np.float32).reshape(-1))
    fix_manifest(entry, "rotation/L0H0k", f.read_bytes())
    with pytest.raises(tq.FormatError, match="expected float32"):
        rebuild(b, tmp_path)


@pytest.mark.parametrize("manifest,msg", [
    (None, "has no MANIFEST.json"),
    ("{not json", "is corrupted"),
    (b"\xff\xfe\x00", "is corrupted"),
    ('{"format": "something-else", "version": 1, "arrays": {}}', "bad magic"),
    ('{"format": "turboquant-artifacts", "version": 7, "arrays": {}}', "format version 7, newer than this library"),
    ('{"format": "turboquant-artifacts", "version": 0, "arrays": {}}', "is corrupted"),
    ('{"format": "turboquant-artifacts", "version": 1, "arrays": {"../../etc/passwd": {}}}', "bad entry"),
])
def test_npy_store_manifest_damage(tmp_path, manifest, msg):
    b, entry = npy_store(tmp_path)
    m = entry / "MANIFEST.json"
    if manifest is None:
        m.unlink()
    elif isinstance(manifest, bytes):
        m.write_bytes(manifest)
    else:
        m.write_text(manifest)
    with pytest.raises(tq.FormatError, match=msg):
        rebuild(b, tmp_path)


def memory_store_with(mutate):
    store = tq.MemoryArtifactStore()
    b = tq.KVCacheBuilder().with_head_dim(D).with_bit_width(2).with_seed(3).with_layers(2).with_rotation("dense")
    b.with_artifact_store(store).build()
    key = store.keys()[0]
    for role_key in list(store._entries):  # noqa: SLF001 - damaging the stored entry on purpose
        entry = store._entries[role_key]
        mutate(entry)
    return b, store, key


@pytest.mark.parametrize("damage,msg", [
    (lambda e: e.__setitem__("rotation/L1H0k", e["rotation/L1H0k"][:-3]), "expected 1024 float32"),
    (lambda e: e.__setitem__("rotation/L1H0k", e["rotation/L1H0k"].astype(np.float64)), "expected 1024 float32"),
    (lambda e: e["rotation/L1H0k"].__setitem__(5, e["rotation/L1H0k"][5] * 3.0), "not orthogonal"),
    (lambda e: e["rotation/L0H0k"].__setitem__(0, np.nan), "NaN"),
    (lambda e: e.__setitem__("rotation_kind", np.array(7, np.float32)), "unknown rotation_kind"),
    (lambda e: e.__setitem__("rotation_kind", np.array([1, 2], np.float32)), "unknown rotation_kind"),
])
def test_memory_store_damaged_entry_is_refused(damage, msg):
    b, store, _ = memory_store_with(damage)
    with pytest.raises(tq.FormatError, match=msg):
        b.with_artifact_store(store).build()


# --- concurrency (the GIL is released inside append/attend) --------------------------

def test_concurrent_attend_threads_match_serial(core):
    qs = [rnd(4, 3, D, seed=100 + i) for i in range(8)]
    expected = [core.attend(q) for q in qs]
    errors = []

    def worker(t):
        try:
            for rep in range(40):
                i = (t + rep) % 8
                np.testing.assert_array_equal(core.attend(qs[i]), expected[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_append_overlapping_other_calls_raises_instead_of_racing():
    c = _core.KVCache(128, n_kv_heads=4, n_q_heads=4, key_bits=4, value_bits=4)
    c.append(rnd(4, 4, 128, seed=1), rnd(4, 4, 128, seed=2))
    big_k, big_v = rnd(4, 6000, 128, seed=3), rnd(4, 6000, 128, seed=4)
    q = rnd(4, 1, 128, seed=5)
    conflicts, polls = [], 0
    for _attempt in range(5):
        done = threading.Event()

        def writer():
            try:
                c.append(big_k, big_v)
            except RuntimeError as e:  # the main thread's call started first: refused, fine
                conflicts.append(str(e))
            finally:
                done.set()

        t = threading.Thread(target=writer)
        t.start()
        while not done.is_set():  # runs while the writer holds no GIL
            polls += 1
            for call in (lambda: c.attend(q), lambda: len(c), lambda: c.memory_bytes(),
                         lambda: c.append(q, q), lambda: c.trim(1)):
                try:
                    call()
                except RuntimeError as e:
                    conflicts.append(str(e))
        t.join()
        if conflicts:
            break
    assert polls > 0, "the main thread never ran during append: the GIL was not released"
    assert conflicts, "no overlap was detected in 5 long appends"
    assert all("called while another thread is" in m and "exclusive access" in m for m in conflicts)
    # the cache is whole and usable afterwards
    assert _core.KVCache.from_bytes(c.to_bytes()).to_bytes() == c.to_bytes()
    assert np.isfinite(c.attend(q)).all()


def test_locked_writer_and_free_readers_stay_consistent():
    c = _core.KVCache(D, n_q_heads=2, n_kv_heads=2)
    lock = threading.Lock()
    stop = threading.Event()
    seen, errors = [], []

    def reader():
        q = rnd(2, 1, D, seed=8)
        while not stop.is_set():
            try:
                out = c.attend(q) if len(c) else None
                if out is not None:
                    assert np.isfinite(out).all()
                    seen.append(1)
            except RuntimeError as e:
                if "another thread" not in str(e):
                    errors.append(e)
            except Exception as e:  # pragma: no cover
                errors.append(e)
            time.sleep(0.0002)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for r in readers:
        r.start()
    kk = rnd(2, 3, D, seed=9)
    added = 0
    deadline = time.monotonic() + 20
    for _ in range(100):
        while True:
            assert time.monotonic() < deadline, "writer starved"
            try:
                with lock:
                    c.append(kk, kk)
                added += 3
                break
            except RuntimeError:
                time.sleep(0.0001)
    stop.set()
    for r in readers:
        r.join()
    assert not errors
    assert len(c) == added == 300


# --- limits ----------------------------------------------------------------------------

def test_one_million_tokens_one_head():
    n, d = 1 << 20, 16
    c = _core.KVCache(d, key_bits=1, value_bits=1, block_tokens=1 << 14)
    pos = np.arange(n, dtype=np.float32)[:, None]
    keys = np.sin(pos * 1e-3 + np.arange(d, dtype=np.float32)).astype(np.float32)
    values = np.cos(pos * 2e-3 * (1 + np.arange(d, dtype=np.float32))).astype(np.float32)
    c.append(keys, values)
    assert len(c) == n
    q = rnd(d, seed=1)
    out = c.attend(q)
    assert np.isfinite(out).all()
    # the stored rows at the very end are the encodings of the last inputs
    kd = c.decode(0, 0, "key", n - 4, 4)
    quant = tq.Quantizer("turboquant_mse", dim=d, bits=1, seed=0)
    assert kd.shape == (4, d)
    assert np.isfinite(kd).all()
    win = c.attend(q, window=4)
    vd = c.decode(0, 0, "value", n - 4, 4)
    s = kd @ q / np.sqrt(d)
    w = np.exp(s - s.max())
    np.testing.assert_allclose(win, (w / w.sum()) @ vd, rtol=1e-3, atol=1e-3)
    assert c.fp16_bytes() == n * 2 * d * 2
    del quant


def test_absurd_max_tokens_reserves_nothing():
    a = _core.KVCache(D, max_tokens=2**64 - 1)
    b = _core.KVCache(D)
    assert a.memory_bytes() == b.memory_bytes()
    with pytest.raises(TypeError):
        _core.KVCache(D, max_tokens=2**64)


def test_allocation_failure_is_memory_error_and_cache_survives():
    """Under an address-space limit a big append fails with MemoryError; the cache keeps
    what it held and keeps working (a subprocess, so the limit cannot hurt other tests)."""
    code = textwrap.dedent("""
        import resource, numpy as np
        from turboquant import _core
        c = _core.KVCache(128, n_kv_heads=8, n_q_heads=8, block_tokens=4096)
        x = np.random.default_rng(0).standard_normal((8, 4, 128)).astype(np.float32)
        c.append(x, x)
        before = (len(c), c.memory_bytes(), c.to_bytes())
        big = np.zeros((8, 100_000, 128), np.float32)   # 400 MB of input, 80 MB of pages
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as f:
            vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize")][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + 8 * 2**20, hard))
        try:
            c.append(big, big)
            print("NO-ERROR")
        except MemoryError as e:
            print("MemoryError", e)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert (len(c), c.memory_bytes(), c.to_bytes()) == before, "cache changed"
        c.append(x, x)
        assert len(c) == 8
        print("OK")
    """)
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # ASan reserves terabytes of address space
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "MemoryError out of memory appending 100000 tokens" in r.stdout and "OK" in r.stdout, r.stdout + r.stderr
