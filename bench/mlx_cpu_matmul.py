"""float32/float16 matmul speed of mlx's CPU backend vs NumPy (which BLAS mlx got).

    python bench/mlx_cpu_matmul.py
"""

import time

import mlx.core as mx
import numpy as np

M, K, N, REPS = 1024, 576, 1536, 5
flop = 2 * M * K * N
for dt in (mx.float32, mx.float16):
    a, b = mx.random.normal((M, K)).astype(dt), mx.random.normal((K, N)).astype(dt)
    mx.eval(a, b)
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(REPS):
        mx.eval(a @ b)
    dt_s = (time.perf_counter() - t0) / REPS
    print(f"mlx {dt}: {dt_s * 1e3:.1f} ms, {flop / dt_s / 1e9:.2f} GFLOP/s")
a, b = np.random.randn(M, K).astype(np.float32), np.random.randn(K, N).astype(np.float32)
t0 = time.perf_counter()
for _ in range(REPS):
    a @ b
dt_s = (time.perf_counter() - t0) / REPS
print(f"numpy float32: {dt_s * 1e3:.1f} ms, {flop / dt_s / 1e9:.2f} GFLOP/s")
