"""docs/operations-transcript.md: what each operator command prints, from a real run on this host.

Why: docs/operations.md tells an operator what to type and what to expect; the lines it quotes
must be what the commands print today, not what someone remembered. This script starts a real
coordinator (TLS, node auth, its metrics port) and two hospital daemons on 127.0.0.1, launches a
2-round run with ``--wait``, asks ``status``, scrapes the coordinator's metrics after the run,
restarts one hospital gracefully (SIGTERM) and runs a second run, writes the report, and shows a
hospital's privacy ledger. Every command and the lines it printed go into the transcript.

Run: ``make docs-operations`` (about 2-3 minutes on the 2-core CI box).
"""

from __future__ import annotations

import argparse
import re
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.localdeploy import (free_port, hospital_toml, launch_toml, metrics_rows, run, start,
                               wait_for)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "operations-transcript.md"
NAMES = ("north", "south", "east")
# east has a privacy budget: it refuses the runs without DP-SGD (dp-required) and the DP run's
# rounds past its budget (dp-budget), and status says so by name
EAST_BUDGET = "\ndp-epsilon = 6.0\n"


class Transcript:
    """Commands and what they printed, with the scratch folder's path replaced by ``$WORK``."""

    def __init__(self, work: Path) -> None:
        self.work, self.parts = work, []

    def clean(self, text: str) -> str:
        text = text.replace(str(self.work), "$WORK")
        return re.sub(r"127\.0\.0\.1:\d{4,5}", "127.0.0.1:PORT", text)

    def add(self, title: str, command: str, output: str, keep: int = 40) -> None:
        lines = [ln for ln in self.clean(output).splitlines() if ln.strip()]
        if len(lines) > keep:
            lines = lines[:keep] + [f"... ({len(lines) - keep} more lines)"]
        self.parts.append(f"### {title}\n\n```\n$ {self.clean(command)}\n" + "\n".join(lines)
                          + "\n```\n")

    def command(self, title: str, args: list[str], keep: int = 40, timeout: float = 600) -> str:
        out = run(args, self.work, timeout=timeout)
        text = out.stdout + out.stderr
        self.add(title, "fedsynth " + " ".join(args)
                 + ("" if out.returncode == 0 else f"    # exit code {out.returncode}"),
                 text, keep)
        return text


