"""Fault on the multi-host harness (bench/netns.py, fixture in tests/harness/netns_helpers.py).

The coordinator's host loses power (every process in its namespace SIGKILLed: coordinator,
SuperLink, nginx, ServerApp) and is restarted: ``fedsynth launch --resume`` continues from the
last completed round, each round in metrics.jsonl exactly once.
"""

from __future__ import annotations

import time

import pytest

from bench.localdeploy import metrics_rows, wait_for
from bench.netns import COORD, Federation
from tests.harness.netns_helpers import netns_federation  # noqa: F401


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_coordinator_host_power_loss_resumes_without_losing_or_doubling(
        netns_federation: Federation) -> None:
    fed = netns_federation
    net = fed.harness
    folder = fed.launch("restart", rounds=3, local_steps=20)
    wait_for("round 1", lambda: len(metrics_rows(folder)) >= 1, 300, fed.procs())
    t_kill = time.time()
    killed = net.empty(COORD)
    assert killed and net.pids(COORD) == []  # coordinator, SuperLink, nginx, ServerApp: gone
    done = [r["round"] for r in metrics_rows(folder)]
    assert done == list(range(1, len(done) + 1)), done
    coord = fed.start_coordinator()
    wait_for("the restarted coordinator", lambda: "Uvicorn running" in coord.text(), 180,
             fed.procs())
    fed.launch("restart", resume=True, rounds=3, local_steps=20)
    wait_for("round 3", lambda: len(metrics_rows(folder)) >= 3, 420, fed.procs())
    rows = metrics_rows(folder)
    print(f"\n[netns] coordinator host killed ({len(killed)} processes) after round "
          f"{done[-1]}; resumed; round seconds {[round(r['seconds'], 1) for r in rows]}")
    assert [r["round"] for r in rows] == [1, 2, 3]  # none lost, none twice
    assert all(r["replied"] == 3 for r in rows), rows
    # resumed, not restarted over: the samples of the rounds done before the kill were never
    # drawn again, those of every later round were drawn after it
    samples = {r: (folder / "samples" / f"round-{r:03d}.png").stat().st_mtime
               for r in range(0, 4)}
    assert all(samples[r] < t_kill for r in range(0, done[-1] + 1)), (samples, t_kill)
    assert all(samples[r] > t_kill for r in range(done[-1] + 1, 4)), (samples, t_kill)
    assert done[-1] < 3  # the kill did land before the run's end
    assert all(p.popen.poll() is None for n, p in net.procs.items() if n in net.rates)
