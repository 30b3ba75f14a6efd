"""``fedsynth launch CONFIG``: start (or ``--resume``) a federation run on the coordinator.

CONFIG is TOML: ``[coordinator]`` address and root-certificates; ``[run]`` any of the run settings
of ``server/run_config.py`` (``fedsynth launch --help`` lists them; ``examples/run.toml`` shows
every one). The file is checked before anything is submitted. The run is submitted with
the SuperLink's Control API in-process (``fedsynth.control``: no ``flwr`` start) and a code-free
app (see ``fedsynth.deployment``). ``--wait`` follows it to the end, one line per completed round
(read from the run folder's metrics.jsonl); the outcome is read from the run's status
(``flwr run --stream`` exits 0 even when the ServerApp crashed).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("fedsynth.launch")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start a federation run on the coordinator",
                       description="Start (or --resume) a federation run. CONFIG is TOML with "
                                   "[coordinator] address, root-certificates (or insecure = "
                                   "true) and [run] settings; examples/run.toml lists them all.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    plain_help = p.format_help

    def format_help() -> str:  # the settings list imports torch: only when --help asks for it
        from server.run_config import settings_help

        p.epilog = settings_help()
        return plain_help()

    p.format_help = format_help  # type: ignore[method-assign]
    p.add_argument("config", type=Path, help="launch file (TOML)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue this run after its last completed round")
    p.add_argument("--wait", action="store_true",
                   help="wait for the run to end; exit 1 unless it completed")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to wait for a coordinator that is starting")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between status checks")
    p.add_argument("--flwr-home", type=Path, help="Flower CLI folder (default ~/.fedsynth/flwr)")
    p.set_defaults(func=run)


def round_lines(folder: Path, shown: set[int]) -> list[str]:
    """One line per round of ``folder/metrics.jsonl`` not yet in ``shown`` (which it updates)."""
    from fedsynth.commands.status import _rows

    lines = []
    for row in sorted(_rows(folder / "metrics.jsonl"), key=lambda r: r.get("round", 0)):
        rnd = row.get("round")
        if rnd is None or rnd in shown:
            continue
        shown.add(rnd)
        train = row.get("train", {})
        failed = "".join(f"; {h} failed ({k})" for h, k in
                         sorted(row.get("failed_hospitals", {}).items()))
        wire = row.get("server", {}).get("wire-bytes")
        lines.append(f"round {rnd}: {row.get('replied', 0)}/{row.get('selected', 0)} hospitals "
                     f"replied in {row.get('seconds', 0.0):.1f} s, loss-g "
                     f"{train.get('loss-g', float('nan')):.3f}, loss-d "
                     f"{train.get('loss-d', float('nan')):.3f}"
                     + (f", {wire / 1e6:.2f} MB on the wire" if wire else "") + failed)
    return lines


def wait_for_run(flower_run_id: str, flwr_home: Path, poll: float,
                 folder: Path | None = None) -> tuple[str, str]:
    """Poll the run's status until it is finished, printing a line per completed round of
    ``folder`` (its metrics.jsonl) as it appears; returns (status, details)."""
    from fedsynth.control import Control
    from fedsynth.deployment import DeploymentError

    shown: set[int] = set()
    next_status = 0.0
    while True:
        if folder is not None:
            for line in round_lines(folder, shown):
                print(line, flush=True)
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + poll
            try:
                with Control(flwr_home) as control:
                    runs = control.runs(flower_run_id)
                status, details = runs[0]["status"], runs[0].get("status-details", "")
                if status.startswith("finished"):
                    if folder is not None:
                        for line in round_lines(folder, shown):
                            print(line, flush=True)
                    return status, details
            except DeploymentError as exc:  # the coordinator may be restarting
                log.warning("%s", exc)
        time.sleep(min(1.0, poll))


def wait_for_coordinator(address: str, root_cert: Path | None, timeout: float) -> None:
    """A coordinator that is (re)starting gets ``timeout`` seconds; a wrong CA fails at once."""
    from fedsynth.errors import UserError
    from fedsynth.deployment import CoordinatorUnreachable, DeploymentError, probe_coordinator

    deadline = time.monotonic() + timeout
    while True:
        try:
            probe_coordinator(address, root_cert)
            return
        except CoordinatorUnreachable as exc:
            if time.monotonic() >= deadline:
                raise UserError(str(exc)) from None
            log.info("%s; waiting", exc)
            time.sleep(2.0)
        except DeploymentError as exc:
            raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from fedsynth.errors import UserError
    from fedsynth.control import Control
    from fedsynth.deployment import (DeploymentError, default_flwr_home, run_config_arg,
                                     write_flwr_home, write_launch_app)
    from fedsynth.launch_file import load_launch_file

    cfg = load_launch_file(args.config)
    run_cfg = dict(cfg.run)
    if args.resume:
        run_cfg["run-id"], run_cfg["resume"] = args.resume, True
    elif not run_cfg.get("run-id"):
        run_cfg["run-id"] = datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    if cfg.root_certificates is not None and not run_cfg.get("signing-key"):
        raise UserError(f"launch file '{args.config}': [run] signing-key is missing (the "
                        "coordinator's model-signing.key; hospitals refuse unsigned models)")
    if run_cfg.get("signing-key") and not Path(run_cfg["signing-key"]).is_file():
        raise UserError(f"signing-key '{run_cfg['signing-key']}' does not exist "
                        "(launch from the coordinator's machine)")
    flwr_home = args.flwr_home or default_flwr_home()
    write_flwr_home(flwr_home, cfg.address, cfg.root_certificates)
    wait_for_coordinator(cfg.address, cfg.root_certificates, args.connect_timeout)
    with tempfile.TemporaryDirectory(prefix="fedsynth-app-") as tmp:
        app = write_launch_app(Path(tmp) / "app")
        try:  # the Control API in-process: no `flwr run` start (fedsynth.control)
            with Control(flwr_home) as control:
                flower_id = control.start_run(app, run_config_arg(run_cfg))
        except DeploymentError as exc:
            raise UserError(f"{exc} (coordinator {cfg.address})") from None
    print(f"run {run_cfg['run-id']} submitted (Flower run {flower_id}); "
          f"resume with: fedsynth launch {args.config} --resume {run_cfg['run-id']}", flush=True)
    if not args.wait:
        return 0
    folder = Path(str(run_cfg.get("run-dir") or "runs")) / str(run_cfg["run-id"])
    status, details = wait_for_run(flower_id, flwr_home, args.poll, folder)
    print(f"run {run_cfg['run-id']}: {status} {details}".rstrip(), flush=True)
    return 0 if status == "finished:completed" else 1
