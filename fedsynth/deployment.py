"""Running Flower's SuperLink and SuperNode as supervised processes.

Everything about process management lives here: the command lines (TLS, node authentication,
state database, dependency installation off), the Flower CLI connection file, readiness waits, a
pre-flight TLS probe that turns "wrong certificate" into one clear line, node registration, the
minimal app folder ``flwr run`` ships (no code: hospitals run the fedsynth they installed), and a
supervisor that restarts a dead child with exponential backoff.

Flower facts this relies on (1.42): the SuperLink serves Fleet, Control and runtime APIs on one
port (plain HTTP/1.1 paths /v1/fleet, /v1/control, /v1/runtime; so ``fedsynth coordinator`` puts
it on loopback behind nginx, see ``fedsynth.fleet_proxy``); it and every SuperNode start
``flower-superexec`` (found on ``PATH``) in a new session, which in turn starts
``flwr-serverapp`` / ``flwr-clientapp``; an unregistered node key makes the SuperNode log
``Exit Code: 305`` and exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live beside python
CONNECTION = "fedsynth"  # the name of the SuperLink connection in $FLWR_HOME/config.toml
NODE_REFUSED_CODE = 305  # Flower's SUPERNODE_CONNECTION_ERROR (unregistered key, error 2004)

# Run-config keys the ServerApp understands (server/federation.py), with their defaults: the
# launch app's pyproject declares all of them, because Flower refuses an override of an
# undeclared key ("Invalid run configuration").
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "family": "dcgan",
    "num-server-rounds": 5,
    "local-steps": 20,
    "batch-size": 16,
    "image-size": 32,
    "latent-dim": 64,
    "width": 32,
    "lr-g": 2e-4,
    "lr-d": 2e-4,
    "wire-dtype": "float32",
    "prox-mu": 0.0,
    "run-dir": "runs",
    "run-id": "",
    "min-hospitals": 1,
    "fraction-train": 1.0,
    "round-timeout": 3600.0,
    "evaluate-every": 1,
    "resume": False,
    "preset": "fedgan",
    "signing-key": "",
}


class DeploymentError(RuntimeError):
    """A process could not be started or configured; the message says which and why."""


class CoordinatorUnreachable(DeploymentError):
    """Nothing answers at the coordinator's address (yet): worth retrying."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: our venv's bin first (Flower spawns flower-superexec)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


# ---- command lines ----

@dataclass(frozen=True)
class TLSFiles:
    """The coordinator's TLS material; ``None`` means --insecure."""

    ca_cert: Path
    cert: Path
    key: Path


def superlink_env() -> dict[str, str]:
    """The SuperLink's environment, without Flower's switches for its legacy gRPC servers (they
    would bind Control and Fleet on 0.0.0.0:9093/9092, beside the proxy)."""
    from flwr.common.constant import FLWR_INTERNAL_GRPC_CONTROL_API, FLWR_INTERNAL_GRPC_FLEET_API

    env = child_env()
    for name in (FLWR_INTERNAL_GRPC_CONTROL_API, FLWR_INTERNAL_GRPC_FLEET_API):
        env.pop(name, None)
    return env


