"""The dashboards and alert rules, proven against a real Prometheus scraping a real federation.

A two-round federation of three virtual hospitals runs on Flower's simulation engine with the
coordinator exporter and a hospital exporter in multiprocess mode (fed by the ClientApp handlers
in Ray's worker processes). Prometheus (Debian's package) scrapes both every second with the
scrape jobs of ``deploy/prometheus/prometheus.yml``; then every PromQL expression of the Grafana
dashboard and of the alert rules is evaluated through the HTTP API and must return data.

Alert expressions are conditions, and a healthy run fires none of them (``promtool test rules``
shows each one firing). Here each comparison in them is turned into a ``bool`` comparison, which
keeps every series, label match and function of the expression but returns 0/1 instead of
filtering: data back proves the alert would see its series.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.unit.server.test_metric_labels import assert_labels_safe
from tools import missing_tool, which

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules" / "fedsynth.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedsynth.json"
# Grafana's own variables, as Grafana would substitute them for a 15-minute view.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "15m",
                "$hospital": ".*"}

needs_prometheus = pytest.mark.skipif(which("prometheus") is None or which("promtool") is None,
                                      reason=missing_tool("prometheus", "prometheus"))


def _promtool(*args: str) -> str:
    out = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                         cwd=PROM_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@needs_prometheus
def test_promtool_check_config_and_rules() -> None:
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 11 rules found" in _promtool("check", "rules", "rules/fedsynth.rules.yml")


@needs_prometheus
def test_promtool_rule_unit_tests() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "tests/fedsynth.rules.test.yml")


# -- helpers -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
        return json.loads(resp.read())


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    data = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", f"{expr}: {data}"
    return data["data"]["result"]


def boolify(expr: str) -> str:
    """Each comparison outside label matchers and strings becomes a ``bool`` comparison."""
    out, depth, quote, i = [], 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0 and (m := re.match(r"(==|!=|>=|<=|>|<)(?!\s*bool)", expr[i:])):
            out.append(m.group(1) + " bool")
            i += len(m.group(1))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            exprs.append((f"{panel['title']} [{target['refId']}]", expr))
    for var in dash["templating"]["list"]:
        m = re.match(r"label_values\((.+),\s*(\w+)\)$", var["query"]["query"])
        assert m, var
        exprs.append((f"variable {var['name']}", m.group(1)))
    return exprs


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"])
            for group in groups for rule in group["rules"]]


# -- the federation under Prometheus ------------------------------------------------------------
@pytest.fixture(scope="module")
def scraped(demo_hospitals: list[Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, Path]]:
    from client import metrics as client_metrics
    from fedsynth.simulation import run_simulated_federation
    from server.federation import FederationConfig
    from server.metrics import CoordinatorMetrics, start_exporter
    from shared_models import ModelConfig, TrainConfig

    tmp = tmp_path_factory.mktemp("prom-e2e")
    saved_env = {k: os.environ.get(k) for k in (client_metrics.MULTIPROC_ENV,
                                                  client_metrics.SIM_NAMES_ENV)}
    c_port, h_port, p_port = _free_port(), _free_port(), _free_port()
    # the coordinator's metrics first: in one process, the hospital exporter's multiprocess
    # folder (PROMETHEUS_MULTIPROC_DIR) would make them look like a ServerApp writing into a
    # coordinator daemon's folder, which derives seconds-since-checkpoint itself
    metrics = CoordinatorMetrics()
    hospital_exporter = client_metrics.start_exporter(h_port, multiproc_dir=tmp / "multiproc")
    coordinator_exporter = start_exporter(metrics, c_port)

    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    ports = {"fedsynth-coordinator": c_port, "fedsynth-hospital": h_port}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("w")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{p_port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{p_port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1)  # noqa: S310
                break
            except OSError:
                assert prom.poll() is None, (tmp / "prometheus.log").read_text()
                time.sleep(0.2)
        cfg = FederationConfig(model=ModelConfig(image_size=32),
                               train=TrainConfig(local_steps=2, batch_size=4),
                               rounds=2, run_dir=str(tmp / "runs"), run_id="prom-e2e")
        # audit-every: the memorisation audit's gauge (alert FedsynthNearCopies) is scraped too
        hospitals = [{"data-dir": str(h), "cache-dir": str(tmp / "cache" / h.name),
                      "audit-every": 1} for h in demo_hospitals]
        root = run_simulated_federation(cfg, hospitals, metrics=metrics)
        # wait until Prometheus saw the end of the run on both exporters
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = _query(base, "fedsynth_round == 2")
            hosp = _query(base, 'fedsynth_hospital_last_successful_round{kind="evaluate"} == 2')
            if done and len(hosp) == 3:
                break
            time.sleep(0.5)
        time.sleep(2.5)  # a few more scrapes so rate() has points after the last change
        yield base, root
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        hospital_exporter.shutdown()
        coordinator_exporter.shutdown()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@needs_prometheus
@pytest.mark.slow
def test_federation_was_scraped(scraped: tuple[str, Path]) -> None:
    base, _ = scraped
    up = {r["metric"]["job"]: r["value"][1] for r in _query(base, 'up{job=~"fedsynth-.*"}')}
    assert up == {"fedsynth-coordinator": "1", "fedsynth-hospital": "1"}
    names = {r["metric"]["hospital"] for r in _query(base, "fedsynth_hospital_last_round")}
    assert names == {"hospital-1", "hospital-2", "hospital-3"}, "coordinator names != hospitals'"
    local = {r["metric"]["hospital"] for r in _query(base, "fedsynth_hospital_local_steps_total")}
    assert local == names
    steps = sum(float(r["value"][1]) for r in _query(base, "fedsynth_hospital_local_steps_total"))
    assert steps == 3 * 2 * 2  # hospitals x rounds x local steps
    sent = _query(base, 'sum(fedsynth_sent_bytes_total{kind="train"})')
    assert float(sent[0]["value"][1]) > 0


@needs_prometheus
@pytest.mark.slow
@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_returns_data(scraped: tuple[str, Path], source: str) -> None:
    base, _ = scraped
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    assert len(exprs) >= (30 if source == "dashboard" else 9)
    empty = []
    for title, expr in exprs:
        query = boolify(expr) if source == "rules" else expr
        if not _query(base, query):
            empty.append(f"{title}: {query}")
    assert not empty, "no data for:\n" + "\n".join(empty)


@needs_prometheus
@pytest.mark.slow
def test_no_scraped_label_is_a_path_or_unbounded(scraped: tuple[str, Path]) -> None:
    base, root = scraped
    data = _get(f"{base}/api/v1/series?" + urllib.parse.urlencode(
        {"match[]": '{__name__=~"fedsynth_.*"}'}))
    series = data["data"]
    assert len(series) > 50
    counts = assert_labels_safe(series, extra_secrets=(str(root.parent.parent),))
    assert counts["hospital"] == 3


@needs_prometheus
@pytest.mark.slow
def test_report_of_the_scraped_run_renders(scraped: tuple[str, Path], tmp_path: Path) -> None:
    from tests.system.test_report import render_in_chromium

    from server.report import write_report

    _, root = scraped
    page = write_report(root)
    dom = render_in_chromium(page, tmp_path, "prom-e2e")
    assert 'data-images="3"' in dom and "hospital-3" in dom
