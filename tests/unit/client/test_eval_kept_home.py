"""Issue 25 item 1, as the attacker tried it: a coordinator's crafted discriminators read the
hospital's held-out slices out of ``eval-d-real``, one pixel per EVALUATE message.

At a hospital without DP the attack works (it is what the per-round and per-run limits bound);
at a hospital that requires DP nothing computed from its slices leaves: the figures are in its
log and its kept-evaluations file instead (``client/evaluation.py``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict
from prometheus_client import CollectorRegistry

import client.metrics as hm
from client import evaluation
from client.app import app
from client.datasets import local_data
from client.settings import HospitalSettings
from client.trainer import LocalTrainer
from protocol import records as protocol
from shared_models import DataConfig, ModelConfig, TrainConfig, encode, get_family

from tests.harness.flower_helpers import server_message, task_identity

MODEL = ModelConfig(image_size=32)
SCALE = 1e-3  # logit = SCALE * pixel: sigmoid is linear to ~1e-7 there
# pixels the one-tap path reaches are (8a, 8b); six of them keep the test to seconds
PIXELS = [(0, 0), (0, 24), (8, 8), (16, 16), (24, 0), (24, 24)]


def crafted(pixel: tuple[int, int]) -> dict[str, np.ndarray]:
    """A DCGAN whose discriminator's logit is SCALE x the image's value at ``pixel``.

    Every stride-2 4x4 conv copies channel 0 from the offset-1 tap (output o reads input 2o),
    the first conv's bias of 2 keeps every value positive (LeakyReLU is the identity), the
    BatchNorm layers are identities (running mean 0, variance 1) and the head reads one final
    location, removing the offset."""
    torch.manual_seed(0)
    nets = get_family("dcgan").build(MODEL)
    d = nets["discriminator"]
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.zero_()
        for name, b in d.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1 - 1e-5)
            elif name.endswith("running_mean"):
                b.zero_()
        for i, block in enumerate(d.body):
            block.conv.weight[0, 0, 1, 1] = 1.0
            if i == 0:
                block.conv.bias[0] = 2.0
            else:
                block.adn.N.weight.fill_(1.0)
        y, x = pixel[0] // 8, pixel[1] // 8
        d.head.weight[0, y * 4 + x] = SCALE
        d.head.bias[0] = -2 * SCALE
    return encode(nets)


def _message(arrays: dict, server_round: int, kind: str = MessageType.EVALUATE, **extra):
    config = protocol.train_config(MODEL, TrainConfig(local_steps=2, batch_size=4),
                                   server_round, **extra)
    content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays), protocol.CONFIG: config})
    return server_message(content, 7, kind)


def _node(folder: Path, cache: Path, dp: bool, **more) -> dict:
    node = {"data-dir": str(folder), "cache-dir": str(cache), "accept-unsigned-models": True,
            "name": "north", "device": "cpu", "threads": 1}
    if dp:
        # a hospital with a budget keeps its ledger in a state folder (issue 25 item 7)
        node.update({"require-dp": True, "dp-epsilon": 1.0, "state-dir": str(cache) + "-state"})
    return {**node, **more}


def _context(node: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _metrics(reply) -> dict[str, float]:  # noqa: ANN001
    assert not reply.has_error(), reply.error
    return dict(reply.content.metric_records[protocol.METRICS])


@pytest.fixture()
def refusals():  # noqa: ANN201
    registry = CollectorRegistry()
    saved, hm._SERIES = hm._SERIES, hm._Series(registry)
    yield lambda reason: registry.get_sample_value(
        "fedsynth_hospital_refused_messages_total", {"hospital": "north", "reason": reason})
    hm._SERIES = saved


def test_crafted_discriminators_read_pixels_without_dp_and_nothing_at_a_dp_hospital(
        demo_hospitals: list[Path], tmp_path: Path, caplog, capsys) -> None:
    folder = demo_hospitals[0]
    truth = local_data(HospitalSettings.from_mapping(_node(folder, tmp_path / "c0", False)),
                       MODEL, DataConfig()).holdout["image"].double().mean(0)[0]
    truth = np.array([truth[p].item() for p in PIXELS])

    # without DP: the attack in small works (one pixel mean per message)
    plain = _context(_node(folder, tmp_path / "plain", False))
    with task_identity():
        got = []
        for rnd, pixel in enumerate(PIXELS, 1):
            d_real = _metrics(app(_message(crafted(pixel), rnd), plain))["eval-d-real"]
            got.append(math.log(d_real / (1 - d_real)) / SCALE)
    assert np.corrcoef(got, truth)[0, 1] > 0.999 and np.abs(np.array(got) - truth).max() < 1e-2

    # at a DP hospital: the same messages, and of the held-out slices only their count leaves
    caplog.set_level(logging.INFO, logger="client.evaluation")
    guarded = _context(_node(folder, tmp_path / "dp", True))
    kept_replies = []
    with task_identity():
        for rnd, pixel in enumerate(PIXELS, 1):
            kept_replies.append(_metrics(app(_message(crafted(pixel), rnd), guarded)))
    n_held = int(len(local_data(HospitalSettings.from_mapping(
        _node(folder, tmp_path / "c0", False)), MODEL, DataConfig()).holdout["image"]))
    for m in kept_replies:
        assert m == {"eval-examples": n_held, "eval-kept-home": 1}, m
    # ... while the hospital sees its figures: one log line per evaluation, and its file
    lines = [r.getMessage() for r in caplog.records if "kept at this hospital" in r.getMessage()]
    assert len(lines) == len(PIXELS) and all("eval-d-real=" in x for x in lines)
    hospital = HospitalSettings.from_mapping(_node(folder, tmp_path / "dp", True))
    kept = evaluation.read_kept(evaluation.kept_path(hospital))
    assert [e["round"] for e in kept] == list(range(1, len(PIXELS) + 1))
    kept_pixels = [math.log(e["eval-d-real"] / (1 - e["eval-d-real"])) / SCALE for e in kept]
    assert np.allclose(kept_pixels, got, atol=1e-4)
    # ... and `fedsynth evaluate --kept-home SETTINGS` shows them
    from fedsynth.cli import main

    settings = tmp_path / "hospital.toml"
    settings.write_text(f'[coordinator]\naddress = "x:1"\ninsecure = true\n[hospital]\n'
                        f'data-dir = "{folder}"\ncache-dir = "{tmp_path / "dp"}"\n'
                        f'state-dir = "{tmp_path / "dp"}-state"\n'
                        'name = "north"\nrequire-dp = true\ndp-epsilon = 1.0\n')
    capsys.readouterr()
    assert main(["evaluate", "--kept-home", str(settings)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "not sent" in table[0] and "d-real" in table[1] and len(table) == 2 + len(PIXELS)
    assert main(["evaluate", "--kept-home", str(settings), "--json", "--run", "1"]) == 0
    assert [e["round"] for e in json.loads(capsys.readouterr().out)] == [e["round"] for e in kept]


def test_folded_evaluation_and_audit_stay_home_at_a_dp_hospital(demo_hospitals: list[Path],
                                                                 tmp_path: Path) -> None:
    """The evaluation folded into a DP train message: eval-* figures stay home too."""
    node = _node(demo_hospitals[0], tmp_path / "dp", True,
                 **{"audit-every": 1, "dp-epsilon": 50.0})
    context = _context(node)
    arrays = encode(get_family("dcgan").build(ModelConfig(image_size=32, norm="group")))
    config = protocol.train_config(ModelConfig(image_size=32, norm="group"),
                                   TrainConfig(local_steps=2, batch_size=4,
                                               dp_noise_multiplier=1.0), 2)
    config[protocol.EVALUATE_ROUND] = 1
    content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays), protocol.CONFIG: config})
    with task_identity():
        metrics = _metrics(app(server_message(content, 7, MessageType.TRAIN), context))
    eval_keys = {k for k in metrics if k.startswith("eval-")}
    assert eval_keys == {"eval-examples", "eval-kept-home"}
    assert not {"audit-near-copy-share", "audit-pixel-ratio", "d-real", "loss-d"} & set(metrics)


def test_a_second_evaluation_of_a_round_is_refused_before_anything_is_computed(
        demo_hospitals: list[Path], tmp_path: Path, monkeypatch, caplog, refusals) -> None:
    calls = []
    real = LocalTrainer.evaluate
    monkeypatch.setattr(LocalTrainer, "evaluate",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    context = _context(_node(demo_hospitals[0], tmp_path / "c", False))
    arrays = encode(get_family("dcgan").build(MODEL))
    with task_identity():
        # round 1 evaluated folded into round 2's train message ...
        train = _metrics(app(_message(arrays, 2, MessageType.TRAIN,
                                      **{protocol.EVALUATE_ROUND: 1}), context))
        assert "eval-d-real" in train and len(calls) == 1
        # ... then an EVALUATE message for round 1 again: refused, nothing computed
        caplog.clear()
        with pytest.raises(Exception, match="refused by the hospital's privacy settings"):
            app(_message(arrays, 1), context)
        assert len(calls) == 1 and refusals("evaluation-repeat") == 1
        refused = [r for r in caplog.records if "REFUSED evaluation" in r.getMessage()]
        assert len(refused) == 1 and "\n" not in refused[0].getMessage()
        assert not any(r.exc_info for r in caplog.records)  # one line, no traceback
        # round 3 by EVALUATE, then folded into round 4's train: the train runs, unevaluated
        _metrics(app(_message(arrays, 3), context))
        train = _metrics(app(_message(arrays, 4, MessageType.TRAIN,
                                      **{protocol.EVALUATE_ROUND: 3}), context))
        assert "steps" in train and not any(k.startswith("eval-") for k in train)
        assert len(calls) == 2 and refusals("evaluation-repeat") == 2
        # the same EVALUATE again is a replay (per message type): refused too
        with pytest.raises(Exception):
            app(_message(arrays, 3), context)
        assert len(calls) == 2


def test_the_per_run_limit_and_a_restart(demo_hospitals: list[Path], tmp_path: Path,
                                         refusals) -> None:
    node = _node(demo_hospitals[0], tmp_path / "c", False, **{"max-evaluations": 2})
    arrays = encode(get_family("dcgan").build(MODEL))
    with task_identity():
        context = _context(node)
        _metrics(app(_message(arrays, 1), context))
        _metrics(app(_message(arrays, 2), context))
        with pytest.raises(Exception, match="refused"):
            app(_message(arrays, 3), context)
        assert refusals("evaluation-limit") == 1
        # a restarted SuperNode (fresh context.state) reads the record from the cache folder
        with pytest.raises(Exception, match="refused"):
            app(_message(arrays, 4), _context(node))
        assert refusals("evaluation-limit") == 2
        # a corrupt record counts as spent, never as empty
        hospital = HospitalSettings.from_mapping(node)
        hospital.run_state_path(1, "evaluated").write_text("{not json")
        with pytest.raises(Exception, match="refused"):
            app(_message(arrays, 5), _context({**node, "max-evaluations": 50}))
    assert HospitalSettings.from_mapping(hospital.to_node_config()) == hospital
    assert HospitalSettings.from_mapping({"data-dir": "."}).max_evaluations == 1000


def test_the_coordinator_copes_with_kept_home_replies(tmp_path: Path) -> None:
    from server.report import build_report
    from server.strategy import GanStrategy

    per_hospital = {"11": {"eval-frd": 4.0, "eval-examples": 3.0},
                    "22": {"eval-examples": 5.0, "eval-kept-home": 1}}
    means = GanStrategy._eval_means(per_hospital)
    assert means == {"eval-frd": 4.0, "eval-examples": 3.0, "eval-kept-home": 1.0}
    assert GanStrategy._eval_means({"22": per_hospital["22"]}) == {"eval-kept-home": 1.0}

    row = {"round": 1, "seconds": 1.0, "selected": 2, "replied": 2, "failed": 0, "rejected": 0,
           "train": {}, "evaluate": means, "server": {}, "hospitals": {},
           "evaluated": per_hospital, "names": {"22": "south"}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    page = build_report(tmp_path)
    assert "kept at hospital (DP)" in page and "south" in page


def test_a_run_with_one_dp_hospital_reports_it_kept_home(tmp_path: Path) -> None:
    """In process, end to end: folded and final evaluations of a DP hospital stay at it; the
    run's means come from the other hospital and the report names the kept one."""
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig
    from server.report import build_report

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4, "threads": 1} for f in folders]
    hospitals[1].update({"name": "guarded", "require-dp": True, "dp-epsilon": 1e6,
                         "state-dir": str(tmp_path / "state" / folders[1].name)})
    cfg = FederationConfig(model=ModelConfig(family="pix2pix", image_size=16, width=4),
                           train=TrainConfig(local_steps=1, batch_size=2,
                                             dp_noise_multiplier=1.0),
                           run_dir=str(tmp_path / "runs"), run_id="kept", num_samples=2,
                           rounds=2)
    folder, _ = run_inprocess(cfg, hospitals)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["evaluate"]["eval-kept-home"] == 1 and "eval-ssim" in r["evaluate"]
        kept = [m for m in r["evaluated"].values() if m.get("eval-kept-home") == 1]
        assert len(kept) == 1 and set(kept[0]) == {"eval-examples", "eval-kept-home"}
    page = build_report(folder)
    assert "kept at hospital (DP)" in page and "guarded" in page