def superlink_command(address: str, database: Path, tls: TLSFiles | None,
                      node_auth: bool = True) -> list[str]:
    host, port = split_address(address)
    cmd = [str(BIN_DIR / "flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(database), "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert),
                "--ssl-keyfile", str(tls.key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def format_node_config(values: Mapping[str, Any]) -> str:
    """Flower's ``--node-config`` syntax: space separated ``key=value``, strings quoted (TOML)."""
    parts = []
    for key, value in values.items():
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if " " in text:
            raise ValueError(f"node config value of {key!r} must not contain spaces: {value!r}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(superlink: str, root_cert: Path | None, node_key: Path | None,
                      port: int, node_config: Mapping[str, Any], warm: bool = True) -> list[str]:
    """Flower's SuperNode; with ``warm`` it starts no SuperExec of its own (``client.executor``
    runs the tasks) and polls the coordinator with a shorter idle sleep (``fedsynth.supernode``)."""
    head = ([sys.executable, "-m", "fedsynth.supernode", "--isolation", "process"] if warm
            else [str(BIN_DIR / "flower-supernode")])
    cmd = [*head, "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
           "--node-config", format_node_config(node_config)]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if node_key is not None:
        cmd += ["--auth-supernode-private-key", str(node_key)]
    return cmd


def executor_command(port: int, parent_pid: int | None = None,
                     approved_apps: Sequence[str] = ()) -> list[str]:
    """The warm task executor (``client.executor``) for the SuperNode's runtime port."""
    cmd = [sys.executable, "-m", "client.executor", "--runtime-api-address", f"127.0.0.1:{port}"]
    for digest in approved_apps:
        cmd += ["--approved-app", digest]
    return cmd + (["--parent-pid", str(parent_pid)] if parent_pid else [])


# ---- the Flower CLI connection and the launch app ----

def write_flwr_home(flwr_home: Path, address: str, root_cert: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` with one connection named ``fedsynth`` (the default)."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    if root_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_cert).resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_launch_app(folder: Path) -> Path:
    """A Flower app folder holding only ``pyproject.toml``.

    The FAB that ``flwr run`` ships then carries no code: the ServerApp and every hospital's
    ClientApp are imported from the fedsynth each side installed, so a coordinator cannot push
    code to hospitals, and every run-config key is declared (Flower rejects undeclared ones).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in RUN_CONFIG_DEFAULTS.items())
    (folder / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsynth-run"
version = "1.0.0"
license = "Apache-2.0"
description = "fedsynth federation run (code comes from the installed fedsynth)"
dependencies = []

[tool.flwr.app]
publisher = "fedsynth"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
{config}
""")
    return folder


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``--run-config`` text; an unknown key is refused here with its name, not by Flower."""
    unknown = sorted(set(values) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(RUN_CONFIG_DEFAULTS)}")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def flwr_cli(args: Sequence[str], flwr_home: Path, timeout: float = 120.0
             ) -> subprocess.CompletedProcess:
    """Run ``flwr ARGS`` against our connection file."""
    return subprocess.run([str(BIN_DIR / "flwr"), *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env({"FLWR_HOME": str(flwr_home)}),
                          check=False)


def flwr_json(args: Sequence[str], flwr_home: Path, timeout: float = 120.0) -> dict[str, Any]:
    """``flwr ARGS --format json`` parsed; Flower's own error message becomes the exception."""
    import json

    proc = flwr_cli([*args, "--format", "json"], flwr_home, timeout)
    text = proc.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if not data.get("success"):
        msg = data.get("error-message") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeploymentError(f"flwr {args[0]} failed: {' '.join(str(msg).split())}")
    return data


# ---- readiness and the pre-flight probe ----

def wait_for_port(host: str, port: int, timeout: float,
                  alive: Callable[[], bool] = lambda: True) -> None:
    """Block until something accepts TCP connections at host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise DeploymentError(f"process serving {host}:{port} exited while starting")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"nothing answered at {host}:{port} within {timeout:.0f} s")


def probe_coordinator(address: str, root_cert: Path | None, timeout: float = 5.0) -> None:
    """Connect (and, with TLS, verify the certificate) the way the SuperNode will.

    Raises ``CoordinatorUnreachable`` (retry later) or ``DeploymentError`` (configuration is
    wrong: retrying cannot help).
    """
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise CoordinatorUnreachable(
            f"coordinator {address} unreachable ({exc.strerror or exc})") from None
    with sock:
        if root_cert is None:
            return
        ctx = ssl.create_default_context(cafile=str(root_cert))
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            raise DeploymentError(
                f"coordinator {address} presented a certificate that '{root_cert}' does not "
                f"verify ({exc.verify_message}): wrong CA file, or the coordinator's "
                "certificate lacks this host name") from None
        except (ssl.SSLError, OSError) as exc:
            raise CoordinatorUnreachable(
                f"TLS handshake with coordinator {address} failed ({exc})") from None


def register_node_keys(public_keys: Iterable[Path], flwr_home: Path) -> dict[str, str]:
    """Register hospitals' public node keys with the running SuperLink.

    Returns ``{key file name: node id or "already registered"}``. Uses Flower's own Control client
    in-process (one ``flwr`` start per key costs ~5 s).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from fedsynth.certs import CertError

    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    out: dict[str, str] = {}
    try:
        client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        try:
            for path in public_keys:
                path = Path(path)
                try:
                    key = serialization.load_ssh_public_key(path.read_bytes())
                except (OSError, ValueError) as exc:
                    raise CertError(f"hospital public key '{path}' cannot be read: {exc}") from None
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise CertError(f"hospital public key '{path}' is not an EC key")
                name = path.name.removesuffix(".pub")
                try:
                    resp = client.RegisterNode(request=RegisterNodeRequest(
                        public_key=public_key_to_bytes(key), name=name))
                    out[path.name] = str(resp.node_id)
                except Exception as exc:  # noqa: BLE001 - Flower raises its own API error types
                    # Flower answers a known key with "Public key already in use" (HTTP 412)
                    if "already in use" not in str(exc) and "412" not in str(exc):
                        raise DeploymentError(f"registering '{path}' failed: {exc}") from None
                    out[path.name] = "already registered"
        finally:
            client.close()
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old
    return out


# ---- processes ----

def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc); Flower detaches its helpers into new sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal a process and everything under it; SIGKILL what is left after ``grace``."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in pids[1:]:  # reap helpers that are ours (others get reaped by init)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@dataclass
class Supervisor:
    """Keep one child running: restart it with exponential backoff when it dies.

    The child's output is copied line by line to ``sink`` (our log or a file); ``on_line`` lets the
    caller recognise Flower's messages (e.g. the node-refused exit code) without parsing twice.
    """

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=child_env)
    cwd: Path | None = None
    min_backoff: float = 1.0
    max_backoff: float = 60.0
    healthy_after: float = 60.0  # a child that lived this long resets the backoff
    max_restarts: int | None = None  # None: restart forever (a daemon); 0: run once
    on_line: Callable[[str], None] | None = None
    sink: Callable[[str], None] | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                     start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        log.info("%s started (pid %d)", self.name, self.proc.pid)
        return self.proc

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None  # noqa: S101 - set by Popen above
        for line in proc.stdout:
            line = line.rstrip("\n")
            if self.sink is not None:
                self.sink(line)
            else:
                sys.stderr.write(f"[{self.name}] {line}\n")
            if self.on_line is not None:
                self.on_line(line)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run_forever(self, before_start: Callable[[], None] | None = None) -> int:
        """Start, wait, restart with backoff until ``stop()``; returns the last exit code."""
        backoff = self.min_backoff
        code = 0
        while not self._stop.is_set():
            if before_start is not None:
                try:
                    before_start()
                except CoordinatorUnreachable as exc:
                    log.warning("%s; retrying in %.0f s", exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
            t0 = time.monotonic()
            proc = self.start()
            while proc.poll() is None and not self._stop.is_set():
                self._stop.wait(0.5)
            if self._stop.is_set():
                break
            code = proc.returncode
            if time.monotonic() - t0 >= self.healthy_after:
                backoff = self.min_backoff
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                log.error("%s exited with code %s; not restarting (--max-restarts %d)",
                          self.name, code, self.max_restarts)
                break
            self.restarts += 1
            log.warning("%s exited with code %s; restarting in %.0f s (restart %d)",
                        self.name, code, backoff, self.restarts)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        self.terminate()
        return code

    def stop(self) -> None:
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the supervisor is stopped."""
        self._stop.wait(seconds)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc)
        elif self.proc is not None:
            for pid in _descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT end the daemon cleanly (systemd, docker stop, Ctrl-C)."""
    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ---- the launch file (``fedsynth launch CONFIG`` / ``fedsynth status CONFIG``) ----

RUN_ALIASES = {"rounds": "num-server-rounds"}
PATH_KEYS = ("run-dir", "signing-key")


@dataclass(frozen=True)
class LaunchConfig:
    """``[coordinator]`` address + root-certificates (or insecure); ``[run]`` run settings.

    Paths in ``[run]`` (run-dir, signing-key) are paths on the coordinator's machine; relative ones
    are resolved against the file's folder, i.e. launch from the coordinator's host.
    """

    address: str
    root_certificates: Path | None
    run: dict[str, Any]
    source: Path

    @classmethod
    def load(cls, path: Path) -> "LaunchConfig":
        import tomllib

        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"launch file '{path}' cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"launch file '{path}' is not valid TOML: {exc}") from None
        coord = data.get("coordinator", {})
        if not coord.get("address"):
            raise ValueError(f"launch file '{path}': [coordinator] address is missing")
        insecure = bool(coord.get("insecure", False))
        root = coord.get("root-certificates")
        if not insecure and not root:
            raise ValueError(f"launch file '{path}': [coordinator] root-certificates is missing "
                             "(the federation's ca.pem), or set insecure = true")
        run = {RUN_ALIASES.get(k, k): v for k, v in data.get("run", {}).items()}
        for key in PATH_KEYS:
            if run.get(key):
                p = Path(str(run[key])).expanduser()
                run[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
        run_config_arg(run)  # unknown keys fail here, by name
        root_path = None
        if not insecure:
            root_path = Path(str(root)).expanduser()
            root_path = root_path if root_path.is_absolute() else (path.parent / root_path)
        return cls(address=str(coord["address"]), root_certificates=root_path, run=run,
                   source=path)


def default_flwr_home() -> Path:
    return Path(os.environ.get("FEDSYNTH_FLWR_HOME", Path.home() / ".fedsynth" / "flwr"))
