"""``fedsynth status CONFIG``: the coordinator's runs and hospitals, and what happened in each run.

Per run: its Flower run id and state, its run folder (the run config's ``run-dir``/``run-id``,
also written to the folder's ``config.json`` as ``flower_run_id``), rounds done / asked, the
privacy spent per hospital (its latest ``dp-epsilon``, by registered name), the run's
client-level epsilon (``client-dp-epsilon``, server/client_dp.py) and every round's
failed hospitals with the reason (offline / restarted / timeout / dp-budget / ...,
``server/grid.py``). The SuperLink is asked in-process over its Control API
(``fedsynth.control``), not through ``flwr`` starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="runs, rounds, privacy spent, failures, hospitals online")
    p.add_argument("config", type=Path, help="the launch file (TOML) naming the coordinator")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--flwr-home", type=Path, help="Flower CLI folder (default ~/.fedsynth/flwr)")
    p.set_defaults(func=run)


def _rows(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:  # a row being written by another process is skipped, not fatal
                continue
    return out


def folder_summary(folder: Path, rounds_asked: int | None = None) -> dict[str, Any]:
    """What one run folder says happened: rounds done / asked, latest epsilon per hospital by
    registered name, and each round's failed hospitals with the kind of failure."""
    rows = _rows(folder / "metrics.jsonl")
    config: dict[str, Any] = {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        pass
    epsilon: dict[str, float] = {}
    client_dp: float | None = None  # the run's client-level epsilon (server/client_dp.py EPSILON)
    failures: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: r.get("round", 0)):
        names = r.get("names", {})
        server = r.get("server")
        if isinstance(server, dict) and isinstance(server.get("client-dp-epsilon"), (int, float)):
            client_dp = float(server["client-dp-epsilon"])
        for node, metrics in r.get("hospitals", {}).items():
            if isinstance(metrics, dict) and "dp-epsilon" in metrics:
                epsilon[names.get(node, node)] = float(metrics["dp-epsilon"])
        for phase, key in (("train", "failed_hospitals"), ("evaluate", "evaluate_failed")):
            for hospital, kind in sorted(r.get(key, {}).items()):
                failures.append({"round": r.get("round"), "hospital": hospital, "kind": kind,
                                 "phase": phase})
    return {"folder": str(folder),
            "rounds-done": len({r.get("round") for r in rows}),
            "rounds-asked": config.get("rounds", rounds_asked),
            "flower-run-id": config.get("flower_run_id"),
            "client-dp-delta": config.get("client_dp_delta") if client_dp is not None else None,
            "epsilon": epsilon, "client-dp-epsilon": client_dp, "failures": failures}


def collect(cfg, flwr_home: Path) -> dict:  # noqa: ANN001
    from fedsynth.control import Control

    with Control(flwr_home) as control:
        runs = control.runs()
        nodes = control.nodes()
    default_dir = Path(cfg.run.get("run-dir", "runs"))
    out_runs, seen = [], set()
    for r in runs:
        rc = r.get("run-config", {})
        entry = {k: r.get(k) for k in ("run-id", "status", "status-details", "elapsed")}
        if rc.get("run-id"):
            folder = Path(str(rc.get("run-dir") or default_dir)) / str(rc["run-id"])
            asked = rc.get("num-server-rounds")
            entry["run-folder"] = str(rc["run-id"])
            entry.update(folder_summary(folder, int(asked) if asked is not None else None))
            seen.add(folder.resolve())
        out_runs.append(entry)
    # run folders no listed Flower run names (e.g. from before a SuperLink state reset)
    if default_dir.is_dir():
        for folder in sorted(p.parent for p in default_dir.glob("*/metrics.jsonl")):
            if folder.resolve() not in seen:
                out_runs.append({"run-id": None, "status": None, "run-folder": folder.name,
                                 **folder_summary(folder)})

    def label(n: dict) -> str:
        return n.get("name") or str(n.get("node-id"))

    return {
        "coordinator": cfg.address,
        "runs": out_runs,
        "hospitals-online": sum(n.get("status") == "online" for n in nodes),
        "hospitals-registered": len(nodes),
        "hospitals-offline": sorted(label(n) for n in nodes if n.get("status") == "offline"),
    }


def format_run(r: dict[str, Any]) -> list[str]:
    head = (f"run {r['run-folder']}" if r.get("run-folder") else "run (no run folder)")
    if r.get("run-id"):
        elapsed = f", {r['elapsed']:.0f} s" if r.get("elapsed") is not None else ""
        head += f" (Flower run {r['run-id']}): {r['status']}{elapsed}"
        if r.get("status-details"):
            head += f" ({r['status-details']})"
    else:
        head += ": no Flower run listed"
    lines = [f"  {head}"]
    if "folder" in r:
        asked = r.get("rounds-asked")
        lines.append(f"    folder {r['folder']}: rounds {r['rounds-done']} / "
                     f"{asked if asked is not None else '?'}")
        if r["epsilon"]:
            lines.append("    epsilon: " + ", ".join(f"{h} {e:.4g}"
                                                     for h, e in sorted(r["epsilon"].items())))
        if r.get("client-dp-epsilon") is not None:
            delta = r.get("client-dp-delta")
            lines.append(f"    client-level epsilon: {r['client-dp-epsilon']:.4g}"
                         + (f" (delta {delta:g})" if isinstance(delta, (int, float)) else ""))
        by_round: dict[Any, list[str]] = {}
        for f in r["failures"]:
            by_round.setdefault(f["round"], []).append(
                f"{f['hospital']} ({f['kind']}{', evaluate' if f['phase'] == 'evaluate' else ''})")
        for rnd, failed in by_round.items():
            lines.append(f"    round {rnd} failed: {', '.join(failed)}")
    return lines


def run(args: argparse.Namespace) -> int:
    from fedsynth.errors import UserError
    from fedsynth.deployment import DeploymentError, default_flwr_home, write_flwr_home
    from fedsynth.launch_file import load_launch_file

    cfg = load_launch_file(args.config, check_run=False)  # status needs no torch
    flwr_home = args.flwr_home or default_flwr_home()
    write_flwr_home(flwr_home, cfg.address, cfg.root_certificates)
    try:
        info = collect(cfg, flwr_home)
    except DeploymentError as exc:
        raise UserError(f"{exc} (coordinator {cfg.address})") from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    offline = f" (offline: {', '.join(info['hospitals-offline'])})" \
        if info["hospitals-offline"] else ""
    print(f"coordinator {info['coordinator']}: {info['hospitals-online']} of "
          f"{info['hospitals-registered']} registered hospitals online{offline}")
    for r in info["runs"]:
        print("\n".join(format_run(r)))
    return 0
