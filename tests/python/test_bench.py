"""``python -m turboquant bench compare`` (and bench/compare.py) runs end to end on a tiny
problem; ``bench`` dispatches its jobs (compare, the default, and sweep)."""

import subprocess
import sys
from pathlib import Path

import turboquant as tq
from turboquant.__main__ import main
from turboquant.cli import bench

ROOT = Path(__file__).resolve().parents[2]


def test_bench_cli_prints_every_method_and_ratios():
    r = subprocess.run([sys.executable, "-m", "turboquant", "bench", "compare", "--contexts", "256",
                        "--kv-heads", "2",
                        "--repeat", "1", "--min-time", "0", "--bits", "2,3"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "memory bandwidth" in out
    for name in ("numpy-fp32", "turboquant-2b", "turboquant-3b"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "x" in line and "%" in line
    try:
        import mlx.core  # noqa: F401
        assert "mlx-fp16-sdpa" in out and "mlx-q4" in out and "mlx-q8" in out
    except ImportError:
        pass
    assert "M vectors/s" in out and "single query" in out
    per_head = next(ln for ln in out.splitlines() if "per KV head (the step over 2 KV heads" in ln)
    assert "2b " in per_head and "3b " in per_head and per_head.rstrip().endswith(" us")


def test_compare_script_is_the_same_command():
    env = {"PYTHONPATH": str(Path(tq.__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--help"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "--contexts" in r.stdout


def test_bench_runs_one_job_per_subcommand_and_compare_by_default(monkeypatch):
    seen = []
    for name, (help_text, add_arguments, _run) in list(bench.JOBS.items()):
        monkeypatch.setitem(bench.JOBS, name, (help_text, add_arguments,
                                               lambda args, name=name: seen.append((name, args))))
    assert main(["bench", "--contexts", "64", "--bits", "2"]) == 0
    assert main(["bench", "compare", "--contexts", "128"]) == 0
    assert main(["bench", "sweep", "--context-lengths", "32", "--methods", "polar"]) == 0
    (j1, a1), (j2, a2), (j3, a3) = seen
    assert (j1, a1.contexts, a1.bits) == ("compare", "64", "2")
    assert (j2, a2.contexts, a2.bits) == ("compare", "128", "2,3,4")
    # the sweep's own options and defaults, not compare's
    assert (j3, a3.context_lengths, a3.methods, a3.bits, a3.kv_heads) == (
        "sweep", "32", "polar", "3", 1)
