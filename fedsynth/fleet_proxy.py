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

The split is by the address the connection arrived at (nginx's stream server maps
``$server_addr``, i.e. ``getsockname``, to one of two unix-socket doors), not by a header the
client controls. The coordinator's own registration and ``flwr`` connection bypass nginx and use
the SuperLink's loopback port directly.

Bounded per client address (issue 25 items 2 and 3; the numbers and why are in
``fedsynth.proxy_limits``): connections, counted at accept so that unfinished TLS handshakes
and requests count; requests per second; how long headers and bodies may take; the body each
Fleet route accepts, sized to the largest message that route carries; and how many large bodies
are in flight at once.
A stranger holding connections open, or sending big unauthenticated bodies, spends only its own
share: hospitals at other addresses get through, and the SuperLink never reads a body larger
than its route's limit (nginx reads every Fleet body whole before passing it on).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedsynth.proxy_limits import (  # the numbers, each with its reason
    BODY_TIMEOUT_S, BUFFER_SLACK, HEADER_TIMEOUT_S, KEEPALIVE_TIMEOUT_S, LARGE_BODY_ROUTES,
    LOOPBACK_MAX_BODY, PER_ADDRESS_BODIES, PER_ADDRESS_BURST, PER_ADDRESS_CONNECTIONS,
    PER_ADDRESS_RATE, REFUSED_STATUS, SMALL_BODY, nginx_size, route_body_limits, worker_files)

APT_PACKAGE = "nginx"
STREAM_PACKAGE = "libnginx-mod-stream"  # Debian ships nginx's stream module on its own
NGINX_MISSING = ("nginx is not installed: the coordinator runs it in front of the SuperLink so "
                 "that only Flower's Fleet API faces the network; install it with "
                 f"`apt-get install {APT_PACKAGE} {STREAM_PACKAGE}` (Debian packages "
                 f"'{APT_PACKAGE}' and '{STREAM_PACKAGE}')")
STREAM_MISSING = ("nginx's stream module is not installed: the coordinator's proxy caps "
                  "connections per address with it; install it with "
                  f"`apt-get install {STREAM_PACKAGE}` (Debian package '{STREAM_PACKAGE}')")
FLEET_PREFIX = "/v1/fleet/"
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


def stream_module() -> str:
    """What the config must ``load_module`` for nginx's stream module: "" when it is built in
    (nginx.org's packages), its path when it is a dynamic module (Debian's libnginx-mod-stream);
    raises ``ProxyError`` when this nginx has none."""
    return _stream_module_of(nginx_binary())


