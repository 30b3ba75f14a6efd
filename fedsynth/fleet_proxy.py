"""The coordinator's front door: nginx passes only Flower's Fleet API from the network.

Why a proxy at all. Flower 1.42's SuperLink is one FastAPI/uvicorn app on ONE port that serves
plain HTTP/1.1 (TLS by uvicorn) with one POST path per RPC (``flwr/superlink/main.py``):

* ``/v1/fleet/*``   the Fleet API, what hospitals' SuperNodes call (node-authenticated: every
  request carries ``flwr-public-key`` / ``flwr-signature`` / ``flwr-timestamp`` headers);
* ``/v1/control/*`` the Control API: ``flwr run``/``ls``/``stop``, node registration
  (``register-node``), federation management;
* ``/v1/runtime/*`` the ServerAppIo/runtime API the ServerApp process uses;
* ``/health``, ``/docs``, ``/openapi.json``.

The SuperLink has no flag to serve these on different ports or addresses, and the Control API's
account authentication is a plugin whose open-source default lets everyone in (see
``flwr/superlink/auth_plugin``). Whoever reaches the port and trusts the CA could register its
own node key, list runs and start its own app. So the SuperLink listens on 127.0.0.1 only, and
this module's nginx (Debian's package: maintained, patched by the distribution) owns the public
address:

* a connection that arrives on a non-loopback address gets exactly the Fleet routes (one
  exact-match ``location`` per route of Flower's Fleet router, POST only, forwarded to the fixed
  upstream path whatever the client wrote); every other path answers 404;
* a connection that arrives on 127.0.0.1 (the coordinator's own host: ``fedsynth launch`` and
  ``fedsynth status`` from the coordinator's machine) is passed through whole.

The split is by the address the connection arrived at (nginx picks the ``server`` block with
``getsockname``), not by a header the client controls. The coordinator's own registration and
``flwr`` connection bypass nginx and use the SuperLink's loopback port directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

APT_PACKAGE = "nginx"
NGINX_MISSING = ("nginx is not installed: the coordinator runs it in front of the SuperLink so "
                 "that only Flower's Fleet API faces the network; install it with "
                 f"`apt-get install {APT_PACKAGE}` (Debian package '{APT_PACKAGE}')")
FLEET_PREFIX = "/v1/fleet/"
# one model per push-object; DCGAN/CycleGAN weights are tens of MB, keep room for bigger models
MAX_BODY = "1024m"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TLS_NAME = "localhost"  # always a SAN of fedsynth's coordinator certificate (fedsynth.certs)


class ProxyError(RuntimeError):
    """nginx is missing or refused its configuration; the message says what to do."""


def nginx_binary() -> str:
    """The nginx executable; Debian installs it in /usr/sbin, which a user's PATH may lack."""
    path = os.environ.get("PATH", "")
    found = shutil.which("nginx", path=os.pathsep.join([path, "/usr/sbin", "/sbin"]))
    if not found:
        raise ProxyError(NGINX_MISSING)
    return found


def fleet_routes() -> list[str]:
    """The Fleet API's paths, read from the installed Flower's own Fleet router (POST each).

    Reading them (rather than listing them here) keeps the proxy in step with a Flower upgrade;
    anything outside ``/v1/fleet/`` is refused so that a future Flower cannot widen it.
    """
    from protocol.flower_private import fleet_router as router

    paths = sorted({r.path for r in router.routes if "POST" in getattr(r, "methods", ())})
    bad = [p for p in paths if not p.startswith(FLEET_PREFIX)]
    if bad or not paths:
        raise ProxyError(f"Flower's Fleet router has unexpected routes {bad or paths}")
    return paths


def is_loopback(host: str) -> bool:
    """Only 127.0.0.1 / ::1 / localhost count: a connection there comes from this host (the
    kernel drops packets from outside addressed to them). Other 127.x addresses are served as
    public, i.e. Fleet only."""
    return host in LOOPBACK_HOSTS


def _listen(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "*"):
        return str(port)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(frozen=True)
