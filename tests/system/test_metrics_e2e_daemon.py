"""Issue 24 item 2 through the real processes: a coordinator daemon with ``--metrics-port``, two
hospital daemons with ``--metrics-port``, one run launched with ``fedsynth launch``, and a real
Prometheus scraping all three endpoints every second with the deployed alert rules.

Before today's shape, the run's ServerApp served the coordinator's metrics and took them with it:
after the run Prometheus held no current ``fedsynth_round`` (stale), ``up`` was 0 and
``FedsynthExporterDown`` went pending; the per-hospital series were ``unnamed-1..2``; and a
hospital's /metrics had no ``fedsynth_hospital_*`` series before its first task. Each is asserted
here.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.harness.deploy_helpers import (free_port, launch_toml, lifecycle_federation, metrics_rows,
                                          run, start, wait_for)
from tools import missing_tool, which

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "fedsynth.rules.yml"
NAMES = ("north", "south")
QUIET_S = 20  # the window after the run in which no alert may fire or go pending


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - 127.0.0.1
        data = json.loads(resp.read())
    assert data["status"] == "success", data
    return data["data"]["result"]


def _body(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310
        return r.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(which("prometheus") is None, reason=missing_tool("prometheus", "prometheus"))
def test_prometheus_sees_the_last_round_and_names_after_the_run(tmp_path: Path) -> None:
    keys, address, coord_args, _, tomls = lifecycle_federation(tmp_path, NAMES)
    c_port, p_port = free_port(), free_port()
    h_ports = {n: free_port() for n in NAMES}
    coord = start("coordinator", [*coord_args, "--metrics-port", str(c_port)], tmp_path)
    hospitals = {n: start(n, ["hospital", str(tomls[n]), "--metrics-port", str(h_ports[n])],
                          tmp_path) for n in NAMES}
    procs = (coord, *hospitals.values())
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [
                  {"job_name": "fedsynth-coordinator",
                   "static_configs": [{"targets": [f"127.0.0.1:{c_port}"]}]},
                  {"job_name": "fedsynth-hospital",
                   "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in h_ports.values()]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = (tmp_path / "prometheus.log").open("w")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{p_port}", "--log.level=warn"],
                            stdout=prom_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{p_port}"
    folder = tmp_path / "runs" / "metrics"
    try:
        wait_for("2 hospitals connected", lambda: all(
            "SuperNode ID" in h.text() for h in hospitals.values()), 240, procs)
        # before any task: each hospital's endpoint has its series, at 0
        for n in NAMES:
            body = _body(h_ports[n])
            assert f'fedsynth_hospital_signature_failures_total{{hospital="{n}"}} 0.0' in body, body
            assert (f'fedsynth_hospital_refused_messages_total{{hospital="{n}",'
                    f'reason="dp-budget"}} 0.0') in body, body
        launch = launch_toml(tmp_path / "launch.toml", address, keys.ca_cert, family="dcgan",
                             rounds=3, local_steps=1, batch_size=4, image_size=16, width=8,
                             min_hospitals=2, evaluate_every=3, round_timeout=180.0,
                             signing_key=keys.signing_key, run_dir=tmp_path / "runs",
                             run_id="metrics")
        out = run(["launch", str(launch), "--flwr-home", str(tmp_path / "flwr")], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        wait_for("the run's 3 rounds", lambda: len(metrics_rows(folder)) >= 3, 420, procs)
        t_end = time.time()
        # the run's ServerApp has ended (it used to take the exporter with it) and Prometheus has
        # scraped many times since
        time.sleep(QUIET_S)
        assert _query(base, 'up{job="fedsynth-coordinator"} == 1'), "coordinator endpoint down"
        rnd = _query(base, "fedsynth_round")
        assert [r["value"][1] for r in rnd] == ["3"], rnd
        done = _query(base, "fedsynth_rounds_completed_total")
        assert [r["value"][1] for r in done] == ["3"], done
        named = {r["metric"]["hospital"]: r["value"][1]
                 for r in _query(base, "fedsynth_hospital_last_round")}
        assert named == {"north": "3", "south": "3"}, named
        assert {r["metric"]["hospital"] for r in _query(base, "fedsynth_sent_bytes_total")} \
            == set(NAMES)
        # no alert fired or went pending after the run (FedsynthExporterDown did at once)
        window = f"{int(time.time() - t_end) - 2}s"
        alerts = _query(base, f"count_over_time(ALERTS[{window}])")
        assert not alerts, alerts
        assert not _query(base, "fedsynth_rounds_planned"), "a finished run is not running"
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
        prom_log.close()
        for p in procs:
            p.stop()
