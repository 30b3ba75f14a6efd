"""The coordinator's nginx (fedsynth.fleet_proxy): its config passes ``nginx -t`` and, with a real
nginx in front of a fake SuperLink, the network reaches the Fleet routes only.

"The network" is 127.0.0.2 here (served like any non-loopback address: only 127.0.0.1 and ::1
count as the coordinator's own host); tests/system/test_stranger.py does it from a network
namespace.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedsynth.certs import init_federation
from fedsynth.fleet_proxy import (NGINX_MISSING, FleetProxy, ProxyError, ProxyTLS,
                                  fleet_routes, forwarded_paths, nginx_binary, write_proxy)

from tests.harness.deploy_helpers import free_port
from tools import needs, skip_unless, which

NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")
needs_nginx = needs("nginx", "nginx")
PUBLIC = "127.0.0.2"
SIGNED = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln",
          "flwr-timestamp": "2026-01-01T00:00:00+00:00"}
REFUSED = ["/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
           "/v1/control/list-nodes", "/v1/control/stream-logs", "/v1/runtime/pull-messages",
           "/v1/runtime/responses", "/health", "/docs", "/openapi.json", "/",
           "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run",
           "/v1/fleet/pull-messages/../../control/list-runs", "/v1/FLEET/pull-messages",
           "/v1/fleet/", "/v1/fleet/pull-messages/", "/v1/fleetx/pull-messages",
           "/v1/control%2Fstart-run", "//v1/control/start-run"]


class _Upstream:
    """A stand-in SuperLink: answers every request with its path, records what reached it."""

    def __init__(self, keys=None) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen.append((self.command, self.path, dict(self.headers), body))
                out = f"upstream {self.path}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_POST = do_GET = _answer  # noqa: N815

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if keys is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(keys.server_cert, keys.server_key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start_nginx(proxy: FleetProxy) -> subprocess.Popen:
    proc = subprocess.Popen(proxy.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    proc.fedsynth_proxy = proxy  # for _stop: its socket folder goes once nginx has stopped
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    raise AssertionError("nginx did not start listening")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    proc.fedsynth_proxy.remove_socket_dir()
    return out.decode(errors="replace")


def _conn(host: str, port: int, keys) -> http.client.HTTPConnection:
    if keys is None:
        return http.client.HTTPConnection(host, port, timeout=10)
    ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
    return http.client.HTTPSConnection(host, port, timeout=10, context=ctx)


def _send(host: str, port: int, keys, path: str, method: str = "POST",
          body: bytes = b"x") -> tuple[int, bytes]:
    conn = _conn(host, port, keys)
    try:
        # skip_host/putrequest keep the raw path (http.client would not normalise it anyway)
        conn.putrequest(method, path)
        for k, v in SIGNED.items():
            conn.putheader(k, v)
        conn.putheader("content-type", "application/protobuf")
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fleet_routes_are_flowers_fleet_router_and_nothing_else() -> None:
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet

    routes = fleet_routes()
    assert routes == sorted(r.path for r in fleet.routes)
    assert all(r.startswith("/v1/fleet/") for r in routes)
    assert "/v1/fleet/pull-messages" in routes and "/v1/fleet/push-object" in routes
    assert not set(routes) & {r.path for r in control.routes}


def test_missing_nginx_is_one_clear_line(monkeypatch, tmp_path: Path, capsys) -> None:
    from fedsynth.cli import main

    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(ProxyError, match="apt-get install nginx"):
        nginx_binary()
    assert main(["coordinator", "--insecure", "--address", f"127.0.0.1:{free_port()}",
                 "--state", str(tmp_path / "s")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert err == [f"fedsynth coordinator: error: {NGINX_MISSING}"]


@needs_nginx
@pytest.mark.parametrize("secure", [True, False], ids=["tls", "insecure"])
def test_config_passes_nginx_t(tmp_path: Path, secure: bool) -> None:
    keys = init_federation(tmp_path / "keys") if secure else None
    tls = ProxyTLS(keys.ca_cert, keys.server_cert, keys.server_key) if keys else None
    for host in ("0.0.0.0", "127.0.0.1", "::", PUBLIC):
        proxy = write_proxy(tmp_path / f"proxy-{host}", (host, 8000), 8001, tls)
        out = subprocess.run([NGINX, "-t", "-p", f"{proxy.folder}/", "-c", str(proxy.config),
                              "-e", "stderr"], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert "syntax is ok" in out.stderr and "test is successful" in out.stderr
        text = proxy.config.read_text()
        assert "daemon off;" in text and f"pid {proxy.folder}" in text
        assert "/etc/nginx" not in text and "/var/" not in text.replace("/var/tmp", "")
        if host == "127.0.0.1":  # loopback only: nobody but this host can connect
            assert forwarded_paths(text) == []
        else:
            assert forwarded_paths(text) == fleet_routes()
        proxy.remove_socket_dir()


@needs_nginx
def test_broken_config_is_refused_with_nginx_words(tmp_path: Path) -> None:
    keys = init_federation(tmp_path / "keys")
    tls = ProxyTLS(keys.ca_cert, keys.server_cert, tmp_path / "missing.key")
    with pytest.raises(ProxyError, match="nginx refused .*missing.key"):
        write_proxy(tmp_path / "proxy", ("0.0.0.0", 8000), 8001, tls)


@needs_nginx
@pytest.mark.parametrize("secure", [True, False], ids=["tls", "insecure"])
def test_only_fleet_paths_reach_the_superlink_from_the_network(tmp_path: Path,
                                                               secure: bool) -> None:
    keys = init_federation(tmp_path / "keys", hosts=[PUBLIC]) if secure else None
    upstream = _Upstream(keys)
    port = free_port()
    proxy = write_proxy(tmp_path / "proxy", (PUBLIC, port), upstream.port,
                        ProxyTLS(keys.ca_cert, keys.server_cert, keys.server_key)
                        if keys else None)
    nginx = _start_nginx(proxy)
    try:
        # every Fleet route passes, to exactly its own path, with the node-auth headers intact
        for route in fleet_routes():
            status, body = _send(PUBLIC, port, keys, route, body=b"\x00protobuf\xff")
            assert (status, body) == (200, f"upstream {route}".encode()), route
        assert [s[1] for s in upstream.seen] == fleet_routes()
        for _, _, headers, body in upstream.seen:
            assert {k: headers.get(k) for k in SIGNED} == SIGNED
            assert body == b"\x00protobuf\xff"
        # a model's largest push-object (one 5 MiB array chunk + its header) passes whole
        big = bytes(range(256)) * (5 * 4096) + b"h" * 179
        assert _send(PUBLIC, port, keys, "/v1/fleet/push-object", body=big)[0] == 200
        assert upstream.seen[-1][3] == big
        n = len(upstream.seen)
        # everything else is refused at nginx and never reaches the SuperLink
        for path in REFUSED:
            status, _ = _send(PUBLIC, port, keys, path)
            assert status in (400, 403, 404), (path, status)
        for route in ("/v1/fleet/pull-messages", "/v1/fleet/get-fab"):
            assert _send(PUBLIC, port, keys, route, method="GET")[0] == 403
        assert len(upstream.seen) == n, upstream.seen[n:]
        # the coordinator's own host (127.0.0.1, same port) reaches the Control API
        status, body = _send("127.0.0.1" if not keys else "localhost", port, keys,
                             "/v1/control/list-runs")
        assert (status, body) == (200, b"upstream /v1/control/list-runs")
        # the SuperLink itself listens on loopback only: not on the public address
        with pytest.raises(OSError):
            socket.create_connection((PUBLIC, upstream.port), timeout=2).close()
    finally:
        log = _stop(nginx)
        upstream.close()
    assert "/v1/control/start-run" in log and " 404" in log  # refusals are logged


@needs_nginx
def test_stale_nginx_of_a_killed_coordinator_is_stopped(tmp_path: Path) -> None:
    upstream = _Upstream()
    port = free_port()
    proxy = write_proxy(tmp_path / "proxy", ("0.0.0.0", port), upstream.port, None)
    old = _start_nginx(proxy)
    try:
        deadline = time.monotonic() + 10
        while not proxy.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proxy.stop_stale()
        old.wait(timeout=15)
        new = _start_nginx(proxy)  # the port is free again
        _stop(new)
    finally:
        if old.poll() is None:
            _stop(old)
        upstream.close()


ROOT = Path(__file__).resolve().parents[2]


def test_deploy_files_run_the_proxy(tmp_path: Path) -> None:
    """The coordinator image installs nginx; the systemd unit for the coordinator verifies."""
    docker = (ROOT / "deploy" / "docker" / "Dockerfile.coordinator").read_text()
    assert "apt-get install -y --no-install-recommends nginx libnginx-mod-stream" in docker
    unit = ROOT / "deploy" / "systemd" / "fedsynth-coordinator.service"
    text = unit.read_text()
    assert "fedsynth coordinator" in text and "Restart=" in text
    assert "apt-get install" in (ROOT / ".ci" / "run").read_text() and \
        "nginx libnginx-mod-stream iproute2" in (ROOT / ".ci" / "run").read_text()
    skip_unless("systemd-analyze", "systemd")
    tool = which("systemd-analyze")
    fake = tmp_path / unit.name
    fake.write_text(text.replace("/opt/fedsynth/venv/bin/fedsynth", shutil.which("true")))
    out = subprocess.run([tool, "verify", str(fake)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
