"""Real deployment on 127.0.0.1: coordinator (SuperLink) + hospital daemons (SuperNodes).

The long test walks one federation through what happens in practice, in order: 3 hospitals with
TLS and node authentication train; a 4th, unregistered node is refused without disturbing the
run; the coordinator is SIGKILLed after round 2 of 4 and resumed; a hospital is SIGKILLed
mid-round 3, the round completes with the others, and the restarted hospital trains in round 4.
Fast tests cover bad settings and the deploy/ files.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedsynth.certs import init_federation, new_node_key
from fedsynth.cli import main

from tests.harness.deploy_helpers import (free_port, hospital_toml, launch_toml, metrics_rows, run,
                                          start, wait_for)
from tools import skip_unless, which

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the deployed federation

@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deployed_federation_auth_resume_and_dropout(tmp_path: Path) -> None:
    from fedsynth.demo_data import build_demo_hospitals

    keys = init_federation(tmp_path / "keys")
    for name in ("h1", "h2", "h3"):
        new_node_key(keys.root, name)
    rogue_key, _ = new_node_key(tmp_path / "rogue", "rogue")  # never given to the coordinator
    data = build_demo_hospitals(tmp_path / "data", 3, matrix=32)
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord_args = ["coordinator", "--keys", str(keys.root), "--address", address,
                  "--state", str(tmp_path / "state"), "--rescan", "2"]
    coord = start("coordinator", coord_args, tmp_path)
    hospitals = {name: start(name, ["hospital", str(hospital_toml(
        tmp_path / f"{name}.toml", address, keys.root, name, data[i], free_port()))], tmp_path)
        for i, name in enumerate(("h1", "h2", "h3"))}
    procs = (coord, *hospitals.values())
    run_dir = tmp_path / "runs"
    # 90 local steps: ~5 s of training, long enough to kill a hospital mid-round
    launch = launch_toml(tmp_path / "launch.toml", address, keys.ca_cert, family="dcgan",
                         rounds=4, local_steps=90, batch_size=4, image_size=32, min_hospitals=3,
                         round_timeout=120, signing_key=keys.signing_key, run_dir=run_dir,
                         run_id="deployed")
    flwr_home = ["--flwr-home", str(tmp_path / "flwr")]
    folder = run_dir / "deployed"
    try:
        wait_for("3 hospitals connected", lambda: all(
            "SuperNode ID" in h.text() for h in hospitals.values()), 240, procs)

        # an unregistered node is refused (Flower exit code 305) and says so in one line
        rogue = run(["hospital", "--coordinator", address, "--root-certificates",
                     str(keys.ca_cert), "--node-key", str(rogue_key), "--port", str(free_port()),
                     "--data-dir", str(data[0]), "--name", "rogue", "--max-restarts", "0",
                     "--model-public-key", str(keys.signing_pub)],
                    tmp_path, timeout=240)
        assert rogue.returncode == 3, rogue.stderr[-2000:]
        assert "refused this hospital's node key" in rogue.stderr

        t0 = time.monotonic()
        out = run(["launch", str(launch), *flwr_home], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        wait_for("round 2", lambda: len(metrics_rows(folder)) >= 2, 420, procs)
        rounds = metrics_rows(folder)
        first_two = time.monotonic() - t0
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["replied"] == 3 and r["selected"] == 3 for r in rounds), rounds
        print(f"\n[deploy] 2 rounds, 3 hospitals, TLS + node auth: {first_two:.0f} s "
              f"(round seconds: {[round(r['seconds'], 1) for r in rounds]})")

        # the coordinator dies hard after round 2 of 4; restarted, the run resumes
        coord.stop(signal.SIGKILL)
        coord = start("coordinator-2", coord_args, tmp_path)
        procs = (coord, *hospitals.values())
        wait_for("the restarted coordinator", lambda: "Uvicorn running" in coord.text(), 120,
                 procs)
        out = run(["launch", str(launch), "--resume", "deployed", *flwr_home], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]

        # a hospital dies mid-round 3: the round completes with the others
        h3 = hospitals["h3"]
        before = h3.text().count("Receiving: train message")
        wait_for("round 3 reaching h3", lambda: h3.text().count("Receiving: train message")
                 > before, 300, procs)
        h3.stop(signal.SIGKILL)
        procs = (coord, hospitals["h1"], hospitals["h2"])  # h3 is down on purpose
        wait_for("round 3", lambda: len(metrics_rows(folder)) >= 3, 480, procs)
        # restarted, it takes part in the next round
        hospitals["h3"] = start("h3-restarted", ["hospital", str(tmp_path / "h3.toml")], tmp_path)
        procs = (coord, *hospitals.values())
        wait_for("round 4", lambda: len(metrics_rows(folder)) >= 4, 420, procs)

        rows = metrics_rows(folder)
        assert [r["round"] for r in rows] == [1, 2, 3, 4]  # each round exactly once
        assert rows[2]["replied"] == 2, rows[2]
        assert rows[3]["replied"] == 3, rows[3]
        assert set(rows[3]["hospitals"]) == set(rows[0]["hospitals"])  # same node ids again
        assert "REFUSED" not in "".join(h.text() for h in hospitals.values())
        print(f"[deploy] round seconds: {[round(r['seconds'], 1) for r in rows]}")
    finally:
        for p in (coord, *hospitals.values()):
            p.stop()


# ---------------------------------------------------------------- bad settings

@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fed")
    keys = init_federation(root / "keys")
    new_node_key(keys.root, "h1")
    (root / "data").mkdir()
    return keys


def _hospital_args(keys, data: Path, address: str = "127.0.0.1:9") -> list[str]:
    return ["hospital", "--coordinator", address, "--root-certificates", str(keys.ca_cert),
            "--node-key", str(keys.node_key("h1")), "--data-dir", str(data),
            "--model-public-key", str(keys.signing_pub)]


def test_missing_data_folder_is_one_line(fed, tmp_path: Path, capsys) -> None:
    assert main(_hospital_args(fed, tmp_path / "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data-dir" in err[0] and "nope" in err[0]


def test_unreadable_node_key_is_one_line(fed, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "node.key"
    bad.write_text("garbage")
    args = _hospital_args(fed, fed.root.parent / "data")
    args[args.index("--node-key") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node key" in err[0] and "node.key" in err[0]


def _tls_server(keys) -> tuple[int, threading.Event]:
    """A TLS listener with the federation's certificate (stands in for the SuperLink)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(keys.server_cert, keys.server_key)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.5)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], done


