"""The turboquant_mse quantizer through the Python API, checked against reference.py."""

import tracemalloc

import numpy as np
import pytest

import reference as ref
import turboquant as tq


def unit_vectors(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_module_metadata():
    assert tq.__version__ == "0.1.0"
    assert tq.backends() == ["cpu"]
    info = tq.build_info()
    assert "compiler" in info and "scalar" in info["simd_targets_available"]
    assert "turboquant_mse" in tq.methods()


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_philox_reference_matches_rotation_signs(seed):
    q = tq.Quantizer("turboquant_mse", dim=64, bits=2, seed=seed, rotation="hadamard")
    np.testing.assert_allclose(q.rotation_matrix(), ref.hadamard_rotation(64, seed), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 12345])
@pytest.mark.parametrize("d", [16, 64, 256])
def test_hadamard1_is_one_round_with_the_first_signs(seed, d):
    q = tq.Quantizer("turboquant_mse", dim=d, bits=2, seed=seed, rotation="hadamard1")
    assert q.rotation == "hadamard1"
    np.testing.assert_allclose(q.rotation_matrix(), ref.hadamard1_rotation(d, seed), atol=1e-6)
    two = tq.Quantizer("turboquant_mse", dim=d, bits=2, seed=seed, rotation="hadamard")
    np.testing.assert_array_equal(q.rotation_parameters(), two.rotation_parameters()[:d])
    with pytest.raises(ValueError, match="hadamard1 rotation needs a power-of-two"):
        tq.Quantizer("turboquant_mse", dim=96, bits=2, rotation="hadamard1")


def test_hadamard1_reaches_the_parts_of_an_outlier_split():
    q = tq.Quantizer("turboquant_mse", dim=64, bits=2, seed=1, rotation="hadamard1",
                     outlier_channels=list(range(0, 64, 2)), outlier_bits=4)
    assert [q.part(p).rotation for p in (0, 1)] == ["hadamard1", "hadamard1"]
    x = unit_vectors(50, 64)
    codes, norms = q.encode(x)
    assert np.mean(np.sum((q.decode(codes, norms) - x) ** 2, axis=1)) < 0.1


@pytest.mark.parametrize("d", [16, 48, 100])
def test_dense_rotation_matches_reference_qr(d):
    q = tq.Quantizer("turboquant_mse", dim=d, bits=2, seed=7, rotation="dense")
    np.testing.assert_allclose(q.rotation_matrix(), ref.dense_rotation(d, 7), atol=2e-5)


@pytest.mark.parametrize("d,bits", [(64, 1), (64, 3), (128, 2), (128, 4), (100, 3)])
def test_codebook_matches_reference_lloyd(d, bits):
    cb = tq.codebook(d, bits)
    c, dist = ref.lloyd_max(d, bits)
    np.testing.assert_allclose(cb.centroids, c, atol=2e-5)
    assert cb.vector_distortion == pytest.approx(dist, rel=2e-3)


