"""Subcommands of ``python -m turboquant``: name -> (help, add_arguments, run)."""

from __future__ import annotations

from turboquant.cli import demo, distortion

COMMANDS = {
    "demo": (demo.HELP, demo.add_arguments, demo.run),
    "distortion": (distortion.HELP, distortion.add_arguments, distortion.run),
}