@functools.lru_cache(maxsize=4)
def _stream_module_of(binary: str) -> str:
    proc = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=30,
                          check=False)
    flags = (proc.stderr + proc.stdout).split()
    if "--with-stream" in flags:
        return ""
    if "--with-stream=dynamic" not in flags:
        raise ProxyError(f"{binary} was built without the stream module: {STREAM_MISSING}")
    folder = next((x.split("=", 1)[1] for x in flags if x.startswith("--modules-path=")),
                  "/usr/lib/nginx/modules")
    module = Path(folder) / "ngx_stream_module.so"
    if not module.is_file():
        raise ProxyError(STREAM_MISSING)
    return str(module)


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
    """nginx on ``host:port`` in front of the SuperLink on ``127.0.0.1:upstream_port``.

    Two layers in one nginx. The ``stream`` server owns the port (every listen address): it
    counts each connection against its client address as it is accepted, then hands the raw
    bytes (TLS included) over a unix socket, with a PROXY protocol header naming the client, to
    one of two ``http`` servers picked by the address the connection arrived at: 127.0.0.1 /
    ::1 to the full-API door, anything else to the Fleet-only door. The http servers terminate
    TLS, take the client address from that header, and apply the request, timeout and body
    limits.
    """

    folder: Path  # nginx's prefix: config, pid, temp folders, sockets, error log
    host: str
    port: int
    upstream_port: int
    tls: ProxyTLS | None  # None: plain HTTP both sides (--insecure)
    stream_module: str = ""  # load_module path of nginx's stream module ("" : built in)

    @property
    def config(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.folder / "nginx.pid"

    @property
    def socket_dir(self) -> Path:
        """Where the two doors' unix sockets live (mode 0755; the socket files are 0666, like
        the 127.0.0.1 port every local user can reach anyway).

        Run as root, nginx's workers are ``nobody``, who may not be able to traverse the state
        folder: then a folder in /run. Otherwise ``folder/run``, unless that path is too long
        for a socket address (107 bytes): then a folder of this user's in the runtime folder.
        """
        digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        if os.geteuid() == 0 and os.access("/run", os.W_OK):
            return Path("/run") / f"fedsynth-nginx-{digest}"
        here = self.folder / "run"
        if len(str(here / "fleet.sock").encode()) <= 100:
            return here
        runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        return Path(runtime) / f"fedsynth-nginx-{os.getuid()}-{digest}"

    @property
    def sockets(self) -> tuple[Path, Path]:
        """(the Fleet-only door, the coordinator's own full-API door)."""
        return self.socket_dir / "fleet.sock", self.socket_dir / "local.sock"

    def _fleet_locations(self, scheme: str) -> str:
        out = []
        for path, limit in route_body_limits(fleet_routes()).items():
            large = ("            limit_conn fedsynth_bodies "
                     f"{PER_ADDRESS_BODIES};\n") if path in LARGE_BODY_ROUTES else ""
            out.append(f"        location = {path} {{\n"
                       "            limit_except POST { deny all; }\n"
                       f"            client_max_body_size {nginx_size(limit)};\n"
                       "            client_body_buffer_size "
                       f"{nginx_size(limit + BUFFER_SLACK)};\n"
                       f"{large}"
                       f"            proxy_pass {scheme}://superlink{path};\n"
                       "        }\n")
        return "".join(out)

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
        fleet_sock, local_sock = self.sockets
        listens = ["127.0.0.1"]
        if ":" in self.host:  # an IPv6 public address: the IPv6 loopback exists too
            listens.append("::1")
        if is_loopback(self.host):
            ports = [_listen(h, self.port) for h in listens]
        elif self.host in ("", "0.0.0.0", "*"):
            ports = [str(self.port)]  # the wildcard takes 127.0.0.1 too
        elif self.host == "::":
            ports = [f"[::]:{self.port}", str(self.port)]  # nginx keeps [::] IPv6-only
        else:
            ports = [_listen(self.host, self.port), *(_listen(h, self.port) for h in listens)]
        stream_listen = "".join(f"        listen {x};\n" for x in ports)
        public = ""
        if not is_loopback(self.host):
            public = ("    # any address but loopback: the Fleet API only (hospitals'\n"
                      "    # SuperNodes), each route with the body limit of what it carries\n"
                      "    # (fedsynth/proxy_limits.py)\n"
                      "    server {\n"
                      f"        listen unix:{fleet_sock}{ssl} proxy_protocol;\n"
                      "        limit_req zone=fedsynth_rate "
                      f"burst={PER_ADDRESS_BURST} nodelay;\n"
                      f"        client_max_body_size {nginx_size(SMALL_BODY)};\n"
                      "        # bodies are read whole (in memory, at most the route's limit)\n"
                      "        # before the SuperLink sees a byte: an oversized or stalled one\n"
                      "        # never reaches it\n"
                      "        proxy_request_buffering on;\n"
                      + self._fleet_locations(scheme)
                      + "        location / { return 404; }\n"
                      "    }\n")
        load = f"load_module {self.stream_module};\n" if self.stream_module else ""
        nofile, connections = worker_files()
        return f"""\
# Written by `fedsynth coordinator` at every start; edits are lost. See fedsynth/fleet_proxy.py:
# Flower's SuperLink serves Fleet, Control and runtime APIs on one port and has no flag to split
# them, so only this proxy faces the network and it passes the Fleet API alone.
{load}daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {self.pid_file};
error_log stderr warn;  # notices (worker started, epoll) are noise in the coordinator log

events {{
    worker_connections {connections};
}}

# Every connection to the port arrives here first: at most {PER_ADDRESS_CONNECTIONS} at a time
# per client address, counted at accept (an unfinished TLS handshake or request counts); the
# coordinator's own 127.0.0.1 / ::1 are not capped. Then, by the address it ARRIVED AT
# (getsockname), to the Fleet-only door or the full one, with the client's address in a PROXY
# protocol header.
stream {{
    map $server_addr $fedsynth_door {{
        127.0.0.1 unix:{local_sock};
        ::1 unix:{local_sock};
        default unix:{fleet_sock};
    }}
    map $server_addr $fedsynth_peer {{
        127.0.0.1 "";
        ::1 "";
        default $binary_remote_addr;
    }}
    limit_conn_zone $fedsynth_peer zone=fedsynth_conns:4m;
    # a refused connection is not logged one by one (a flood would fill the log)
    limit_conn_log_level info;
    server {{
{stream_listen}        limit_conn fedsynth_conns {PER_ADDRESS_CONNECTIONS};
        proxy_pass $fedsynth_door;
        proxy_protocol on;
        proxy_connect_timeout 5s;
        proxy_timeout 3700s;
    }}
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
    # connections come from the stream server above; the client is the PROXY header's address
    set_real_ip_from unix:;
    real_ip_header proxy_protocol;
    # headers (and the TLS handshake) within {HEADER_TIMEOUT_S} s; no body pause over
    # {BODY_TIMEOUT_S} s
    client_header_timeout {HEADER_TIMEOUT_S}s;
    client_body_timeout {BODY_TIMEOUT_S}s;
    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;
    send_timeout 60s;
    limit_req_zone $binary_remote_addr zone=fedsynth_rate:4m rate={PER_ADDRESS_RATE};
    limit_conn_zone $binary_remote_addr zone=fedsynth_bodies:4m;
    # over a limit: 503, which Flower's SuperNode retries
    limit_req_status {REFUSED_STATUS};
    limit_conn_status {REFUSED_STATUS};
    client_max_body_size {nginx_size(SMALL_BODY)};

    upstream superlink {{
        server 127.0.0.1:{self.upstream_port};
        keepalive 16;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header X-Forwarded-For $remote_addr;
    # responses stream through (model weights; `flwr log` streams): no buffering
    proxy_buffering off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
{tls_upstream}{tls_server}
{public}
    # the coordinator's own host (fedsynth launch / status): every API
    server {{
        listen unix:{local_sock}{ssl} proxy_protocol;
        client_max_body_size {LOOPBACK_MAX_BODY};
        proxy_request_buffering off;
        location / {{
            proxy_pass {scheme}://superlink;
        }}
    }}
}}
"""

    def clear_sockets(self) -> None:
        """Remove the doors' socket files a killed nginx left (nginx cannot bind over them);
        called before every start, when no nginx of this config runs."""
        for sock in self.sockets:
            try:
                if sock.is_socket():
                    sock.unlink()
            except FileNotFoundError:
                pass

    def remove_socket_dir(self) -> None:
        """After nginx has stopped: its socket folder outside ``folder`` (/run, see
        ``socket_dir``) goes too, once empty (nginx removes its sockets when it exits)."""
        run = self.socket_dir
        if run.parent != self.folder:
            self.clear_sockets()
            try:
                run.rmdir()
            except OSError:
                pass

    def write(self) -> Path:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        run = self.socket_dir
        run.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = run.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise ProxyError(f"{run} (the proxy's socket folder) is not a folder of this user's")
        os.chmod(run, 0o755)
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
    proxy = FleetProxy(folder, address[0], address[1], upstream_port, tls, stream_module())
    proxy.write()
    proxy.clear_sockets()
    try:
        proxy.check()
    except ProxyError:
        proxy.remove_socket_dir()
        raise
    return proxy


def forwarded_paths(proxy_text: str) -> Sequence[str]:
    """The exact paths the public server forwards (for tests and ``--print-proxy-config``)."""
    return [line.split()[2] for line in proxy_text.splitlines()
            if line.strip().startswith("location = ")]
