"""The coordinator's Prometheus metrics: an observer of finished rounds and a metered Grid.

Flower exports no metrics of its own, so the coordinator does. Everything here follows
Prometheus's naming conventions (``fedsynth_`` prefix, ``_total`` counters, base units in the
name) and keeps label values bounded:

* per-hospital series carry one label, ``hospital``, whose value is the hospital's *registered
  name* (``HospitalNames``), never a Flower node id, a path, or anything a hospital sent;
* a node id with no registered name is shown as ``unnamed-K`` (K in order of first appearance, at
  most ``max_unnamed`` of them, then ``unnamed-overflow``), so a churn of unknown nodes cannot
  blow up the series count;
* reject reasons are mapped onto a fixed list (``REJECT_REASONS``).

Names come from the coordinator's registry in deployment (the SuperLink lists each node with the
name ``fedsynth coordinator`` registered its key under, ``server.grid.PromptGrid.node_name``: the
same names metrics.jsonl's rows carry) and, in simulation, from a folder where each virtual
hospital writes its own node id → name file (see ``client.metrics.note_identity``).

Where the series live (issue 24): a run's ServerApp is a process that ends with the run, so an
exporter inside it dies before Prometheus scrapes the last round, and its ``up`` goes to 0 after
every run. Under ``fedsynth coordinator --metrics-port`` the ServerApp therefore only *records*:
its environment names a prometheus-client multiprocess folder of the daemon's
(``PROMETHEUS_MULTIPROC_ENV``), every value is written to files there, and the long-lived daemon
serves them (``start_daemon_exporter``), before the first run, during each and after the last.
Gauges of a finished run keep their last value (``mostrecent``); the two that describe *the
running* federation (``fedsynth_run_info``, ``fedsynth_rounds_planned``) are ``live`` series that
leave with the ServerApp's process, so the stalled-round alert cannot fire between runs.
Counters add up over the runs of one daemon, as Prometheus counters should.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from protocol.keys import check_name  # one definition of a valid hospital label
from protocol.keys import PROMETHEUS_MULTIPROC_ENV
from protocol.keys import COORDINATOR_HOSPITAL_GAUGES, FEDERATION_GAUGES, gauge_values

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # a metrics endpoint is opened to the network only on purpose


# RejectedReply.kind values of server/validation.py, plus "other" and "unclassified".
REJECT_REASONS = ("decode", "missing-key", "extra-key", "shape", "dtype", "non-finite",
                  "norm-stats", "norm", "metric", "no-record", "int8", "class-counts", "other",
                  "unclassified")

ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


def reject_reason(text: str) -> str:
    """A reject kind (or an older free-text reason, which may quote a hospital's key) as a
    value of the fixed list ``REJECT_REASONS``."""
    t = text.strip().lower()
    if t in REJECT_REASONS:
        return t
    for prefix, reason in (("reply has no", "no-record"), ("missing key", "missing-key"),
                           ("unexpected key", "extra-key"), ("metric ", "metric")):
        if t.startswith(prefix):
            return reason
    return "other"


class HospitalNames:
    """Node id → registered hospital name, with a bounded fallback for unknown nodes.

    ``registered`` is a fixed mapping (a run's ``hospital-names`` file); ``lookup`` asks the
    coordinator's node registry (``PromptGrid.node_name``: the name a hospital's key was registered
    under, or the node id itself when it has none) for an id not in it; ``names_dir``
    (simulation) holds one ``<node-id>.name`` file per virtual hospital and is re-read when an
    unknown id shows up.
    """

    def __init__(self, registered: Mapping[int | str, str] | None = None,
                 names_dir: Path | None = None, max_unnamed: int = 32,
                 lookup: Callable[[int | str], str] | None = None) -> None:
        self._names = {str(k): check_name(v) for k, v in (registered or {}).items()}
        self._lookup = lookup
        self._names_dir = names_dir
        self._unnamed: dict[str, str] = {}
        self._max_unnamed = max_unnamed
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, lookup: Callable[[int | str], str] | None = None
                  ) -> "HospitalNames":
        """From a JSON object ``{"<node id>": "<registered name>", ...}`` (the node registry)."""
        import json

        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"hospital names file {path}: cannot read a JSON object ({exc})") \
                from None
        if not isinstance(data, dict):
            raise ValueError(f"hospital names file {path}: expected a JSON object node id -> name")
        return cls({str(k): str(v) for k, v in data.items()}, lookup=lookup)

    def watch(self, names_dir: Path) -> None:
        """Read names from ``names_dir`` too (simulation: virtual hospitals write them there)."""
        self._names_dir = Path(names_dir)

    def _reload(self, key: str) -> None:
        if self._lookup is not None:
            try:
                name = str(self._lookup(key) or "")
            except Exception as exc:  # noqa: BLE001 - a failed registry call names nobody
                log.debug("no registered name for node %s: %s", key, exc)
                name = ""
            if name and name != key:  # the registry answers the id itself for a nameless node
                try:
                    self._names[key] = check_name(name)
                    return
                except ValueError as exc:
                    log.warning("node %s: %s", key, exc)
        if self._names_dir is None or not self._names_dir.is_dir():
            return
        for f in self._names_dir.glob("*.name"):
            try:
                self._names.setdefault(f.stem, check_name(f.read_text().strip()))
            except (OSError, ValueError) as exc:
                log.warning("ignoring hospital name file %s: %s", f.name, exc)

    def __call__(self, node_id: int | str) -> str:
        key = str(node_id)
        with self._lock:
            if key not in self._names:
                self._reload(key)
            if key in self._names:
                return self._names[key]
            if key not in self._unnamed:
                k = len(self._unnamed) + 1
                self._unnamed[key] = (f"unnamed-{k}" if k <= self._max_unnamed
                                      else "unnamed-overflow")
                log.warning("node %s has no registered name; its series are labelled %s",
                            key, self._unnamed[key])
            return self._unnamed[key]


def record_nbytes(content: Any) -> int:
    """Bytes of every array of a message's records, from shape and dtype (nothing decoded)."""
    total = 0
    for record in content.array_records.values():
        for arr in record.values():
            total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total


def _finite_or_nan(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def multiprocess_mode() -> bool:
    """Whether this process records into a daemon's multiprocess folder (module docstring)."""
    return bool(os.environ.get(PROMETHEUS_MULTIPROC_ENV))


def _gauge(*args: Any, live: bool = False, **kwargs: Any) -> Gauge:
    """A Gauge that, in multiprocess mode, shows the value written last: by any process, or with
    ``live`` by a process still running (the series leaves with it)."""
    return Gauge(*args, multiprocess_mode="livemostrecent" if live else "mostrecent", **kwargs)


SINCE_CHECKPOINT = "fedsynth_seconds_since_last_checkpoint"
SINCE_CHECKPOINT_HELP = "Seconds since the last checkpoint (-1 before the first)."
LAST_CHECKPOINT = "fedsynth_last_checkpoint_timestamp_seconds"


def seconds_since(timestamp: float) -> float:
    """``SINCE_CHECKPOINT``'s value for a last-checkpoint time (0: none yet)."""
    return time.time() - timestamp if timestamp > 0 else -1.0


class CoordinatorMetrics:
    """All coordinator series on one registry; ``observe`` is a ``run_federation`` observer."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 names: HospitalNames | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.names = names or HospitalNames()
        r = self.registry
        self.run_info = _gauge("fedsynth_run_info", "The running federation (value 1).",
                               ["family", "preset"], registry=r, live=True)
        self.rounds_planned = _gauge("fedsynth_rounds_planned",
                                     "Rounds the running federation will train.", registry=r,
                                     live=True)
        self.rounds = Counter("fedsynth_rounds_completed", "Rounds finished (checkpoint written).",
                              registry=r)
        self.current_round = _gauge("fedsynth_round", "Number of the last finished round.",
                                   registry=r)
        self.round_seconds = Histogram("fedsynth_round_duration_seconds",
                                       "Wall time of a round: train, aggregate, evaluate, save.",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.last_round_ts = _gauge("fedsynth_last_round_timestamp_seconds",
                                   "Unix time the last round finished.", registry=r)
        self.last_ckpt_ts = _gauge(LAST_CHECKPOINT,
                                  "Unix time the last checkpoint was written.", registry=r)
        if not multiprocess_mode():  # in a daemon's folder, the daemon derives it at each scrape
            self.since_ckpt = Gauge(SINCE_CHECKPOINT, SINCE_CHECKPOINT_HELP, registry=r)
            self.since_ckpt.set_function(self._seconds_since_checkpoint)
        self.hospitals = _gauge("fedsynth_round_hospitals",
                               "Hospitals in the last round by outcome.", ["outcome"], registry=r)
        self.hospitals_total = Counter("fedsynth_hospital_outcomes",
                                       "Hospital train replies by outcome, over all rounds.",
                                       ["outcome"], registry=r)
        self.rejected = Counter("fedsynth_rejected_updates",
                                "Train replies refused by validation, by reason.", ["reason"],
                                registry=r)
        # the gauges of reported scalars, declared in protocol/keys.py (name, help, labels)
        self.reported = {g.name: _gauge(g.name, g.help, list(g.labels), registry=r)
                         for g in FEDERATION_GAUGES}
        self.diversity = _gauge("fedsynth_sample_diversity",
                               "Mean pairwise L2 distance of the fixed-noise samples.", registry=r)
        # computed here, not reported by hospitals: written out like the sample diversity
        self.client_dp_epsilon = _gauge("fedsynth_client_dp_epsilon",
                                        "Client-level DP on the aggregate: the run's epsilon "
                                        "after the last round (the coordinator's RDP accountant, "
                                        "at client-dp-delta; client-DP runs only).", registry=r)
        self.nonfinite = Counter("fedsynth_nonfinite_losses",
                                 "Rounds whose aggregated loss was NaN or infinite.", ["component"],
                                 registry=r)
        self.h_rounds = Counter("fedsynth_hospital_rounds",
                                "Rounds in which the hospital's update was aggregated.",
                                ["hospital"], registry=r)
        self.h_last = _gauge("fedsynth_hospital_last_round",
                            "Last round in which the hospital's update was aggregated.",
                            ["hospital"], registry=r)
        self.h_reported = {g.name: _gauge(g.name, g.help, ["hospital", *g.labels], registry=r)
                           for g in COORDINATOR_HOSPITAL_GAUGES}
        # a reported value its gauge's check refused, by metric key (shown as NaN)
        self.h_invalid = {"dp-epsilon": Counter(
            "fedsynth_hospital_dp_epsilon_invalid_reports",
            "Replies whose self-reported dp-epsilon was negative, NaN or infinite: refused, "
            "never shown as the hospital's epsilon.", ["hospital"], registry=r)}
        self.sent = Counter("fedsynth_sent_bytes", "Model bytes sent to hospitals.",
                            ["hospital", "kind"], registry=r)
        self.received = Counter("fedsynth_received_bytes", "Model bytes received from hospitals.",
                                ["hospital", "kind"], registry=r)
        for outcome in ("selected", "replied", "failed", "rejected"):
            self.hospitals.labels(outcome)
            self.hospitals_total.labels(outcome)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for component in ("generator", "discriminator"):
            self.nonfinite.labels(component)
        # what the coordinator refused to take from hospitals short of rejecting a reply
        self.dropped_keys = Counter("fedsynth_dropped_metric_keys",
                                    "Metric keys of hospital replies outside the protocol, not "
                                    "kept.", registry=r)
        self.capped = Counter("fedsynth_capped_example_counts",
                              "Per-component example counts clipped to the coordinator's cap.",
                              registry=r)
        self.refused = Counter("fedsynth_refused_aggregates",
                               "Component aggregates refused as non-finite (previous kept).",
                               registry=r)

    def _seconds_since_checkpoint(self) -> float:
        return seconds_since(self.last_ckpt_ts._value.get())  # noqa: SLF001 - no getter

    def set_run(self, family: str, preset: str, rounds: int) -> None:
        """Label the run: ``family`` and ``preset`` are checked against the known ones first, so a
        label value is never an arbitrary string from a run config (``ValueError`` otherwise)."""
        from shared_models import get_family

        from .presets import PRESETS

        get_family(family)  # ValueError naming the known families
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {str(preset)[:80]!r}; known: {', '.join(PRESETS)}")
        self.run_info.labels(family=family, preset=preset).set(1)
        self.rounds_planned.set(rounds)

    def observe(self, summary: Any) -> None:
        """Export one ``RoundSummary`` (called after its checkpoint and metrics row are written)."""
        now = time.time()
        self.rounds.inc()
        self.current_round.set(summary.round)
        self.round_seconds.observe(summary.seconds)
        self.last_round_ts.set(now)
        self.last_ckpt_ts.set(now)
        for outcome in ("selected", "replied", "failed", "rejected"):
            n = int(getattr(summary, outcome))
            self.hospitals.labels(outcome).set(n)
            self.hospitals_total.labels(outcome).inc(n)
        # Reject kinds come in summary.server["rejected-<kind>"] (or a rejected_reasons
        # mapping); a rejection without a kind is still counted, as "unclassified".
        reasons = dict(getattr(summary, "rejected_reasons", None) or {})
        for key, n in summary.server.items():  # run_federation: server["rejected-<kind>"]
            if key.startswith("rejected-"):
                reasons[key[len("rejected-"):]] = reasons.get(key[len("rejected-"):], 0) + int(n)
        for reason, n in reasons.items():
            self.rejected.labels(reject_reason(reason)).inc(n)
        for key, counter in (("dropped-metric-keys", self.dropped_keys),
                             ("dropped-eval-metric-keys", self.dropped_keys),
                             ("capped-example-counts", self.capped),
                             ("refused-aggregates", self.refused)):
            n = _finite_or_nan(summary.server.get(key, 0))
            if n > 0:
                counter.inc(n)
        if summary.rejected > sum(reasons.values()):
            self.rejected.labels("unclassified").inc(summary.rejected - sum(reasons.values()))
        # A value a round did not produce (no valid reply, no evaluation) keeps its last value;
        # a NaN one is exported as NaN, which the NaN-loss alert looks for.
        for gauge in FEDERATION_GAUGES:
            metric = self.reported[gauge.name]
            for values, value in gauge_values(gauge, getattr(summary, gauge.section)):
                (metric.labels(*values) if values else metric).set(_finite_or_nan(value))
        for key, component in (("loss-g", "generator"), ("loss-d", "discriminator")):
            if key in summary.train and math.isnan(_finite_or_nan(summary.train[key])):
                self.nonfinite.labels(component).inc()
        if "sample-diversity" in summary.server:
            self.diversity.set(_finite_or_nan(summary.server["sample-diversity"]))
        if "client-dp-epsilon" in summary.server:
            self.client_dp_epsilon.set(_finite_or_nan(summary.server["client-dp-epsilon"]))
        for node_id, m in summary.hospitals.items():
            name = self.names(node_id)
            self.h_rounds.labels(name).inc()
            self.h_last.labels(name).set(summary.round)
            self._observe_hospital(name, m)

    def _observe_hospital(self, name: str, m: Mapping[str, Any]) -> None:
        """One hospital's reply: the gauges ``COORDINATOR_HOSPITAL_GAUGES`` declares."""
        for gauge in COORDINATOR_HOSPITAL_GAUGES:
            metric = self.h_reported[gauge.name]
            for key, values in gauge.keys:
                if key not in m and gauge.missing != "nan":
                    continue
                raw = m.get(key, math.nan)
                if gauge.check is None:
                    value = _finite_or_nan(raw)
                else:
                    checked = gauge.check(raw)
                    value = math.nan if checked is None else checked
                    if checked is None and key in self.h_invalid:
                        self.h_invalid[key].labels(name).inc()
                metric.labels(name, *values).set(value)

    __call__ = observe

    def count_sent(self, node_id: int | str, kind: str, nbytes: int) -> None:
        self.sent.labels(self.names(node_id), kind).inc(nbytes)

    def count_received(self, node_id: int | str, kind: str, nbytes: int) -> None:
        self.received.labels(self.names(node_id), kind).inc(nbytes)


class MeteredGrid:
    """A Flower ``Grid`` that counts the model bytes of every message it sends and receives."""

    def __init__(self, grid: Any, metrics: CoordinatorMetrics) -> None:
        self._grid = grid
        self._metrics = metrics

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> Iterable[Any]:
        messages = list(messages)
        sent = [(m.metadata.dst_node_id, _kind(m), record_nbytes(m.content)) for m in messages]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        # Counted once the round's replies are in: a simulated hospital names itself on its
        # first message, so its name is known by then.
        for node_id, kind, nbytes in sent:
            self._metrics.count_sent(node_id, kind, nbytes)
        for msg in replies:
            if not msg.has_error():
                self._metrics.count_received(msg.metadata.src_node_id, _kind(msg),
                                             record_nbytes(msg.content))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _kind(msg: Any) -> str:
    kind = str(msg.metadata.message_type).split(".")[0]
    return kind if kind in ("train", "evaluate", "query") else "other"


def start_exporter(metrics: CoordinatorMetrics, port: int, host: str = DEFAULT_HOST) -> Any:
    """Serve ``metrics`` at ``http://host:port/metrics`` from a daemon thread; returns the server.

    Binds 127.0.0.1 unless told otherwise: Prometheus runs beside the coordinator, and a wider
    bind is a deliberate choice of whoever deploys it.
    """
    if not 0 <= port < 65536:
        raise ValueError(f"metrics port {port} is not a TCP port (0-65535)")
    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise OSError(f"cannot serve coordinator metrics on {host}:{port}: {exc.strerror}") from exc
    log.info("coordinator metrics on http://%s:%d/metrics", host, server.server_port)
    return server


class DaemonCollector:
    """What ``fedsynth coordinator`` serves: the ``fedsynth_`` series every run's ServerApp wrote
    into ``folder``, merged, plus ``fedsynth_seconds_since_last_checkpoint`` computed at the
    scrape (a function gauge cannot live in a file).

    Before each collection the ``live`` files of processes that have exited are removed
    (prometheus-client's ``mark_process_dead``; the ServerApp cannot do it itself, it is gone), so
    the running-federation series end with their run. Other libraries in a ServerApp process
    that use prometheus-client write into the same folder: only fedsynth's series, whose labels
    this module bounds, are served.
    """

    def __init__(self, folder: Path) -> None:
        from prometheus_client import multiprocess

        self.folder = Path(folder)
        self._merged = multiprocess.MultiProcessCollector(None, path=str(self.folder))

    def _forget_exited(self) -> None:
        from prometheus_client import multiprocess

        for f in self.folder.glob("gauge_live*_*.db"):
            pid = f.stem.rpartition("_")[2]
            if pid.isdigit() and not _alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), str(self.folder))

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        self._forget_exited()
        families = [m for m in self._merged.collect() if m.name.startswith("fedsynth_")]
        last = max((s.value for m in families if m.name == LAST_CHECKPOINT for s in m.samples),
                   default=0.0)
        since = GaugeMetricFamily(SINCE_CHECKPOINT, SINCE_CHECKPOINT_HELP)
        since.add_metric([], seconds_since(last))
        return [*families, since]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited ServerApp its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the signal test
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def start_daemon_exporter(folder: Path, port: int, host: str = DEFAULT_HOST) -> Any:
    """Serve ``DaemonCollector(folder)`` at ``http://host:port/metrics`` (``fedsynth coordinator
    --metrics-port``): one endpoint that lives as long as the coordinator, across its runs."""
    if not 0 <= port < 65536:
        raise ValueError(f"metrics port {port} is not a TCP port (0-65535)")
    registry = CollectorRegistry()
    registry.register(DaemonCollector(folder))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve coordinator metrics on {host}:{port}: {exc.strerror}") from exc
    log.info("coordinator metrics on http://%s:%d/metrics (every run's, from %s)", host,
             server.server_port, folder)
    return server
