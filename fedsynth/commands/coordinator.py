"""``fedsynth coordinator``: the Flower SuperLink with TLS, node authentication and a state
database, behind nginx so that only the Fleet API faces the network.

It registers every hospital public key found in ``KEYS/nodes/*.pub`` (and ``--register`` files),
keeps looking for new ones while it runs, and restarts the SuperLink and nginx with backoff if
either dies.

Why nginx: Flower 1.42's SuperLink serves the Fleet API (hospitals), the Control API (``flwr
run``/``ls``, node registration) and the runtime API on one port, has no flag to split them, and
its Control API authenticates no one by default. So the SuperLink listens on 127.0.0.1 only
(``--superlink-port``) and nginx (``fedsynth.fleet_proxy``) listens on ``--address``: from the
network it forwards the Fleet routes alone; on 127.0.0.1 (this host) it forwards everything, so
``fedsynth launch``/``status`` keep working from the coordinator's machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("fedsynth.coordinator")

INSECURE_WARNING = ("RUNNING WITHOUT TLS AND WITHOUT NODE AUTHENTICATION: model weights travel in "
                    "clear text and any machine that reaches this port can join. Use only for a "
                    "local test.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="run the federation's SuperLink (TLS + node auth)")
    p.add_argument("--keys", type=Path, help="folder from `fedsynth certs init` "
                   "(ca.pem, coordinator.pem/.key, nodes/*.pub)")
    p.add_argument("--address", default="0.0.0.0:8000",
                   help="HOST:PORT hospitals dial (nginx: from the network only Flower's Fleet "
                        "API passes; on 127.0.0.1 this host also reaches run submission)")
    p.add_argument("--superlink-port", type=int, default=0, metavar="PORT",
                   help="loopback port of the SuperLink behind the proxy (default: a free one, "
                        "chosen at start)")
    p.add_argument("--state", type=Path, default=Path("coordinator-state"),
                   help="folder for the state database and the Flower CLI connection")
    p.add_argument("--ca-cert", type=Path, help="override KEYS/ca.pem")
    p.add_argument("--cert", type=Path, help="override KEYS/coordinator.pem")
    p.add_argument("--key", type=Path, help="override KEYS/coordinator.key")
    p.add_argument("--register", type=Path, action="append", default=[], metavar="PUB",
                   help="a hospital's public node key to register (repeatable)")
    p.add_argument("--register-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="a folder of hospitals' *.pub node keys to register (repeatable)")
    p.add_argument("--rescan", type=float, default=15.0,
                   help="seconds between looks for new keys in KEYS/nodes")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no node authentication (local tests only; warns loudly)")
    p.add_argument("--log-file", type=Path, help="copy the SuperLink's and nginx's log here")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve the coordinator's Prometheus metrics on this port for as long as "
                        "the coordinator runs: every run's, kept after it ends (0: off; a run's "
                        "own [run] metrics-port serves that run alone, while it lasts)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds (default 127.0.0.1)")
    p.set_defaults(func=run)


def _tls(args: argparse.Namespace):  # noqa: ANN202
    from fedsynth.certs import CertError, FederationKeys, check_server_pair
    from fedsynth.errors import UserError
    from fedsynth.deployment import TLSFiles

    keys = FederationKeys(args.keys) if args.keys else None
    ca = args.ca_cert or (keys.ca_cert if keys else None)
    cert = args.cert or (keys.server_cert if keys else None)
    key = args.key or (keys.server_key if keys else None)
    if ca is None or cert is None or key is None:
        raise UserError("no TLS files: give --keys DIR (from `fedsynth certs init`) or "
                        "--ca-cert/--cert/--key; --insecure runs without TLS for local tests")
    try:
        check_server_pair(ca, cert, key)
    except CertError as exc:
        raise UserError(str(exc)) from None
    return TLSFiles(ca.resolve(), cert.resolve(), key.resolve())


DATABASE = "state.db"
SERVERAPP_LOG = "serverapp.log"  # what runs' ServerApps log (they have no stdout)


def private_database(state: Path) -> Path:
    """``state/state.db``, created (or, from an earlier version, changed) to mode 0600 before
    the SuperLink opens it: it holds the runs, their configurations and the hospitals' replies,
    and Flower creates it with the umask's 0644 (issue 25). SQLite gives its journal and WAL
    files the database's mode, so they are private too; existing ones are changed as well."""
    import os

    db = state / DATABASE
    fd = os.open(db, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-journal", "-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.is_file() and not side.is_symlink():
            side.chmod(0o600)
    return db


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_metrics(args: argparse.Namespace) -> tuple[dict[str, str], Path | None, object]:
    """``--metrics-port``: the daemon's own endpoint, serving what every run's ServerApp records.

    The ServerApp is a process of its run and ends with it (an exporter of its own went down
    before Prometheus saw the last round, and after every run, issue 24); this daemon lives across
    runs. It makes a new multiprocess folder of its own (``client.metrics.prepare_multiproc_dir``,
    the hospital daemon's rule: nothing it did not create is ever emptied) and hands it to the
    SuperLink, whose ServerApps inherit it and write their series there. Returns (environment for
    the SuperLink, folder, HTTP server); nothing when metrics are off.
    """
    from fedsynth.errors import UserError
    from protocol.keys import PROMETHEUS_MULTIPROC_ENV

    if not 0 <= args.metrics_port < 65536:
        raise UserError(f"--metrics-port {args.metrics_port} is not a TCP port")
    if not args.metrics_port:
        return {}, None, None
    from client.metrics import prepare_multiproc_dir
    from server.metrics import start_daemon_exporter

    try:
        folder = prepare_multiproc_dir()
        server = start_daemon_exporter(folder, args.metrics_port, args.metrics_host)
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return {PROMETHEUS_MULTIPROC_ENV: str(folder)}, folder, server


def run(args: argparse.Namespace) -> int:
    from fedsynth.certs import CertError, FederationKeys
    from fedsynth.errors import UserError
    from fedsynth.child_output import child_sink, follow_file
    from fedsynth.deployment import (DeploymentError, register_node_keys, split_address,
                                     superlink_command, superlink_env, wait_for_port,
                                     write_flwr_home)
    from fedsynth.supervisor import Supervisor, stop_on_signals
    from fedsynth.fleet_proxy import ProxyError, ProxyTLS, write_proxy

    tls = None
    if args.insecure:
        for _ in range(3):
            log.warning(INSECURE_WARNING)
    else:
        tls = _tls(args)
    try:
        host, port = split_address(args.address)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    state = args.state.resolve()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new folder is the coordinator's
    try:
        database = private_database(state)
    except OSError as exc:
        raise UserError(f"state database in '{state}': {exc.strerror or exc}") from None
    # The SuperLink (all of Flower's APIs) answers on loopback only; nginx owns --address.
    local = "127.0.0.1"
    link_port = args.superlink_port or _free_loopback_port()
    if link_port == port:
        raise UserError(f"--superlink-port {link_port} is the port of --address {args.address}")
    try:
        proxy = write_proxy(state / "proxy", (host, port), link_port,
                            ProxyTLS(tls.ca_cert, tls.cert, tls.key) if tls else None)
    except ProxyError as exc:
        raise UserError(str(exc)) from None
    proxy.stop_stale()
    # The coordinator's own flwr connection and key registration go straight to the SuperLink.
    flwr_home = state / "flwr"
    write_flwr_home(flwr_home, f"{local}:{link_port}", tls.ca_cert if tls else None)

    # Every run's ServerApp appends its lines (strategy, rounds, failures) here, followed below
    # into this daemon's log. Emptied at each start: an earlier start logged what it held, and
    # its ServerApps ended with its SuperLink.
    from protocol.keys import SERVERAPP_LOG_ENV

    serverapp_log = state / SERVERAPP_LOG
    try:
        os.close(os.open(serverapp_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                         | getattr(os, "O_NOFOLLOW", 0), 0o600))
    except OSError as exc:
        raise UserError(f"coordinator log for runs '{serverapp_log}': {exc.strerror or exc}"
                        ) from None
    log_fh = args.log_file.open("a", buffering=1) if args.log_file else None
    metrics_env, metrics_dir, metrics_server = start_metrics(args)

    link = Supervisor("superlink", superlink_command(f"{local}:{link_port}", database,
                                                    tls, node_auth=tls is not None),
                      env={**superlink_env(), **metrics_env,
                           SERVERAPP_LOG_ENV: str(serverapp_log)},
                      sink=child_sink("superlink", log_fh))
    front = Supervisor("fleet-proxy", proxy.command(), sink=child_sink("proxy", log_fh))

    def stop() -> None:
        link.stop()
        front.stop()

    stop_on_signals(stop)
    registered: set[Path] = set()

    def pending() -> list[Path]:
        keys = FederationKeys(args.keys).node_public_keys() if args.keys else []
        extra = [p for d in args.register_dir for p in sorted(Path(d).glob("*.pub"))]
        return [p for p in [*keys, *extra, *args.register] if p.resolve() not in registered]

    def registrar() -> None:
        """Register new hospital keys once the SuperLink answers; retry soon after a failure."""
        while not link.stopping():
            todo = pending() if tls is not None else []
            ok = True
            if todo and link.alive():
                try:
                    wait_for_port(local, link_port, 60, link.alive)
                    for name, node in register_node_keys(todo, flwr_home).items():
                        log.info("hospital key %s registered (node %s)", name, node)
                    registered.update(p.resolve() for p in todo)
                except (DeploymentError, CertError) as exc:
                    log.error("%s", exc)
                    ok = False
            link.sleep(args.rescan if ok and not (todo and not link.alive()) else 2.0)

    if tls is not None and not args.register and not (args.keys and
                                                       FederationKeys(args.keys).nodes.is_dir()):
        log.warning("no hospital keys to register yet: add KEYS/nodes/NAME.pub "
                    "(`fedsynth certs node`) or --register")
    # a killed nginx leaves its unix sockets behind, and a new one cannot bind over them
    front_thread = threading.Thread(target=front.run_forever, daemon=True,
                                    kwargs={"before_start": proxy.clear_sockets})
    front_thread.start()
    threading.Thread(target=registrar, daemon=True).start()
    threading.Thread(target=follow_file, daemon=True,
                     args=(serverapp_log, child_sink("serverapp", log_fh), link.stopping)
                     ).start()
    log.info("coordinator listening on %s (%s; Fleet API only from the network, nginx config "
             "%s); SuperLink on %s:%d; state in %s", args.address,
             "TLS + node authentication" if tls else "INSECURE", proxy.config, local, link_port,
             state)
    code = link.run_forever()
    front.stop()
    front_thread.join(timeout=30)
    proxy.remove_socket_dir()
    if metrics_server is not None:
        from client.metrics import cleanup

        metrics_server.shutdown()
        cleanup(metrics_dir)
    if log_fh is not None:
        log_fh.close()
    return 0 if link.stopping() else code