def scrape(port: int, pattern: str) -> str:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return "\n".join(ln for ln in body.splitlines() if re.match(pattern, ln))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from fedsynth.demo_data import build_demo_hospitals

    work = Path(tempfile.mkdtemp(prefix="fedsynth-ops-"))
    t = Transcript(work)
    t.command("Make the federation's keys (coordinator host)", ["certs", "init", str(work / "keys")])
    for name in NAMES:
        t.command(f"A node key for {name}", ["certs", "node", str(work / "keys"), name])
    data = build_demo_hospitals(work / "data", len(NAMES), matrix=32)
    address, metrics = f"127.0.0.1:{free_port()}", free_port()
    coord_args = ["coordinator", "--keys", str(work / "keys"), "--address", address,
                  "--state", str(work / "state"), "--rescan", "2", "--metrics-port", str(metrics)]
    coord = start("coordinator", coord_args, work)
    tomls = {n: hospital_toml(work / f"{n}.toml", address, work / "keys", n, data[i], free_port())
             for i, n in enumerate(NAMES)}
    with tomls["east"].open("a") as fh:  # the [hospital] table is the file's last
        fh.write(EAST_BUDGET)
    hmetrics = {n: free_port() for n in NAMES}
    hosp = {n: start(n, ["hospital", str(tomls[n]), "--metrics-port", str(hmetrics[n]),
                         "--state-dir", str(work / "hstate" / n)], work) for n in NAMES}
    procs = lambda: (coord, *hosp.values())  # noqa: E731
    launch = launch_toml(work / "run.toml", address, work / "keys" / "ca.pem", family="dcgan",
                         rounds=2, local_steps=5, batch_size=4, image_size=32, min_hospitals=2,
                         round_timeout=120, signing_key=work / "keys" / "model-signing.key",
                         run_dir=work / "runs", run_id="first")
    try:
        wait_for("hospitals connected", lambda: all("SuperNode ID" in h.text()
                                                    for h in hosp.values()), 240, procs())
        time.sleep(3)
        t.add("The coordinator's log at start", " ".join(["fedsynth", *coord_args]), coord.text(), 25)
        t.add("A hospital's log at start", f"fedsynth hospital {tomls['north']} --metrics-port "
              f"{hmetrics['north']} --state-dir {work / 'hstate' / 'north'}", hosp["north"].text(), 25)
        t.add("A hospital's metrics before its first task",
              f"curl -s 127.0.0.1:{hmetrics['north']}/metrics | grep ^fedsynth_",
              scrape(hmetrics["north"], r"fedsynth_"), 15)
        t.command("Who is online, before any run", ["status", str(launch), "--flwr-home",
                                                     str(work / "flwr")])
        t.command("Launch a run and follow it", ["launch", str(launch), "--wait", "--flwr-home",
                                                str(work / "flwr")], 30)
        t.command("Status after the run", ["status", str(launch), "--flwr-home",
                                           str(work / "flwr")])
        time.sleep(3)
        t.add("The coordinator's metrics after the run ended",
              f"curl -s 127.0.0.1:{metrics}/metrics | grep -E '^fedsynth_(round|rounds_completed|"
              "hospital_last_round)'",
              scrape(metrics, r"fedsynth_(round|rounds_completed|hospital_last_round)"), 15)
        # a graceful restart of one hospital, then a second run it takes part in
        # what `systemctl stop` does (KillMode=mixed): SIGTERM to the daemon's main pid only
        hosp["south"].popen.send_signal(signal.SIGTERM)
        hosp["south"].popen.wait(timeout=120)
        t.add("A hospital stopped with SIGTERM (systemctl stop)", "kill -TERM <south's daemon>",
              "\n".join(hosp["south"].text().splitlines()[-6:]), 6)
        hosp["south"] = start("south-2", ["hospital", str(tomls["south"]), "--metrics-port",
                                          str(hmetrics["south"]), "--state-dir",
                                          str(work / "hstate" / "south")], work)
        wait_for("south back", lambda: "SuperNode ID" in hosp["south"].text(), 240, procs())
        t.add("... and started again", f"fedsynth hospital {tomls['south']} ...",
              hosp["south"].text(), 12)
        second = launch_toml(work / "run2.toml", address, work / "keys" / "ca.pem",
                             family="dcgan", rounds=2, local_steps=5, batch_size=4,
                             image_size=32, min_hospitals=2, round_timeout=120,
                             signing_key=work / "keys" / "model-signing.key",
                             run_dir=work / "runs", run_id="second")
        t.command("A second run after the restart", ["launch", str(second), "--wait",
                                                      "--flwr-home", str(work / "flwr")], 30)
        rows = metrics_rows(work / "runs" / "second")
        t.add("Who trained in the second run (metrics.jsonl)",
              f"jq -c '{{round, replied, names}}' {work / 'runs' / 'second' / 'metrics.jsonl'}",
              "\n".join(str({"round": r["round"], "replied": r["replied"],
                             "names": sorted(r.get("names", {}).values())}) for r in rows))
        # a DP run in which a hospital dies hard mid-round: the round ends without it, status and
        # the report say who failed and why, the restarted daemon trains again
        third = launch_toml(work / "run3.toml", address, work / "keys" / "ca.pem",
                            family="dcgan", rounds=3, local_steps=40, batch_size=4,
                            image_size=32, min_hospitals=1, round_timeout=60,
                            dp_noise_multiplier=1.0, signing_key=work / "keys" / "model-signing.key",
                            run_dir=work / "runs", run_id="third")
        t.command("A run with DP-SGD at the hospitals", ["launch", str(third), "--flwr-home",
                                                         str(work / "flwr")], 10)
        north = hosp["north"]
        seen = north.text().count("Receiving: train message")
        wait_for("round 2 reaching north", lambda: north.text().count("Receiving: train message")
                 >= seen + 2, 300, procs())
        north.stop(signal.SIGKILL)  # power cut: every process of the daemon, no goodbye
        t.add("A hospital killed mid-round (kill -9 of its process group)",
              "kill -KILL -<north's process group>", "(no output: the daemon and its children are gone)")
        wait_for("round 2 without north", lambda: len(metrics_rows(work / "runs" / "third")) >= 2,
                 300, (coord, hosp["south"]))
        hosp["north"] = start("north-2", ["hospital", str(tomls["north"]), "--metrics-port",
                                          str(hmetrics["north"]), "--state-dir",
                                          str(work / "hstate" / "north")], work)
        wait_for("the third run", lambda: len(metrics_rows(work / "runs" / "third")) >= 3, 400,
                 procs())
        time.sleep(2)
        t.command("Status: rounds, epsilon per hospital, who failed and why",
                  ["status", str(third), "--flwr-home", str(work / "flwr")])
        t.command("The run's report", ["report", str(work / "runs" / "third")])
        t.command("The budgeted hospital's ledger", ["ledger", "show", str(tomls["east"]),
                                                     "--state-dir", str(work / "hstate" / "east")])
        t.command("A hospital's privacy ledger", ["ledger", "show", "--state-dir",
                                                  str(work / "hstate" / "south"), "--name", "south"])
    finally:
        for proc in procs():
            proc.stop()
    args.out.write_text(
        "# What the operator commands print (generated)\n\n"
        "Written by `make docs-operations` (bench/operations_transcript.py) from a real coordinator "
        "and two hospital daemons on 127.0.0.1; `$WORK` is its scratch folder, `PORT` a free "
        "port. docs/operations.md explains each step. Do not edit by hand: run it again.\n\n"
        + "\n".join(t.parts))
    print(f"wrote {args.out} ({len(t.parts)} steps); scratch folder {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
