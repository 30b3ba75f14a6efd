"""Log noise (issue 24 item 7): quiet library loggers, plain text in files, Flower lines that
blame the right peer; and a real coordinator, started twice, whose log says nothing alarming."""

from __future__ import annotations

import io
import logging
import signal
import time
from pathlib import Path

import pytest

from protocol import logs


@pytest.fixture(autouse=True)
def _restore_levels():
    names = [*logs.QUIET, "flwr"]
    before = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in before.items():
        logging.getLogger(n).setLevel(level)


def test_alembic_and_httpx_are_held_at_warning() -> None:
    logs.setup()
    for name in ("alembic.runtime.plugins", "httpx", "highdicom.base", "flwr"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name


def test_a_file_handler_with_the_plain_formatter_writes_no_colour_codes() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.PlainFormatter(logs.FORMAT))
    logger = logging.getLogger("fedsynth.test-plain")
    logger.addHandler(handler)
    try:
        logger.warning("%s", "\x1b[93mWARNING \x1b[0m:   Connection attempt failed")
    finally:
        logger.removeHandler(handler)
    assert "\x1b[" not in out.getvalue() and "WARNING :   Connection attempt" in out.getvalue()


def test_highdicom_says_nothing_while_a_seg_is_written(caplog: pytest.LogCaptureFixture,
                                                      tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    pytest.importorskip("phantominator")
    from fedsynth.lesion_data import LESION_SITES, build_lesion_hospitals

    logs.setup()
    caplog.set_level(logging.INFO)  # the root at INFO, as a command runs: only QUIET holds it back
    build_lesion_hospitals(tmp_path, matrix=16, sites=LESION_SITES[:1], scale=0.01,
                           include_real=False)
    assert list(tmp_path.rglob("*-seg.dcm"))
    assert not [r for r in caplog.records if r.name.startswith("highdicom")]


def test_the_coordinators_copy_of_superlink_lines_is_plain_and_calm() -> None:
    from fedsynth.child_output import child_sink

    out = io.StringIO()
    sink = child_sink("superlink", out)
    for line in ("\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink",
                 "\x1b[91mERROR \x1b[0m:     Public key already in use",
                 "\x1b[91mERROR \x1b[0m:     [/v1/control/register-node][ApiError:23] Public key "
                 "already in use while registering node for flwr_aid=<id:none>, account_name=none.",
                 '2026-12-07T05:57:53.866Z INFO [uvicorn.access] 127.0.0.1:48726 - "POST '
                 '/v1/control/register-node HTTP/1.1" 412'):
        sink(line)
    assert out.getvalue().splitlines() == [
        "INFO :      Starting Flower SuperLink",
        "INFO :      hospital key already registered (the state database keeps it)"]
    out = io.StringIO()
    child_sink("supernode", out)("\x1b[93mWARNING \x1b[0m:   Connection attempt failed, "
                                 "retrying in 2.50 seconds")
    assert out.getvalue() == "WARNING :   coordinator not answering, retrying in 2.50 s\n"


def test_the_executors_retry_line_names_its_own_supernode(caplog: pytest.LogCaptureFixture) -> None:
    from client.executor import local_retry_wording

    flower = logging.getLogger("flwr")
    wording = local_retry_wording("127.0.0.1:9094")
    flower.addFilter(wording)
    try:
        with caplog.at_level(logging.INFO, logger="flwr"):
            flower.warning("Connection attempt failed, retrying in %.2f seconds", 1.5)
    finally:
        flower.removeFilter(wording)
    [record] = [r for r in caplog.records if r.name == "flwr"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == ("this hospital's SuperNode (127.0.0.1:9094) is not answering "
                                   "yet (starting or restarting; not the coordinator): retrying "
                                   "in 1.50 s")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_restarted_coordinators_log_is_plain_and_calm(tmp_path: Path) -> None:
    from tests.harness.deploy_helpers import free_port, start, wait_for

    from fedsynth.certs import init_federation, new_node_key

    keys = init_federation(tmp_path / "keys")
    new_node_key(keys.root, "h1")
    args = ["coordinator", "--keys", str(keys.root), "--address", f"127.0.0.1:{free_port()}",
            "--state", str(tmp_path / "state"), "--rescan", "2",
            "--log-file", str(tmp_path / "children.log")]
    for attempt in (1, 2):  # the second start offers the registered key again
        coord = start(f"coordinator-{attempt}", args, tmp_path)
        try:
            wait_for("the hospital key", lambda: "hospital key h1.pub registered" in coord.text(),
                     120, (coord,))
            wait_for("the SuperExec", lambda: "Starting Flower SuperExec" in coord.text(), 60,
                     (coord,))
            time.sleep(1.0)
        finally:
            assert coord.stop(signal.SIGTERM) == 0, coord.text()[-2000:]
    assert "node already registered" in coord.text()
    for text in (coord.text(), (tmp_path / "children.log").read_text()):
        assert "\x1b[" not in text
        assert "alembic" not in text
        assert "Public key already in use" not in text
        assert "ERROR" not in text


def test_the_coordinator_follows_its_serverapps_log_file(tmp_path: Path) -> None:
    """A run's ServerApp has no stdout (Flower: /dev/null); it appends to a file the coordinator
    follows: new lines only, a partial line once whole, a truncated file from its start."""
    import threading

    from fedsynth.child_output import follow_file

    path = tmp_path / "serverapp.log"
    path.write_text("before the start\n")
    got: list[str] = []
    stop = threading.Event()
    follower = threading.Thread(target=follow_file, args=(path, got.append, stop.is_set, 0.05))
    follower.start()
    try:
        time.sleep(0.2)
        with path.open("a") as fh:
            fh.write("INFO server.federation [r1] strategy: family dcgan\nround 1")
            fh.flush()
            time.sleep(0.2)
            fh.write("/3 done\n")
        time.sleep(0.3)
        path.write_text("after truncation\n")
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        follower.join(5)
    assert got == ["INFO server.federation [r1] strategy: family dcgan", "round 1/3 done",
                   "after truncation"], got
    assert not follower.is_alive()
