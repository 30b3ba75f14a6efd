"""The multi-host harness fixture of the netns fault tests (tests/system/test_netns_*.py).

One federation per test file: coordinator (SuperLink behind nginx, TLS naming its WAN address
10.213.<n>.1) and three hospital daemons, h1 and h2 on 20 Mbit/s links and h3 on 5 Mbit/s (tbf
both ways), dialling the coordinator across a bridge in a namespace of its own. Nothing is added
to the machine's own network namespace; every namespace is deleted at the end, also on failure.
Each fault has a file of its own so that pytest-xdist (a file to a worker) runs them side by
side instead of one after another on one worker (issue 20).
"""


from __future__ import annotations

import os
import subprocess

import pytest

from bench.netns import Federation, Harness, HarnessError, available


def unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def netns_federation(tmp_path_factory: pytest.TempPathFactory):
    why = available()
    if why:
        unavailable(why)
    harness = Harness(tmp_path_factory.mktemp("netns"), {"h1": 20.0, "h2": 20.0, "h3": 5.0})
    try:
        harness.up()
    except HarnessError as exc:
        unavailable(str(exc))
    try:
        fed = Federation(harness).prepare()
        fed.start_all()
        yield fed
    finally:
        harness.down()
    made = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"fs{harness.tag}-" not in made  # every namespace it made is gone


def node_of(rows: list[dict], name: str) -> str:
    ids = {node for r in rows for node, n in r.get("names", {}).items() if n == name}
    assert len(ids) == 1, (name, [r.get("names") for r in rows])
    return ids.pop()


def received(proc) -> int:  # noqa: ANN001
    return proc.text().count("Receiving: train message")
