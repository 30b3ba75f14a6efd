"""Killed daemons take their children with them; a hospital that does not answer is failed, by name.

A daemon's children (SuperLink, nginx, SuperNode, the warm executor) and what they start
(flower-superexec → flwr-serverapp, nginx's worker) run under a guard
(``fedsynth.processes.spawn``) that the kernel signals when the daemon dies. The slow tests kill a daemon's whole process group
with SIGKILL, as ``kill -9 -PGID`` or an OOM kill of the group would, mid-round.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness.deploy_helpers import (free_port, launch_toml, lifecycle_federation, metrics_rows,
                                          run, start, wait_for)

ROUND_TIMEOUT = 600.0  # what a dead hospital must NOT cost a round
DEAD_HOSPITAL_BOUND_S = 30.0  # kill → round done, with the other hospital's training in it


# ---------------------------------------------------------------- /proc helpers

def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _tree(pid: int) -> dict[int, str]:
    """``pid`` and its descendants: pid -> start time (to tell a reused pid apart)."""
    from fedsynth.processes import descendants as _descendants

    out = {}
    for p in (pid, *_descendants(pid)):
        st = _stat(p)
        if st is not None:
            out[p] = st[1]
    return out


def _alive(tree: dict[int, str]) -> list[str]:
    """The processes of ``tree`` still running (zombies are dead), with their command lines."""
    left = []
    for pid, started in tree.items():
        st = _stat(pid)
        if st is None or st[1] != started or st[0] in ("Z", "X"):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        left.append(f"{pid}: {cmd}")
    return left


def _matching(*needles: str) -> list[str]:
    """Running processes (not zombies, not this one) whose command line holds a needle."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        st = _stat(int(entry.name))
        if st is None or st[0] in ("Z", "X"):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            out.append(f"{entry.name}: {cmd}")
    return out


def _gone(what: str, check, timeout: float = 15.0) -> float:
    """Wait until ``check()`` lists nothing; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        left = check()
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} still running {timeout:.0f} s later:\n" + "\n".join(left))
        time.sleep(0.2)


# ---------------------------------------------------------------- the guard itself (fast)

DAEMON = textwrap.dedent("""\
    import sys, threading, time
    from fedsynth.supervisor import Supervisor
    s = Supervisor("x", ["sh", "-c", "sleep 301 & sleep 302 & echo started; wait"],
                   sink=lambda line: print(line, flush=True))
    # started from a thread that ends at once: the children must outlive it
    t = threading.Thread(target=s.start)
    t.start()
    t.join()
    print("guard", s.proc.pid, flush=True)
    time.sleep(120)
