"""``fedsynth simulate RUN_FILE --data-dir DIR ... --virtual-hospitals N``: research runs on
Flower's simulation engine, with N virtual hospitals spread over the given DICOM folders.

RUN_FILE holds a ``[run]`` table with the same settings ``fedsynth launch`` takes
(``examples/run.toml``); a ``[coordinator]`` table, if present, is ignored. With
``--ray-address`` the virtual hospitals run on an existing Ray cluster (``ray start --head`` on one
machine, ``ray start --address HEAD:PORT`` on each other one), so a run is not limited to one
machine's cores. Simulation runs everything under one operator: no signatures, no trust boundary;
it is for research on data you may pool, never for hospitals' private data.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("fedsynth.simulate")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="many virtual hospitals on Flower's simulation engine "
                                        "(optionally on a multi-node Ray cluster)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("run_file", type=Path, help="TOML with a [run] table (examples/run.toml)")
    p.add_argument("--data-dir", type=Path, action="append", required=True,
                   help="a hospital's DICOM folder; repeat it; virtual hospitals take them in turn")
    p.add_argument("--virtual-hospitals", type=int, default=0,
                   help="how many virtual hospitals (default: one per --data-dir)")
    p.add_argument("--ray-address", default="",
                   help="HOST:PORT of a running Ray head (default: start Ray here)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="slice cache shared by the virtual hospitals (default: DATA_DIR/.cache)")
    p.add_argument("--run-dir", type=Path, default=None, help="overrides [run] run-dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tomllib

    from fedsynth.errors import UserError
    from fedsynth.simulation import run_simulated_federation
    from server.run_config import from_flat

    try:
        table = tomllib.loads(args.run_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"run file '{args.run_file}': {exc}") from None
    if not isinstance(table.get("run"), dict):
        raise UserError(f"run file '{args.run_file}' has no [run] table")
    settings = dict(table["run"])
    if args.run_dir is not None:
        settings["run-dir"] = str(args.run_dir)
    try:
        cfg = from_flat(settings)
    except ValueError as exc:
        raise UserError(f"run file '{args.run_file}': {exc}") from None
    folders = [d.resolve() for d in args.data_dir]
    for d in folders:
        if not d.is_dir():
            raise UserError(f"--data-dir '{d}' is not a folder")
    n = args.virtual_hospitals or len(folders)
    if n < 1:
        raise UserError("--virtual-hospitals must be at least 1")
    hospitals = []
    for i in range(n):
        folder = folders[i % len(folders)]
        cache = (args.cache_dir.resolve() if args.cache_dir else folder / ".cache")
        hospitals.append({"data-dir": str(folder), "cache-dir": str(cache),
                          "name": f"virtual-{i + 1}"})
    log.info("simulating %d virtual hospitals over %d folder(s) for %d rounds%s", n,
             len(folders), cfg.rounds, f" on the Ray cluster at {args.ray_address}"
             if args.ray_address else "")
    t0 = time.monotonic()
    try:
        root = run_simulated_federation(cfg, hospitals, ray_address=args.ray_address or None)
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    print(f"fedsynth simulate: {n} virtual hospitals, {cfg.rounds} rounds in "
          f"{time.monotonic() - t0:.0f} s; run folder {root}")
    return 0
