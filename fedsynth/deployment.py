"""Running Flower's SuperLink and SuperNode as supervised processes.

Everything about process management lives here: the command lines (TLS, node authentication,
state database, dependency installation off), the Flower CLI connection file, readiness waits, a
pre-flight TLS probe that turns "wrong certificate" into one clear line, node registration, the
minimal app folder ``flwr run`` ships (no code: hospitals run the fedsynth they installed), and
the spawn/kill helpers ``fedsynth.supervisor`` uses to keep a child running.

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


# ---- processes ----
#
# Children die with their daemon. A daemon killed hard (SIGKILL, OOM killer, `kill -9` of its
# process group) runs no cleanup, and its children live in sessions of their own (so that a
# terminal's Ctrl-C reaches only the daemon). Each child therefore runs under a *guard*: a small
# process of ours (``python -m fedsynth.deployment guard DAEMON_PID -- COMMAND``) that
#
# * gets SIGTERM from the kernel when the daemon dies (``prctl(PR_SET_PDEATHSIG)``; the kernel
#   sends it when the *thread* that forked the guard ends, so every guard is forked by one
#   long-lived thread, ``_SPAWNER``, never by a supervisor's own thread), and checks once that
#   the daemon is still its parent (the daemon may have died before the prctl);
# * is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever its child leaves behind (Flower's
#   flower-superexec and flwr-serverapp, nginx's worker) is re-parented to the guard, which reaps
#   it (Flower's own parent monitors then notice their parent is gone, even where PID 1 reaps
#   nothing) and, when the daemon dies or the child exits, ends it: SIGTERM, then SIGKILL;
# * starts its child with PDEATHSIG SIGKILL, in case the guard itself is killed.
#
# SIGTERM first matters: a SuperNode that gets SIGTERM tells the SuperLink it leaves
# (DeactivateNode), so the coordinator gives up on that hospital at once instead of waiting for
# two missed heartbeats (60 s).

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GUARD_GRACE_S = 5.0  # SIGTERM → SIGKILL for what a guard ends
_libc_handle: Any = None


def _libc() -> Any:
    """libc for ``prctl`` (Linux only; ``None`` elsewhere). Loaded before any fork: a forked child
    must not take the loader's locks."""
    global _libc_handle  # noqa: PLW0603 - one handle per process
    if _libc_handle is None and sys.platform.startswith("linux"):
        import ctypes

        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies."""
    libc = _libc()
    return libc is not None and libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _die_with(parent_pid: int, sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when ``parent_pid`` (the forking thread) dies."""
    if _libc() is None:
        return None

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent_pid:  # the parent died before the prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Spawner:
    """One long-lived thread forks every supervised child (see the section's comment): a child
    forked by a supervisor's thread would get its death signal when that thread ends."""

    def __init__(self) -> None:
        import queue

        self._jobs: Any = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="fedsynth-spawner",
                                                daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return subprocess.Popen(args, **kwargs)
        done = threading.Event()
        box: dict[str, Any] = {}
        self._jobs.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _serve(self) -> None:
        while True:
            args, kwargs, box, done = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()


_SPAWNER = _Spawner()


def guarded(command: Sequence[str], daemon_pid: int | None = None) -> list[str]:
    """``command`` under a guard that ends it (and what it started) when the daemon dies."""
    return [sys.executable, "-m", "fedsynth.deployment", "guard",
            str(daemon_pid or os.getpid()), "--", *command]


