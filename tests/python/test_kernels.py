"""SIMD dispatch and the thread pool, seen from Python: every available SIMD target, forced
with TURBOQUANT_SIMD in a fresh process, gives the same codes (bit-exact) and the same
attention (fp tolerance); the thread count changes nothing but speed."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import turboquant as tq
from turboquant import _core

PYTHON_DIR = str(Path(tq.__file__).resolve().parent.parent)

PROBE = r"""
import json, sys
import numpy as np
import turboquant as tq
from turboquant import _core
rng = np.random.default_rng(0)
out = {}
for bits in (1, 2, 3, 4, 5, 8):
    for d in (64, 96, 128):
        x = rng.standard_normal((77, d)).astype(np.float32)
        q = tq.Quantizer("turboquant_mse", dim=d, bits=bits, seed=3)
        codes, norms = q.encode(x)
        ip = q.inner_products(x[:5], codes, norms)
        out[f"{bits}/{d}"] = [codes.tobytes().hex(), norms.tobytes().hex(), ip.ravel().tolist()]
kv = _core.KVCache(128, n_q_heads=8, n_kv_heads=2, key_bits=3, value_bits=3, seed=1)
kv.append(rng.standard_normal((2, 300, 128)).astype(np.float32), rng.standard_normal((2, 300, 128)).astype(np.float32))
out["attend"] = kv.attend(rng.standard_normal((8, 1, 128)).astype(np.float32)).ravel().tolist()
# fp16 sinks + recent window (the f16 kernels), decode and a causal prefill, d = 96.
kw = _core.KVCache(96, n_q_heads=6, n_kv_heads=2, key_bits=3, value_bits=3, seed=1, block_tokens=32,
                   fp16_sinks=4, fp16_window=40)
kw.append(rng.standard_normal((2, 300, 96)).astype(np.float32), rng.standard_normal((2, 300, 96)).astype(np.float32))
out["attend_window"] = kw.attend(rng.standard_normal((6, 1, 96)).astype(np.float32)).ravel().tolist()
out["attend_window_prefill"] = kw.attend(rng.standard_normal((6, 50, 96)).astype(np.float32)).ravel().tolist()
print(json.dumps(out))
"""


def _probe(target: str) -> dict:
    env = dict(os.environ, TURBOQUANT_SIMD=target, PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_simd_target_matches_scalar():
    targets = tq.build_info()["simd_targets_available"]
    assert targets[0] == "scalar"
    if "avx2" in tq.build_info()["simd_targets_compiled"] and tq.build_info()["cpu_features"]["avx2"]:
        assert "avx2" in targets
    if platform.machine().lower() in ("arm64", "aarch64"):  # NEON: every AArch64 CPU
        assert "neon" in tq.build_info()["simd_targets_compiled"] and "neon" in targets
    ref = _probe("scalar")
    for target in targets[1:]:
        got = _probe(target)
        for key, (codes, norms, ip) in ((k, v) for k, v in ref.items() if not k.startswith("attend")):
            assert got[key][0] == codes, f"{target}: codes differ at bits/d={key}"
            assert got[key][1] == norms, f"{target}: norms differ at bits/d={key}"
            np.testing.assert_allclose(got[key][2], ip, rtol=1e-4, atol=1e-4, err_msg=f"{target} {key}")
        for key in ("attend", "attend_window", "attend_window_prefill"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5, err_msg=f"{target} {key}")


def test_unknown_simd_target_is_a_clear_error():
    env = dict(os.environ, TURBOQUANT_SIMD="avx9000", PYTHONPATH=PYTHON_DIR)
    code = ("import numpy as np, turboquant as tq\n"
            "tq.Quantizer('turboquant_mse', dim=64, bits=3).encode(np.ones((2, 64), np.float32))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "avx9000" in r.stderr and "scalar" in r.stderr


def test_num_threads_roundtrip_and_results_do_not_depend_on_it():
    before = tq.get_num_threads()
    assert before >= 1
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 128)).astype(np.float32)
    q = tq.Quantizer("turboquant_mse", dim=128, bits=3, seed=1)
    k = rng.standard_normal((4, 500, 128)).astype(np.float32)
    qs = rng.standard_normal((8, 1, 128)).astype(np.float32)
    results = []
    try:
        for n in (1, 2, 3):
            tq.set_num_threads(n)
            assert tq.get_num_threads() == n
            codes, norms = q.encode(x)
            kv = _core.KVCache(128, n_q_heads=8, n_kv_heads=4, seed=2)
            kv.append(k, k)
            results.append((codes, norms, kv.attend(qs)))
    finally:
        tq.set_num_threads(0)
    assert tq.get_num_threads() == before or os.environ.get("TURBOQUANT_NUM_THREADS")
    for codes, norms, att in results[1:]:
        np.testing.assert_array_equal(codes, results[0][0])
        np.testing.assert_array_equal(norms, results[0][1])
        np.testing.assert_array_equal(att, results[0][2])  # heads are independent: same bits


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(ValueError, match="num_threads"):
        tq.set_num_threads(-1)
    with pytest.raises(ValueError, match="num_threads"):
        tq.set_num_threads(5000)
