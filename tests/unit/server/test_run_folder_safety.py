"""Issue 11, finding 10 (coordinator side): what a run config or a hospital names stays in bounds.

* a run id is a plain folder name: ``../../x`` and friends are refused with a clear error;
* a resume follows ``latest.json`` only to a ``round-NNN.npz`` inside the run's ``checkpoints/``;
* metric keys a hospital invents never reach metrics.jsonl (they are counted instead);
* ``fedsynth_run_info{family=...}`` is labelled only with a family and preset that exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from protocol import records as protocol
from server.federation import FederationConfig, run_federation
from server.metrics import CoordinatorMetrics
from server import run_folder
from server.run_folder import RunFolder
from server.strategy import GanStrategy
from shared_models import ModelConfig
from tests.harness.flower_helpers import task_identity
from tests.unit.server.test_strategy import ALL, COMPONENTS, FakeGrid, filled, global_model

HOSTILE_KEY = "<script>alert(1)</script>/etc/passwd DOE^JANE"
BAD_IDS = ["../../x", "..", ".", "/etc", "a/b", "a\\b", ".hidden", "-rf", "", "x" * 65, "a\0b",
           "run id", "~root", "ä"]


@pytest.mark.parametrize("run_id", BAD_IDS[:8] + BAD_IDS[9:])
def test_run_id_must_be_a_plain_name(run_id: str) -> None:
    with pytest.raises(ValueError, match="not a plain name"):
        FederationConfig(run_id=run_id)
    with pytest.raises(ValueError, match="not a plain name"):
        FederationConfig.from_run_config({"run-id": run_id})
    with pytest.raises(ValueError, match="not a plain name"):
        run_folder.check_run_id(run_id)


def test_plain_run_ids_are_kept(tmp_path: Path) -> None:
    for run_id in ("run-20240101-120000", "ct_brain.v2", "A", "x" * 64):
        assert FederationConfig(run_id=run_id).resolved_run_id() == run_id
    assert run_folder.check_run_id(FederationConfig().resolved_run_id())  # the time-stamped default
    folder = RunFolder.for_run(tmp_path, "r1")
    assert folder.root == tmp_path / "r1" and (folder.root / "checkpoints").is_dir()
    with pytest.raises(ValueError):
        RunFolder.for_run(tmp_path, "../../x")
    assert not (tmp_path.parent.parent / "x").exists()


def _folder_with_checkpoint(tmp_path: Path) -> RunFolder:
    folder = RunFolder(tmp_path / "runs" / "r1")
    folder.save_checkpoint(1, {"g.w": np.zeros(2, np.float32)}, {"round": 1})
    return folder


def test_resume_follows_the_marker_only_inside_checkpoints(tmp_path: Path) -> None:
    folder = _folder_with_checkpoint(tmp_path)
    assert folder.latest_checkpoint() == folder.checkpoint_path(1)
    outside = tmp_path / "outside.npz"
    outside.write_bytes(folder.checkpoint_path(1).read_bytes())
    marker = folder.root / "checkpoints" / "latest.json"
    for bad in ("../../../outside.npz", str(outside), "round-001.npz/../../../../outside.npz",
                "latest.json", 5, None, ["round-001.npz"]):
        marker.write_text(json.dumps({"round": 1, "file": bad}))
        with pytest.raises(ValueError, match="latest.json"):
            folder.latest_checkpoint()
    marker.write_text("{not json")
    with pytest.raises(ValueError, match="latest.json"):
        folder.latest_checkpoint()
    # a link inside checkpoints/ that leads out of it is refused too
    link = folder.root / "checkpoints" / "round-009.npz"
    link.symlink_to(outside)
    marker.write_text(json.dumps({"round": 9, "file": "round-009.npz"}))
    with pytest.raises(ValueError, match="not a file inside"):
        folder.latest_checkpoint()
    marker.write_text(json.dumps({"round": 7, "file": "round-007.npz"}))  # not written yet
    assert folder.latest_checkpoint() is None


def test_invented_metric_keys_are_dropped_and_counted() -> None:
    strategy = GanStrategy(COMPONENTS)
    model = global_model()
    metrics = {protocol.examples_key(c): n for c, n in ALL.items()}
    metrics.update({protocol.NUM_EXAMPLES: 10, "loss-g": 1.0, HOSTILE_KEY: 3.0,
                    "eval-frechet": 2.0})  # an eval key: the folded evaluation of last round
    with task_identity():
        (msg,) = strategy.configure_train(1, protocol.to_record(model), ConfigRecord({}),
                                          FakeGrid([1]))
        content = RecordDict({
            protocol.ARRAYS: protocol.to_record(filled(model, 1.0)),
            protocol.METRICS: MetricRecord(metrics)})
        record, mean = strategy.aggregate_train(1, [Message(content, reply_to=msg)])
        assert record is not None
        (hospital,) = strategy.last_train.per_hospital.values()
        assert HOSTILE_KEY not in hospital and "eval-frechet" not in hospital
        assert hospital["loss-g"] == 1.0 and HOSTILE_KEY not in dict(mean)
        assert strategy.last_train.dropped_metric_keys == 1
        folded, per_node = strategy.folded_evaluation()  # kept as the evaluation, not training
        assert per_node == {"1": {"eval-frechet": 2.0}}
        (emsg,) = strategy.configure_evaluate(1, record, ConfigRecord({}), FakeGrid([1]))
        ereply = RecordDict({protocol.METRICS: MetricRecord(
            {"eval-frechet": 2.0, HOSTILE_KEY: 1.0, "loss-g": 5.0})})
        strategy.aggregate_evaluate(1, [Message(ereply, reply_to=emsg)])
    assert strategy.last_evaluate.per_hospital["1"] == {"eval-frechet": 2.0}
    assert strategy.last_evaluate.dropped_metric_keys == 2


class EchoGrid(FakeGrid):
    """A Grid whose hospitals send back what they received, with a hostile metric key."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = []
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                arrays = protocol.from_record(msg.content[protocol.ARRAYS])
                metrics = {protocol.NUM_EXAMPLES: 8, "loss-g": 1.0, "loss-d": 0.5,
                           HOSTILE_KEY: 1.0, "num-examples-generator": 8,
                           "num-examples-discriminator": 8}
                content = RecordDict({
                    protocol.ARRAYS: protocol.to_record(arrays),
                    protocol.METRICS: MetricRecord(metrics)})
            else:
                content = RecordDict({protocol.METRICS: MetricRecord(
                    {"eval-frechet": 1.5, HOSTILE_KEY: 2.0})})
            out.append(Message(content, reply_to=msg))
        return out