def spawn(command: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start a child that dies with this process: forked by the spawner thread, guarded on Linux
    (the guard is started with PDEATHSIG SIGTERM and checks it is still our child)."""
    if _libc() is not None:
        command = guarded(command)
    return _SPAWNER.popen(list(command), **kwargs)


def _end_descendants(root: int, grace: float) -> None:
    """SIGTERM every descendant of ``root``, SIGKILL what is left after ``grace``, reap."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        pids = _descendants(root)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap_any()
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.05)
    _reap_any()


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _reap_any() -> list[tuple[int, int]]:
    """Reap every child that has exited (a subreaper's adopted orphans included)."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def guard_main(daemon_pid: int, command: Sequence[str], grace: float = GUARD_GRACE_S) -> int:
    """The guard process (see the section's comment); returns the child's exit status."""
    stop = {"why": ""}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["why"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, on_signal)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != daemon_pid:
        return 1  # the daemon is already gone: start nothing
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        child = subprocess.Popen(list(command), preexec_fn=_die_with(os.getpid()))
    except OSError as exc:
        sys.stderr.write(f"cannot start {command[0]}: {exc}\n")
        return 127
    code: int | None = None
    while code is None and not stop["why"]:
        for pid, status in _reap_any():
            if pid == child.pid:
                code = os.waitstatus_to_exitcode(status)
                child.returncode = code
        if code is None and os.getppid() != daemon_pid:
            stop["why"] = "daemon gone"
        if code is None and not stop["why"]:
            time.sleep(0.1)
    _end_descendants(os.getpid(), grace)
    if code is None:
        code = child.returncode if child.returncode is not None else 128 + signal.SIGTERM
    return code if code >= 0 else 128 - code


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


# ---- the launch file (``fedsynth launch CONFIG`` / ``fedsynth status CONFIG``) ----

PATH_KEYS = ("run-dir", "signing-key", "hospital-names")
COORDINATOR_KEYS = ("address", "root-certificates", "insecure")


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
        unknown_sections = sorted(set(data) - {"coordinator", "run"})
        if unknown_sections:
            raise ValueError(f"launch file '{path}': unknown section(s) "
                             f"{', '.join(f'[{x}]' for x in unknown_sections)} (known: "
                             "[coordinator], [run])")
        coord = data.get("coordinator", {})
        extra = sorted(set(coord) - set(COORDINATOR_KEYS))
        if extra:
            hint = (" (the run's metrics endpoint is [run] metrics-port)"
                    if "metrics-port" in extra else "")
            raise ValueError(f"launch file '{path}': unknown [coordinator] key(s) "
                             f"{', '.join(extra)}; known: {', '.join(COORDINATOR_KEYS)}{hint}")
        if not coord.get("address"):
            raise ValueError(f"launch file '{path}': [coordinator] address is missing")
        insecure = bool(coord.get("insecure", False))
        root = coord.get("root-certificates")
        if not insecure and not root:
            raise ValueError(f"launch file '{path}': [coordinator] root-certificates is missing "
                             "(the federation's ca.pem), or set insecure = true")
        from server.run_config import ALIASES, from_flat

        run = dict(data.get("run", {}))
        try:
            from_flat(run)  # unknown or mistyped keys fail here, by name, before submission
        except ValueError as exc:
            raise ValueError(f"launch file '{path}': {exc}") from None
        run = {ALIASES.get(k, k): v for k, v in run.items()}
        for key in PATH_KEYS:
            if run.get(key):
                p = Path(str(run[key])).expanduser()
                run[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
        for key, value in list(run.items()):
            if isinstance(value, list):  # classes = ["a", "b"]: Flower's run config is scalars
                run[key] = (";" if key.endswith("patterns") else ",").join(map(str, value))
        root_path = None
        if not insecure:
            root_path = Path(str(root)).expanduser()
            root_path = root_path if root_path.is_absolute() else (path.parent / root_path)
        return cls(address=str(coord["address"]), root_certificates=root_path, run=run,
                   source=path)


def default_flwr_home() -> Path:
    return Path(os.environ.get("FEDSYNTH_FLWR_HOME", Path.home() / ".fedsynth" / "flwr"))


def _main(argv: Sequence[str]) -> int:
    """``python -m fedsynth.deployment guard DAEMON_PID -- COMMAND...`` (see ``spawn``)."""
    if len(argv) >= 4 and argv[0] == "guard" and argv[1].isdigit() and argv[2] == "--":
        return guard_main(int(argv[1]), argv[3:])
    sys.stderr.write("usage: python -m fedsynth.deployment guard DAEMON_PID -- COMMAND...\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
