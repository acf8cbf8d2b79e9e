"""The dequantize kernels of a prefill tile on the emulated GPU: the rows form (a simd-group
per row, the inverse Hadamard in registers, several rows per threadgroup; the default) against
the group form (a threadgroup per row, the transform in threadgroup memory) and the C++
core's decode, bit for bit, for plain and split keys, one and two rotation rounds, fp32 and
fp16 tiles, rotated-domain tiles, and row counts that leave the last threadgroup part
empty; head dims outside the rows form's (not 32·2^k) keep the group form."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from turboquant import _core, metal, mlx_metal  # noqa: E402


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_dequant"))


def store_and_core(d, heads, tokens, split, rotation, seed=11):
    kw = dict(n_layers=1, n_q_heads=heads, n_kv_heads=heads, key_bits=3, value_bits=2,
              seed=seed, block_tokens=8, rotation=rotation)
    if split:
        kw.update(key_bits=2, n_outlier_channels=d // 2, outlier_bits=4,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys")
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((heads, tokens, d)).astype(np.float32) for _ in range(2))
    k[..., : d // 2] *= np.exp(rng.uniform(-2.0, 2.0, (heads, tokens, 1))).astype(np.float32)
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    return store, core


def both_forms(monkeypatch, emulated, tables, codes, norms, **kw):
    """dequantize_heads by the rows form and by the group form, with the launches of each."""
    out = {}
    for form in ("rows", "group"):
        monkeypatch.setenv("TQ_GPU_DEQUANTIZE", form)
        start = len(emulated.launches)
        out[form] = (np.array(metal.dequantize_heads(tables, codes, norms, **kw)),
                     emulated.launches[start:])
    return out


@pytest.mark.parametrize("rotation", ["hadamard", "hadamard1"])
@pytest.mark.parametrize("d,split", [(32, False), (128, False), (256, False), (64, True),
                                     (128, True)])
def test_the_rows_form_is_bit_identical_to_the_group_form_and_the_core(
        emulated, monkeypatch, d, split, rotation):
    emulated.install(monkeypatch)
    heads, tokens = 2, 13  # 26 rows: the last threadgroup of 8 rows has 2
    store, core = store_and_core(d, heads, tokens, split, rotation)
    for role, tables in (("key", store.key_tables), ("value", store.value_tables)):
        codes = mx.array(np.stack([store.encoded(0, h, role)[0] for h in range(heads)]))
        norms = mx.array(np.stack([store.encoded(0, h, role)[1] for h in range(heads)]))
        is_split = split and role == "key"
        name = ("split_" if is_split else "") + "dequantize"
        for kw in (dict(), dict(out_dtype=mx.float16), dict(inverse_rotate=False)):
            got = both_forms(monkeypatch, emulated, tables, codes, norms, **kw)
            rows, rows_launch = got["rows"]
            group, group_launch = got["group"]
            assert rows_launch == [name + "_rows_heads"], rows_launch
            assert group_launch == [name + "_heads"], group_launch
            assert rows.dtype == group.dtype and rows.shape == (heads, tokens, d)
            assert np.array_equal(rows.view(np.uint8), group.view(np.uint8)), (role, kw)
            if not kw:  # decoded rows: the core's Quantizer.decode, to the bit
                for h in range(heads):
                    c, n = core.encoded(0, h, role, 0, tokens)
                    assert np.array_equal(rows[h], tables.quantizers[h].decode(c, n)), (role, h)


def test_rows_form_takes_only_the_head_dims_it_can(monkeypatch):
    monkeypatch.delenv("TQ_GPU_DEQUANTIZE", raising=False)
    assert metal.dequantize_kernel() == "rows"
    for dim, lanes, form in ((16, 1, "dequantize_heads"), (48, 1, "dequantize_heads"),
                             (1024, 1, "dequantize_heads"), (32, 2, "split_dequantize_heads"),
                             (32, 1, "dequantize_rows_heads"),
                             (512, 2, "split_dequantize_rows_heads")):
        base = "split_dequantize_heads" if "split" in form else "dequantize_heads"
        which, launch = metal._dequantize_launch(base, 10, dim, lanes)
        assert which == form, (dim, which)
        if "rows" in which:  # 10 rows: two threadgroups of 8 simd-groups
            assert launch == dict(grid=(512, 1, 1), threadgroup=(256, 1, 1))
        else:
            assert launch["threadgroup"] == (metal.threads_for(dim), 1, 1)
    monkeypatch.setenv("TQ_GPU_DEQUANTIZE", "group")
    assert metal._dequantize_launch("dequantize_heads", 10, 128, 1)[0] == "dequantize_heads"
    monkeypatch.setenv("TQ_GPU_DEQUANTIZE", "warp")
    with pytest.raises(ValueError, match="TQ_GPU_DEQUANTIZE must be 'rows' or 'group'"):
        metal.dequantize_kernel()


@pytest.mark.parametrize("d,split", [(64, False), (128, True), (16, False)])
@pytest.mark.parametrize("nb,na", [(0, 0), (2, 0), (0, 5), (3, 7)])
def test_the_tile_kernel_writes_the_fp16_rows_and_the_codes_in_one_launch(
        emulated, monkeypatch, d, split, nb, na):
    # The prefill tile: fp16 sinks, the decoded codes, the fp16 window, per head. The rows
    # form writes it in one launch, bit-identical to decoding (group form) and concatenating,
    # and to the reference kernels; d = 16 (not 32·2^k) takes the group form and concatenates.
    emulated.install(monkeypatch)
    heads, tokens = 2, 11
    store, _ = store_and_core(d, heads, tokens, split, "hadamard")
    rng = np.random.default_rng(nb * 10 + na)
    rows = [mx.array(rng.standard_normal((heads, m, d)).astype(np.float16)) if m else None
            for m in (nb, na)]
    tables = store.key_tables
    codes = mx.array(np.stack([store.encoded(0, h, "key")[0] for h in range(heads)]))
    norms = mx.array(np.stack([store.encoded(0, h, "key")[1] for h in range(heads)]))
    start = len(emulated.launches)
    tile = metal.dequantize_tile_heads(tables, codes, norms, before=rows[0], after=rows[1])
    launches = emulated.launches[start:]
    assert tile.dtype == mx.float16 and tile.shape == (heads, nb + tokens + na, d)
    name = ("split_" if split else "") + "dequantize"
    assert launches == ([name + "_tile_heads"] if d != 16 else [name + "_heads"]), launches
    monkeypatch.setenv("TQ_GPU_DEQUANTIZE", "group")
    decoded = metal.dequantize_heads(tables, codes, norms, out_dtype=mx.float16)
    want = mx.concatenate([r for r in (rows[0], decoded, rows[1]) if r is not None], axis=1)
    assert np.array_equal(np.array(tile).view(np.uint16), np.array(want).view(np.uint16))
    ref = mlx_metal.ReferenceKernels.dequantize_tile_heads(tables, codes, norms, rows[0], rows[1])
    assert np.array_equal(np.array(ref).view(np.uint16), np.array(want).view(np.uint16))
    monkeypatch.delenv("TQ_GPU_DEQUANTIZE")
    with pytest.raises(ValueError, match="before rows must be float16"):
        metal.dequantize_tile_heads(tables, codes, norms,
                                    before=mx.zeros((heads, 2, d), mx.float32))
    with pytest.raises(ValueError, match="after rows must be float16 of shape"):
        metal.dequantize_tile_heads(tables, codes, norms,
                                    after=mx.zeros((heads + 1, 2, d), mx.float16))


def test_a_float16_prefill_takes_the_tile_kernel_and_matches_the_group_form(emulated,
                                                                          monkeypatch):
    # Through the store: a float16 prefill with fp16 sinks and window gives the same output,
    # bit for bit, by one tile launch per role as by the group form's decode + concatenation.
    emulated.install(monkeypatch)
    d, hq, hkv = 64, 4, 2
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, key_bits=2, value_bits=3, seed=4,
              block_tokens=8, fp16_sinks=2, fp16_window=8, n_outlier_channels=d // 2,
              outlier_bits=4, outlier_channels=list(range(d // 2)), outlier_roles="keys")
    store = mlx_metal.MetalCodeStore(d, **kw)
    rng = np.random.default_rng(5)
    store.append(mx.array(rng.standard_normal((hkv, 37, d)).astype(np.float32)),
                 mx.array(rng.standard_normal((hkv, 37, d)).astype(np.float32)))
    q = mx.array(rng.standard_normal((hq, 6, d)).astype(np.float16))
    out = {}
    for form in ("rows", "group"):
        monkeypatch.setenv("TQ_GPU_DEQUANTIZE", form)
        start = len(emulated.launches)
        out[form] = np.array(store.attend(q, scale=0.2, dtype=mx.float16))
        used = emulated.launches[start:]
        if form == "rows":
            assert sorted(used) == ["dequantize_tile_heads", "split_dequantize_tile_heads"], used
        else:
            assert sorted(used) == ["dequantize_heads", "split_dequantize_heads"], used
    assert np.array_equal(out["rows"].view(np.uint16), out["group"].view(np.uint16))
