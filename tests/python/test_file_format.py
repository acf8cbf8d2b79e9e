"""The cache file format across its versions (cpp/include/turboquant/serialize.h): files of
every version the library has written load to the same cache (committed fixtures of versions
1-7 under tests/data/cache_files, with what they must load to), re-save as the section
container (version 8) and load back identically; legacy saves still write the old versions
byte for byte; in the container an unknown critical section is refused by name and an
unknown ancillary one skipped."""

import struct
from pathlib import Path

import numpy as np
import pytest

import turboquant
from reference import crc32c
from turboquant import _core

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "cache_files"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.tqkv"))


def version_of(data: bytes) -> int:
    return struct.unpack_from("<I", data, 8)[0]


def assert_loads_to(cache, want):
    for layer in range(cache.n_layers):
        assert cache.size(layer) == int(want[f"size_{layer}"])
        for h in range(cache.n_kv_heads):
            for role in ("key", "value"):
                assert np.array_equal(cache.decode(layer, h, role),
                                      want[f"rows_{layer}_{h}_{role}"]), (layer, h, role)
        out = cache.attend(want[f"query_{layer}"], layer)
        np.testing.assert_array_equal(out, want[f"attend_{layer}"])


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_there_is_a_fixture_of_every_legacy_version():
    versions = {version_of((FIXTURES / f"{n}.tqkv").read_bytes()) for n in NAMES}
    assert versions == set(range(1, 8)), versions
    assert _core.KVCache(16).format_version == 8


@pytest.mark.parametrize("name", NAMES)
def test_old_files_load_and_resave(name, tmp_path):
    data = (FIXTURES / f"{name}.tqkv").read_bytes()
    want = np.load(FIXTURES / f"{name}.npz")
    assert version_of(data) == int(name[1])
    cache = _core.KVCache.from_bytes(data)
    assert_loads_to(cache, want)
    assert_loads_to(cache.copy(), want)  # every feature of every version survives a copy
    # A legacy save writes the same bytes the older library wrote.
    assert cache.legacy_format_version == version_of(data)
    assert _core.KVCache.from_bytes(data).to_bytes(legacy=True) == data
    # The container re-save loads to the same cache, and saves to the same bytes again.
    fresh = _core.KVCache.from_bytes(data)
    path = tmp_path / "resaved.tqkv"
    fresh.save(str(path))
    resaved = path.read_bytes()
    assert version_of(resaved) == 8 and resaved != data
    again = _core.KVCache.load(str(path))
    assert_loads_to(again, want)
    assert _core.KVCache.load(str(path)).to_bytes() == resaved


def sections(data: bytes):
    """(offset, tag, payload length) of each section of a file."""
    out, at = [], 16
    while at < len(data):
        tag = data[at:at + 4]
        (n,) = struct.unpack_from("<Q", data, at + 4)
        out.append((at, tag, n))
        at += 12 + n + 4
    return out


def with_section(data: bytes, before: bytes, tag: bytes, payload: bytes) -> bytes:
    at = next(off for off, t, _ in sections(data) if t == before)
    body = tag + struct.pack("<Q", len(payload)) + payload
    return data[:at] + body + struct.pack("<I", crc32c(body)) + data[at:]


def feature_cache():
    c = _core.KVCache(32, n_layers=1, n_q_heads=2, n_kv_heads=1, key_bits=3, value_bits=3,
                      block_tokens=4, fp16_window=4, fp16_sinks=1, norm_correction=True)
    rng = np.random.default_rng(0)
    c.append(rng.standard_normal((1, 11, 32)).astype(np.float32),
             rng.standard_normal((1, 11, 32)).astype(np.float32))
    return c


def test_container_has_one_section_per_feature():
    tags = [t for _, t, _ in sections(feature_cache().to_bytes())]
    assert tags[:5] == [b"CONF", b"FWIN", b"FSNK", b"QOPT", b"ROTS"], tags
    assert tags[-1] == b"END "
    plain = [t for _, t, _ in sections(_core.KVCache(16).to_bytes())]
    assert plain == [b"CONF", b"ROTS", b"LAYR", b"END "]


def test_unknown_sections_critical_refused_ancillary_skipped():
    c = feature_cache()
    data = c.to_bytes()
    for before in (b"ROTS", b"LAYR", b"END "):
        skipped = with_section(data, before, b"xtra", b"anything at all")
        back = _core.KVCache.from_bytes(skipped)
        assert back.to_bytes() == data  # skipped, and not written back
        with pytest.raises(turboquant.FormatError, match="needs section 'NEWF'.* upgrade"):
            _core.KVCache.from_bytes(with_section(data, before, b"NEWF", b"\x00" * 8))
    # A damaged ancillary section is still a damaged file.
    bad = bytearray(with_section(data, b"ROTS", b"xtra", b"payload"))
    at = next(off for off, t, _ in sections(bytes(bad)) if t == b"xtra")
    bad[at + 12] ^= 1
    with pytest.raises(turboquant.FormatError, match="CRC32C mismatch"):
        _core.KVCache.from_bytes(bytes(bad))


def test_feature_sections_are_checked():
    data = feature_cache().to_bytes()
    # A feature section twice, or one that says nothing, is a corrupted file.
    fwin = next((off, n) for off, t, n in sections(data) if t == b"FWIN")
    twice = data[:fwin[0]] + data[fwin[0]:fwin[0] + 16 + fwin[1]] + data[fwin[0]:]
    with pytest.raises(turboquant.FormatError, match="FWIN appears twice"):
        _core.KVCache.from_bytes(twice)
    empty_sinks = with_section(data, b"ROTS", b"FSNK", struct.pack("<Q", 0))
    with pytest.raises(turboquant.FormatError):
        _core.KVCache.from_bytes(empty_sinks)
    # Every truncation is refused.
    for n in range(0, len(data), 7):
        with pytest.raises(turboquant.FormatError):
            _core.KVCache.from_bytes(data[:n])


def test_copy_is_independent_and_equal():
    c = feature_cache()
    before = c.to_bytes()
    d = c.copy()
    assert type(d) is _core.KVCache and d.to_bytes() == before
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 32)).astype(np.float32)
    d.append(x, x)
    assert c.to_bytes() == before and d.size(0) == c.size(0) + 5
    c.append(x, x)
    assert c.to_bytes() == d.to_bytes()  # the same appends, the same cache
    q = rng.standard_normal((2, 3, 32)).astype(np.float32)
    np.testing.assert_array_equal(c.copy().attend(q), c.attend(q))
