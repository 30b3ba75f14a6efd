"""``fedsynth`` command line: one sub-command per module in ``fedsynth.commands``.

Each module exposes ``register(subparsers)``; adding a command never edits another's code.
Errors a person can fix end with one line naming the problem and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedsynth.errors import UserError

COMMANDS = ("demo", "certs", "coordinator", "hospital", "launch", "status", "report", "data",
            "sample", "simulate", "audit", "evaluate", "ledger")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsynth", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fedsynth.commands.{name}").register(sub)
    return parser


def setup_logging(verbose: bool) -> None:
    """Plain lines, libraries at WARNING (``protocol.logs``: one setup for every process)."""
    from protocol.logs import setup

    setup(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"fedsynth {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
