"""Subcommands of ``python -m turboquant``: name -> (help, add_arguments, run). One command
per job; ``ALIASES`` are former names that still run (after a notice) but are not listed."""

from __future__ import annotations

from turboquant.cli import bench, benchmark, demo, distortion, info, precompute
from turboquant.cli import calibrate, convert_gguf, eval, generate, needle, serve

COMMANDS = {
    "demo": (demo.HELP, demo.add_arguments, demo.run),
    "distortion": (distortion.HELP, distortion.add_arguments, distortion.run),
    "precompute": (precompute.HELP, precompute.add_arguments, precompute.run),
    "info": (info.HELP, info.add_arguments, info.run),
    "bench": (bench.HELP, bench.add_arguments, bench.run),
    "convert-gguf": (convert_gguf.HELP, convert_gguf.add_arguments, convert_gguf.run),
    "generate": (generate.HELP, generate.add_arguments, generate.run),
    "eval": (eval.HELP, eval.add_arguments, eval.run),
    "calibrate": (calibrate.HELP, calibrate.add_arguments, calibrate.run),
    "serve": (serve.HELP, serve.add_arguments, serve.run),
    "needle": (needle.HELP, needle.add_arguments, needle.run),
}

ALIASES = {
    "benchmark": (benchmark.HELP, benchmark.add_arguments, benchmark.run),  # bench sweep
}