def test_metrics_jsonl_keeps_only_protocol_keys(tmp_path: Path) -> None:
    cfg = FederationConfig(model=ModelConfig(family="dcgan", image_size=16, latent_dim=8,
                                             width=4),
                           rounds=1, run_dir=str(tmp_path), run_id="r1", num_samples=2)
    with task_identity():
        root = run_federation(EchoGrid([1]), cfg)
    text = (root / "metrics.jsonl").read_text()
    assert "script" not in text and "passwd" not in text and "DOE" not in text
    (row,) = [json.loads(line) for line in text.splitlines()]
    assert row["server"]["dropped-metric-keys"] == 1
    assert row["server"]["dropped-eval-metric-keys"] == 1
    assert row["hospitals"]["1"]["loss-g"] == 1.0 and row["evaluate"]["eval-frechet"] == 1.5
    assert root == tmp_path / "r1"


def test_run_info_is_labelled_only_with_known_family_and_preset() -> None:
    metrics = CoordinatorMetrics()
    for family, preset in ((HOSTILE_KEY, "fedgan"), ("dcgan", HOSTILE_KEY), ("../x", "fedgan")):
        with pytest.raises(ValueError, match="unknown"):
            metrics.set_run(family, preset, 3)
    metrics.set_run("dcgan", "fedgan", 3)
    labels = [s.labels for m in metrics.registry.collect() if m.name == "fedsynth_run_info"
              for s in m.samples]
    assert labels == [{"family": "dcgan", "preset": "fedgan"}]
