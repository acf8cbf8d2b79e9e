"""KVCacheBuilder: mlx-kv-quant compatibility, validation, backends, artifact stores."""

import numpy as np
import pytest

import turboquant as tq
from turboquant import _core

mx = pytest.importorskip("mlx.core")

# mlx-kv-quant's README quick-start (shared/seeds/002), only the import changed.
QUICKSTART = '''
import mlx.core as mx
import numpy as np
from turboquant import KVCacheBuilder

# Build a TurboQuantProd cache with the fluent builder
cache = (
    KVCacheBuilder()
    .with_method("turboquant_prod")   # or "turboquant_mse", "polar", "qjl"
    .with_head_dim(128)
    .with_bit_width(inlier=2, outlier=3)
    .with_jl_dim(128)
    .with_n_outlier_channels(4)
    .with_seed(42)
    .with_precision(mx.float16)
    .build()
)

# Simulate streaming token generation
rng = np.random.default_rng(0)
for _ in range(100):
    k = mx.array(rng.standard_normal(128).astype(np.float16))
    v = mx.array(rng.standard_normal(128).astype(np.float16))
    cache.append(k, v)

q = mx.array(rng.standard_normal(128).astype(np.float16))
output = cache.attend(q)   # shape (128,)
print(f"Memory: {cache.memory_bytes() / 1024:.1f} KB for {len(cache)} tokens")
'''



def _run_quickstart(src):
    ns = {}
    exec(compile(src, "quickstart", "exec"), ns)
    cache, output = ns["cache"], ns["output"]
    assert isinstance(output, mx.array) and output.shape == (128,) and output.dtype == mx.float16
    assert len(cache) == 100
    return cache, output


def test_seed_quickstart_runs_unchanged(capsys):
    cache, output = _run_quickstart(QUICKSTART)
    assert "KB for 100 tokens" in capsys.readouterr().out
    core = cache.core
    assert core.key_method == "turboquant_prod" and core.n_outlier_channels == 4 and core.outlier_bits == 3
    assert core.outlier_channels == [0, 1, 2, 3]
    # 2.x bits per coordinate: far below the 256 B/token of fp16 K, and above a plain 2-bit cache.
    plain = tq.KVCacheBuilder().with_method("turboquant_prod").with_bit_width(2).with_jl_dim(128).build()
    assert plain.core.bytes_per_token() < core.bytes_per_token() < 2 * 256


def test_seed_quickstart_flow_with_available_method(capsys):
    src = QUICKSTART.replace('"turboquant_prod")', '"turboquant_mse")').replace("inlier=2, outlier=3", "3")
    cache, output = _run_quickstart(src)
    assert "KB for 100 tokens" in capsys.readouterr().out
    # Replay the quick-start's random stream: the output is attention over those tokens.
    rng = np.random.default_rng(0)
    kv = np.stack([rng.standard_normal(128).astype(np.float16) for _ in range(200)]).astype(np.float64)
    K, V = kv[0::2], kv[1::2]
    q = rng.standard_normal(128).astype(np.float16).astype(np.float64)
    s = K @ q / np.sqrt(128)
    p = np.exp(s - s.max())
    exact = (p / p.sum()) @ V
    out = np.array(output.astype(mx.float32)).astype(np.float64)
    assert out @ exact / np.linalg.norm(out) / np.linalg.norm(exact) > 0.95
    # one page per stream + rotations (the default hadamard1: 128 signs per stream)
    assert cache.memory_bytes() == 256 * 100 + 2 * 128 * 4


def test_outlier_split_cache_attends_like_its_decoded_kv():
    cache = (tq.KVCacheBuilder().with_method("turboquant_mse").with_head_dim(64)
             .with_bit_width(inlier=2, outlier=4).with_n_outlier_channels(8).build())
    rng = np.random.default_rng(3)
    k = rng.standard_normal((50, 64)).astype(np.float32)
    k[:, :8] *= 5.0  # outlier channels
    v = rng.standard_normal((50, 64)).astype(np.float32)
    cache.append(k, v)
    q = rng.standard_normal(64).astype(np.float32)
    kd = cache.core.decode(0, 0, "key")
    vd = cache.core.decode(0, 0, "value")
    s = kd @ q / 8.0
    p = np.exp(s - s.max())
    np.testing.assert_allclose(cache.attend(q), (p / p.sum()) @ vd, atol=1e-4)
    with pytest.raises(ValueError, match="n_outlier_channels"):
        tq.KVCacheBuilder().with_bit_width(inlier=2, outlier=3).build()


