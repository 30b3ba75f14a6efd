"""A hospital's Prometheus metrics, written by the ClientApp and served by the hospital daemon.

The SuperNode starts a fresh ``flwr-clientapp`` process for every message, so the series live in
prometheus-client's multiprocess mode: each ClientApp process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (which must be in its environment before ``prometheus_client`` is
imported: the daemon sets it for the SuperNode it starts), and the long-lived exporter started by
``start_exporter`` merges those files on every scrape. Gauges use the ``mostrecent`` mode, so a
value written by the process of the last message wins.

Labels are bounded and private by construction: ``hospital`` is the hospital's own configured
name (checked against ``NAME_PATTERN``), ``modality`` is one of a fixed list of DICOM modality
codes, ``reason`` one of the scan's fixed skip reasons, ``device`` ``cpu``/``cuda``/``mps``. No
path, file name or DICOM attribute beyond the modality code ever becomes a label.

Recording never raises: a metrics problem is logged and the round goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess
from protocol.keys import NAME_PATTERN, check_name  # noqa: F401 - one definition, shared
from protocol.keys import HOSPITAL_GAUGES, PROMETHEUS_MULTIPROC_ENV, gauge_values

log = logging.getLogger(__name__)

MULTIPROC_ENV = PROMETHEUS_MULTIPROC_ENV
# Simulation only: folder where each virtual hospital writes ``<node-id>.name`` so the
# coordinator's exporter can label per-hospital series by name (server.metrics.HospitalNames).
SIM_NAMES_ENV = "FEDSYNTH_SIM_NODE_NAMES"
DEFAULT_HOST = "127.0.0.1"

# A hospital name fit for a metric label: short, no path separators, no spaces.
INVALID_NAME = "invalid-name"
MODALITIES = ("CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "OT")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def label_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        log.warning("%s; metrics use %r", exc, INVALID_NAME)
        return INVALID_NAME


def modality_label(modality: str) -> str:
    m = str(modality).strip().upper()
    return m if m in MODALITIES else "other"


def skip_reason_label(reason: str) -> str:
    from .dicom import SKIP_REASONS

    return reason if reason in SKIP_REASONS else "other"


class _Series:
    """The metric objects of one process; created on first use (after the env is final)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        h = ["hospital"]
        self.steps = Counter("fedsynth_hospital_local_steps", "Local GAN steps trained.", h,
                             registry=r)
        self.messages = Counter("fedsynth_hospital_messages", "Rounds handled, by kind and outcome.",
                                h + ["kind", "outcome"], registry=r)
        self.signature_failures = Counter(
            "fedsynth_hospital_signature_failures",
            "Global models refused because the pinned coordinator key did not sign them.", h,
            registry=r)
        self.refusals = Counter(
            "fedsynth_hospital_refused_messages",
            "Messages this hospital refused by its own policy (reason: unsigned, signature, "
            "replay, replay-record, never-send, ua-policy, dp-budget, dp-ledger, bundle-*).",
            h + ["reason"], registry=r)
        # the gauges of reported scalars, declared in protocol/keys.py (name, help, labels)
        self.reported = {g.name: Gauge(g.name, g.help, h + list(g.labels), registry=r,
                                       multiprocess_mode="mostrecent")
                         for g in HOSPITAL_GAUGES}
        self.step_seconds = Histogram("fedsynth_hospital_step_seconds",
                                      "Mean wall time of one local step, once per round.", h,
                                      buckets=STEP_BUCKETS, registry=r)
        self.memory = Gauge("fedsynth_hospital_device_memory_bytes",
                            "Peak memory of the last training round on its device (CPU: peak "
                            "resident set of the process).", h + ["device"], registry=r,
                            multiprocess_mode="mostrecent")
        self.usable = Gauge("fedsynth_hospital_scan_usable_slices",
                            "Usable slices in the local data scan, by modality.",
                            h + ["modality"], registry=r, multiprocess_mode="mostrecent")
        self.skipped = Gauge("fedsynth_hospital_scan_skipped_files",
                             "Files the local data scan skipped, by reason.", h + ["reason"],
                             registry=r, multiprocess_mode="mostrecent")
        self.last_round = Gauge("fedsynth_hospital_last_successful_round",
                                "Last round this hospital completed, by kind.", h + ["kind"],
                                registry=r, multiprocess_mode="mostrecent")
        self.last_success = Gauge("fedsynth_hospital_last_success_timestamp_seconds",
                                  "Unix time this hospital last completed a round.", h,
                                  registry=r, multiprocess_mode="mostrecent")


