"""The GPU benchmarks' scripts run end to end at tiny sizes on any machine (--smoke: the
reference kernels / the C++ core instead of the GPU), so a GPU session never finds them
broken; their numbers mean something only on a GPU (scripts/gpu-test.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _env():
    """The environment of a script that imports the turboquant this test imported (installed
    or a source tree)."""
    import turboquant

    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(turboquant.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))


def run(script, tmp_path, *extra):
    out = tmp_path / f"{script}.json"
    r = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out),
                        *extra], cwd=BENCH, capture_output=True, text=True, timeout=600,
                       env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def test_gpu_attention_smoke(tmp_path):
    res = run("gpu_attention.py", tmp_path)
    rows = res["rows"]
    assert {r["cache"] for r in rows} == {"fp16 sdpa"} | {
        f"turboquant {split}3-bit ({kernel})" for split in ("", "key split ")
        for kernel in ("mma", "staged", "fast", "generic")}
    for r in rows:
        assert r["seconds"] > 0 and r["bytes"] > 0 and r["gbps"] > 0
        assert r["pipelined_seconds"] > 0 and r["overlapped_seconds"] > 0
    fp16 = {r["context"]: r["bytes"] for r in rows if r["cache"] == "fp16 sdpa"}
    for r in rows:  # 3-bit codes read ~4-5x fewer bytes than fp16 K/V (head_dim 64)
        if r["bits"] == 3:
            assert 3.0 < fp16[r["context"]] / r["bytes"] < 6.0
    assert res["machine"]["mlx_kernels"] in ("cpu", "metal", "cuda")


def test_gpu_decode_parts_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from gpu_decode_parts import VARIANTS

    res = run("gpu_decode_parts.py", tmp_path)
    rows = res["rows"]
    assert [r["cache"] for r in rows] == ["fp16", *VARIANTS]
    for r in rows:
        assert r["context"] == 256 and r["total_us"] >= r["host_us"] > 0
        assert r["prefill_tok_s"] > 0


def test_gpu_decode_parts_host_tables(tmp_path, monkeypatch):
    """--ops and --lines: the host time of a step by mlx call (the wrapped functions put
    back afterwards) and by line of turboquant's code."""
    import mlx.core as mx

    monkeypatch.syspath_prepend(str(BENCH))
    from gpu_decode_parts import _OpTimers

    add, rope = mx.add, mx.fast.rope
    with _OpTimers() as timers:
        assert mx.add is not add and mx.fast.rope is not rope
        mx.add(mx.array(1), mx.array(2))
    assert mx.add is add and mx.fast.rope is rope and timers.calls == {"mx.add": 1}
    res = run("gpu_decode_parts.py", tmp_path, "--ops", "--lines", "--variants",
              "tq3 (default recipe)")
    fp16, tq = res["rows"]
    assert "mx.fast.rope" in fp16["ops"] and "all wrapped calls" in tq["ops"]
    assert "lines" not in fp16 and "mlx_cache.py:" in tq["lines"]


def test_gpu_e2e_smoke(tmp_path):
    res = run("gpu_e2e.py", tmp_path)
    rows = {r["cache"]: r for r in res["rows"]}
    assert set(rows) == {"fp16", "mlx-q8", "mlx-q4", "turboquant-3"}
    for r in rows.values():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["kv_bytes"] > 0
        assert set(r["step_ms"]) == {"build", "submit", "wait", "gc"}
        assert r["step_ms"]["build"] > 0 and min(r["step_ms"].values()) >= 0
        assert r["gc_full_collections"] >= 0
    assert rows["turboquant-3"]["kv_bytes"] < rows["fp16"]["kv_bytes"]
    assert rows["mlx-q4"]["kv_bytes"] < rows["mlx-q8"]["kv_bytes"] < rows["fp16"]["kv_bytes"]
    assert res["isolated"] is False


def test_gpu_e2e_isolated_smoke(tmp_path):
    """--isolate: each cache measured in a process of its own, the same row fields."""
    res = run("gpu_e2e.py", tmp_path, "--caches", "fp16,turboquant-3", "--isolate")
    rows = {r["cache"]: r for r in res["rows"]}
    assert res["isolated"] is True and set(rows) == {"fp16", "turboquant-3"}
    for r in rows.values():
        assert r["context"] == 256 and r["decode_tok_s"] > 0 and r["kv_bytes"] > 0
        assert set(r["step_ms"]) == {"build", "submit", "wait", "gc"}
    assert rows["turboquant-3"]["decode_vs_fp16"] > 0
    assert rows["turboquant-3"]["kv_bytes"] < rows["fp16"]["kv_bytes"]


