"""No metric label carries a path, a patient or study attribute, or an unbounded value.

Every label of every series is enumerated: the coordinator's (fed hostile inputs: unknown node
ids, reject reasons quoting keys) and a hospital's, written by the real ClientApp handlers in
prometheus-client's multiprocess mode on a folder whose DICOM files name a patient. The same
checker runs on everything Prometheus scraped in ``test_prometheus_e2e``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import Counter as Count
from pathlib import Path
from typing import Iterable, Mapping

import pydicom
import pytest

from client.dicom import SKIP_REASONS
from client.metrics import MODALITIES, NAME_PATTERN, REFUSAL_REASONS
from server.metrics import REJECT_REASONS, CoordinatorMetrics, HospitalNames

SECRETS = ("DOE^JANE", "DOE", "PID-8812345", "ACC-77441", "Oncology", "St_Elsewhere")

# Every label a fedsynth series may carry, and the values it may take.
ALLOWED: dict[str, re.Pattern[str] | frozenset[str]] = {
    "hospital": NAME_PATTERN,
    "component": frozenset({"generator", "discriminator"}),
    "outcome": frozenset({"selected", "replied", "failed", "rejected", "ok", "error"}),
    "reason": (frozenset(REJECT_REASONS) | frozenset(SKIP_REASONS) | frozenset(REFUSAL_REASONS)
               | {"other"}),
    "kind": frozenset({"train", "evaluate", "query", "other"}),
    "on": frozenset({"real", "fake"}),
    "measure": frozenset({"precision", "recall", "density", "coverage"}),
    "modality": frozenset(MODALITIES) | {"other"},
    "device": frozenset({"cpu", "cuda", "mps"}),
    "family": re.compile(r"^[a-z0-9-]{1,32}$"),
    "preset": re.compile(r"^[a-z0-9-]{1,32}$"),
    "le": re.compile(r"^([0-9.e+-]+|\+Inf)$"),
    # added by Prometheus at scrape time
    "job": re.compile(r"^fedsynth-[a-z]+$"),
    "instance": re.compile(r"^127\.0\.0\.1:\d+$"),
}
MAX_VALUES_PER_LABEL = 64  # a bound on any label's distinct values in one federation


def assert_labels_safe(series: Iterable[Mapping[str, str]], extra_secrets: Iterable[str] = ()
                       ) -> Count[str]:
    """Check every (label, value) of ``series``; returns the distinct values per label."""
    secrets = [s.lower() for s in (*SECRETS, *extra_secrets)]
    values: dict[str, set[str]] = {}
    for labels in series:
        for name, value in labels.items():
            if name == "__name__":
                continue
            assert name in ALLOWED, f"unexpected label {name!r} (value {value!r})"
            rule = ALLOWED[name]
            ok = rule.match(value) if isinstance(rule, re.Pattern) else value in rule
            assert ok, f"label {name}={value!r} is not an allowed value"
            assert "/" not in value or name == "instance", f"path-like label {name}={value!r}"
            low = value.lower()
            assert not any(s in low for s in secrets), f"label {name}={value!r} leaks a secret"
            values.setdefault(name, set()).add(value)
    for name, seen in values.items():
        assert len(seen) <= MAX_VALUES_PER_LABEL, f"label {name} has {len(seen)} values"
    return Count({k: len(v) for k, v in values.items()})


def _registry_series(registry) -> list[dict[str, str]]:  # noqa: ANN001
    return [dict(s.labels, __name__=s.name) for m in registry.collect() for s in m.samples]


class _Summary:
    def __init__(self, rnd: int, hospitals: dict[str, dict[str, float]], rejected: int = 0,
                 reasons: dict[str, int] | None = None) -> None:
        self.round, self.seconds = rnd, 1.5
        self.selected, self.replied, self.failed = len(hospitals) + rejected, len(hospitals), 0
        self.rejected, self.rejected_reasons = rejected, reasons or {}
        self.train = {"loss-g": 1.0, "loss-d": float("nan"), "d-real": 0.6, "d-fake": 0.4}
        self.evaluate = {"eval-frechet": 3.0, "eval-mmd": 0.1}
        self.server = {"sample-diversity": 0.5}
        self.hospitals = hospitals


def test_coordinator_labels_stay_bounded_under_hostile_input() -> None:
    metrics = CoordinatorMetrics(names=HospitalNames({"11": "hospital-1"}, max_unnamed=4))
    metrics.set_run("dcgan", "fedgan", 3)
    for rnd in range(1, 4):
        # 50 distinct unknown node ids, and reasons quoting keys a hospital chose
        hospitals = {str(1000 + 50 * rnd + i): {"images-per-second": 10.0} for i in range(50)}
        hospitals["11"] = {"images-per-second": 5.0, "loss-g": 1.0, "loss-d": 0.5}
        reasons = {"key '/data/DOE^JANE/x.dcm'": 2, "unexpected key 'PID-8812345'": 1,
                   "missing key 'generator.w'": 1, "something new": 1}
        metrics.observe(_Summary(rnd, hospitals, rejected=6, reasons=reasons))
        metrics.count_sent("11", "train", 100)
        metrics.count_received("999999", "train", 100)
    series = _registry_series(metrics.registry)
    counts = assert_labels_safe(series)
    hospitals = {s["hospital"] for s in series if "hospital" in s}
    assert "hospital-1" in hospitals
    assert hospitals - {"hospital-1"} == {f"unnamed-{k}" for k in range(1, 5)} | {
        "unnamed-overflow"}
    reasons = {s["reason"]: s for s in series if s["__name__"] == "fedsynth_rejected_updates_total"}
    assert set(reasons) == set(REJECT_REASONS)
    assert counts["hospital"] == 6


def test_hospital_names_refuse_paths() -> None:
    with pytest.raises(ValueError, match="not a valid metric label"):
        HospitalNames({"1": "/data/hospital"})
    with pytest.raises(ValueError, match="not a valid metric label"):
        HospitalNames({"1": "DOE JANE"})


_CHILD = textwrap.dedent("""
    import sys
    from flwr.app import MessageType, RecordDict
    sys.path.insert(0, {tests!r})
    from client.app import app
    from protocol import records as protocol
    from shared_models import ModelConfig, TrainConfig, encode, get_family
    from tests.harness.flower_helpers import client_context, server_message, task_identity

    model = ModelConfig(image_size=32)
    arrays = encode(get_family("dcgan").build(model))
    def message(kind):
        config = protocol.train_config(model, TrainConfig(local_steps=2, batch_size=4), 1)
        content = RecordDict({{protocol.ARRAYS: protocol.to_record(arrays),
                               protocol.CONFIG: config}})
        return server_message(content, 7, kind)
    with task_identity():
        for node in ({nodes!r}):
            for kind in (MessageType.TRAIN, MessageType.EVALUATE):
                try:
                    app(message(kind), client_context(7, node))
                except Exception as exc:  # the refused model: the error is the point
                    print("handler error:", type(exc).__name__)
