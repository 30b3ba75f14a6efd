"""Trust review findings 2, 3 and 8, at the hospital.

2. Hospitals executed coordinator-supplied code: the warm executor imported the ClientApp that the
   run's app bundle named, from the bundle's folder (a bundle with its own ``client/app.py``
   shadowed the installed one). Now only fedsynth's code-free launch bundle is served, and
   nothing from any bundle is imported (``client/bundle.py``).
3. ``fedsynth hospital --metrics-port N`` without ``PROMETHEUS_MULTIPROC_DIR`` emptied its
   working directory (``shutil.rmtree(Path(""))``). Now the daemon only ever removes the metrics
   folder it made.
8. The warm executor cached a trainer per (unsigned) config forever: 12 runs with different
   ``latent-dim`` grew RSS by 513 MB; a wrong-family model left its trainer cached; the UA
   optimiser kept the first run's learning rate. Now state belongs to a run.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from client.bundle import BundleRefused, check_bundle
from protocol.keys import LAUNCH_APP_NAME, LAUNCH_APP_PUBLISHER, LAUNCH_APP_VERSION

from tests.harness.deploy_helpers import FEDSYNTH, free_port, wait_for

LAUNCH_ID = f"{LAUNCH_APP_PUBLISHER}/{LAUNCH_APP_NAME}"


# ---------------------------------------------------------------- 2: the app bundle

def _fab(folder: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(folder)


@pytest.fixture
def launch_app(tmp_path: Path) -> Path:
    from fedsynth.deployment import write_launch_app

    return write_launch_app(tmp_path / "app")


def _check(fab: bytes, fab_id: str = LAUNCH_ID, version: str = LAUNCH_APP_VERSION,
           approved: tuple[str, ...] = ()) -> None:
    check_bundle(fab_id, version, hashlib.sha256(fab).hexdigest(), fab, approved)


def test_the_launch_bundle_is_served(launch_app: Path) -> None:
    fab = _fab(launch_app)
    _check(fab)
    _check(fab, approved=(hashlib.sha256(fab).hexdigest(),))


@pytest.mark.parametrize("attack,reason", [
    ("shadow-client-app", "code"),  # same name and version, its own client/app.py
    ("extra-module", "code"),
    ("other-clientapp", "components"),
    ("dependencies", "code"),
])
def test_bundles_with_code_are_refused(launch_app: Path, attack: str, reason: str) -> None:
    text = (launch_app / "pyproject.toml").read_text()
    if attack == "shadow-client-app":
        (launch_app / "client").mkdir()
        (launch_app / "client" / "app.py").write_text("import os; os.system('id')\n")
    elif attack == "extra-module":
        (launch_app / "evil.py").write_text("print('hello')\n")
    elif attack == "other-clientapp":
        (launch_app / "pyproject.toml").write_text(
            text.replace('clientapp = "client.app:app"', 'clientapp = "fedsynth.cli:main"'))
    elif attack == "dependencies":
        (launch_app / "pyproject.toml").write_text(
            text.replace("dependencies = []", 'dependencies = ["evil-package"]'))
    with pytest.raises(BundleRefused) as err:
        _check(_fab(launch_app))
    assert err.value.reason == reason


def test_bundle_identity_hash_and_approval(launch_app: Path) -> None:
    fab = _fab(launch_app)
    cases = {
        "name": lambda: _check(fab, fab_id="stranger/app"),
        "version": lambda: _check(fab, version="9.9.9"),
        "not-approved": lambda: _check(fab, approved=("0" * 64,)),
        "hash": lambda: check_bundle(LAUNCH_ID, LAUNCH_APP_VERSION, "0" * 64, fab),
        "malformed": lambda: _check(b"PK\x03\x04 not a zip at all"),
        "size": lambda: _check(b"\0" * (1 << 20)),
    }
    for reason, attempt in cases.items():
        with pytest.raises(BundleRefused) as err:
            attempt()
        assert err.value.reason == reason, reason
    # a zip whose entries repeat a name (a second pyproject.toml shadowing the first)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        body = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml")
        zf.writestr("pyproject.toml", body)
        zf.writestr("pyproject.toml", body.replace(b"client.app:app", b"evil:app"))
    with pytest.raises(BundleRefused, match="duplicates"):
        _check(buf.getvalue())


# A ClientApp that would prove it ran: it writes a marker file at the hospital.
EVIL_APP = '''\
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ClientApp()

@app.train()
def train(msg, context):
    open({marker!r}, "w").write("the coordinator's code ran at the hospital")
    raise SystemExit(0)

server = ServerApp()

@server.main()
def main(grid, context):
    import time
    from flwr.app import Message, MessageType, RecordDict, ConfigRecord
    for _ in range(120):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(0.5)
    msgs = [Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                    message_type=MessageType.TRAIN) for n in nodes]
    list(grid.send_and_receive(msgs, timeout=60))
'''


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("variant", ["own-app", "shadowed-client-app"])
def test_coordinator_code_never_runs_at_a_hospital(tmp_path: Path, demo_hospitals,
                                                   variant: str) -> None:
    """Real SuperLink + hospital daemon; the coordinator's operator ``flwr run``s a bundle of its
    own (a foreign app, or fedsynth's name and version with its own ``client/app.py``). The
    hospital refuses it with one log line and a metric, and the marker file is never written."""
    from tests.harness.deploy_helpers import start
    from fedsynth.deployment import flwr_cli, write_launch_app

    marker = tmp_path / "PWNED"
    app = tmp_path / "evil-app"
    if variant == "own-app":
        app.mkdir()
        (app / "evil.py").write_text(EVIL_APP.format(marker=str(marker)))
        (app / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
            '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n'
            '[tool.flwr.app]\npublisher = "evil"\n'
            '[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "evil:app"\n'
            '[tool.flwr.app.config]\n')
    else:
        write_launch_app(app)
        (app / "client").mkdir()
        (app / "client" / "__init__.py").write_text("")
        (app / "client" / "app.py").write_text(EVIL_APP.format(marker=str(marker)))
        (app / "server").mkdir()
        (app / "server" / "__init__.py").write_text("")
        (app / "server" / "app.py").write_text(
            EVIL_APP.format(marker=str(marker)).replace("server = ServerApp()", "app = None\n"
                                                        "server = ServerApp()") +
            "\napp = server\n")
    port, metrics_port = free_port(), free_port()
    state = tmp_path / "state"
    coord = start("coordinator", ["coordinator", "--insecure", "--address",
                                  f"127.0.0.1:{port}", "--state", str(state)], tmp_path)
    toml = tmp_path / "hospital.toml"
    toml.write_text(f'[coordinator]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
                    f'[node]\nport = {free_port()}\nmetrics-port = {metrics_port}\n'
                    f'[hospital]\nname = "h1"\ndata-dir = "{demo_hospitals[0]}"\n'
                    f'accept-unsigned-models = true\ndevice = "cpu"\nthreads = 1\n')
    hospital = start("hospital", ["hospital", str(toml)], tmp_path)
    procs = (coord, hospital)
    try:
        wait_for("the warm executor", lambda: "warm executor polling" in hospital.text(), 180,
                 procs)
        out = flwr_cli(["run", str(app), "fedsynth", "--stream"], state / "flwr", timeout=240)
        wait_for("the hospital's refusal", lambda: "REFUSED run" in hospital.text(), 120, procs)
        assert not marker.exists(), "the coordinator's code ran at the hospital"
        line = next(x for x in hospital.text().splitlines() if "REFUSED run" in x)
        assert "nothing from it was run" in line, line
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert 'fedsynth_hospital_refused_messages_total{hospital="h1",reason="bundle-' in body
        assert out is not None
    finally:
        for p in procs:
            p.stop()
    assert not marker.exists()


# ---------------------------------------------------------------- 3: never delete what isn't ours

def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("multiproc_env", ["unset", "empty", "user-folder"])
def test_metrics_port_never_deletes_what_the_daemon_did_not_create(
        tmp_path: Path, demo_hospitals, multiproc_env: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "node.key").write_text("secret key")
    (work / "state.db").write_bytes(b"a live SuperLink's database")  # *.db like Prometheus's
    data = demo_hospitals[0]
    toml = work / "hospital.toml"
    metrics_port = free_port()
    toml.write_text(f'[coordinator]\naddress = "127.0.0.1:{free_port()}"\ninsecure = true\n'
                    f'[node]\nport = {free_port()}\n'
                    f'[hospital]\ndata-dir = "{data}"\naccept-unsigned-models = true\n')
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    user = tmp_path / "user-metrics"
    if multiproc_env == "empty":
        env["PROMETHEUS_MULTIPROC_DIR"] = ""
    elif multiproc_env == "user-folder":
        user.mkdir()
        (user / "counter_1.db").write_bytes(b"someone else's metrics")
        (user / "notes.txt").write_text("keep me")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(user)
    before = (_tree(work), _tree(data), _tree(user) if user.exists() else {})
    proc = subprocess.Popen([*FEDSYNTH, "hospital", str(toml), "--metrics-port", str(metrics_port)],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    after = (_tree(work), _tree(data), _tree(user) if user.exists() else {})
    assert after == before, out[-3000:]


def test_daemon_without_pinned_key_refuses_to_start(tmp_path: Path) -> None:
    """Finding 4's start-up half: no model-public-key and no insecure flag → one line, exit 2."""
    (tmp_path / "data").mkdir()
    toml = tmp_path / "h.toml"
    toml.write_text(f'[coordinator]\naddress = "127.0.0.1:{free_port()}"\ninsecure = true\n'
                    f'[hospital]\ndata-dir = "{tmp_path / "data"}"\n')
    proc = subprocess.run([*FEDSYNTH, "hospital", str(toml), "--max-restarts", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no model-public-key pinned" in proc.stderr
    assert "--insecure-accept-unsigned-models" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- 8: state belongs to a run

def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_runs_do_not_accumulate_state(demo_hospitals, tmp_path: Path) -> None:
    import numpy as np
    from flwr.app import Context, RecordDict

    import client.app as clientapp
    import client.run_state as client_run_state
    from client import datasets
    from protocol import records as protocol
    from shared_models import ModelConfig, TrainConfig, encode, get_family

    from tests.harness.flower_helpers import server_message, task_identity

    node = {"data-dir": str(demo_hospitals[0]), "cache-dir": str(tmp_path / "cache"),
            "accept-unsigned-models": True, "threads": 1}

    def one_run(run_id: int, model: ModelConfig, family_nets=None):
        nets = family_nets or get_family(model.family).build(model)
        config = protocol.train_config(model, TrainConfig(local_steps=1, batch_size=4), 1)
        msg_content = RecordDict({protocol.ARRAYS: protocol.to_record(encode(nets)),
                                  protocol.CONFIG: config})
        with task_identity(run_id=run_id, node_id=3):
            msg = server_message(msg_content, 3)
            ctx = Context(run_id=run_id, node_id=3, node_config=node, state=RecordDict(),
                          run_config={})
            return clientapp.app(msg, ctx)

    one_run(1, ModelConfig(image_size=32, latent_dim=8))
    base = _rss_mb()
    for i in range(12):
        reply = one_run(100 + i, ModelConfig(image_size=32, latent_dim=16 + 8 * i))
        assert not reply.has_error()
        assert len(client_run_state._RUNS) <= client_run_state.MAX_RUNS
        assert sum(len(s.trainers) for s in client_run_state._RUNS.values()) <= 1
        assert len(datasets._DATA) <= datasets.MAX_DATA_PER_HOSPITAL
    growth = _rss_mb() - base
    print(f"[memory] RSS growth over 12 runs with different latent-dim: {growth:.0f} MB")
    assert growth < 150, f"RSS grew {growth:.0f} MB over 12 runs"
    # a model of the wrong family is refused, and its trainer is not kept
    wrong = get_family("cyclegan").build(ModelConfig(family="cyclegan", image_size=32))
    with pytest.raises(clientapp.HospitalError, match="CodecError"):
        one_run(500, ModelConfig(image_size=32), family_nets=wrong)
    assert not any(s.trainers for s in client_run_state._RUNS.values())
    assert np.isfinite(growth)