def test_mlx_precision_and_shapes():
    cache = tq.KVCacheBuilder().with_head_dim(64).with_heads(8, 2).with_precision(mx.bfloat16).build()
    rng = np.random.default_rng(1)
    cache.append(mx.array(rng.standard_normal((1, 2, 12, 64)).astype(np.float32)),
                 mx.array(rng.standard_normal((1, 2, 12, 64)).astype(np.float32)))
    out = cache.attend(mx.array(rng.standard_normal((1, 8, 3, 64)).astype(np.float32)))
    assert out.shape == (1, 8, 3, 64) and out.dtype == mx.bfloat16
    out_np = cache.attend(rng.standard_normal((8, 1, 64)).astype(np.float32))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32  # bf16 -> fp32 for NumPy
    c16 = tq.KVCacheBuilder().with_head_dim(64).with_precision(np.float16).build()
    c16.append(rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((4, 64)).astype(np.float32))
    assert c16.attend(rng.standard_normal(64).astype(np.float32)).dtype == np.float16


@pytest.mark.parametrize("configure,exc,message", [
    (lambda b: b.with_head_dim(1000), ValueError, r"head_dim must be in \[16, 512\], got 1000"),
    (lambda b: b.with_bit_width(9), ValueError, r"key bits must be in \[1, 8\], got 9"),
    (lambda b: b.with_value_bits(0), ValueError, r"value bits must be in \[1, 8\], got 0"),
    (lambda b: b.with_heads(6, 4), ValueError, r"n_q_heads \(6\) must be a multiple of n_kv_heads \(4\)"),
    (lambda b: b.with_head_dim(96).with_rotation("hadamard"), ValueError, "power-of-two head_dim, got 96"),
    (lambda b: b.with_rotation("givens"), ValueError, "rotation must be one of"),
    (lambda b: b.with_method("nope"), ValueError, "unknown method 'nope'; available: .*turboquant_mse"),
    (lambda b: b.with_precision(np.int8), ValueError, "precision must be float16, float32"),
    (lambda b: b.with_layers(0), ValueError, r"n_layers must be in \[1, 65536\], got 0"),
    (lambda b: b.with_seed(-1), ValueError, "seed must be in"),
    (lambda b: b.with_head_dim(12.5), ValueError, "head_dim must be an integer"),
    (lambda b: b.with_n_outlier_channels(200), ValueError, r"n_outlier_channels must be in \[0, 127\]"),
    (lambda b: b.with_backend("tpu"), ValueError, "backend must be 'auto', 'cpu', 'metal' or 'cuda'"),
    (lambda b: b.with_backend("metal"), RuntimeError, "Metal is not available on this platform"),
])
def test_validation_messages(configure, exc, message):
    with pytest.raises(exc, match=message):
        configure(tq.KVCacheBuilder()).build()


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("TURBOQUANT_BACKEND", "metal")
    with pytest.raises(RuntimeError, match="Metal is not available on this platform"):
        tq.KVCacheBuilder().build()
    monkeypatch.setenv("TURBOQUANT_BACKEND", "cpu")
    assert tq.KVCacheBuilder().build().backend == "cpu"
    assert tq.KVCacheBuilder().with_backend("cpu").build().backend == "cpu"


def test_extensions_reach_the_core():
    c = (tq.KVCacheBuilder().with_head_dim(96).with_key_bits(4).with_value_bits(2).with_layers(3)
         .with_heads(8, 4).with_rotation("auto").with_seed(7).with_block_tokens(32).build())
    core = c.core
    assert (core.head_dim, core.key_bits, core.value_bits, core.n_layers, core.n_q_heads, core.n_kv_heads,
            core.seed, core.block_tokens, core.rotation) == (96, 4, 2, 3, 8, 4, 7, 32, "dense")
    assert c.effective_bits() == pytest.approx((96 * 4 / 8 + 2 + 96 * 2 / 8 + 2) * 8 / (2 * 96))


def test_artifact_store_second_build_loads():
    store = tq.MemoryArtifactStore()
    b = tq.KVCacheBuilder().with_head_dim(64).with_heads(2, 2).with_layers(2).with_seed(3).with_artifact_store(store)
    first = b.build()
    # Keys and values share the entry (same method, d, bits, seed); both roles get stored.
    assert first.description["artifacts_loaded"] == {"key": 0, "value": 0} and store.puts == 2
    hits = store.hits
    second = b.build()
    assert store.hits == hits + 2 and store.puts == 2  # loaded, nothing recomputed or stored
    assert second.description["artifacts_loaded"] == {"key": 4, "value": 4}
    for layer in range(2):
        for head in range(2):
            np.testing.assert_array_equal(first.core.rotation_parameters(layer, head, "key")[1],
                                          second.core.rotation_parameters(layer, head, "key")[1])
    # Proof that the stored rotation is what the cache uses: plant another valid rotation.
    key = tq.artifacts.ArtifactKey("turboquant_mse", 64, 3, 3)
    entry = store.get(key)
    planted = -entry["rotation/L1H0k"]
    store.put(key, {**entry, "rotation/L1H0k": planted})
    third = b.build()
    np.testing.assert_array_equal(third.core.rotation_parameters(1, 0, "key")[1], planted)
    assert not np.array_equal(first.core.rotation_parameters(1, 0, "key")[1], planted)


