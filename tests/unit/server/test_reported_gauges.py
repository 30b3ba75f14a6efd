"""Gauges of reported scalars come from ``protocol/keys.py``'s declarations (issue 23, Done when:
"a dashboard metric derives its gauges from protocol/keys")."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from client import metrics as hm
from protocol import keys
from server.metrics import CoordinatorMetrics


def _names(registry: CollectorRegistry) -> set[str]:
    return {m.name for m in registry.collect()}


def test_every_declared_gauge_reads_a_protocol_key_and_exists_on_its_exporter() -> None:
    allowed = set(keys.TRAIN_METRICS) | set(keys.EVAL_METRICS)
    for gauge in (*keys.FEDERATION_GAUGES, *keys.COORDINATOR_HOSPITAL_GAUGES,
                  *keys.HOSPITAL_GAUGES):
        assert gauge.section in ("train", "evaluate") and gauge.missing in ("keep", "nan")
        for key, values in gauge.keys:
            assert key in allowed, (gauge.name, key)
            assert len(values) == len(gauge.labels), gauge.name
    coordinator = CoordinatorMetrics(CollectorRegistry())
    assert {g.name for g in (*keys.FEDERATION_GAUGES, *keys.COORDINATOR_HOSPITAL_GAUGES)} <= \
        _names(coordinator.registry)
    registry = CollectorRegistry()
    hm._Series(registry)
    assert {g.name for g in keys.HOSPITAL_GAUGES} <= _names(registry)


def test_a_new_declaration_is_a_new_hospital_gauge(monkeypatch) -> None:
    """Adding a hospital-reported scalar: its declaration alone makes and sets the gauge."""
    new = keys.ReportedGauge.of("fedsynth_hospital_eval_mmd", "MMD of the last evaluation.",
                                "eval-mmd", section="evaluate", missing="nan")
    monkeypatch.setattr(hm, "HOSPITAL_GAUGES", (*keys.HOSPITAL_GAUGES, new))
    registry = CollectorRegistry()
    monkeypatch.setattr(hm, "_SERIES", hm._Series(registry))
    hm.record_evaluate("site-a", 3, {"eval-mmd": 0.25})
    assert registry.get_sample_value("fedsynth_hospital_eval_mmd", {"hospital": "site-a"}) == 0.25
    hm.record_evaluate("site-a", 4, {})  # missing = nan
    assert math.isnan(registry.get_sample_value("fedsynth_hospital_eval_mmd",
                                                {"hospital": "site-a"}))