_SERIES: _Series | None = None

# Counters of rare events that exist at 0 before anything happened, so "no failure" is a value
# and the alerts' increase() sees the first one (a counter born at 1 has no increase): the
# daemon's exporter serves them from its start (``FedsynthOnly``), before the first task, and
# every training round writes them too. (``_Series`` attribute, label values after hospital.)
ZERO_SERIES = (("signature_failures", ()), ("refusals", ("dp-budget",)),
               ("messages", ("train", "error")), ("messages", ("evaluate", "error")))


def zero_families(hospital: str) -> list[Any]:
    """``ZERO_SERIES`` of ``hospital`` as metric families at 0, made without creating a value
    (the daemon process never records: its ClientApps do, in their own files)."""
    from prometheus_client.core import CounterMetricFamily

    defs = _Series(None)  # unregistered, and no labels given: nothing is written anywhere
    name = label_name(hospital)
    families: dict[str, Any] = {}
    for attr, values in ZERO_SERIES:
        metric = getattr(defs, attr)
        desc = metric.describe()[0]
        family = families.setdefault(desc.name, CounterMetricFamily(
            desc.name, desc.documentation, labels=metric._labelnames))  # noqa: SLF001
        family.add_metric([name, *values], 0.0)
    return list(families.values())


def series() -> _Series:
    global _SERIES
    if _SERIES is None:
        from prometheus_client import REGISTRY

        _SERIES = _Series(REGISTRY)
    return _SERIES


