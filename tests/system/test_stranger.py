"""A stranger on the network who holds the federation's ca.pem and Flower's own tools gets nowhere.

Real processes: ``fedsynth coordinator`` (TLS + node authentication, its nginx on an address of
a veth pair this test creates) and one ``fedsynth hospital`` that dials that address. The
stranger runs in its own network namespace, at the other end of the pair, with the ``flwr`` CLI
(config.toml pointing at the coordinator's public address), Flower's Control client, and a
SuperNode of its own. It cannot register a node key, list runs or nodes, start its own app,
or reach the SuperLink's own port; nothing of it runs at the hospital. The hospital, through the
same Fleet-only door, connects and is listed.

Traffic goes only to 127.0.0.1 and to the two addresses of the veth pair made here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsynth.certs import init_federation, new_node_key
from fedsynth.deployment import BIN_DIR, child_env, flwr_cli, write_flwr_home

from tests.harness.deploy_helpers import FEDSYNTH, free_port, hospital_toml, start, wait_for

IP = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin")
NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, timeout=30)


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


@pytest.fixture
def netns():
    """(namespace, coordinator-side address, stranger-side address) of a fresh veth pair."""
    if IP is None:
        _unavailable("iproute2 is not installed (apt-get install iproute2)")
    tag = f"{random.getrandbits(24):06x}"
    name, host_if, peer_if = f"fs-stranger-{tag}", f"fsh{tag}", f"fss{tag}"
    used = _ip("-4", "addr", "show").stdout
    for _ in range(50):
        third = random.randrange(256)
        if f"10.213.{third}." not in used:
            break
    else:
        _unavailable("no free 10.213.x.0/30 subnet")
    here, there = f"10.213.{third}.1", f"10.213.{third}.2"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        _unavailable(f"`ip netns add` failed: {made.stderr.strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _ip("link", "set", peer_if, "netns", name)
        _ip("addr", "add", f"{here}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", peer_if)
        _ip("netns", "exec", name, "ip", "link", "set", peer_if, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, here, there
    finally:
        _ip("netns", "del", name, check=False)  # takes the peer, and with it the pair
        _ip("link", "del", host_if, check=False)


def _in_ns(ns: str, args: list[str], env: dict[str, str], timeout: float = 120,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([IP, "netns", "exec", ns, *args], capture_output=True, text=True,
                          env=child_env(env), timeout=timeout, check=False, cwd=cwd)


STRANGER_CLIENT = textwrap.dedent("""\
    # Flower's own Control client, as the flwr CLI builds it from config.toml
    import sys
    from cryptography.hazmat.primitives import serialization
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import (ListNodesRequest, ListRunsRequest,
                                        RegisterNodeRequest, StartRunRequest)
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = serialization.load_ssh_public_key(open(sys.argv[1], "rb").read())
    client = init_http_client_from_connection(read_superlink_connection("stranger"))
    calls = {
        "RegisterNode": lambda: client.RegisterNode(request=RegisterNodeRequest(
            public_key=public_key_to_bytes(key), name="stranger")),
        "ListRuns": lambda: client.ListRuns(request=ListRunsRequest()),
        "ListNodes": lambda: client.ListNodes(request=ListNodesRequest()),
        "StartRun": lambda: client.StartRun(request=StartRunRequest()),
    }
    for name, call in calls.items():
        try:
            call()
            print(name, "ACCEPTED")
        except Exception as exc:  # noqa: BLE001
            print(name, "REFUSED", type(exc).__name__, " ".join(str(exc).split())[:200])
