"""Subcommands of ``python -m turboquant``: name -> (help, add_arguments, run)."""

from __future__ import annotations

from turboquant.cli import bench, demo

COMMANDS = {
    "demo": (demo.HELP, demo.add_arguments, demo.run),
    "bench": (bench.HELP, bench.add_arguments, bench.run),
}
