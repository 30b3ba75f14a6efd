"""fedsynth.inprocess: ``run_federation`` over a Grid that delivers to the real ClientApp in-process.

Delivery is stamped as Flower stamps it (message ids, replies to the message they answer, source
and destination nodes, the run id), each hospital keeps one Context across rounds, a ClientApp
that raises is answered with an Error, and signed runs are checked by the hospitals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedsynth.demo_data import build_demo_hospitals
from fedsynth.inprocess import SUPERLINK_NODE_ID, InProcessGrid, run_inprocess
from server.federation import FederationConfig
from shared_models import ModelConfig, TrainConfig


def _echo(msg: Message, context: Context) -> Message:
    """A ClientApp that counts its messages in its context's state and answers with the count."""
    seen = (context.state.config_records["seen"] if "seen" in context.state.config_records
            else ConfigRecord({"n": 0}))
    seen["n"] = int(seen["n"]) + 1
    context.state["seen"] = seen
    if msg.content.config_records["ask"]["fail"]:
        raise RuntimeError("local failure")
    return Message(RecordDict({"n": ConfigRecord({"n": seen["n"],
                                                  "node": context.node_id})}), reply_to=msg)


def _ask(dst: int, fail: bool = False) -> Message:
    return Message(RecordDict({"ask": ConfigRecord({"fail": fail})}), dst_node_id=dst,
                   message_type=MessageType.TRAIN)


def test_delivery_is_stamped_like_flower_and_contexts_persist() -> None:
    grid = InProcessGrid([{"data-dir": "/nowhere"}, {"data-dir": "/nowhere", "name": "b"}],
                         app=_echo, run_id=77)
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 2 and SUPERLINK_NODE_ID not in nodes and grid.run.run_id == 77
    assert [grid.node_name(n) for n in nodes] == ["hospital-1", "b"]
    ctx = grid.contexts[nodes[0]]
    assert ctx.run_id == 77 and ctx.node_config["accept-unsigned-models"] is True
    assert ctx.node_config["partition-id"] == 0 and ctx.node_config["num-partitions"] == 2
    with grid.serving():
        for rnd in (1, 2):
            sent = [_ask(n) for n in nodes]
            replies = list(grid.send_and_receive(sent))
            assert len(replies) == 2
            for msg, reply in zip(sent, replies):
                assert msg.metadata.message_id and reply.metadata.message_id
                assert msg.metadata.src_node_id == SUPERLINK_NODE_ID
                assert reply.metadata.reply_to_message_id == msg.metadata.message_id
                assert reply.metadata.src_node_id == msg.metadata.dst_node_id
                assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
                assert reply.metadata.run_id == 77
                assert reply.content.config_records["n"]["n"] == rnd  # one Context per hospital
        # a raising ClientApp is answered with an Error, as Flower's node runtime answers
        (reply,) = grid.send_and_receive([_ask(nodes[1], fail=True)])
        assert reply.has_error() and "local failure" in reply.error.reason
        with pytest.raises(ValueError, match="no hospital"):
            grid.push_messages([_ask(12345)])
    # a message built outside the grid's task identity (another run) is refused
    with InProcessGrid([{"data-dir": "/x"}], app=_echo, run_id=5).serving():
        stray = _ask(nodes[0])
    with grid.serving(), pytest.raises(ValueError, match="run"):
        grid.push_messages([stray])


def _hospitals(root: Path, **extra: object) -> list[dict]:
    folders = build_demo_hospitals(root / "data", 2, matrix=16, include_real=False)
    return [{"data-dir": str(f), "cache-dir": str(root / "cache" / f.name), "device": "cpu",
             "holdout-every": 4, **extra} for f in folders]


def _cfg(root: Path, **kw: object) -> FederationConfig:
    # pix2pix: its evaluation is SSIM/PSNR/MAE (a 16 px DCGAN's Fréchet distance on a few
    # held-out slices can fail in scipy's sqrtm at the hospital)
    return FederationConfig(model=ModelConfig(family="pix2pix", image_size=16, width=4),
                            train=TrainConfig(local_steps=1, batch_size=2),
                            run_dir=str(root / "runs"), run_id="inproc", num_samples=2,
                            **{"rounds": 2, **kw})


@pytest.mark.slow
def test_a_signed_run_trains_every_hospital_and_keeps_local_state(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "model-signing.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "model-signing.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    hospitals = _hospitals(tmp_path, **{"model-public-key": str(tmp_path / "model-signing.pub"),
                                        "accept-unsigned-models": False})
    folder, grid = run_inprocess(_cfg(tmp_path, preset="local-d",
                                      signing_key=str(tmp_path / "model-signing.key")), hospitals)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["selected"], r["replied"], r["failed"], r["rejected"]) == (2, 2, 0, 0)
        assert r["train"]["num-examples"] > 0 and len(r["evaluated"]) == 2
    assert (folder / "checkpoints" / "round-002.npz").is_file()
    from tests.harness.report_checks import assert_report_scores

    titles = assert_report_scores(folder)  # pix2pix: SSIM / PSNR / MAE of G(A) vs its pair
    assert {t.split(" ")[0] for t in titles} >= {"SSIM", "PSNR", "MAE"}, titles
    # local-d: each hospital's discriminator is its own, kept in its context across rounds
    d = [grid.local_arrays(n) for n in grid.node_ids]
    key_d = next(k for k in d[0] if k.startswith("discriminator.") and d[0][k].dtype.kind == "f")
    key_g = next(k for k in d[0] if k.startswith("generator.") and d[0][k].dtype.kind == "f")
    assert (d[0][key_d] != d[1][key_d]).any() and (d[0][key_g] == d[1][key_g]).all()


@pytest.mark.slow
def test_a_hospital_refusing_unsigned_models_fails_by_name(tmp_path: Path) -> None:
    hospitals = _hospitals(tmp_path)
    hospitals[1]["accept-unsigned-models"] = False
    hospitals[1]["name"] = "strict"
    folder, _ = run_inprocess(_cfg(tmp_path, rounds=1), hospitals)
    (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert (row["replied"], row["failed"]) == (1, 1)
    assert row["failed_hospitals"] == {"strict": "error"}
