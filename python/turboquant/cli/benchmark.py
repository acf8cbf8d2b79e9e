"""``python -m turboquant benchmark``: the former name of ``python -m turboquant bench sweep``
(same options); it runs that job after a one-line notice on stderr."""

from __future__ import annotations

import argparse
import sys

from turboquant.cli import bench_sweep

HELP = "alias of `bench sweep` (same options)"
NOTICE = ("note: `python -m turboquant benchmark` is now `python -m turboquant bench sweep` "
          "(same options)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    bench_sweep.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    print(NOTICE, file=sys.stderr)
    return bench_sweep.run(args)
