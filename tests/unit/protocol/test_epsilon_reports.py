"""A hospital's self-reported epsilon that cannot be one is refused, never shown (issue 25, item 9).

The report, the coordinator's metrics and ``fedsynth audit`` showed a ``dp-epsilon`` of -5, NaN or
inf as sent: -5 and NaN read as a strong guarantee, inf as none at all. Now each goes through
``protocol.keys.valid_epsilon`` and is shown as invalid.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from protocol.keys import valid_epsilon

BAD = [-5, -5.0, -1e-9, math.nan, math.inf, -math.inf, "5", "nan", None, True, 10 ** 400,
       [1.0], {"e": 1}]


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_what_cannot_be_an_epsilon_is_refused(value: object) -> None:
    assert valid_epsilon(value) is None


@pytest.mark.parametrize("value", [0, 0.0, 2.71, 8, 1e6])
def test_a_finite_non_negative_number_is_an_epsilon(value: float) -> None:
    assert valid_epsilon(value) == float(value)


def _rows(bad: object) -> list[dict]:
    return [{"round": 1, "hospitals": {"n-0001": {"dp-epsilon": 1.5},
                                       "n-0002": {"dp-epsilon": 0.5}}},
            {"round": 2, "hospitals": {"n-0001": {"dp-epsilon": bad},
                                       "n-0002": {"dp-epsilon": 0.9}}}]


@pytest.mark.parametrize("bad", [-5, math.nan, math.inf, "5"], ids=repr)
def test_the_report_shows_an_invalid_epsilon_as_invalid(bad: object, caplog) -> None:
    from server.report import _privacy

    names = {"n-0001": "north", "n-0002": "south"}
    with caplog.at_level(logging.WARNING):
        chart, table = _privacy(_rows(bad), names, {"train": {"dp_noise_multiplier": 1.0}})
    north = next(r for r in table.split("<tr>") if r.startswith("<td>north"))
    assert "invalid (refused)" in north and "rounds 2" in north
    for shown in ("-5", "nan", "inf", ">5<"):  # the value itself appears nowhere
        assert shown not in north.lower()
        assert shown not in chart.lower()
    south = next(r for r in table.split("<tr>") if r.startswith("<td>south"))
    assert ">0.9<" in south and "invalid" not in south
    assert "north (rounds 2)" in caplog.text


def test_the_report_keeps_an_earlier_valid_epsilon_out_of_the_latest_cell() -> None:
    """A hospital whose LATEST report is invalid shows no epsilon, not its earlier 1.5."""
    from server.report import _privacy

    _, table = _privacy(_rows(-5), {"n-0001": "north"}, {})
    north = next(r for r in table.split("<tr>") if r.startswith("<td>north"))
    assert "1.5" not in north


@pytest.mark.parametrize("bad", [-5, math.nan, math.inf], ids=repr)
def test_the_coordinator_metrics_export_nan_and_count_the_invalid_report(bad: float) -> None:
    from server.metrics import CoordinatorMetrics, HospitalNames

    m = CoordinatorMetrics(names=HospitalNames({"11": "north"}))
    summary = SimpleNamespace(round=1, seconds=1.0, selected=1, replied=1, failed=0, rejected=0,
                              train={}, evaluate={}, server={},
                              hospitals={"11": {"dp-epsilon": 2.0}})
    m.observe(summary)
    assert m.registry.get_sample_value("fedsynth_hospital_dp_epsilon",
                                       {"hospital": "north"}) == 2.0
    summary.round, summary.hospitals = 2, {"11": {"dp-epsilon": bad}}
    m.observe(summary)
    shown = m.registry.get_sample_value("fedsynth_hospital_dp_epsilon", {"hospital": "north"})
    assert math.isnan(shown)
    assert m.registry.get_sample_value("fedsynth_hospital_dp_epsilon_invalid_reports_total",
                                       {"hospital": "north"}) == 1


def test_the_audit_leaves_an_invalid_epsilon_out_and_says_so(tmp_path: Path) -> None:
    from fedsynth.export_gate import model_epsilon

    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "round-003.npz"
    rows = [{"round": 1, "hospitals": {"1": {"dp-epsilon": 2.5}, "2": {"dp-epsilon": -5}}},
            {"round": 2, "hospitals": {"1": {"dp-epsilon": float("inf")},
                                       "2": {"dp-epsilon": float("nan")}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = model_epsilon(ckpt, 3, {"train": {"dp_noise_multiplier": 1.0}})
    assert out["dp-epsilon"] == 2.5
    assert "3 report(s) not a finite number >= 0 left out" in out["dp-epsilon-source"]