class ProxyTLS:
    """TLS for both sides: what nginx shows the network, and how it checks the SuperLink."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class FleetProxy:
    """nginx on ``host:port`` in front of the SuperLink on ``127.0.0.1:upstream_port``."""

    folder: Path  # nginx's prefix: config, pid, temp folders, error log
    host: str
    port: int
    upstream_port: int
    tls: ProxyTLS | None  # None: plain HTTP both sides (--insecure)

    @property
    def config(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.folder / "nginx.pid"

    def render(self) -> str:
        f = self.folder
        ssl = " ssl" if self.tls else ""
        scheme = "https" if self.tls else "http"
        tls_server = tls_upstream = ""
        if self.tls:
            tls_server = (f"    ssl_certificate {self.tls.cert};\n"
                          f"    ssl_certificate_key {self.tls.key};\n"
                          "    ssl_protocols TLSv1.2 TLSv1.3;\n"
                          "    ssl_session_cache shared:fedsynth_tls:1m;\n")
            tls_upstream = ("    # the SuperLink keeps its own TLS; nginx checks it (CA)\n"
                            f"    proxy_ssl_trusted_certificate {self.tls.ca_cert};\n"
                            "    proxy_ssl_verify on;\n"
                            f"    proxy_ssl_name {TLS_NAME};\n"
                            "    proxy_ssl_server_name on;\n"
                            "    proxy_ssl_session_reuse on;\n")
        fleet = "".join(
            f"        location = {p} {{\n"
            "            limit_except POST { deny all; }\n"
            f"            proxy_pass {scheme}://superlink{p};\n"
            "        }\n" for p in fleet_routes())
        loopback_listen = ["127.0.0.1"]
        if ":" in self.host:  # an IPv6 public address: the IPv6 loopback exists too
            loopback_listen.append("::1")
        loopback = "".join(f"        listen {_listen(h, self.port)}{ssl};\n"
                           for h in loopback_listen)
        public = ""
        if not is_loopback(self.host):
            listens = [_listen(self.host, self.port)]
            if self.host == "::":
                listens.append(str(self.port))  # IPv4 as well; nginx keeps [::] IPv6-only
            public = ("    # any address but loopback: the Fleet API only (hospitals' SuperNodes)\n"
                      "    server {\n"
                      + "".join(f"        listen {x}{ssl};\n" for x in listens)
                      + fleet
                      + "        location / { return 404; }\n"
                      "    }\n")
        return f"""\
# Written by `fedsynth coordinator` at every start; edits are lost. See fedsynth/fleet_proxy.py:
# Flower's SuperLink serves Fleet, Control and runtime APIs on one port and has no flag to split
# them, so only this proxy faces the network and it passes the Fleet API alone.
daemon off;
worker_processes 1;
pid {self.pid_file};
error_log stderr notice;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {f / 'tmp' / 'body'};
    proxy_temp_path {f / 'tmp' / 'proxy'};
    fastcgi_temp_path {f / 'tmp' / 'fastcgi'};
    uwsgi_temp_path {f / 'tmp' / 'uwsgi'};
    scgi_temp_path {f / 'tmp' / 'scgi'};
    # refused and failed requests only (a hospital polls several times a second)
    map $status $fedsynth_logged {{
        ~^[45] 1;
        default 0;
    }}
    log_format fedsynth 'proxy: $remote_addr "$request" $status';
    access_log /dev/stderr fedsynth if=$fedsynth_logged;
    server_tokens off;
    default_type application/octet-stream;
    client_max_body_size {MAX_BODY};

    upstream superlink {{
        server 127.0.0.1:{self.upstream_port};
        keepalive 16;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header X-Forwarded-For $remote_addr;
    # stream bodies through (model weights; `flwr log` streams): no temp files, no buffering
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
{tls_upstream}{tls_server}
{public}
    # the coordinator's own host (fedsynth launch / status): every API
    server {{
{loopback}        location / {{
            proxy_pass {scheme}://superlink;
        }}
    }}
}}
"""

    def write(self) -> Path:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.render())
        return self.config

    def command(self, test: bool = False) -> list[str]:
        """nginx in the foreground, every path inside ``folder`` (no global config touched)."""
        cmd = [nginx_binary(), "-p", f"{self.folder}/", "-c", str(self.config), "-e", "stderr"]
        return [*cmd, "-t", "-q"] if test else cmd

    def check(self) -> None:
        """``nginx -t`` on the written config; its complaint becomes the exception."""
        proc = subprocess.run(self.command(test=True), capture_output=True, text=True,
                              timeout=60, check=False)
        if proc.returncode != 0:
            lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
            raise ProxyError(f"nginx refused {self.config}: "
                             f"{lines[0] if lines else f'exit code {proc.returncode}'}")

    def stop_stale(self, grace: float = 5.0) -> None:
        """A coordinator killed hard leaves its nginx holding the port: end that one (ours only:
        the pid file's process must be an nginx master started with this very config)."""
        import time

        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            return
        if b"nginx: master process" not in cmdline or str(self.config).encode() not in cmdline:
            return
        for sig, wait in ((signal.SIGQUIT, grace), (signal.SIGKILL, grace)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)


def write_proxy(folder: Path, address: tuple[str, int], upstream_port: int,
                tls: ProxyTLS | None) -> FleetProxy:
    """Write and ``nginx -t`` the proxy's configuration; raises ``ProxyError``."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    proxy = FleetProxy(folder, address[0], address[1], upstream_port, tls)
    proxy.write()
    proxy.check()
    return proxy


def forwarded_paths(proxy_text: str) -> Sequence[str]:
    """The exact paths the public server forwards (for tests and ``--print-proxy-config``)."""
    return [line.split()[2] for line in proxy_text.splitlines()
            if line.strip().startswith("location = ")]