""")


def test_children_outlive_the_starting_thread_and_die_with_the_daemon(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", DAEMON], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert "started" in lines, lines
        time.sleep(1.0)  # the starting thread is long gone
        tree = _tree(proc.pid)
        sleeps = [x for x in _alive(tree) if x.split(": ", 1)[1].startswith("sleep 30")]
        assert len(sleeps) == 2, _alive(tree)  # shell's children: grandchildren of the guard
        assert any("fedsynth.processes guard" in x for x in _alive(tree))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        took = _gone("the daemon's children", lambda: _alive(tree), timeout=10)
        print(f"\n[lifecycle] children gone {took:.1f} s after SIGKILL of the daemon")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_guard_passes_the_exit_code_and_refuses_an_orphaned_start() -> None:
    from fedsynth.processes import guarded

    done = subprocess.run(guarded(["sh", "-c", "exit 7"]), check=False)
    assert done.returncode == 7
    # a guard whose daemon is not its parent starts nothing
    wrong = subprocess.run(guarded(["sh", "-c", "echo ran"], daemon_pid=1), capture_output=True,
                           text=True, check=False)
    assert wrong.returncode == 1 and "ran" not in wrong.stdout


def _status_without_flwr(launch: Path, flwr_home: Path) -> dict:
    """``fedsynth status``'s answer with every ``flwr`` start made to fail."""
    from unittest import mock

    from fedsynth import deployment
    from fedsynth.commands.status import collect
    from fedsynth.launch_file import load_launch_file

    def no_flwr(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("status started flwr")

    with mock.patch.object(deployment, "flwr_cli", no_flwr):
        return collect(load_launch_file(launch, check_run=False), flwr_home)



# ---------------------------------------------------------------- real daemons (slow)

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_hospital_is_failed_by_name_and_leaves_nothing(tmp_path: Path) -> None:
    keys, address, coord_args, ports, tomls = lifecycle_federation(tmp_path, ("h1", "h2"))
    coord = start("coordinator", coord_args, tmp_path)
    hospitals = {n: start(n, ["hospital", str(tomls[n])], tmp_path) for n in tomls}
    procs = (coord, *hospitals.values())
    folder = tmp_path / "runs" / "lifecycle"
    launch = launch_toml(tmp_path / "launch.toml", address, keys.ca_cert, family="dcgan",
                         rounds=3, local_steps=60, batch_size=4, image_size=32, min_hospitals=2,
                         round_timeout=ROUND_TIMEOUT, signing_key=keys.signing_key,
                         run_dir=tmp_path / "runs", run_id="lifecycle")
    try:
        wait_for("2 hospitals connected", lambda: all(
            "SuperNode ID" in h.text() for h in hospitals.values()), 240, procs)
        out = run(["launch", str(launch), "--flwr-home", str(tmp_path / "flwr")], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        wait_for("round 1", lambda: len(metrics_rows(folder)) >= 1, 300, procs)

        # h2 dies hard mid-round 2: its daemon's whole process group, SIGKILL
        h2 = hospitals["h2"]  # its second train message is round 2's (round 1's evaluation
        # rides in it: no evaluate message comes between the two)
        wait_for("round 2 reaching h2", lambda: h2.text().count("Receiving: train message")
                 >= 2, 120, procs)
        tree = _tree(h2.popen.pid)
        assert len(tree) >= 4, tree  # daemon, guards, SuperNode, executor
        os.killpg(h2.popen.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        h2.popen.wait()
        procs = (coord, hospitals["h1"])
        took = _gone("h2's processes", lambda: _alive(tree))
        _gone("processes naming h2's port or settings",
              lambda: _matching(f"127.0.0.1:{ports['h2']}", f"--port {ports['h2']} ",
                                str(tomls["h2"])))
        wait_for("round 2", lambda: len(metrics_rows(folder)) >= 2, ROUND_TIMEOUT, procs)
        waited = time.monotonic() - t_kill
        row = metrics_rows(folder)[1]
        print(f"\n[lifecycle] h2's processes gone {took:.1f} s after the kill; round 2 done "
              f"{waited:.1f} s after it (round {row['seconds']:.1f} s, train phase "
              f"{row['server']['train-phase-seconds']:.1f} s)")
        assert waited < DEAD_HOSPITAL_BOUND_S, row
        assert row["selected"] == 2 and row["replied"] == 1 and row["failed"] == 1, row
        assert row["failed_hospitals"] == {"h2": "offline"}, row
        assert "h2" not in row["evaluate_failed"], row  # offline: not even asked to evaluate

        # each round's row has its model bytes: round 2 received one reply of round 1's two
        wire = [r["server"] for r in metrics_rows(folder)[:2]]
        assert wire[0]["sent-bytes"] > 0 and wire[0]["received-bytes"] > 0, wire
        assert wire[1]["received-bytes"] == pytest.approx(wire[0]["received-bytes"] / 2,
                                                          rel=0.02), wire
        # the run folder's coordinator log names the run's strategy, once, at its start
        run_log = (folder / "coordinator.log").read_text()
        assert run_log.count("strategy: family dcgan, preset fedgan, wire float32; "
                             "discriminator: mean/avg; generator: mean/avg") == 1, run_log
        assert "round 2/3 done" in run_log and "h2 failed (offline)" in run_log, run_log
        # ... and so does the coordinator daemon's own log (the ServerApp has no stdout: it
        # appends to the daemon's state/serverapp.log, which the daemon follows), with the run
        strategy = ("strategy: family dcgan, preset fedgan, wire float32; discriminator: "
                    "mean/avg; generator: mean/avg")
        wait_for("the run's lines in the coordinator's log",
                 lambda: "h2 failed (offline)" in coord.text(), 10, procs)
        daemon_log = coord.text()
        assert daemon_log.count(strategy) == 1, daemon_log[-4000:]
        assert re.search(r"fedsynth\.serverapp: INFO server\.\S+ \[lifecycle\] run lifecycle .*"
                         + re.escape(strategy), daemon_log), daemon_log[-4000:]
        assert "[lifecycle] round 2/3 done" in daemon_log, daemon_log[-4000:]
        # fedsynth status names it too: the run's folder, rounds done / asked, each failure
        flower_id = re.search(r"Flower run (\d+)", out.stdout).group(1)
        t_status = time.monotonic()
        status = run(["status", str(launch), "--flwr-home", str(tmp_path / "flwr")], tmp_path)
        took_status = time.monotonic() - t_status
        assert status.returncode == 0, status.stderr[-2000:]
        assert f"run lifecycle (Flower run {flower_id}): running" in status.stdout, status.stdout
        assert f"folder {folder}: rounds 2 / 3" in status.stdout, status.stdout
        assert "round 2 failed: h2 (offline)" in status.stdout, status.stdout
        assert "N/A" not in status.stdout, status.stdout
        # ... asking the SuperLink in-process (a `flwr` start each costs 1.5-5 s)
        info = _status_without_flwr(launch, tmp_path / "flwr")
        mine = [r for r in info["runs"] if r["run-id"] == flower_id]
        assert mine and mine[0]["folder"] == str(folder) and mine[0]["rounds-asked"] == 3, info
        print(f"[lifecycle] fedsynth status took {took_status:.1f} s (load "
              f"{os.getloadavg()[0]:.1f})")

        # restarted, h2 trains in round 3 (its old SuperNode does not hold the port)
        hospitals["h2"] = start("h2-restarted", ["hospital", str(tomls["h2"])], tmp_path)
        procs = (coord, *hospitals.values())
        wait_for("round 3", lambda: len(metrics_rows(folder)) >= 3, 300, procs)
        rows = metrics_rows(folder)
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert rows[2]["replied"] == 2 and rows[2]["failed_hospitals"] == {}, rows[2]
        assert set(rows[2]["hospitals"]) == set(rows[0]["hospitals"])  # same node ids
        assert "address already in use" not in hospitals["h2"].text().lower()
    finally:
        for p in (coord, *hospitals.values()):
            p.stop()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_coordinator_leaves_nothing_and_resumes(tmp_path: Path) -> None:
    keys, address, coord_args, ports, tomls = lifecycle_federation(tmp_path, ("h1",))
    state = tmp_path / "state"
    coord = start("coordinator", coord_args, tmp_path)
    h1 = start("h1", ["hospital", str(tomls["h1"])], tmp_path)
    folder = tmp_path / "runs" / "resumed"
    launch = launch_toml(tmp_path / "launch.toml", address, keys.ca_cert, family="dcgan",
                         rounds=2, local_steps=40, batch_size=4, image_size=32, min_hospitals=1,
                         round_timeout=ROUND_TIMEOUT, signing_key=keys.signing_key,
                         run_dir=tmp_path / "runs", run_id="resumed", wire_dtype="int8")
    flwr_home = ["--flwr-home", str(tmp_path / "flwr")]
    try:
        wait_for("h1 connected", lambda: "SuperNode ID" in h1.text(), 240, (coord, h1))
        out = run(["launch", str(launch), *flwr_home], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        wait_for("round 1", lambda: len(metrics_rows(folder)) >= 1, 300, (coord, h1))

        tree = _tree(coord.popen.pid)
        kinds = " ".join(_alive(tree))
        for part in ("flower-superlink", "nginx: master", "nginx: worker", "flower-superexec",
                     "flwr-serverapp"):
            assert part in kinds, kinds  # what must go, running before the kill
        os.killpg(coord.popen.pid, signal.SIGKILL)
        coord.popen.wait()
        took = _gone("the coordinator's processes", lambda: _alive(tree))
        _gone("processes naming the coordinator's state", lambda: _matching(str(state)))
        print(f"\n[lifecycle] coordinator's SuperLink, nginx, superexec, serverapp gone "
              f"{took:.1f} s after the kill")

        coord = start("coordinator-2", coord_args, tmp_path)
        wait_for("the restarted coordinator", lambda: "Uvicorn running" in coord.text(), 120,
                 (coord, h1))
        # --wait follows the run to its end, a line per round it completes
        out = run(["launch", str(launch), "--resume", "resumed", "--wait", "--poll", "1",
                   *flwr_home], tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
        assert re.search(r"^round 2: 1/1 hospitals replied in [0-9.]+ s, loss-g [0-9.-]+, "
                         r"loss-d [0-9.-]+, [0-9.]+ MB on the wire$", out.stdout, re.M), out.stdout
        assert out.stdout.rstrip().endswith("run resumed: finished:completed"), out.stdout
        rows = metrics_rows(folder)
        assert [r["round"] for r in rows] == [1, 2]
        assert rows[1]["replied"] == 1, rows[1]
        # an int8 run's bytes are in metrics.jsonl: float16 down, one byte per weight back
        # (round 1: train messages only; the last round adds its evaluate message's download)
        sent, got = rows[0]["server"]["sent-bytes"], rows[0]["server"]["received-bytes"]
        assert 0.4 * sent < got < 0.6 * sent, rows[0]["server"]
        assert rows[1]["server"]["received-bytes"] == got, rows[1]["server"]
        assert rows[1]["server"]["sent-bytes"] == 2 * sent, rows[1]["server"]
        assert "address already in use" not in coord.text().lower()
    finally:
        for p in (coord, h1):
            p.stop()
