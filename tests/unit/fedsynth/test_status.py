"""``fedsynth status`` / ``launch --wait`` read what happened from the run folder (fast, no
processes; the deployed checks are in tests/system/test_process_lifecycle.py)."""

from __future__ import annotations

import json
from pathlib import Path

from fedsynth.commands.launch import round_lines
from fedsynth.commands.status import folder_summary, format_run
from server.grid import failure_kind


class _Err:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Msg:
    def __init__(self, reason: str) -> None:
        self.error = _Err(reason)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"rounds": 3, "flower_run_id": "77"}))
    rows = [
        {"round": 1, "selected": 2, "replied": 2, "seconds": 4.0, "names": {"11": "north",
                                                                             "12": "south"},
         "hospitals": {"11": {"dp-epsilon": 0.5}, "12": {"dp-epsilon": 0.7}},
         "train": {"loss-g": 1.0, "loss-d": 0.5}, "failed_hospitals": {},
         "evaluate_failed": {}, "server": {"wire-bytes": 2.5e6}},
        {"round": 2, "selected": 2, "replied": 1, "seconds": 3.0, "names": {"11": "north"},
         "hospitals": {"11": {"dp-epsilon": 0.9}}, "train": {"loss-g": 0.9, "loss-d": 0.4},
         "failed_hospitals": {"south": "dp-budget"}, "evaluate_failed": {"south": "offline"},
         "server": {}},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                          + '{"round": 3, "trunc')  # a row mid-write
    return folder


def test_the_folder_summary_has_rounds_epsilon_by_name_and_each_failure(tmp_path: Path) -> None:
    s = folder_summary(_folder(tmp_path))
    assert (s["rounds-done"], s["rounds-asked"], s["flower-run-id"]) == (2, 3, "77")
    assert s["epsilon"] == {"north": 0.9, "south": 0.7}  # latest each, by registered name
    assert s["failures"] == [
        {"round": 2, "hospital": "south", "kind": "dp-budget", "phase": "train"},
        {"round": 2, "hospital": "south", "kind": "offline", "phase": "evaluate"}]
    lines = format_run({"run-id": "77", "status": "running", "elapsed": 12.0,
                        "run-folder": "r1", **s})
    assert lines[0] == "  run r1 (Flower run 77): running, 12 s"
    assert lines[1].endswith("/runs/r1: rounds 2 / 3")
    assert lines[2] == "    epsilon: north 0.9, south 0.7"
    assert lines[3] == "    round 2 failed: south (dp-budget), south (offline, evaluate)"


def test_launch_wait_prints_each_round_once(tmp_path: Path) -> None:
    folder, shown = _folder(tmp_path), set()
    first = round_lines(folder, shown)
    assert first == ["round 1: 2/2 hospitals replied in 4.0 s, loss-g 1.000, loss-d 0.500, "
                     "2.50 MB on the wire",
                     "round 2: 1/2 hospitals replied in 3.0 s, loss-g 0.900, loss-d 0.400; "
                     "south failed (dp-budget)"]
    assert round_lines(folder, shown) == []


def test_a_hospitals_refusal_is_classified_by_its_kind() -> None:
    reason = ("<class 'client.app.HospitalRefusal'>:<'train refused by the hospital's privacy "
              "settings (PrivacyBudgetExhausted)'>")
    assert failure_kind(_Msg(reason)) == "dp-budget"
    assert failure_kind(_Msg(reason.replace("PrivacyBudgetExhausted", "LedgerUnusable"))) \
        == "dp-ledger"
    assert failure_kind(_Msg("train refused: past the hospital's ceilings (CeilingRefused)")) \
        == "ceiling"
    assert failure_kind(_Msg("fedsynth: offline")) == "offline"
    assert failure_kind(_Msg("train failed at the hospital (KeyError)")) == "error"


def test_the_report_lists_failures_per_round(tmp_path: Path) -> None:
    from server.report import failures_section

    rows = [json.loads(x) for x in
            (_folder(tmp_path) / "metrics.jsonl").read_text().splitlines()[:2]]
    html = failures_section(rows)
    assert "<td>2</td><td>south</td><td>train</td><td>dp-budget</td>" in html
    assert "<td>2</td><td>south</td><td>evaluate</td><td>offline</td>" in html
    assert "past its dp-epsilon" in html
    assert failures_section(rows[:1]) == ""