@pytest.mark.parametrize("rotation", ["hadamard", "hadamard1", "dense"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_match_numpy_reference(rotation, bits):
    d = 64
    q = tq.Quantizer("turboquant_mse", dim=d, bits=bits, seed=3, rotation=rotation)
    x = np.random.default_rng(1).standard_normal((200, d)).astype(np.float32) * 2
    codes, norms = q.encode(x)
    rot = q.rotation_matrix().astype(np.float64)
    cent = q.codebook.centroids.astype(np.float64)
    rcodes, rnorms, idx = ref.mse_encode(x.astype(np.float64), rot, cent, bits)
    # A coordinate within float rounding of a boundary may round either way: allow a tiny
    # fraction of differing indices, never a wrong layout.
    got = np.stack([tq.unpack_indices(c, d, bits) for c in codes])
    assert np.mean(got != idx) < 1e-3
    same = np.all(got == idx, axis=1)
    np.testing.assert_array_equal(codes[same], rcodes[same])
    np.testing.assert_allclose(norms.astype(np.float64), rnorms, rtol=1e-3)
    np.testing.assert_allclose(q.decode(codes, norms), ref.mse_decode(got, norms.astype(np.float64), rot, cent),
                               atol=1e-4)


@pytest.mark.parametrize("bits,expected", [(1, 0.361), (2, 0.116), (3, 0.0340), (4, 0.0093)])
def test_distortion_within_one_percent(bits, expected):
    n, d = 100_000, 128
    x = unit_vectors(n, d, seed=bits)
    q = tq.Quantizer("turboquant_mse", dim=d, bits=bits, seed=0)
    codes, norms = q.encode(x)
    err = np.mean(np.sum((x - q.decode(codes, norms)) ** 2, axis=1))
    predicted = tq.codebook(d, bits).vector_distortion
    assert err == pytest.approx(predicted, rel=0.01)
    assert predicted == pytest.approx(expected, rel=0.01)


def test_float16_input_and_shapes():
    q = tq.Quantizer("turboquant_mse", dim=32, bits=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 32)).astype(np.float32)
    c32, n32 = q.encode(x)
    c16, n16 = q.encode(x.astype(np.float16))
    assert c32.shape == (2, 3, 5, q.code_bytes) and n32.shape == (2, 3, 5)
    assert n32.dtype == np.float16
    assert q.decode(c32, n32).shape == x.shape
    assert np.mean(c32 != c16) < 0.05  # fp16 rounding of the input moves few indices
    c1, n1 = q.encode(x[0, 0, 0])
    assert c1.shape == (q.code_bytes,) and n1.shape == ()


def test_float32_input_is_not_copied():
    q = tq.Quantizer("turboquant_mse", dim=128, bits=3)
    x = np.random.default_rng(0).standard_normal((20_000, 128)).astype(np.float32)  # 10 MB
    tracemalloc.start()
    codes, norms = q.encode(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    outputs = codes.nbytes + norms.nbytes
    assert peak < outputs + 0.1 * x.nbytes, f"peak {peak} B suggests a copy of the {x.nbytes} B input"


def test_inner_products_match_decode():
    q = tq.Quantizer("turboquant_mse", dim=128, bits=4, seed=1)
    x = np.random.default_rng(2).standard_normal((300, 128)).astype(np.float32)
    qs = np.random.default_rng(3).standard_normal((4, 128)).astype(np.float32)
    codes, norms = q.encode(x)
    np.testing.assert_allclose(q.inner_products(qs, codes, norms), qs @ q.decode(codes, norms).T,
                               rtol=1e-4, atol=1e-3)


def test_fp32_norms_and_norm_correction():
    q = tq.Quantizer("turboquant_mse", dim=64, bits=2, norm_dtype=np.float32, norm_correction=True)
    x = unit_vectors(100, 64)
    codes, norms = q.encode(x)
    assert norms.dtype == np.float32 and q.bytes_per_vector == 16 + 4
    np.testing.assert_allclose(np.linalg.norm(q.decode(codes, norms), axis=1), 1.0, rtol=1e-5)


def test_deterministic_by_seed():
    x = unit_vectors(50, 64)
    a = tq.Quantizer("turboquant_mse", dim=64, bits=3, seed=5).encode(x)
    b = tq.Quantizer("turboquant_mse", dim=64, bits=3, seed=5).encode(x)
    c = tq.Quantizer("turboquant_mse", dim=64, bits=3, seed=6).encode(x)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_bytes_per_vector():
    for bits, expected in [(2, 34), (3, 50), (4, 66)]:
        assert tq.Quantizer("turboquant_mse", dim=128, bits=bits).bytes_per_vector == expected


def test_pack_matches_reference():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for count in (1, 7, 33, 128, 129):
            idx = rng.integers(0, 2**bits, count).astype(np.uint8)
            np.testing.assert_array_equal(tq.pack_indices(idx, bits), ref.pack(idx, bits))
            np.testing.assert_array_equal(tq.unpack_indices(ref.pack(idx, bits), count, bits), idx)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda q: q.encode(np.zeros((4, 32), np.float64)), TypeError, "float64"),
        (lambda q: q.encode(np.zeros((4, 32), np.int32)), TypeError, "int32"),
        (lambda q: q.encode(np.zeros((4, 33), np.float32)), ValueError, "head_dim=32"),
        (lambda q: q.encode(np.zeros((32, 8), np.float32).T), ValueError, "C-contiguous"),
        (lambda q: q.encode(np.full((2, 32), np.nan, np.float32)), ValueError, "NaN"),
        (lambda q: q.encode(np.full((2, 32), np.inf, np.float32)), ValueError, "NaN or Inf"),
        (lambda q: q.encode(np.float32(1.0)), ValueError, "dimension"),
        (lambda q: q.encode("hello"), TypeError, "float32"),
        (lambda q: q.decode(np.zeros((2, 5), np.uint8), np.zeros(2, np.float16)), ValueError, "code_bytes"),
        (lambda q: q.decode(np.zeros((2, 12), np.int8), np.zeros(2, np.float16)), TypeError, "uint8"),
        (lambda q: q.decode(np.zeros((2, 12), np.uint8), np.zeros(2, np.float32)), TypeError, "float16"),
        (lambda q: q.decode(np.zeros((2, 12), np.uint8), np.zeros(3, np.float16)), ValueError, "norms has 3"),
    ],
)
def test_bad_input_errors(make, exc, match):
    q = tq.Quantizer("turboquant_mse", dim=32, bits=3)
    with pytest.raises(exc, match=match):
        make(q)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=0), r"bits must be in \[1, 8\], got 0"),
        (dict(bits=9), r"bits must be in \[1, 8\], got 9"),
        (dict(dim=8), r"head_dim must be in \[16, 512\], got 8"),
        (dict(dim=1000), r"head_dim must be in \[16, 512\], got 1000"),
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(rotation="fft"), "rotation must be"),
        (dict(dim=96, rotation="hadamard"), "power-of-two"),
        (dict(norm_dtype=np.int8), "norm_dtype"),
    ],
)
def test_bad_config_errors(kwargs, match):
    args = dict(method="turboquant_mse", dim=32, bits=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tq.Quantizer(**args)


def test_copy_true_converts():
    q = tq.Quantizer("turboquant_mse", dim=32, bits=3)
    x = np.random.default_rng(0).standard_normal((8, 32))
    c1, _ = q.encode(x, copy=True)
    c2, _ = q.encode(x.astype(np.float32))
    np.testing.assert_array_equal(c1, c2)
    xt = np.ascontiguousarray(x.astype(np.float32).T).T  # non-contiguous view of (8, 32)? no: (32,8)->T
    xs = x.astype(np.float32)[:, ::1]
    np.testing.assert_array_equal(q.encode(np.asfortranarray(xs), copy=True)[0], c2)
    del xt
