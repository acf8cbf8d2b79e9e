"""The one-round rotation (``"hadamard1"``, Π = H·D₁) on the GPU kernels: the mlx-resident
store on the emulated GPU (the real turboquant.metal host functions, only mx.fast.metal_kernel
replaced) against the C++ core with the same rotation, plain keys and the key split, for each
decode-attention kernel (mma, staged, fast, generic): codes and norms bit-exact, attention
within each kernel's tolerance, files byte-identical both ways. The kernels take one round at
compile time (TQ_ROTATION_ROUNDS in the header, metal.kernel_header)."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from test_mlx_metal import assert_same_codes  # noqa: E402
from turboquant import _core, metal, mlx_metal  # noqa: E402

MMA_TOL = 2e-3  # the mma kernel's fp16 products (test_gpu_fast_attention.py)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from mlx_kernel_emulator import EmulatedKernels

    return EmulatedKernels(tmp_path_factory.mktemp("emu_h1"))


def config(d, hq, hkv, kb, vb, bt, split, rotation="hadamard1"):
    kw = dict(n_layers=1, n_q_heads=hq, n_kv_heads=hkv, value_bits=vb, seed=5, block_tokens=bt,
              rotation=rotation, key_bits=kb)
    if split:  # the mlx-lm key split: outlier half at kb + 1 bits, the other at kb - 1
        kw.update(key_bits=kb - 1, n_outlier_channels=d // 2, outlier_bits=kb + 1,
                  outlier_channels=list(range(d // 2)), outlier_roles="keys")
    return kw


def filled_pair(rng, d, hkv, tokens, kw, split):
    store, core = mlx_metal.MetalCodeStore(d, **kw), _core.KVCache(d, **kw)
    k, v = (rng.standard_normal((hkv, tokens, d)).astype(np.float32) for _ in range(2))
    k *= 1.5
    if split:
        k[..., : d // 2] *= 3.0  # unequal halves: the angle codes vary
    store.append(mx.array(k), mx.array(v))
    core.append(k, v)
    return store, core


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))


# The launches of one decode step by each kernel, plain and split keys.
LAUNCHES = {
    ("mma", False): ["attention_mma", "attention_reduce_heads"],
    ("staged", False): ["attention_staged", "attention_reduce_heads"],
    ("fast", False): ["attention_fast", "attention_reduce_heads"],
    ("generic", False): ["rotate_heads", "attention_block", "attention_reduce_heads"],
    ("mma", True): ["attention_mma", "attention_reduce_heads"],
    ("staged", True): ["attention_staged", "attention_reduce_heads"],
    ("fast", True): ["attention_fast", "attention_reduce_heads"],
    ("generic", True): ["split_rotate_heads", "split_attention_block", "attention_reduce_heads"],
}


# head_dim 128 (2^7: 1/√d is not a power of two) for plain keys, 64 (halves of 2^5) for the
# split; tokens over several pages, the last one partial.
@pytest.mark.parametrize("kernel", ["mma", "staged", "fast", "generic"])
@pytest.mark.parametrize("d,hq,hkv,kb,vb,tokens,bt,split", [
    (128, 4, 2, 3, 3, 75, 16, False),
    (64, 4, 2, 3, 3, 75, 8, True),
])
def test_hadamard1_store_matches_the_core(emulated, monkeypatch, kernel, d, hq, hkv, kb, vb,
                                          tokens, bt, split):
    emulated.install(monkeypatch)
    rng = np.random.default_rng(d + tokens + split)
    store, core = filled_pair(rng, d, hkv, tokens, config(d, hq, hkv, kb, vb, bt, split), split)
    # (a split's block-diagonal rotation reports "dense"; its parts are hadamard1)
    assert store.rotation == "hadamard1"
    assert (core.configured_rotation if split else core.rotation) == "hadamard1"
    tables = store._groups[0]
    assert tables.key_tables.rounds == tables.value_tables.rounds == 1
    assert_same_codes(store, core)
    assert store.memory_bytes() == core.memory_bytes()  # d signs per rotation
    q = rng.standard_normal((hq, 1, d)).astype(np.float32)
    start = len(emulated.launches)
    with metal.forced_attention(kernel):
        got = np.array(store.attend(mx.array(q), scale=0.2))
    assert emulated.launches[start:] == LAUNCHES[(kernel, split)]
    want = core.attend(q, scale=0.2)
    assert rel_err(got, want) <= (MMA_TOL if kernel == "mma" else 2e-5)
    # A prefill (several query rows: the decoded tile) goes through the inverse rotation.
    q4 = rng.standard_normal((hq, 4, d)).astype(np.float32)
    assert rel_err(np.array(store.attend(mx.array(q4))), core.attend(q4)) <= 2e-5
    # Files: the store writes the core's bytes, and reads them back to the same codes.
    blob = core.to_bytes()
    assert store.to_bytes() == blob
    back = mlx_metal.MetalCodeStore.from_bytes(blob)
    assert back.rotation == "hadamard1"
    assert_same_codes(back, core)


def test_two_round_kernels_do_not_pass_for_one(emulated, monkeypatch):
    # The comparison can fail: a hadamard1 store whose kernels were built for two rounds (the
    # rounds dropped on the way to the kernel) encodes other codes than the core.
    emulated.install(monkeypatch)
    monkeypatch.setattr(metal, "_kernel", lambda which, rounds=2: emulated.kernel(which))
    rng = np.random.default_rng(3)
    for split in (False, True):
        store, core = filled_pair(rng, 64, 2, 20, config(64, 4, 2, 3, 3, 8, split), split)
        with pytest.raises(AssertionError):
            assert_same_codes(store, core)


def test_signs_tables_and_rounds():
    q1 = _core.Quantizer("turboquant_mse", 64, 3, 7, rotation="hadamard1", stream=2)
    q2 = _core.Quantizer("turboquant_mse", 64, 3, 7, rotation="hadamard", stream=2)
    t1, t2 = metal.HeadTables([q1]), metal.HeadTables([q2])
    assert (t1.rounds, t2.rounds) == (1, 2)
    s1, s2 = t1.signs_numpy(), t2.signs_numpy()
    assert s1.shape == s2.shape == (1, 128)
    np.testing.assert_array_equal(s1[0, :64], s2[0, :64])  # D₁: the first signs of hadamard
    np.testing.assert_array_equal(s1[0, 64:], 1.0)
    assert t1.state_bytes() == 64 * 4 and t2.state_bytes() == 128 * 4
    with pytest.raises(ValueError, match="same dim, bits, rotation"):
        metal.HeadTables([q1, q2])
    with pytest.raises(ValueError, match="hadamard or hadamard1"):
        metal.HeadTables([_core.Quantizer("turboquant_mse", 64, 3, 7, rotation="dense")])
    assert mlx_metal.store_supports(64, rotation="hadamard1") is None
    assert "hadamard1" in mlx_metal.store_supports(64, rotation="dense")
    # The one-round header defines TQ_ROTATION_ROUNDS; the two-round text is unchanged, and
    # the kernels' names (digests of their text) differ.
    h1, src = metal.kernel_text("encode_heads", "metal", rounds=1)
    h2, _ = metal.kernel_text("encode_heads", "metal")
    assert "#define TQ_ROTATION_ROUNDS 1u" in h1 and "#define TQ_ROTATION_ROUNDS 1u" not in h2
    assert metal.kernel_name("k", h1, src) != metal.kernel_name("k", h2, src)
    with pytest.raises(ValueError, match="rounds must be 1 or 2"):
        metal.kernel_header(rounds=3)
    assert metal.rotation_rounds("hadamard1") == 1
    with pytest.raises(ValueError, match="hadamard and hadamard1"):
        metal.rotation_rounds("dense")