def test_wrong_certificate_is_one_line(fed, tmp_path: Path, capsys) -> None:
    other = init_federation(tmp_path / "other")
    port, done = _tls_server(fed)
    try:
        args = _hospital_args(fed, fed.root.parent / "data", f"127.0.0.1:{port}")
        args[args.index("--root-certificates") + 1] = str(other.ca_cert)  # not this CA
        assert main(args) == 2
    finally:
        done.set()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "certificate" in err[0] and str(other.ca_cert) in err[0]


def test_unreachable_coordinator_is_retried_with_backoff(fed, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens
    proc = start("hospital", _hospital_args(fed, fed.root.parent / "data", address), tmp_path)
    try:
        wait_for("two retries", lambda: "retrying in 2 s" in proc.text(), 60, (proc,))
        assert proc.popen.poll() is None  # a daemon keeps trying
        assert f"coordinator {address} unreachable" in proc.text()
    finally:
        code = proc.stop()
    assert code == 0  # SIGTERM is a clean stop


def test_coordinator_refuses_without_tls_and_warns_when_insecure(tmp_path: Path, capsys) -> None:
    assert main(["coordinator", "--state", str(tmp_path / "s")]) == 2
    assert "--insecure" in capsys.readouterr().err
    keys = init_federation(tmp_path / "keys")
    other = init_federation(tmp_path / "other")
    assert main(["coordinator", "--keys", str(keys.root), "--ca-cert", str(other.ca_cert),
                 "--state", str(tmp_path / "s")]) == 2
    assert "not issued by CA" in capsys.readouterr().err
    proc = start("coordinator", ["coordinator", "--insecure", "--address",
                                 f"127.0.0.1:{free_port()}", "--state", str(tmp_path / "s")],
                 tmp_path)
    try:
        wait_for("the warning", lambda: "WITHOUT TLS" in proc.text(), 60, (proc,))
    finally:
        proc.stop()
    assert "--insecure" in " ".join(proc.popen.args)


def test_launch_refuses_bad_files(fed, tmp_path: Path, capsys) -> None:
    launch = tmp_path / "launch.toml"
    launch.write_text(f'[coordinator]\naddress = "127.0.0.1:9"\n'
                      f'root-certificates = "{fed.ca_cert}"\n[run]\nnum-server-rounds = 2\n')
    assert main(["launch", str(launch)]) == 2
    assert "signing-key is missing" in capsys.readouterr().err
    launch.write_text(launch.read_text() + f'signing-key = "{fed.signing_key}"\nlocal-stpes = 3\n')
    assert main(["launch", str(launch)]) == 2
    assert "local-stpes" in capsys.readouterr().err


def test_launch_app_declares_every_run_setting(tmp_path: Path) -> None:
    """Flower rejects run-config keys its app does not declare: the launch app declares all."""
    import tomllib

    from fedsynth.deployment import write_launch_app
    from server.federation import FederationConfig
    from server.run_config import defaults_flat

    app = tomllib.loads((write_launch_app(tmp_path) / "pyproject.toml").read_text())
    declared = app["tool"]["flwr"]["app"]["config"]
    assert declared == defaults_flat()
    cfg = FederationConfig.from_run_config({**declared, "num-server-rounds": 7, "resume": True})
    assert cfg.rounds == 7 and cfg.resume
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                        "clientapp": "client.app:app"}


