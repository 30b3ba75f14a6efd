"""``fedsynth report RUN_DIR``: write the run's self-contained ``report.html``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.html (curves, participation, sample grids)")
    p.add_argument("run_dir", type=Path, help="a run folder (runs/<run-id>)")
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report.html")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedsynth.errors import UserError
    from server.report import ReportError, write_report

    try:
        path = write_report(args.run_dir, args.out)
    except ReportError as exc:
        raise UserError(str(exc)) from None
    print(path)
    return 0
