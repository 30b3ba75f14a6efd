"""Coordinator and hospital exporters: the values they serve come from the rounds they saw."""

from __future__ import annotations

import math
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import MessageType, RecordDict

from protocol import records as protocol
from server.metrics import (CoordinatorMetrics, HospitalNames, MeteredGrid, record_nbytes,
                            reject_reason, start_exporter)

from tests.harness.flower_helpers import server_message, task_identity


def _summary(rnd: int, **over: object) -> SimpleNamespace:
    base = dict(round=rnd, seconds=4.0, selected=3, replied=2, failed=1, rejected=0,
                train={"loss-g": 1.5, "loss-d": 0.6, "d-real": 0.7, "d-fake": 0.3},
                evaluate={"eval-frechet": 12.0, "eval-mmd": 0.2, "eval-frd": 3.5,
                          "eval-precision": 0.8, "eval-recall": 0.25, "eval-density": 0.9,
                          "eval-coverage": 0.3},
                server={"sample-diversity": 0.4},
                hospitals={"11": {"images-per-second": 80.0, "loss-g": 1.4, "loss-d": 0.5},
                           "22": {"images-per-second": 40.0, "loss-g": 1.6, "loss-d": 0.7}})
    base.update(over)
    return SimpleNamespace(**base)


def test_observer_exports_each_round() -> None:
    m = CoordinatorMetrics(names=HospitalNames({"11": "north", "22": "south"}))
    m.set_run("dcgan", "fedgan", 5)
    m.observe(_summary(1))
    m.observe(_summary(2, rejected=1, server={"sample-diversity": 0.3, "rejected-shape": 1.0},
                       train={"loss-g": float("nan"), "loss-d": 0.5},
                       hospitals={"11": {"images-per-second": 90.0}}))
    v = m.registry.get_sample_value
    assert v("fedsynth_rounds_completed_total") == 2
    assert v("fedsynth_round") == 2
    assert v("fedsynth_round_duration_seconds_count") == 2
    assert v("fedsynth_round_duration_seconds_sum") == 8.0
    assert v("fedsynth_run_info", {"family": "dcgan", "preset": "fedgan"}) == 1
    assert math.isnan(v("fedsynth_loss", {"component": "generator"}))
    assert v("fedsynth_nonfinite_losses_total", {"component": "generator"}) == 1
    assert v("fedsynth_loss", {"component": "discriminator"}) == 0.5
    assert v("fedsynth_rejected_updates_total", {"reason": "shape"}) == 1
    assert v("fedsynth_sample_diversity") == 0.3
    assert v("fedsynth_hospital_outcomes_total", {"outcome": "replied"}) == 4
    assert v("fedsynth_hospital_last_round", {"hospital": "north"}) == 2
    assert v("fedsynth_hospital_last_round", {"hospital": "south"}) == 1
    assert v("fedsynth_hospital_rounds_total", {"hospital": "north"}) == 2
    assert v("fedsynth_hospital_images_per_second", {"hospital": "north"}) == 90.0
    assert v("fedsynth_eval_frechet_distance") == 12.0
    assert v("fedsynth_eval_frd") == 3.5
    assert v("fedsynth_eval_prdc", {"measure": "recall"}) == 0.25
    assert v("fedsynth_eval_prdc", {"measure": "coverage"}) == 0.3
    assert 0 <= v("fedsynth_seconds_since_last_checkpoint") < 5


def test_round_without_losses_keeps_the_last_values() -> None:
    m = CoordinatorMetrics()
    m.observe(_summary(1))
    m.observe(_summary(2, train={}, evaluate={}, hospitals={}, replied=0, rejected=3))
    v = m.registry.get_sample_value
    assert v("fedsynth_loss", {"component": "generator"}) == 1.5  # no NaN alarm for "no reply"
    assert v("fedsynth_rejected_updates_total", {"reason": "unclassified"}) == 3


@pytest.mark.parametrize("text, reason", [
    ("non-finite", "non-finite"), ("norm", "norm"), ("reply has no arrays record", "no-record"),
    ("missing key 'a.b' (1 missing)", "missing-key"),
    ("unexpected key '/etc/passwd' (1 extra)", "extra-key"), ("key '/data/x.dcm'", "other"),
    ("metric 'num-examples-generator'", "metric"), ("anything else", "other")])
def test_reject_reasons_are_a_fixed_set(text: str, reason: str) -> None:
    assert reject_reason(text) == reason


def test_unknown_nodes_get_bounded_names(tmp_path) -> None:  # noqa: ANN001
    names = HospitalNames(max_unnamed=2)
    assert [names(i) for i in (5, 6, 7, 5)] == ["unnamed-1", "unnamed-2", "unnamed-overflow",
                                                "unnamed-1"]
    (tmp_path / "9.name").write_text("hospital-3\n")
    names.watch(tmp_path)
    assert names(9) == "hospital-3"
    (tmp_path / "names.json").write_text('{"12": "west"}')
    assert HospitalNames.from_file(tmp_path / "names.json")(12) == "west"
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        HospitalNames.from_file(tmp_path / "bad.json")


class _FakeGrid:
    """Echoes each message back as its reply, with the same arrays."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return [SimpleNamespace(has_error=lambda: False, content=m.content,
                                metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id,
                                                         message_type=m.metadata.message_type))
                for m in messages]

    def get_node_ids(self):  # noqa: ANN201
        return [1, 2]


def test_metered_grid_counts_model_bytes_per_hospital() -> None:
    arrays = {"generator.w": np.zeros((10, 10), np.float32), "discriminator.b": np.zeros(7)}
    m = CoordinatorMetrics(names=HospitalNames({"1": "a", "2": "b"}))
    grid = MeteredGrid(_FakeGrid(), m)
    with task_identity():
        msgs = [server_message(RecordDict({protocol.ARRAYS: protocol.to_record(arrays)}), n,
                               MessageType.TRAIN) for n in (1, 2)]
        # the packed array that travels: the 400 + 56 tensor bytes plus its small index
        carried = record_nbytes(msgs[0].content)
        assert 400 + 56 < carried < 400 + 56 + 128
        assert carried == msgs[0].content[protocol.ARRAYS][protocol.PACKED].shape[0]
        grid.send_and_receive(msgs, timeout=1)
    v = m.registry.get_sample_value
    assert v("fedsynth_sent_bytes_total", {"hospital": "a", "kind": "train"}) == carried
    assert v("fedsynth_received_bytes_total", {"hospital": "b", "kind": "train"}) == carried
    assert list(grid.get_node_ids()) == [1, 2]  # everything else is the wrapped Grid's


def test_exporter_serves_on_loopback() -> None:
    m = CoordinatorMetrics()
    m.observe(_summary(1))
    server = start_exporter(m, 0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"fedsynth_rounds_completed_total 1.0" in text
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="not a TCP port"):
        start_exporter(m, 70000)