""")


def test_hospital_labels_from_real_handlers(tmp_path: Path, demo_hospitals: list[Path]) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = tmp_path / "Oncology_St_Elsewhere" / "patient_DOE_JANE"
    folder.mkdir(parents=True)
    for i, src in enumerate(sorted(demo_hospitals[0].rglob("*.dcm"))):
        ds = pydicom.dcmread(src)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "DOE^JANE", "PID-8812345", "ACC-77441"
        ds.save_as(folder / f"{i:03d}.dcm")
    (folder / "notes.txt").write_text("not dicom")  # a skipped file
    key = tmp_path / "coordinator.pub"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    nodes = [
        {"data-dir": str(folder), "cache-dir": str(tmp_path / "cache"), "name": "st-elsewhere-1",
         "accept-unsigned-models": True},
        # a hospital named like a path, and one that refuses the (unsigned) model
        {"data-dir": str(folder), "cache-dir": str(tmp_path / "cache"), "name": str(folder),
         "accept-unsigned-models": True},
        {"data-dir": str(folder), "cache-dir": str(tmp_path / "cache"), "name": "pinned",
         "model-public-key": str(key)},
    ]
    mp = tmp_path / "multiproc"
    mp.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp))
    root = Path(__file__).resolve().parents[3]
    code = _CHILD.format(tests=str(root / "tests" / "harness"), nodes=nodes)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120,
                   cwd=root, capture_output=True)

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mp))
    series = _registry_series(registry)
    names = {s["__name__"] for s in series}
    for expected in ("fedsynth_hospital_local_steps_total", "fedsynth_hospital_step_seconds_bucket",
                     "fedsynth_hospital_scan_usable_slices", "fedsynth_hospital_scan_skipped_files",
                     "fedsynth_hospital_signature_failures_total",
                     "fedsynth_hospital_device_memory_bytes", "fedsynth_hospital_train_loss"):
        assert expected in names, f"{expected} not written by the handlers"
    assert_labels_safe(series, extra_secrets=(str(tmp_path),))
    hospitals = {s["hospital"] for s in series if "hospital" in s}
    assert hospitals == {"st-elsewhere-1", "invalid-name", "pinned"}
    value = registry.get_sample_value
    assert value("fedsynth_hospital_signature_failures_total", {"hospital": "pinned"}) == 2
    assert value("fedsynth_hospital_messages_total",
                 {"hospital": "pinned", "kind": "train", "outcome": "error"}) == 1
    assert value("fedsynth_hospital_local_steps_total", {"hospital": "st-elsewhere-1"}) == 2
    assert value("fedsynth_hospital_scan_skipped_files",
                 {"hospital": "st-elsewhere-1", "reason": "not-dicom"}) == 1
    skipped = {s["reason"] for s in series if s["__name__"] == "fedsynth_hospital_scan_skipped_files"}
    assert skipped == set(SKIP_REASONS) | {"other"}