""")


def _stranger_app(folder: Path, marker: Path) -> Path:
    """A Flower app whose ClientApp and ServerApp would leave ``marker`` behind if they ran."""
    folder.mkdir(parents=True)
    (folder / "strangerapp.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp

        Path({str(marker)!r}).write_text("stranger code ran")
        app = ClientApp()
        server = ServerApp()
        """))
    (folder / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "strangerapp"
        version = "1.0.0"
        license = "Apache-2.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "stranger"

        [tool.flwr.app.components]
        serverapp = "strangerapp:server"
        clientapp = "strangerapp:app"

        [tool.flwr.app.config]
        x = 1
        """))
    return folder


def _json(stdout: str) -> dict:
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _nodes(flwr_home: Path) -> list[dict]:
    proc = flwr_cli(["supernode", "list", "--format", "json"], flwr_home)
    data = _json(proc.stdout)
    assert data.get("success"), proc.stdout + proc.stderr
    return data["nodes"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stranger_with_ca_and_flower_tools_gets_nowhere(netns, tmp_path: Path) -> None:
    from fedsynth.demo_data import build_demo_hospitals

    if NGINX is None:
        _unavailable("nginx is not installed (apt-get install nginx)")
    ns, here, _there = netns
    keys = init_federation(tmp_path / "keys", hosts=[here])  # the public address is a SAN
    new_node_key(keys.root, "h1")
    stranger_dir = tmp_path / "stranger"
    stranger_key, stranger_pub = new_node_key(stranger_dir, "stranger")
    shutil.copy(keys.ca_cert, stranger_dir / "ca.pem")  # all the stranger holds of ours
    data = build_demo_hospitals(tmp_path / "data", 1, matrix=32)
    port, link_port = free_port(), free_port()
    public = f"{here}:{port}"
    coord = start("coordinator", ["coordinator", "--keys", str(keys.root), "--address", public,
                                  "--superlink-port", str(link_port),
                                  "--state", str(tmp_path / "state"), "--rescan", "2"],
                  tmp_path)
    hospital = start("h1", ["hospital", str(hospital_toml(
        tmp_path / "h1.toml", public, keys.root, "h1", data[0], free_port()))], tmp_path)
    procs = (coord, hospital)
    own = tmp_path / "state" / "flwr"  # the coordinator's own flwr connection (loopback)
    marker = tmp_path / "stranger-code-ran"
    try:
        wait_for("the hospital connected", lambda: "SuperNode ID" in hospital.text(), 240,
                 procs)
        config = (own / "config.toml").read_text()
        assert f'address = "127.0.0.1:{link_port}"' in config

        # the stranger's flwr CLI, configured the documented way for the coordinator's address
        home = stranger_dir / "flwr"
        write_flwr_home(home, public, stranger_dir / "ca.pem")
        (home / "config.toml").write_text((home / "config.toml").read_text().replace(
            "[superlink.fedsynth]", "[superlink.stranger]").replace(
            'default = "fedsynth"', 'default = "stranger"'))
        env = {"FLWR_HOME": str(home)}
        flwr = str(BIN_DIR / "flwr")
        # TLS works from there: the stranger does reach the coordinator's front door
        probe = _in_ns(ns, [sys.executable, "-c", (
            "import ssl,socket,sys; ctx=ssl.create_default_context(cafile=sys.argv[1]); "
            "s=ctx.wrap_socket(socket.create_connection((sys.argv[2],int(sys.argv[3])),5),"
            "server_hostname=sys.argv[2]); print('TLS', s.version())"),
            str(stranger_dir / "ca.pem"), here, str(port)], env)
        assert probe.returncode == 0 and "TLS" in probe.stdout, probe.stderr

        register = _in_ns(ns, [flwr, "supernode", "register", str(stranger_pub), "stranger",
                               "--format", "json"], env)
        listing = _in_ns(ns, [flwr, "ls", "stranger", "--format", "json"], env)
        nodes = _in_ns(ns, [flwr, "supernode", "list", "stranger", "--format", "json"], env)
        app = _stranger_app(stranger_dir / "app", marker)
        run = _in_ns(ns, [flwr, "run", str(app), "stranger", "--format", "json"], env,
                     timeout=300)
        for what, proc in (("register", register), ("ls", listing), ("supernode list", nodes),
                           ("run", run)):
            out = proc.stdout + proc.stderr
            print(f"[stranger] flwr {what}: exit {proc.returncode}: "
                  f"{' '.join(proc.stdout.split())[:300]}")
            assert _json(proc.stdout).get("success") is False, (what, out[-2000:])
            assert "404" in out or "not found" in out.lower(), (what, out[-2000:])

        client = _in_ns(ns, [sys.executable, "-c", STRANGER_CLIENT, str(stranger_pub)], env)
        lines = [x for x in client.stdout.splitlines() if x.split()[:1] and
                 x.split()[0] in ("RegisterNode", "ListRuns", "ListNodes", "StartRun")]
        print("[stranger] Control client:", *lines, sep="\n  ")
        assert len(lines) == 4 and all(" REFUSED " in x for x in lines), \
            client.stdout + client.stderr[-2000:]

        # the SuperLink's own port is not on the network at all
        direct = _in_ns(ns, [sys.executable, "-c", (
            "import socket,sys\ntry:\n socket.create_connection((sys.argv[1],int(sys.argv[2])),"
            "5)\n print('CONNECTED')\nexcept OSError as e:\n print('REFUSED', e)"),
            here, str(link_port)], env)
        assert "REFUSED" in direct.stdout, direct.stdout + direct.stderr

        # a SuperNode of the stranger's own, with its own key, is refused at the Fleet API
        rogue = subprocess.run(
            [IP, "netns", "exec", ns, *FEDSYNTH, "hospital", "--coordinator", public,
             "--root-certificates", str(stranger_dir / "ca.pem"), "--node-key",
             str(stranger_key), "--port", str(free_port()), "--data-dir", str(data[0]),
             "--name", "stranger", "--max-restarts", "0", "--insecure-accept-unsigned-models",
             "--cache-dir",
             str(stranger_dir / "cache")], cwd=stranger_dir, capture_output=True, text=True,
            timeout=240, env=child_env(), check=False)
        assert rogue.returncode == 3, rogue.stderr[-2000:]
        assert "refused this hospital's node key" in rogue.stderr

        # seen from the coordinator's own host: one node, the hospital's; no run at all
        listed = _nodes(own)
        assert len(listed) == 1, listed
        assert listed[0].get("name") in (None, "", "h1"), listed
        assert "online" in json.dumps(listed).lower(), listed
        runs = flwr_cli(["ls", "--format", "json"], own)
        assert _json(runs.stdout)["runs"] == [], runs.stdout
        assert not marker.exists()
        assert "Receiving" not in hospital.text()  # no message of any run reached it
        # nginx logged the refusals, with the stranger's address
        assert f"proxy: {_there} " in coord.text() and "/v1/control/" in coord.text()
        assert hospital.popen.poll() is None and coord.popen.poll() is None
    finally:
        for p in procs:
            p.stop()
    assert not marker.exists()