def _safely(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics must never sink a round
            log.warning("hospital metrics: %s failed", fn.__name__, exc_info=True)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def reset_peak_memory(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: Any) -> float:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0  # KiB on Linux


@_safely
def record_train(hospital: str, server_round: int, metrics: Mapping[str, float],
                 report: Any, device: Any) -> None:
    """One finished training round: steps, throughput, step time, memory, losses, scan counts."""
    s, name = series(), label_name(hospital)
    steps = float(metrics.get("steps", 0))
    s.steps.labels(name).inc(steps)
    _set_reported(s, name, "train", metrics)
    seconds = float(metrics.get("train-seconds", float("nan")))
    if steps > 0:
        s.step_seconds.labels(name).observe(seconds / steps)
    s.memory.labels(name, getattr(device, "type", "cpu")).set(peak_memory_bytes(device))
    if report is not None:
        record_scan(name, report)
    _success(s, name, "train", server_round)
    for attr, values in ZERO_SERIES:  # a daemon without metrics-port serves none before this
        getattr(s, attr).labels(name, *values).inc(0)


@_safely
def record_evaluate(hospital: str, server_round: int, metrics: Mapping[str, float]) -> None:
    s, name = series(), label_name(hospital)
    _set_reported(s, name, "evaluate", metrics)
    _success(s, name, "evaluate", server_round)


def _set_reported(s: _Series, name: str, section: str, metrics: Mapping[str, float]) -> None:
    """The ``HOSPITAL_GAUGES`` of ``section`` (train / evaluate) from the round's metrics."""
    for gauge in HOSPITAL_GAUGES:
        if gauge.section == section:
            for values, value in gauge_values(gauge, metrics):
                s.reported[gauge.name].labels(name, *values).set(float(value))


def _success(s: _Series, name: str, kind: str, server_round: int) -> None:
    s.messages.labels(name, kind, "ok").inc()
    s.last_round.labels(name, kind).set(server_round)
    s.last_success.labels(name).set(time.time())


def record_scan(hospital: str, report: Any) -> None:
    """Scan counts by modality code and fixed skip reason (every reason shown, 0 included)."""
    from .dicom import SKIP_REASONS

    s, name = series(), label_name(hospital)
    usable: dict[str, int] = {}
    for modality, n in report.usable_by_modality.items():
        usable[modality_label(modality)] = usable.get(modality_label(modality), 0) + int(n)
    for modality, n in usable.items():
        s.usable.labels(name, modality).set(n)
    skipped = dict.fromkeys(SKIP_REASONS + ("other",), 0)
    for reason, n in report.skipped.items():
        skipped[skip_reason_label(reason)] += int(n)
    for reason, n in skipped.items():
        s.skipped.labels(name, reason).set(n)


@_safely
def record_failure(hospital: str, kind: str) -> None:
    series().messages.labels(label_name(hospital), kind, "error").inc()


@_safely
def record_signature_failure(hospital: str) -> None:
    series().signature_failures.labels(label_name(hospital)).inc()


REFUSAL_REASONS = ("unsigned", "signature", "replay", "never-send", "ua-policy", "bundle-name",
                   "bundle-version", "bundle-size", "bundle-hash", "bundle-not-approved",
                   "bundle-code", "bundle-malformed", "bundle-components", "dp-budget",
                   "dp-ledger", "replay-record", "evaluation-repeat", "evaluation-limit",
                   "ceiling-parameters", "ceiling-batch", "ceiling-steps", "ceiling-seconds",
                   "ceiling-memory")


@_safely
def record_refusal(hospital: str, reason: str) -> None:
    """A message refused by the hospital's policy; ``reason`` is one of ``REFUSAL_REASONS``."""
    series().refusals.labels(label_name(hospital),
                             reason if reason in REFUSAL_REASONS else "other").inc()


@_safely
def note_identity(node_id: int, hospital: str) -> None:
    """Simulation only: tell the coordinator's exporter which name this node id has."""
    folder = os.environ.get(SIM_NAMES_ENV)
    if not folder:
        return
    path = Path(folder) / f"{int(node_id)}.name"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(label_name(hospital))
    os.replace(tmp, path)


def prepare_multiproc_dir(parent: Path | None = None) -> Path:
    """A NEW, empty multiprocess folder of this daemon's own, exported for child processes.

    Call it before the SuperNode starts: only processes started afterwards inherit it. It is
    always a fresh ``fedsynth-metrics-*`` folder, made inside ``parent`` (default:
    ``$PROMETHEUS_MULTIPROC_DIR`` when set, else the system's temporary folder), so stale values of
    an earlier run cannot survive and nothing that the daemon did not create is ever emptied or
    removed (``cleanup`` removes only this folder).
    """
    raw = parent or (Path(os.environ[MULTIPROC_ENV]) if os.environ.get(MULTIPROC_ENV) else None)
    if raw is not None:
        raw = Path(raw)
        if raw.exists() and not raw.is_dir():
            raise ValueError(f"metrics folder {raw} is not a directory")
        raw.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="fedsynth-metrics-", dir=raw))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


class DaemonRestarts:
    """``fedsynth_supernode_restarts_total{hospital, reason}``: the daemon's own counter.

    Counted in the daemon process (not in a ClientApp's multiprocess files: the daemon imported
    prometheus-client before it chose the multiprocess folder), and served by ``start_exporter``
    beside the merged ClientApp series. ``reason`` is one of ``fedsynth.supervisor``'s
    ``RESTART_REASONS``: ``exited`` (the SuperNode ended) or ``gave-up`` (it logged that it gave
    up reconnecting and was ended).
    """

    REASONS = ("exited", "gave-up")

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], float] = {}

    def inc(self, hospital: str, reason: str | None) -> None:
        name = label_name(hospital)
        with self._lock:
            for r in self.REASONS:  # every reason's series exists from the start, at 0
                self._counts.setdefault((name, r), 0.0)
            if reason is not None:
                key = (name, reason if reason in self.REASONS else "other")
                self._counts[key] = self._counts.get(key, 0.0) + 1.0

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "fedsynth_supernode_restarts",
            "SuperNode restarts by this hospital's daemon (reason: exited, or gave-up: it logged "
            "that it gave up reconnecting and was ended).", labels=["hospital", "reason"])
        with self._lock:
            for (name, reason), value in sorted(self._counts.items()):
                family.add_metric([name, reason], value)
        yield family


