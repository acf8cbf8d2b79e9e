"""Command line: ``python -m turboquant <command>``. Each command lives in
turboquant/cli/<command>.py and registers its arguments in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys

from turboquant.cli import ALIASES, COMMANDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m turboquant",
        description="KV-cache compression with TurboQuant, PolarQuant and QJL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _run) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    for name, (help_text, add_arguments, _run) in ALIASES.items():  # runnable, not listed
        add_arguments(sub.add_parser(name, description=help_text))
    args, extra = parser.parse_known_args(argv)
    if extra:  # only commands that pass options on to another tool (serve -> mlx_lm.server)
        if not hasattr(args, "passthrough"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough = extra
    if args.command is None:
        parser.print_help()
        return 2
    return int({**COMMANDS, **ALIASES}[args.command][2](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
