"""A hospital given a wrong coordinator address ends under ``--max-restarts`` (issue 24 item 6).

Before, the daemon's pre-flight probe (nothing answers at the address) was retried forever
outside the restart count: the SuperNode was never started, so it never died, and
``--max-restarts 1`` never ran out. Now each failed try counts like a restart.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from fedsynth.deployment import CoordinatorUnreachable
from fedsynth.supervisor import Supervisor

from tests.harness.deploy_helpers import run


def test_unreachable_before_start_counts_against_max_restarts() -> None:
    tries: list[float] = []

    def preflight() -> None:
        tries.append(time.monotonic())
        raise CoordinatorUnreachable("coordinator 10.0.0.9:1 unreachable (refused)")

    s = Supervisor("supernode", [sys.executable, "-c", "pass"], min_backoff=0.05,
                   max_restarts=2)
    assert s.run_forever(before_start=preflight) == 1
    assert len(tries) == 3 and s.restarts == 2  # the first try and two more
    assert s.unreachable == "coordinator 10.0.0.9:1 unreachable (refused)"
    assert s.proc is None  # the child was never started

    once = Supervisor("supernode", [sys.executable, "-c", "pass"], max_restarts=0)
    tries.clear()
    assert once.run_forever(before_start=preflight) == 1 and len(tries) == 1


def _dead_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_hospital_cli_with_wrong_coordinator_address_ends_with_one_line(tmp_path: Path) -> None:
    from fedsynth.certs import init_federation, new_node_key

    keys = init_federation(tmp_path / "keys")
    key, _pub = new_node_key(keys.root, "h1")
    data = tmp_path / "data"
    data.mkdir()
    address = f"127.0.0.1:{_dead_port()}"
    t0 = time.monotonic()
    out = run(["hospital", "--coordinator", address, "--root-certificates", str(keys.ca_cert),
               "--node-key", str(key), "--port", str(_dead_port()), "--data-dir", str(data),
               "--name", "h1", "--max-restarts", "1", "--model-public-key",
               str(keys.signing_pub), "--cache-dir", str(tmp_path / "cache")],
              tmp_path, timeout=90)
    took = time.monotonic() - t0
    print(f"\n[unreachable] exit {out.returncode} after {took:.1f} s: "
          f"{out.stderr.strip().splitlines()[-1:]}")
    assert out.returncode != 0, out.stderr[-2000:]
    errors = [x for x in out.stderr.splitlines() if "error" in x.lower() and address in x]
    assert len(errors) == 1, out.stderr[-2000:]
    assert "--max-restarts 1" in errors[0] and "2 tries" in errors[0], errors
    assert "Traceback" not in out.stderr
    assert took < 60, took  # two tries, one second of backoff between them
