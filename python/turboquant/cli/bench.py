"""``python -m turboquant bench``: the benchmark command, one job per subcommand.

* ``bench compare`` (also plain ``bench``): decode attention on the codes against NumPy fp32
  and mlx fp16 / quantized baselines in the same run, a roofline, the single-query latency
  and the encode throughput (:mod:`turboquant.cli.bench_compare`).
* ``bench sweep``: append and attend timings, memory and compression ratio of the cache the
  builder makes, for each method x bit width x context length
  (:mod:`turboquant.cli.bench_sweep`).
"""

from __future__ import annotations

import argparse

from turboquant.cli import bench_compare, bench_sweep

HELP = "benchmarks: `bench compare` (vs NumPy/mlx baselines, the default), `bench sweep`"

JOBS = {
    "compare": (bench_compare.HELP, bench_compare.add_arguments, bench_compare.run),
    "sweep": (bench_sweep.HELP, bench_sweep.add_arguments, bench_sweep.run),
}
DEFAULT_JOB = "compare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Plain `bench [options]` is `bench compare [options]`: the parent takes compare's options.
    # A job's own parser sets every one of its options (defaults included) after the parent.
    bench_compare.add_arguments(p)
    jobs = p.add_subparsers(dest="bench_job", metavar="JOB")
    for name, (help_text, add_job_arguments, _run) in JOBS.items():
        add_job_arguments(jobs.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return JOBS[getattr(args, "bench_job", None) or DEFAULT_JOB][2](args)
