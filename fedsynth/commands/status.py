"""``fedsynth status CONFIG``: runs on the coordinator, rounds done, hospitals online."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="runs, rounds done and hospitals online")
    p.add_argument("config", type=Path, help="the launch file (TOML) naming the coordinator")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--flwr-home", type=Path, help="Flower CLI folder (default ~/.fedsynth/flwr)")
    p.set_defaults(func=run)


def rounds_done(run_dir: Path) -> dict[str, int]:
    """Completed rounds per run folder (rows of its metrics.jsonl)."""
    out: dict[str, int] = {}
    for metrics in sorted(Path(run_dir).glob("*/metrics.jsonl")):
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        out[metrics.parent.name] = len({r["round"] for r in rows})
    return out


def last_round_failures(run_dir: Path) -> dict[str, dict]:
    """Per run folder: its last round and the hospitals that failed in it, by name and kind
    (offline / restarted / timeout / error; metrics.jsonl ``failed_hospitals``)."""
    out: dict[str, dict] = {}
    for metrics in sorted(Path(run_dir).glob("*/metrics.jsonl")):
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if rows:
            last = rows[-1]
            out[metrics.parent.name] = {
                "round": last.get("round"),
                "failed": {**last.get("evaluate_failed", {}), **last.get("failed_hospitals", {})}}
    return out


def collect(cfg, flwr_home: Path) -> dict:  # noqa: ANN001
    from fedsynth.deployment import flwr_json

    runs = flwr_json(["ls"], flwr_home)["runs"]
    nodes = flwr_json(["supernode", "ls"], flwr_home)["nodes"]
    run_dir = Path(cfg.run.get("run-dir", "runs"))
    return {
        "coordinator": cfg.address,
        "runs": [{k: r.get(k) for k in ("run-id", "status", "status-details", "elapsed")}
                 for r in runs],
        "hospitals-online": sum(n.get("status") == "online" for n in nodes),
        "hospitals-registered": len(nodes),
        "hospitals-offline": sorted(str(n.get("node-id")) for n in nodes
                                    if n.get("status") == "offline"),
        "rounds-done": rounds_done(run_dir) if run_dir.is_dir() else {},
        "last-round-failed": last_round_failures(run_dir) if run_dir.is_dir() else {},
    }


def run(args: argparse.Namespace) -> int:
    from fedsynth.errors import UserError
    from fedsynth.deployment import DeploymentError, default_flwr_home, write_flwr_home
    from fedsynth.launch_file import load_launch_file

    cfg = load_launch_file(args.config)
    flwr_home = args.flwr_home or default_flwr_home()
    write_flwr_home(flwr_home, cfg.address, cfg.root_certificates)
    try:
        info = collect(cfg, flwr_home)
    except DeploymentError as exc:
        raise UserError(f"{exc} (coordinator {cfg.address})") from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"coordinator {info['coordinator']}: {info['hospitals-online']} of "
          f"{info['hospitals-registered']} registered hospitals online")
    for r in info["runs"]:
        print(f"  flower run {r['run-id']}: {r['status']} ({r['elapsed']:.0f} s) "
              f"{r.get('status-details') or ''}".rstrip())
    if info["hospitals-offline"]:
        print(f"  offline: node {', '.join(info['hospitals-offline'])}")
    for name, n in info["rounds-done"].items():
        last = info["last-round-failed"].get(name, {})
        failed = ", ".join(f"{h} ({kind})" for h, kind in last.get("failed", {}).items())
        print(f"  run folder {name}: {n} rounds done"
              + (f"; round {last.get('round')} failed: {failed}" if failed else ""))
    return 0
