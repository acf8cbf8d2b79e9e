"""atheris fuzzing of the Python entry points: Quantizer.encode/decode, KVCache
append/attend/from_bytes and CompressedKVCache.load, on inputs decoded from fuzzer bytes.

    PYTHONPATH=python python tests/fuzz/atheris_entry_points.py -runs=20000 -max_total_time=30

Bounded: a run count (-runs, default 20000 here) and a time limit (-max_total_time, default
30 s) are always passed to libFuzzer, and scripts/test.sh runs it under `timeout`. Every
entry point may only raise the documented exceptions (ValueError incl. turboquant.FormatError,
TypeError, RuntimeError for concurrency, MemoryError); anything else, or a crash, is a finding.
A call that raised must leave the cache unchanged (checked through to_bytes()).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import atheris

with atheris.instrument_imports():
    import numpy as np

    import turboquant as tq
    from turboquant import _core

warnings.simplefilter("ignore")  # casts of fuzzed NaNs to uint8
ALLOWED = (ValueError, TypeError, MemoryError)
D = 16
_SEED_CACHE = _core.KVCache(D, n_layers=2, n_q_heads=2, n_kv_heads=1, block_tokens=4, max_tokens=64)
_SEED_CACHE.append(np.random.default_rng(0).standard_normal((1, 5, D)).astype(np.float32),
                   np.random.default_rng(1).standard_normal((1, 5, D)).astype(np.float32), 0)
SAVED = _SEED_CACHE.to_bytes()
TMP = tempfile.mkdtemp(prefix="tq-atheris-")
DTYPES = [np.float32, np.float16, np.float64, np.int32, np.uint8]


def array(fdp: atheris.FuzzedDataProvider) -> np.ndarray:
    rank = fdp.ConsumeIntInRange(0, 4)
    shape = [fdp.ConsumeIntInRange(0, 5) for _ in range(rank)]
    if rank and fdp.ConsumeBool():
        shape[-1] = D
    dtype = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
    n = int(np.prod(shape)) if shape else 1
    raw = fdp.ConsumeBytes(n * np.dtype(dtype).itemsize)
    raw = raw + bytes(n * np.dtype(dtype).itemsize - len(raw))
    a = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    if fdp.ConsumeBool() and a.ndim >= 2 and a.shape[0] > 1:
        a = a[::2]  # non-contiguous
    return a


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 5)
    try:
        if op == 0:
            q = tq.Quantizer("turboquant_mse", dim=D, bits=fdp.ConsumeIntInRange(1, 8), seed=fdp.ConsumeIntInRange(0, 3))
            codes, norms = q.encode(array(fdp))
            q.decode(codes, norms)
        elif op == 1:
            q = tq.Quantizer("turboquant_mse", dim=D, bits=fdp.ConsumeIntInRange(1, 8))
            q.decode(array(fdp).astype(np.uint8) if fdp.ConsumeBool() else array(fdp), array(fdp))
        elif op in (2, 3):
            cache = _core.KVCache.from_bytes(SAVED)
            before = cache.to_bytes()
            try:
                if op == 2:
                    k = array(fdp)
                    cache.append(k, k if fdp.ConsumeBool() else array(fdp), fdp.ConsumeIntInRange(-1, 2))
                else:
                    w = fdp.ConsumeIntInRange(0, 8)
                    cache.attend(array(fdp), fdp.ConsumeIntInRange(-1, 2), fdp.ConsumeBool(), None, w or None)
                return
            except ALLOWED:
                if cache.to_bytes() != before:
                    raise AssertionError("a failed call changed the cache")
                raise
        elif op == 4:
            b = bytearray(SAVED)
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                if b:
                    b[fdp.ConsumeIntInRange(0, len(b) - 1)] ^= 1 << fdp.ConsumeIntInRange(0, 7)
            cut = fdp.ConsumeIntInRange(0, len(b))
            _core.KVCache.from_bytes(bytes(b[:cut]) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)))
        else:
            path = os.path.join(TMP, "f.tq")
            with open(path, "wb") as f:
                f.write(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)))
            tq.CompressedKVCache.load(path)
    except ALLOWED:
        pass


def main() -> None:
    argv = list(sys.argv)
    if not any(a.startswith("-runs=") for a in argv):
        argv.append("-runs=20000")
    if not any(a.startswith("-max_total_time=") for a in argv):
        argv.append("-max_total_time=30")
    argv.append("-timeout=10")
    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
