"""turboquant_prod, qjl, polar and the outlier split through the Python API: bytes, exact
bits, calibration, the documented code layout, and property tests (hypothesis) over
d in [16, 512], b in 1..8 and random seeds against the theoretical distortion."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
import turboquant as tq

METHODS = ["turboquant_mse", "turboquant_prod", "qjl", "polar"]
UPPER = math.sqrt(3) * math.pi / 2  # TurboQuant Thm. 1: D_mse <= UPPER * 4^-b
UPPER_IP = math.sqrt(3) * math.pi**2  # Thm. 2: d * Var(IP error) <= UPPER_IP * 4^-b


def unit_vectors(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_methods_registered():
    assert set(METHODS) <= set(tq.methods())


@pytest.mark.parametrize(
    "method,expected",
    [("turboquant_mse", [18, 34, 50, 66]), ("turboquant_prod", [18, 36, 52, 68]),
     ("polar", [18, 34, 50, 66]), ("qjl", [18, 34, 50, 66])],
)
def test_bytes_per_vector_d128(method, expected):
    assert [tq.bytes_per_vector(method, 128, b) for b in (1, 2, 3, 4)] == expected
    for b, n in zip((1, 2, 3, 4), expected):
        assert tq.Quantizer(method, 128, b).bytes_per_vector == n
        assert tq.effective_bits(method, 128, b) == 8 * n / 128


def test_bytes_options():
    assert tq.bytes_per_vector("turboquant_mse", 128, 3, norm_dtype="float32") == 52
    assert tq.bytes_per_vector("turboquant_prod", 128, 3, jl_dim=64) == 32 + 8 + 2 + 2
    # 1 (8-bit split angle, the default) + 2 + 31 + 2 (norm); 37 with the 16-bit angle
    assert tq.bytes_per_vector("turboquant_mse", 128, 2, n_outlier_channels=4, outlier_bits=3) == 36
    assert tq.effective_bits("turboquant_mse", 128, 2, n_outlier_channels=4, outlier_bits=3) == 36 * 8 / 128
    assert tq.bytes_per_vector("turboquant_mse", 128, 2, n_outlier_channels=4, outlier_bits=3,
                               split_angle_bits=16) == 37
    assert tq.effective_bits("turboquant_mse", 128, 2, n_outlier_channels=4, outlier_bits=3,
                             split_angle_bits=16) == 37 * 8 / 128


@pytest.mark.parametrize("n_out,bits,out_bits,nominal", [(64, 2, 3, 2.5), (64, 3, 4, 3.5), (32, 2, 3, 2.25),
                                                         (4, 2, 3, 2.03125), (4, 3, 0, 3.03125)])
def test_fractional_bits_exact(n_out, bits, out_bits, nominal):
    got = tq.effective_bits("turboquant_mse", 128, bits, n_outlier_channels=n_out, outlier_bits=out_bits,
                            nominal=True)
    assert got == nominal

    # polar stores d - 1 angles per part: floor(d/2) at b + 1 bits, the rest at b - 1.
    def polar_bits(d, b):
        return (d // 2) * (b + 1) + (d - 1 - d // 2) * (b - 1)

    ob = out_bits or bits + 1
    want = (polar_bits(n_out, ob) + polar_bits(128 - n_out, bits)) / 128
    assert tq.effective_bits("polar", 128, bits, n_outlier_channels=n_out, outlier_bits=out_bits,
                             nominal=True) == want
    q = tq.Quantizer("turboquant_mse", 128, bits, n_outlier_channels=n_out, outlier_bits=out_bits)
    assert q.nominal_bits == nominal
    assert q.outlier_bits == (out_bits or bits + 1)
    assert q.outlier_channels == list(range(n_out))


def test_calibration_picks_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    x[:, [3, 50, 17]] *= [8, -6, 5]
    assert tq.select_outlier_channels(x, 3) == [3, 17, 50]
    q = tq.Quantizer("turboquant_prod", 64, 2, n_outlier_channels=3, calibration=x)
    assert q.outlier_channels == [3, 17, 50]
    q2 = tq.Quantizer("polar", 64, 2, outlier_channels=[50, 3])
    assert q2.outlier_channels == [3, 50]
    assert "n_outlier_channels=3" in repr(q)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(outlier_channels=[1, 1]), "listed twice"),
        (dict(outlier_channels=[64]), "outside"),
        (dict(n_outlier_channels=64), "n_outlier_channels must be in"),
        (dict(outlier_bits=3), "without outlier channels"),
        (dict(n_outlier_channels=2, outlier_bits=9), "outlier_bits"),
        (dict(calibration=np.ones((4, 64), np.float32)), "needs n_outlier_channels"),
        (dict(n_outlier_channels=2, calibration=np.ones((4, 32), np.float32)), "head_dim=64"),
        (dict(outlier_channels=[1], calibration=np.ones((4, 64), np.float32)), "not both"),
        (dict(method="qjl", jl_dim=100), "qjl: give either bits"),
    ],
)
def test_bad_options(kwargs, match):
    args = dict(method="turboquant_mse", dim=64, bits=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tq.Quantizer(**args)


def test_select_outlier_channels_errors():
    with pytest.raises(ValueError, match="count must be in"):
        tq.select_outlier_channels(np.ones((3, 16), np.float32), 16)
    with pytest.raises(ValueError, match="NaN"):
        tq.select_outlier_channels(np.full((3, 16), np.nan, np.float32), 2)
    with pytest.raises(TypeError):
        tq.select_outlier_channels(np.ones((3, 16), np.int32), 2)


@pytest.mark.parametrize("bits,jl_dim", [(2, 40), (3, 32), (1, 24)])
def test_prod_codes_match_numpy_reference(bits, jl_dim):
    d = 32
    q = tq.Quantizer("turboquant_prod", d, bits, seed=5, jl_dim=jl_dim)
    x = np.random.default_rng(2).standard_normal((50, d)).astype(np.float32) * 3
    codes, _ = q.encode(x)
    s = ref.qjl_matrix(jl_dim, d, 5)
    rot = q.rotation_matrix().astype(np.float64)
    if bits == 1:
        y = x / np.linalg.norm(x, axis=1, keepdims=True) @ rot.T
        want = np.stack([ref.pack((row @ s.T >= 0).astype(np.uint8), 1) for row in y])
        margin = np.abs(y @ s.T)
    else:
        want, margin = ref.prod_encode(x.astype(np.float64), rot, q.codebook.centroids.astype(np.float64), s, bits)
    # Rows where a sketch value sits within float rounding of 0 may differ in that bit.
    safe = margin.min(axis=1) > 1e-4
    assert safe.sum() > 40
    np.testing.assert_array_equal(codes[safe], want[safe])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("outliers", [0, 3])
def test_inner_products_equal_decoded_dot(method, outliers):
    d = 64
    q = tq.Quantizer(method, d, 3, seed=1, n_outlier_channels=outliers)
    x = np.random.default_rng(3).standard_normal((100, d)).astype(np.float32)
    qs = np.random.default_rng(4).standard_normal((5, d)).astype(np.float32)
    codes, norms = q.encode(x)
    np.testing.assert_allclose(q.inner_products(qs, codes, norms), qs @ q.decode(codes, norms).T,
                               rtol=1e-4, atol=1e-4)


def test_prod_unbiased_mse_shrinks():
    """Mean error of <q, x> over many seeds: prod within 3 standard errors of 0, mse about
    -D_mse * <q, x> (its centroids are conditional means)."""
    d, rho, seeds = 64, 0.6, 300
    errs = {"turboquant_prod": [], "turboquant_mse": []}
    for s in range(seeds):
        x = unit_vectors(4, d, s)
        w = unit_vectors(4, d, 10_000 + s).astype(np.float64)
        w -= np.sum(w * x, axis=1, keepdims=True) * x
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        qv = (rho * x + math.sqrt(1 - rho**2) * w).astype(np.float32)
        for method, sink in errs.items():
            quant = tq.Quantizer(method, d, 2, seed=s)
            codes, norms = quant.encode(x)
            sink.append(np.mean(np.diag(quant.inner_products(qv, codes, norms)) - rho))
    p, m = np.array(errs["turboquant_prod"]), np.array(errs["turboquant_mse"])
    se = lambda v: v.std(ddof=1) / math.sqrt(len(v))  # noqa: E731
    assert abs(p.mean()) < 3 * se(p)
    assert m.mean() < -10 * se(m)
    assert m.mean() / rho == pytest.approx(-tq.codebook(d, 2).vector_distortion, rel=0.15)


def expected_distortion(q) -> float:
    """E||u - u~||^2 from theory for one quantizer (no outlier split)."""
    d, b, m = q.dim, q.bits, q.jl_dim
    if q.method == "turboquant_mse":
        return q.predicted_distortion
    if q.method == "polar":
        return q.predicted_distortion
    gamma2 = 1.0 if (q.method == "qjl" or b == 1) else tq.codebook(d, b - 1).vector_distortion
    return gamma2 * (math.pi / 2 * d / m - 1 / m)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), d=st.integers(16, 512), bits=st.integers(1, 8),
       seed=st.integers(0, 2**63 - 1))
def test_property_round_trip_and_bounds(method, d, bits, seed):
    n = 200
    x = unit_vectors(n, d, seed % 2**32)
    q1, q2 = tq.Quantizer(method, d, bits, seed=seed), tq.Quantizer(method, d, bits, seed=seed)
    codes, norms = q1.encode(x)
    codes2, norms2 = q2.encode(x)
    np.testing.assert_array_equal(codes, codes2)
    np.testing.assert_array_equal(norms, norms2)
    assert codes.shape == (n, q1.code_bytes) and q1.bytes_per_vector == q1.code_bytes + 2
    xh = q1.decode(codes, norms)
    assert np.all(np.isfinite(xh))
    err = np.sum((x.astype(np.float64) - xh) ** 2, axis=1)
    mean, se = err.mean(), err.std(ddof=1) / math.sqrt(n)
    lower, upper = 4.0**-bits, UPPER * 4.0**-bits
    want = expected_distortion(q1)
    if method == "turboquant_mse":
        assert lower - 5 * se < mean < upper + 5 * se
        assert mean == pytest.approx(want, rel=0.03, abs=5 * se)
    elif method == "polar":
        assert mean > lower - 5 * se
        assert mean == pytest.approx(want, rel=0.15, abs=5 * se)
        if d & (d - 1) == 0 and bits <= 7:
            assert want < upper
    else:
        # The expectation is over S as well: one sketch deviates by ~sqrt(2/(m d)) relatively.
        spread = 5 * math.sqrt(2.0 / (q1.jl_dim * d)) * want
        assert mean == pytest.approx(want, abs=5 * se + spread)
        if method == "turboquant_prod":
            # d * Var(<q, u~> - <q, u>) for a random unit query equals E||u - u~||^2.
            assert want <= UPPER_IP * 4.0**-bits


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), d=st.integers(16, 512), bits=st.integers(1, 7),
       n_out=st.integers(1, 8), extra=st.integers(1, 2), seed=st.integers(0, 2**63 - 1))
def test_property_outlier_split(method, d, bits, n_out, extra, seed):
    n = 150
    rng = np.random.default_rng(seed % 2**32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, rng.choice(d, n_out, replace=False)] *= 10
    out_bits = min(bits + extra, 8)
    q1 = tq.Quantizer(method, d, bits, seed=seed, n_outlier_channels=n_out, outlier_bits=out_bits,
                      calibration=x)
    q2 = tq.Quantizer(method, d, bits, seed=seed, outlier_channels=q1.outlier_channels, outlier_bits=out_bits)
    codes, norms = q1.encode(x)
    np.testing.assert_array_equal(codes, q2.encode(x)[0])
    xh = q1.decode(codes, norms)
    assert np.all(np.isfinite(xh))
    assert q1.nominal_bits >= (bits if method != "polar" else 0)
    if method in ("turboquant_mse", "polar"):
        rel = np.sum((x - xh) ** 2, axis=1) / np.sum(x**2, axis=1)
        # Every part is at least `bits` wide: the inliers' bound holds for the whole.
        assert rel.mean() < UPPER * 4.0**-bits * (1.1 if method == "turboquant_mse" else 1.3)
