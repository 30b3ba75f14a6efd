"""``fedsynth hospital``: the hospital daemon, a supervised Flower SuperNode.

One outbound TLS connection to the coordinator; the SuperNode's own runtime port binds 127.0.0.1.
Settings come from one TOML file (see ``client.settings.DaemonSettings``); flags override it.
Configuration mistakes end with one line and exit 2; a coordinator that is down, or a SuperNode
that dies, is retried with exponential backoff.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("fedsynth.hospital")

REFUSED_HINT = ("the coordinator refused this hospital's node key (Flower exit code 305): either "
                "it is not registered (give the matching .pub file to the coordinator), or the "
                "coordinator still marks this node online from a session that ended without "
                "saying goodbye (a killed daemon): it is accepted again once that session's "
                "heartbeat expires, about a minute later")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hospital", help="run this hospital's daemon (a Flower SuperNode)")
    p.add_argument("config", type=Path, nargs="?", help="settings file (TOML)")
    p.add_argument("--coordinator", help="coordinator HOST:PORT")
    p.add_argument("--root-certificates", type=Path, help="the federation's CA (ca.pem)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="no TLS (local tests only)")
    p.add_argument("--node-key", type=Path, help="this hospital's OpenSSH EC private key")
    p.add_argument("--port", type=int, help="local runtime port of the SuperNode (127.0.0.1)")
    p.add_argument("--metrics-port", type=int,
                   help="serve this hospital's Prometheus metrics on this port (0: off)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--cache-dir", type=Path, help="preprocessed slices (disposable)")
    p.add_argument("--state-dir", type=Path,
                   help="kept state: the privacy ledger, replay records (default: "
                        "$STATE_DIRECTORY, which systemd's StateDirectory= sets)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int)
    p.add_argument("--modalities", help="comma separated, e.g. MR,CT")
    p.add_argument("--name")
    p.add_argument("--model-public-key", type=Path, help="the coordinator's model-signing.pub")
    p.add_argument("--insecure-accept-unsigned-models", action="store_true", default=None,
                   help="act on UNSIGNED coordinator messages (no model-public-key; local tests "
                        "only, warns loudly)")
    p.add_argument("--never-send", help="components that never leave this hospital, comma "
                   "separated (e.g. discriminator,d_a,d_b; ua-gan refuses UA-GAN rounds)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="give up after this many restarts (default: never)")
    p.add_argument("--log-file", type=Path, help="copy the SuperNode's log here")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    def s(v: object) -> object:
        return str(v) if isinstance(v, Path) else v

    return {"coordinator.address": args.coordinator,
            "coordinator.root-certificates": s(args.root_certificates),
            "coordinator.insecure": args.insecure,
            "node.key": s(args.node_key), "node.port": args.port,
            "node.metrics-port": args.metrics_port,
            "hospital.accept-unsigned-models": args.insecure_accept_unsigned_models,
            "hospital.never-send": args.never_send,
            "hospital.data-dir": s(args.data_dir), "hospital.cache-dir": s(args.cache_dir),
            "hospital.state-dir": s(args.state_dir),
            "hospital.device": args.device, "hospital.threads": args.threads,
            "hospital.modalities": args.modalities, "hospital.name": args.name,
            "hospital.model-public-key": s(args.model_public_key)}


def load_settings(args: argparse.Namespace):  # noqa: ANN201
    """Settings checked before anything starts: each mistake is one ``UserError`` line."""
    from client.settings import DaemonSettings, SettingsError
    from fedsynth.certs import CertError, check_node_private_key, load_certificate
    from fedsynth.errors import UserError

    try:
        settings = DaemonSettings.load(args.config, _overrides(args))
        settings.hospital.check_local()
        if settings.root_certificates is not None:
            load_certificate(settings.root_certificates, "coordinator CA certificate")
        if settings.node_key is not None:
            check_node_private_key(settings.node_key)
        elif not settings.insecure:
            raise UserError("node key is missing ([node] key or --node-key): the coordinator "
                            "only accepts registered hospitals")
        from fedsynth.deployment import format_node_config

        format_node_config(settings.hospital.to_node_config())  # e.g. a space in a value
    except (SettingsError, CertError, ValueError) as exc:
        raise UserError(str(exc)) from None
    missing = [m for m in ("radiomics", "frd_score") if importlib.util.find_spec(m) is None]
    if missing:  # the evaluation's FRD would fail at the first round, not here
        raise UserError(f"this fedsynth install lacks {', '.join(missing)} (the FRD evaluation "
                        "needs them): reinstall fedsynth with pip, which brings its declared "
                        "dependencies, or `pip install pyradiomics-bhklab==3.1.4 frd-score`")
    if settings.hospital.model_public_key is None:
        if not settings.hospital.accept_unsigned_models:
            raise UserError("no model-public-key pinned ([hospital] model-public-key or "
                            "--model-public-key, the coordinator's model-signing.pub): this "
                            "hospital would act on messages anyone could have written. For a "
                            "local test only: --insecure-accept-unsigned-models")
        for _ in range(3):
            log.warning("INSECURE: accepting UNSIGNED messages from the coordinator "
                        "(accept-unsigned-models): anyone who reaches this hospital's "
                        "connection decides what it trains and sends. Local tests only.")
    return settings


def start_metrics(port: int, hospital: str | None = None) -> tuple[dict[str, str], Path | None]:
    """Start the hospital's metrics exporter; returns (environment for the SuperNode, folder).

    The prometheus multiprocess folder is always a new one of the daemon's own
    (``client.metrics.prepare_multiproc_dir``), made inside ``$PROMETHEUS_MULTIPROC_DIR`` when
    that is set: the daemon never empties or removes a folder it did not create (an unset
    variable once made it empty its working directory).
    """
    if not port:
        return {}, None
    if importlib.util.find_spec("client.metrics") is None:
        log.warning("--metrics-port %d given but this fedsynth has no client.metrics module; "
                    "metrics are off", port)
        return {}, None
    from client import metrics

    server = metrics.start_exporter(port, hospital=hospital)  # its series exist from the start
    folder = Path(server.multiproc_dir)
    return {"PROMETHEUS_MULTIPROC_DIR": str(folder)}, folder


def restart_recorder(hospital: str, metrics_dir: Path | None):  # noqa: ANN201
    """``on_restart`` for the SuperNode's supervisor: the restart counter (metrics on only)."""
    if metrics_dir is None:
        return None
    from client import metrics

    metrics.record_supernode_restart(hospital, None)  # every reason's series exists, at 0
    return lambda reason: metrics.record_supernode_restart(hospital, reason)