def test_node_config_quotes_strings() -> None:
    from fedsynth.deployment import format_node_config

    text = format_node_config({"data-dir": "/d/x", "threads": 1, "amp": "auto", "cache-dir": ""})
    assert text == 'data-dir="/d/x" threads=1 amp="auto"'
    with pytest.raises(ValueError, match="spaces"):
        format_node_config({"data-dir": "/a b"})


# ---------------------------------------------------------------- deploy/ files

def test_compose_file_is_valid() -> None:
    import yaml

    compose = ROOT / "deploy" / "compose.yaml"
    doc = yaml.safe_load(compose.read_text())
    services = doc["services"]
    assert {"coordinator", "hospital-1", "hospital-2", "hospital-3", "prometheus",
            "grafana"} <= set(services)
    for name in ("hospital-1", "hospital-2", "hospital-3"):
        cmd = " ".join(services[name]["command"])
        assert "--insecure" not in cmd
        assert any("/data" in str(v) for v in services[name]["volumes"])
    assert "--insecure" not in " ".join(services["coordinator"]["command"])
    # the compose Prometheus scrapes the coordinator's long-lived metrics port by service name
    coord_cmd = services["coordinator"]["command"]
    port = coord_cmd[coord_cmd.index("--metrics-port") + 1]
    assert coord_cmd[coord_cmd.index("--metrics-host") + 1] == "0.0.0.0"
    prom_cfg = next(a.split("=", 1)[1] for a in services["prometheus"]["command"]
                    if a.startswith("--config.file="))
    mount = next(v for v in services["prometheus"]["volumes"] if v.endswith(":ro"))
    host_dir, container_dir = mount.split(":")[:2]
    local_cfg = compose.parent / host_dir / Path(prom_cfg).relative_to(container_dir)
    scraped = yaml.safe_load(local_cfg.read_text())["scrape_configs"]
    assert f"coordinator:{port}" in [t for job in scraped for c in job["static_configs"]
                                     for t in c["targets"]]
    promtool = shutil.which("promtool")
    if promtool:
        for cfg in (local_cfg, compose.parent / "prometheus" / "prometheus.yml"):
            out = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True,
                                 text=True, check=False)
            assert out.returncode == 0, out.stdout + out.stderr
    unit = (ROOT / "deploy" / "systemd" / "fedsynth-coordinator.service").read_text()
    assert "--metrics-port 9400" in unit  # prometheus.yml's coordinator target
    for svc in services.values():
        build = svc.get("build")
        if build:
            assert (compose.parent / build["context"] / build["dockerfile"]).is_file()
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            out = subprocess.run([docker, "compose", "-f", str(compose), "config", "-q"],
                                 capture_output=True, text=True, check=False,
                                 cwd=compose.parent)
            assert out.returncode == 0, out.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = ROOT / "deploy" / "systemd" / "fedsynth-hospital.service"
    text = unit.read_text()
    assert "ExecStart=" in text and "Restart=" in text
    skip_unless("systemd-analyze", "systemd")
    tool = which("systemd-analyze")
    # verify resolves ExecStart's binary: point it at one that exists here
    fake = tmp_path / unit.name
    fake.write_text(text.replace("/opt/fedsynth/venv/bin/fedsynth", shutil.which("true")))
    out = subprocess.run([tool, "verify", str(fake)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr


def test_k8s_manifests_parse() -> None:
    import yaml

    docs = [d for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    assert all("apiVersion" in d and d["metadata"].get("name") for d in docs)
