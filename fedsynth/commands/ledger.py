"""``fedsynth ledger show|reset``: the hospital's privacy ledger, for its operator.

A hospital with a DP budget refuses DP rounds while its ledger is missing (after DP was charged
there) or corrupt (``client.privacy``). ``show`` says which state the ledger is in and what it
has spent; ``reset --i-know`` is the operator's deliberate act that lets DP rounds run again
after a ledger was lost: the old file is kept aside, the reset is logged beside the ledger, and
epsilon counts again from zero, so the operator first lowers ``dp-epsilon`` by what was spent
(docs/hospital-it.md, "The privacy ledger"). Run it as the daemon's user, with its settings file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="this hospital's privacy ledger: show it, or reset a "
                       "lost or corrupt one")
    actions = p.add_subparsers(dest="action", required=True)
    for name, text in (("show", "where the ledger is, its state and the epsilon spent"),
                       ("reset", "replace a lost or corrupt ledger with an empty one "
                                 "(needs --i-know; read docs/hospital-it.md first)")):
        a = actions.add_parser(name, help=text)
        a.add_argument("config", type=Path, nargs="?",
                       help="the hospital daemon's settings file (TOML)")
        a.add_argument("--state-dir", type=Path,
                       help="the state folder (default: the settings' state-dir, else "
                            "$STATE_DIRECTORY; systemd units: /var/lib/fedsynth)")
        a.add_argument("--cache-dir", type=Path, help="the cache folder (default: the settings')")
        a.add_argument("--name", help="the hospital's name (default: the settings')")
        if name == "show":
            a.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            a.add_argument("--i-know", action="store_true",
                           help="epsilon restarts from zero: this hospital's budget no longer "
                                "counts what was spent before")
        a.set_defaults(func=run)


def hospital_settings(args: argparse.Namespace):  # noqa: ANN201
    from client.settings import DaemonSettings, HospitalSettings, SettingsError
    from fedsynth.errors import UserError

    def s(v: object) -> object:
        return str(v) if isinstance(v, Path) else v

    try:
        if args.config is not None:
            # only [hospital] is read here: the coordinator's settings, which the loader
            # requires, are stood in for, so a file without them still names the ledger
            return DaemonSettings.load(args.config, {
                "hospital.state-dir": s(args.state_dir), "hospital.cache-dir": s(args.cache_dir),
                "hospital.name": args.name, "coordinator.address": "unused:1",
                "coordinator.insecure": True}).hospital
        return HospitalSettings.from_mapping({
            "data-dir": ".", "state-dir": s(args.state_dir), "cache-dir": s(args.cache_dir),
            "name": args.name or "hospital"})
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from client.privacy import ledger_status, reset_ledger
    from fedsynth.errors import UserError

    hospital = hospital_settings(args)
    if hospital.state_dir is None:
        raise UserError("no state-dir: give the settings file, or --state-dir (systemd: "
                        "/var/lib/fedsynth); a hospital without one keeps no privacy ledger")
    if args.action == "show":
        status = ledger_status(hospital)
        out = {"hospital": hospital.name, "ledger": str(status.files.ledger),
               "state": status.state, "problem": status.problem or None,
               "releases": status.ledger.releases if status.ledger is not None else None,
               "epsilon": (status.ledger.epsilon(hospital.dp_delta)
                           if status.ledger is not None else None),
               "delta": hospital.dp_delta, "budget": hospital.dp_epsilon}
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(f"privacy ledger of {hospital.name}: {out['ledger']}")
            print(f"state: {status.state}" + (f" -- {status.problem}" if status.problem else ""))
            if status.ledger is not None:
                print(f"spent: epsilon {out['epsilon']:.4g} at delta {hospital.dp_delta:g} "
                      f"({status.ledger.releases} DP releases); budget dp-epsilon = "
                      f"{hospital.dp_epsilon:g}")
        return 0 if status.state in ("ok", "first-start") else 1
    if not args.i_know:
        raise UserError("reset needs --i-know: epsilon then restarts from zero and this "
                        "hospital's dp-epsilon no longer counts what was spent before. Restore "
                        "the ledger from a backup instead if there is one; otherwise first lower "
                        "dp-epsilon by what was spent (the hospital's log lines 'privacy: "
                        "epsilon = ... spent', or the coordinator's report), see "
                        "docs/hospital-it.md")
    _check_owner(hospital.state_dir)
    before, aside = reset_ledger(hospital)
    print(f"privacy ledger {before.files.ledger} reset (it was {before.state}"
          + (f"; the old file is kept as {aside}" if aside else "") + "); the reset is logged "
          f"in {before.files.ledger.with_name('dp-ledger-resets.log')}")
    return 0


def _check_owner(state_dir: Path) -> None:
    """A reset written by another user (root) would leave a ledger the daemon cannot replace,
    so every later DP round would fail: refuse, and say which user to run it as."""
    import os
    import pwd

    from fedsynth.errors import UserError

    try:
        owner = state_dir.stat().st_uid
    except OSError:
        return  # a new folder: made by this user
    if owner != os.geteuid():
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise UserError(f"the state folder {state_dir} belongs to {name}: run the reset as that "
                        f"user (e.g. sudo -u {name} fedsynth ledger reset ...), so that the "
                        "daemon can go on writing its ledger")