RESTARTS = DaemonRestarts()


@_safely
def record_supernode_restart(hospital: str, reason: str | None) -> None:
    """The daemon restarted its SuperNode for ``reason`` (None: only create the series)."""
    RESTARTS.inc(hospital, reason)


class FedsynthOnly:
    """Only the ``fedsynth_`` families of a collector, plus ``baseline`` series it lacks.

    Every library in a ClientApp process (and Ray's own processes in simulation) that uses
    prometheus-client writes into the same multiprocess folder; only fedsynth's series, whose
    labels this module bounds, are served. ``baseline`` (the daemon's ``zero_families``) fills
    in the series no ClientApp has written yet, so ``/metrics`` has them before the first task;
    a series a ClientApp wrote wins (one sample per series: Prometheus refuses duplicates).
    """

    def __init__(self, inner: Any, baseline: list[Any] | None = None) -> None:
        self._inner = inner
        self._baseline = baseline or []

    def collect(self) -> Any:
        families = [m for m in self._inner.collect() if m.name.startswith("fedsynth_")]
        by_name = {m.name: m for m in families}
        for base in self._baseline:
            have = by_name.get(base.name)
            if have is None:
                families.append(base)
                continue
            seen = {(x.name, tuple(sorted(x.labels.items()))) for x in have.samples}
            have.samples.extend(x for x in base.samples
                                if (x.name, tuple(sorted(x.labels.items()))) not in seen)
        return families


def start_exporter(port: int, host: str = DEFAULT_HOST, multiproc_dir: Path | None = None,
                   hospital: str | None = None) -> Any:
    """Serve the merged metrics of every ClientApp process at ``http://host:port/metrics``.

    ``multiproc_dir`` (default: ``$PROMETHEUS_MULTIPROC_DIR``, else a new temporary folder) is
    emptied and exported in this process's environment, so call this before starting the
    SuperNode. ``hospital`` (the daemon's configured name): its ``ZERO_SERIES`` are served from
    the start. Returns the HTTP server (``shutdown()`` stops it).
    """
    if not 0 <= port < 65536:
        raise ValueError(f"metrics port {port} is not a TCP port (0-65535)")
    folder = prepare_multiproc_dir(multiproc_dir)
    registry = CollectorRegistry()
    registry.register(FedsynthOnly(multiprocess.MultiProcessCollector(None, path=str(folder)),
                                   zero_families(hospital) if hospital else None))
    registry.register(RESTARTS)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve hospital metrics on {host}:{port}: {exc.strerror}") from exc
    server.multiproc_dir = folder  # type: ignore[attr-defined]
    log.info("hospital metrics on http://%s:%d/metrics (from %s)", host, server.server_port,
             folder)
    return server


def cleanup(folder: Path) -> None:
    """Remove a multiprocess folder made by ``prepare_multiproc_dir`` (daemon shutdown).

    Only a folder named as ``prepare_multiproc_dir`` names its own, holding nothing but
    prometheus-client's ``*.db`` files: anything else is left where it is.
    """
    folder = Path(folder)
    if not folder.name.startswith("fedsynth-metrics-") or not folder.is_dir():
        log.warning("not removing metrics folder %s: not one this daemon created", folder)
        return
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink() and f.suffix == ".db":
            f.unlink()
    try:
        folder.rmdir()
    except OSError:
        log.warning("metrics folder %s holds files that are not metrics; left in place", folder)