def test_npy_artifact_store_persists(tmp_path):
    b = tq.KVCacheBuilder().with_head_dim(96).with_bit_width(2).with_seed(11)
    s1 = tq.NpyArtifactStore(tmp_path)
    first = b.with_artifact_store(s1).build()
    names = sorted(p.name for p in (tmp_path / "turboquant_mse-d96-b2-s11").iterdir())
    assert "rotation__L0H0k.npy" in names and "rotation__L0H0v.npy" in names and "codebook__centroids.npy" in names
    assert s1.keys() == [tq.artifacts.ArtifactKey("turboquant_mse", 96, 2, 11)]
    s2 = tq.NpyArtifactStore(tmp_path)  # a fresh process would see the same directory
    second = b.with_artifact_store(s2).build()
    assert (s2.hits, s2.misses, s2.puts) == (2, 0, 0)
    x = np.random.default_rng(2).standard_normal((20, 96)).astype(np.float32)
    for c in (first, second):
        c.append(x, x)
    np.testing.assert_array_equal(first.attend(x[-1]), second.attend(x[-1]))
    # A stale codebook is refused, not silently used.
    cb = tmp_path / "turboquant_mse-d96-b2-s11" / "codebook__centroids.npy"
    np.save(cb, np.load(cb) * 1.01)
    with pytest.raises(ValueError, match="stale or foreign|checksum mismatch"):
        b.with_artifact_store(tq.NpyArtifactStore(tmp_path)).build()


def test_hadamard1_through_the_builder_and_artifact_store(tmp_path):
    b = (tq.KVCacheBuilder().with_head_dim(64).with_bit_width(3).with_seed(4)
         .with_rotation("hadamard1"))
    first = b.with_artifact_store(tq.NpyArtifactStore(tmp_path)).build()
    assert first.core.rotation == "hadamard1"
    store = tq.NpyArtifactStore(tmp_path)
    second = b.with_artifact_store(store).build()
    assert store.hits == 2 and second.core.rotation == "hadamard1"
    x = np.random.default_rng(2).standard_normal((20, 64)).astype(np.float32)
    for c in (first, second):
        c.append(x, x)
    np.testing.assert_array_equal(first.attend(x[-1]), second.attend(x[-1]))
    with pytest.raises(ValueError, match="hadamard1 rotation needs a power-of-two head_dim"):
        tq.KVCacheBuilder().with_head_dim(96).with_rotation("hadamard1").build()


def test_default_rotation_is_one_hadamard_round_on_power_of_two_head_dims():
    # Without with_rotation: hadamard1 for a power-of-two head_dim, "auto" (dense) otherwise;
    # an explicit "auto" keeps two rounds.
    assert tq.KVCacheBuilder().with_head_dim(64).build().core.rotation == "hadamard1"
    assert tq.KVCacheBuilder().with_head_dim(96).build().core.rotation == "dense"
    auto = tq.KVCacheBuilder().with_head_dim(64).with_rotation("auto").build()
    assert auto.core.rotation == "hadamard"


def test_mlx_transposed_views_are_accepted():
    # mlx-lm keeps (B, T, H, d) projections and transposes them to (B, H, T, d).
    rng = np.random.default_rng(3)
    cache = tq.KVCacheBuilder().with_head_dim(32).with_heads(2, 2).build()
    k = mx.array(rng.standard_normal((1, 5, 2, 32)).astype(np.float16)).transpose(0, 2, 1, 3)
    cache.append(k, k)
    ref = tq.KVCacheBuilder().with_head_dim(32).with_heads(2, 2).build()
    kn = np.ascontiguousarray(np.array(k))
    ref.append(kn, kn)
    np.testing.assert_array_equal(cache.core.decode(0, 1, "key"), ref.core.decode(0, 1, "key"))


def test_outlier_split_cache_save_load_round_trip(tmp_path):
    core = tq.KVCache(64, key_bits=2, value_bits=2, n_outlier_channels=4, outlier_bits=4,
                      outlier_channels=[5, 9, 33, 60], seed=7)
    rng = np.random.default_rng(0)
    core.append(rng.standard_normal((40, 64)).astype(np.float32), rng.standard_normal((40, 64)).astype(np.float32))
    q = rng.standard_normal((3, 64)).astype(np.float32)
    core.save(str(tmp_path / "c.tqkv"))
    back = tq.KVCache.load(str(tmp_path / "c.tqkv"))
    assert back.outlier_channels == [5, 9, 33, 60] and back.outlier_bits == 4
    assert back.memory_bytes() == core.memory_bytes()
    np.testing.assert_allclose(back.attend(q), core.attend(q), atol=1e-6)


def test_outlier_split_refuses_a_foreign_rotation():
    core = tq.KVCache(64, n_outlier_channels=4, outlier_bits=4, seed=1)
    other = tq.KVCache(64, seed=2)
    kind, params = other.rotation_parameters(0, 0, "key")
    with pytest.raises(ValueError, match="outlier split derives its rotation"):
        core.set_rotation_parameters(0, 0, "key", kind, params)
    own_kind, own = core.rotation_parameters(0, 0, "key")
    core.set_rotation_parameters(0, 0, "key", own_kind, own)  # its own rotation: accepted
