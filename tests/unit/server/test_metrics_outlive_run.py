"""Issue 24 item 2 at unit level: coordinator series outlive the process that recorded them,
hospitals are named by their registered names, and a hospital's /metrics has series at start.

The real-process version (coordinator daemon, hospital daemons, a run, a real Prometheus) is
``tests/system/test_metrics_e2e_daemon.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]

# A stand-in for a run's ServerApp: records one finished round in multiprocess mode, then exits.
RUN = textwrap.dedent("""
    import sys, types
    from server.metrics import CoordinatorMetrics, HospitalNames
    m = CoordinatorMetrics(names=HospitalNames(lookup={"11": "north", "12": "12"}.get))
    m.set_run("dcgan", "fedgan", 3)
    s = types.SimpleNamespace(round=3, seconds=1.0, selected=2, replied=2, failed=0, rejected=0,
                              server={}, train={"loss-g": 1.0}, evaluate={},
                              hospitals={"11": {"loss-g": 1.0}, "12": {"loss-g": 2.0}})
    m.observe(s)
    if len(sys.argv) > 1:
        print("ready", flush=True); sys.stdin.readline()  # stay alive until told
""")


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _daemon(folder: Path) -> CollectorRegistry:
    from server.metrics import DaemonCollector

    registry = CollectorRegistry()
    registry.register(DaemonCollector(folder))
    return registry


def _run(folder: Path, stay: bool = False) -> subprocess.Popen:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin"}
    return subprocess.Popen([sys.executable, "-c", RUN, *(["stay"] if stay else [])], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_finished_runs_last_round_is_served_and_its_live_series_leave(tmp_path: Path) -> None:
    live = _run(tmp_path, stay=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        during = _samples(_daemon(tmp_path))
        assert during[("fedsynth_rounds_planned", ())] == 3
        assert during[("fedsynth_run_info", (("family", "dcgan"), ("preset", "fedgan")))] == 1
    finally:
        live.communicate("\n", timeout=30)
    after = _samples(_daemon(tmp_path))
    # the last round, after the process that recorded it is gone
    assert after[("fedsynth_round", ())] == 3
    assert after[("fedsynth_rounds_completed_total", ())] == 1
    assert after[("fedsynth_hospital_last_round", (("hospital", "north"),))] == 3
    # a node the registry has no name for (it answers the id itself) stays bounded
    assert after[("fedsynth_hospital_last_round", (("hospital", "unnamed-1"),))] == 3
    # the running-federation series end with the run: no stalled-round alert between runs
    assert not any(k[0] in ("fedsynth_rounds_planned", "fedsynth_run_info") for k in after)
    assert 0 <= after[("fedsynth_seconds_since_last_checkpoint", ())] < 60
    assert all(k[0].startswith("fedsynth_") for k in after)


def test_counters_add_up_over_runs(tmp_path: Path) -> None:
    for _ in range(2):
        assert _run(tmp_path).wait(timeout=60) == 0
    after = _samples(_daemon(tmp_path))
    assert after[("fedsynth_rounds_completed_total", ())] == 2
    assert after[("fedsynth_hospital_rounds_total", (("hospital", "north"),))] == 2


def test_before_any_run_the_daemon_serves_a_checkpoint_age_of_none(tmp_path: Path) -> None:
    assert _samples(_daemon(tmp_path)) == {("fedsynth_seconds_since_last_checkpoint", ()): -1.0}


def test_hospital_zero_series_before_the_first_task_and_a_clientapps_value_wins() -> None:
    from client.metrics import FedsynthOnly, zero_families

    class Written:  # what a ClientApp wrote: one refusal on its first message
        def collect(self):  # noqa: ANN202
            from prometheus_client.core import CounterMetricFamily

            f = CounterMetricFamily("fedsynth_hospital_refused_messages", "x",
                                    labels=["hospital", "reason"])
            f.add_metric(["north", "dp-budget"], 1.0)
            return [f]

    class Nothing:
        def collect(self):  # noqa: ANN202
            return []

    start = CollectorRegistry()
    start.register(FedsynthOnly(Nothing(), zero_families("north")))
    before = _samples(start)
    assert before[("fedsynth_hospital_signature_failures_total", (("hospital", "north"),))] == 0
    assert before[("fedsynth_hospital_messages_total", (("hospital", "north"), ("kind", "train"),
                                                        ("outcome", "error")))] == 0
    later = CollectorRegistry()
    later.register(FedsynthOnly(Written(), zero_families("north")))
    text = generate_latest(later).decode()
    assert text.count('fedsynth_hospital_refused_messages_total{hospital="north",'
                      'reason="dp-budget"}') == 1  # one sample: Prometheus refuses duplicates
    assert _samples(later)[("fedsynth_hospital_refused_messages_total",
                            (("hospital", "north"), ("reason", "dp-budget")))] == 1