def run(args: argparse.Namespace) -> int:
    from fedsynth.errors import UserError
    from fedsynth.child_output import child_sink
    from fedsynth.deployment import (NODE_REFUSED_CODE, DeploymentError, child_env,
                                     executor_command, probe_coordinator, supernode_command)
    from fedsynth.supervisor import SUPERNODE_GAVE_UP, Supervisor, stop_on_signals

    settings = load_settings(args)
    try:
        metrics_env, metrics_dir = start_metrics(settings.metrics_port, settings.hospital.name)
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    env = child_env(metrics_env)
    log_fh = args.log_file.open("a", buffering=1) if args.log_file else None
    refused = {"seen": False}

    def on_line(line: str) -> None:
        if f"Exit Code: {NODE_REFUSED_CODE}" in line:
            refused["seen"] = True
            log.error("%s (%s)", REFUSED_HINT, settings.node_key)

    # A SuperNode that logs that it gave up reconnecting (Flower does on any TLS error, e.g. a
    # flooded coordinator's proxy) stays alive doing nothing: it is restarted like a dead one,
    # and every restart is counted on /metrics (fedsynth_supernode_restarts_total{reason}).
    node = Supervisor(
        "supernode",
        supernode_command(settings.coordinator, settings.root_certificates, settings.node_key,
                          settings.port, settings.hospital.to_node_config()),
        env=env, on_line=on_line, sink=child_sink("supernode", log_fh),
        max_restarts=args.max_restarts, gave_up_markers=SUPERNODE_GAVE_UP,
        on_restart=restart_recorder(settings.hospital.name, metrics_dir))
    # Runs the SuperNode's tasks in one long-lived process; restarted like the SuperNode if it
    # dies (a crash mid-round fails that round's reply, as a crashed Flower process would).
    executor = Supervisor("executor", executor_command(settings.port, os.getpid(),
                                                       settings.approved_apps), env=env,
                          sink=child_sink("executor", log_fh), max_restarts=args.max_restarts)
    threading.Thread(target=executor.run_forever, name="executor", daemon=True).start()

    def stop_all() -> None:
        node.stop()
        executor.stop()

    stop_on_signals(stop_all)

    def preflight() -> None:
        try:
            probe_coordinator(settings.coordinator, settings.root_certificates)
        except DeploymentError as exc:
            if type(exc) is DeploymentError:  # wrong certificate: retrying cannot help
                node.stop()
                raise UserError(str(exc)) from None
            raise

    log.info("hospital %s → coordinator %s (%s)", settings.hospital.name, settings.coordinator,
             "INSECURE" if settings.insecure else "TLS")
    try:
        code = node.run_forever(before_start=preflight)
    finally:
        executor.stop()
        executor.terminate()
        if log_fh is not None:
            log_fh.close()
        if metrics_dir is not None:
            from client import metrics

            metrics.cleanup(metrics_dir)
    if node.unreachable is not None:  # --max-restarts spent on a coordinator nobody answers at
        raise UserError(f"{node.unreachable}; gave up after {node.restarts + 1} tries "
                        f"(--max-restarts {args.max_restarts}): check [coordinator] address")
    if node.stopping():
        return 0
    return 3 if refused["seen"] else (code or 1)