def test_gpu_e2e_ab_alternates_fresh_processes(tmp_path):
    """--ab NAME=VALUE: each cache measured in alternating fresh processes without and with
    the setting (the child sees it, or not), --repeat times each, with the medians' ratio;
    a malformed setting or a repeat without --ab is refused."""
    res = run("gpu_e2e.py", tmp_path, "--caches", "turboquant-3", "--ab", "TQ_GPU_STEP_WORDS=0",
              "--repeat", "2")
    assert res["isolated"] is True and res["ab"] == "TQ_GPU_STEP_WORDS=0" and res["repeat"] == 2
    rows = res["rows"]
    assert [(r["variant"], r["run"]) for r in rows] == [
        ("default", 0), ("TQ_GPU_STEP_WORDS=0", 0), ("default", 1), ("TQ_GPU_STEP_WORDS=0", 1)]
    for r in rows:
        want = "0" if r["variant"] != "default" else None
        assert r["env"] == {"TQ_GPU_STEP_WORDS": want} and r["decode_tok_s"] > 0
    (s,) = res["summary"]
    med = s["median_decode_tok_s"]
    assert s["ratio"] == med["TQ_GPU_STEP_WORDS=0"] / med["default"] > 0
    for bad in (["--ab", "NOVALUE"], ["--repeat", "2"]):
        r = subprocess.run([sys.executable, str(BENCH / "gpu_e2e.py"), "--smoke", *bad],
                           cwd=BENCH, capture_output=True, text=True, timeout=60, env=_env())
        assert r.returncode == 2 and ("--ab" in r.stderr or "--repeat" in r.stderr), bad


def test_gpu_e2e_profile(tmp_path):
    """--profile prints where the host time of more decode steps went; it runs in the
    measuring process, so --isolate with it is refused."""
    cmd = [sys.executable, str(BENCH / "gpu_e2e.py"), "--smoke", "--caches", "turboquant-3",
           "--profile", "2"]
    r = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "host time of 2 decode steps" in r.stdout and "update_and_fetch" in r.stdout
    r = subprocess.run(cmd + ["--isolate"], cwd=BENCH, capture_output=True, text=True,
                       timeout=60, env=_env())
    assert r.returncode == 2 and "--profile" in r.stderr


def test_gpu_prefill_parts_smoke(tmp_path):
    res = run("gpu_prefill_parts.py", tmp_path)
    row = res["contexts"]["512"]
    assert set(row) == {"fp16", "tq3 (default recipe)"}
    for r in row.values():
        assert len(r["chunk_ms"]) == 4 and r["mean_ms_per_layer"] > 0 and r["vs_fp16"] > 0


def test_gpu_decode_loop_smoke(tmp_path):
    res = run("gpu_decode_loop.py", tmp_path)
    assert res["cache"] == "tq3" and res["step_us_per_layer"] >= res["build_us_per_layer"] > 0


def test_gpu_decode_nodes_smoke(tmp_path):
    """A decode step of the default recipe on the GPU store, counted: one kernel for the new
    K/V (channel order, centring and fp16 rounding of both roles), the block kernel (which
    reads the queries in the model's dtype and the key split's channel order) and the reduce
    (which merges the fp16 sinks and window, adds the value mean and rounds to the model's
    dtype), and the two slice updates of the window buffer: 5 operations, no gather, cast,
    concatenation or parameter-block arithmetic at a step that flushes nothing."""
    res = run("gpu_decode_nodes.py", tmp_path)
    (row,) = res["rows"]
    assert row["gpu_store"] and row["steps"] == 8 and len(row["per_step"]) == 8
    typical = row["typical"]
    assert typical["launched"] == ["centre", "attention_mma_step", "attention_reduce_rows_step"]
    ops = typical["by_primitive"]
    assert ops == {"SliceUpdate": 2}, ops
    assert row["median_total"] == typical["total"] == 5


def test_kernel_registers_counts_the_innermost_loop_with_products():
    """bench/kernel_registers.py --sass: the main loop is the innermost loop holding HMMA (an
    outer loop around it, and a longer loop without products, are not it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_registers",
                                                  BENCH / "kernel_registers.py")
    sys.path.insert(0, str(BENCH.parent / "tests" / "python"))
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    sass = "\n".join([
        "        /*0000*/                   MOV R1, R2 ;",
        ".L_x_1:",
        "        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;",
        ".L_x_2:",
        "        /*0020*/                   LDS R4, [R5] ;",
        "        /*0030*/                   HMMA.16816.F32 R8, R12, R4, R8 ;",
        "        /*0040*/              @!P0 LDG.E R6, desc[UR4][R2.64] ;",
        "        /*0050*/              @P1 BRA `(.L_x_2) ;",
        "        /*0060*/                   BRA `(.L_x_1) ;",
        ".L_x_3:",
    ] + ["        /*%04x*/                   FADD R1, R1, R1 ;" % (0x70 + 16 * i)
         for i in range(9)] + [
        "        /*0100*/                   BRA `(.L_x_3) ;",
    ])
    assert kr.main_loop(sass) == "main loop 4 instructions, 1 HMMA, 1 LDS, 1 LDG"
    assert kr.main_loop("        /*0000*/                   EXIT ;") == "no loop"


def test_gpu_first_use_runs_its_modes(tmp_path):
    """bench/gpu_first_use.py: one fresh process per mode, its times and the cache's state
    in the JSON (here without a GPU: the path is cpu and the cache off, saying why)."""
    import turboquant

    out = tmp_path / "first_use.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(turboquant.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(BENCH / "gpu_first_use.py"), "--modes", "off,warm",
                        "--out", str(out)], cwd=BENCH, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [x["mode"] for x in runs] == ["off", "warm"]
    for x in runs:
        assert x["process_s"] >= x["self_test_s"] > 0
        assert x["cache"]["state"].startswith(("off", "on", "not probed")), x["cache"]
        if x["path"] == "cpu":
            assert x["first_step_s"] is None
