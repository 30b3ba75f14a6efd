"""Running Flower's SuperLink and SuperNode as supervised processes.

Everything about process management lives here: the command lines (TLS, node authentication,
state database, dependency installation off), the Flower CLI connection file, readiness waits, a
pre-flight TLS probe that turns "wrong certificate" into one clear line, node registration, the
minimal app folder ``flwr run`` ships (no code: hospitals run the fedsynth they installed), and
and the Flower CLI calls. The guard, spawn and kill helpers are ``fedsynth.processes``; the launch
file is ``fedsynth.launch_file``.

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
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live beside python
CONNECTION = "fedsynth"  # the name of the SuperLink connection in $FLWR_HOME/config.toml
NODE_REFUSED_CODE = 305  # Flower's SUPERNODE_CONNECTION_ERROR (unregistered key, error 2004)

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
    from protocol.flower_private import FLWR_INTERNAL_GRPC_CONTROL_API, FLWR_INTERNAL_GRPC_FLEET_API

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
                      port: int, node_config: Mapping[str, Any]) -> list[str]:
    """Flower's SuperNode, starting no SuperExec of its own (``client.executor`` runs the tasks)
    and polling the coordinator with a shorter idle sleep (``fedsynth.supernode``)."""
    cmd = [sys.executable, "-m", "fedsynth.supernode", "--isolation", "process", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
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


def write_launch_app(folder: Path) -> Path:
    """A Flower app folder holding only ``pyproject.toml``.

    The FAB that ``flwr run`` ships then carries no code: the ServerApp and every hospital's
    ClientApp are imported from the fedsynth each side installed (hospitals refuse any other
    bundle, ``client/bundle.py``), and every run setting is declared (Flower rejects undeclared
    ones) with its default from the run configuration (``server/run_config.py``).
    """
    from protocol.keys import LAUNCH_APP_NAME, LAUNCH_APP_PUBLISHER, LAUNCH_APP_VERSION
    from server.run_config import defaults_flat, toml_value

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {toml_value(v)}" for k, v in defaults_flat().items())
    (folder / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{LAUNCH_APP_NAME}"
version = "{LAUNCH_APP_VERSION}"
license = "Apache-2.0"
description = "fedsynth federation run (code comes from the installed fedsynth)"
dependencies = []

[tool.flwr.app]
publisher = "{LAUNCH_APP_PUBLISHER}"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
{config}
""")
    return folder


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``--run-config`` text, after the run configuration accepted ``values`` (an unknown or
    mistyped key, or a bad value, is refused here with its name, not by Flower or the ServerApp)."""
    from server.run_config import from_flat, toml_value

    from_flat(values)
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


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
    from protocol.flower_private import read_superlink_connection
    from protocol.flower_private import init_http_client_from_connection
    from protocol.flower_private import RegisterNodeRequest
    from protocol.flower_private import public_key_to_bytes

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


def default_flwr_home() -> Path:
    return Path(os.environ.get("FEDSYNTH_FLWR_HOME", Path.home() / ".fedsynth" / "flwr"))
