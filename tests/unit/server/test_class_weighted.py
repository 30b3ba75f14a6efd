"""Per-class aggregation weights (``class-weighted-aggregation``, issue 21 item 2): each class's
embedding rows, CBN scales and AC-GAN head rows are weighted by the hospitals' training slices of
that class; a hospital that requires DP sends no counts; counts that cannot be true are refused."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from protocol import records as protocol
from server.aggregation import Update, aggregate
from server.run_config import from_flat
from server.strategy import GanStrategy
from shared_models import DataConfig, ModelConfig, TrainConfig, encode, get_family
from tests.harness.flower_helpers import client_context, server_message, task_identity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3
CONDITIONING = "projection,multiscale,acgan,cbn"


def _model(norm: str = "batch") -> ModelConfig:
    return ModelConfig(family="cdcgan", image_size=16, width=8, latent_dim=8, num_classes=K,
                       conditioning=CONDITIONING, norm=norm)


# -- the family's declaration ---------------------------------------------------------------

def test_cdcgan_declares_every_class_indexed_parameter_and_dcgan_none() -> None:
    family = get_family("cdcgan")
    nets = family.build(_model())
    arrays = encode(nets)
    slices = family.class_slices(nets)
    # CBN scale/shift (seed + each stage), G's one-hot columns, D's projections and AC-GAN head
    assert {"generator.project.0.weight", "generator.seed_norm.scale.weight",
            "generator.seed_norm.shift.weight", "generator.norms.0.scale.weight",
            "discriminator.embed.weight", "discriminator.stage_embeds.0.weight",
            "discriminator.classifier.weight", "discriminator.classifier.bias"} <= set(slices)
    for key, (axis, start) in slices.items():
        assert arrays[key].shape[axis] - start == K, key  # exactly one slice per class
    # the generator's class columns really are its one-hot input: zeroing one class's column
    # changes that class's samples only
    g = nets["generator"].eval()
    z = torch.randn(4, 8)
    before = [g(z, torch.full((4,), c)) for c in range(K)]
    with torch.no_grad():
        g.project[0].weight[:, 8 + 1] = 0.0
    after = [g(z, torch.full((4,), c)) for c in range(K)]
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    plain = get_family("dcgan")
    assert plain.class_slices(plain.build(ModelConfig(image_size=16, width=8))) == {}


# -- the weighting --------------------------------------------------------------------------

SLICES = {"generator.embed": (0, 0), "generator.project": (1, 3)}


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"generator.embed": np.full((2, 3), value, np.float32),
            "generator.project": np.full((4, 5), value, np.float32),  # 3 latent + 2 class columns
            "generator.shared": np.full(3, value, np.float32)}


def test_each_class_takes_the_rows_of_the_hospitals_that_hold_it() -> None:
    a = Update(_arrays(1.0), {"generator": 10}, class_examples=(10.0, 0.0))  # only class 0
    b = Update(_arrays(5.0), {"generator": 30}, class_examples=(0.0, 30.0))  # only class 1
    out = aggregate([a, b], ("generator",), class_slices=SLICES)
    assert out["generator.embed"][0] == pytest.approx([1.0] * 3)  # hospital A's
    assert out["generator.embed"][1] == pytest.approx([5.0] * 3)  # hospital B's
    assert out["generator.shared"] == pytest.approx([4.0] * 3)  # (10*1 + 30*5) / 40
    assert out["generator.project"][:, :3] == pytest.approx(np.full((4, 3), 4.0))
    assert out["generator.project"][:, 3] == pytest.approx([1.0] * 4)
    assert out["generator.project"][:, 4] == pytest.approx([5.0] * 4)
    off = aggregate([a, b], ("generator",))  # the setting off: ordinary FedAvg everywhere
    assert all(v == pytest.approx(np.full_like(v, 4.0)) for v in off.values())


def test_mixed_counts_and_a_hospital_without_counts() -> None:
    a = Update(_arrays(1.0), {"generator": 10}, class_examples=(5.0, 5.0))
    b = Update(_arrays(5.0), {"generator": 30}, class_examples=(30.0, 0.0))
    c = Update(_arrays(3.0), {"generator": 20})  # sent none (requires DP): an even mix, 10 + 10
    out = aggregate([a, b, c], ("generator",), class_slices=SLICES)
    assert out["generator.embed"][0] == pytest.approx([(5 + 150 + 30) / 45] * 3)
    assert out["generator.embed"][1] == pytest.approx([(5 + 30) / 15] * 3)
    assert out["generator.shared"] == pytest.approx([(10 + 150 + 60) / 60] * 3)
    # nobody sent counts: exactly ordinary FedAvg
    plain = aggregate([Update(_arrays(1.0), {"generator": 10}),
                       Update(_arrays(5.0), {"generator": 30})], ("generator",),
                      class_slices=SLICES)
    assert all(v == pytest.approx(np.full_like(v, 4.0)) for v in plain.values())


# -- through the strategy: asked, validated, logged ------------------------------------------

class FakeGrid:
    def __init__(self, nodes) -> None:  # noqa: ANN001
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _global() -> dict[str, np.ndarray]:
    return {"generator.embed": np.zeros((K, 2), np.float32),
            "generator.shared": np.zeros(2, np.float32)}


def _strategy() -> GanStrategy:
    return GanStrategy(("generator",), class_slices={"generator.embed": (0, 0)}, num_classes=K)


def _round(strategy: GanStrategy, answers: dict, server_round: int = 1):  # noqa: ANN202
    """Hospital n answers value v on every key with metrics m: ``answers[n] = (v, m)``."""
    with task_identity():
        out = list(strategy.configure_train(server_round, protocol.to_record(_global()),
                                            ConfigRecord({}), FakeGrid(answers)))
        replies = []
        for m in out:
            value, metrics = answers[m.metadata.dst_node_id]
            arrays = {k: np.full_like(v, value) for k, v in _global().items()}
            content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays),
                                  protocol.METRICS: MetricRecord(metrics)})
            replies.append(Message(content, reply_to=m))
        record, _ = strategy.aggregate_train(server_round, replies)
    return out[0].content[protocol.CONFIG], protocol.from_record(record) if record else None


def _metrics(*counts: int | float, total: int | None = None) -> dict:
    out = {protocol.class_examples_key(k): n for k, n in enumerate(counts)}
    out[protocol.NUM_EXAMPLES] = int(sum(counts)) if total is None else total
    out[protocol.examples_key("generator")] = out[protocol.NUM_EXAMPLES]
    return out


def test_the_train_message_asks_and_the_counts_weigh_each_class() -> None:
    strategy = _strategy()
    config, new = _round(strategy, {1: (1.0, _metrics(10, 0, 0)), 2: (5.0, _metrics(0, 20, 10))})
    assert config[protocol.CLASS_EXAMPLES] == K
    assert new["generator.embed"][0] == pytest.approx([1.0, 1.0])
    assert new["generator.embed"][1] == pytest.approx([5.0, 5.0])
    assert new["generator.embed"][2] == pytest.approx([5.0, 5.0])
    assert new["generator.shared"] == pytest.approx([(10 + 150) / 40] * 2)
    assert protocol.CLASS_EXAMPLES not in _round(GanStrategy(("generator",)),
                                                 {1: (1.0, _metrics(10, 0, 0))})[0]


def test_a_hospital_without_counts_is_weighed_as_usual_and_logged_once(caplog) -> None:
    strategy = _strategy()
    silent = {protocol.NUM_EXAMPLES: 30, protocol.examples_key("generator"): 30}
    caplog.set_level(logging.WARNING, logger="server.strategy")
    for r in (1, 2):
        _, new = _round(strategy, {1: (1.0, _metrics(10, 0, 0)), 2: (4.0, silent)}, r)
    # class 0: 10 x 1 + (30 / 3) x 4 over 20; class 1: hospital 2's alone
    assert new["generator.embed"][0] == pytest.approx([2.5, 2.5])
    assert new["generator.embed"][1] == pytest.approx([4.0, 4.0])
    said = [r for r in caplog.records if "sent no per-class slice counts" in r.getMessage()]
    assert len(said) == 1 and "hospital 2 " in said[0].getMessage()


@pytest.mark.parametrize("metrics,why", [
    (_metrics(-1, 11, 0, total=10), "not a whole number"),
    (_metrics(10**12, 0, 0, total=10**12), "not a whole number"),  # beyond MAX_EXAMPLES
    (_metrics(2.5, 7.5, 0), "not a whole number"),
    (_metrics(5, 5), "for 2 of the run's 3 classes"),  # too short
    ({**_metrics(5, 5, 0), protocol.class_examples_key(3): 0}, "names no class"),  # too long
    ({**_metrics(5, 5, 0), protocol.CLASS_EXAMPLES_PREFIX + "x": 1}, "names no class"),
    (_metrics(5, 5, 5, total=10), "add up to 15"),  # counts beyond the slices it trained on
])
def test_counts_that_cannot_be_true_reject_the_reply(metrics, why, caplog) -> None:
    strategy = _strategy()
    caplog.set_level(logging.WARNING, logger="server.strategy")
    _, new = _round(strategy, {1: (1.0, _metrics(10, 0, 0)), 2: (100.0, metrics)})
    assert strategy.last_train.rejected_reasons == Counter({"class-counts": 1})
    assert any(why in r.getMessage() for r in caplog.records), why
    assert new["generator.embed"] == pytest.approx(np.ones((K, 2)))  # hospital 1's alone


def test_counts_a_run_did_not_ask_for_are_dropped_not_used() -> None:
    strategy = GanStrategy(("generator",))
    _, new = _round(strategy, {1: (1.0, _metrics(10, 0, 0)), 2: (5.0, _metrics(0, 30, 0))})
    assert new["generator.embed"] == pytest.approx(np.full((K, 2), 4.0))
    assert strategy.last_train.dropped_metric_keys == 2 * K
    assert strategy.last_train.rejected == 0


# -- launch refusals --------------------------------------------------------------------------

CDCGAN = {"family": "cdcgan", "classes": "a,b", "class-weighted-aggregation": True}


@pytest.mark.parametrize("extra,match", [
    ({"secure-aggregation": True, "min-hospitals": 3}, "coordinator sees only the sum"),
    ({"reducer": "median"}, "reducer 'median' ignores weights"),
    ({"preset": "ua-gan"}, "aggregates no model updates"),
    ({"client-dp-noise-multiplier": 1.0, "client-dp-clip": 1.0}, "equal-weight mean"),
    ({"family": "dcgan"}, "not class-conditional"),
])
def test_combinations_it_cannot_apply_to_are_refused_at_launch(extra, match) -> None:
    with pytest.raises(ValueError, match=f"class-weighted-aggregation: .*{match}"):
        from_flat({**CDCGAN, **extra})
    assert from_flat(CDCGAN).class_weighted_aggregation
    assert from_flat({**CDCGAN, "dp-noise-multiplier": 1.0}).class_weighted_aggregation


# -- the hospital: counts when asked, none at a hospital that requires DP ------------------------

@pytest.fixture(scope="module")
def lesion_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsynth.lesion_data import LESION_SITES, build_lesion_hospitals

    return build_lesion_hospitals(tmp_path_factory.mktemp("lesions"), matrix=16, scale=0.2,
                                  sites=LESION_SITES[:2], include_real=False, write_seg=False)


def _data_config() -> DataConfig:
    from fedsynth.lesion_data import RUN_DATA_SETTINGS

    return DataConfig(**RUN_DATA_SETTINGS)


def _hospital_reply(folder: Path, tmp: Path, dp: bool) -> dict:
    from client.app import app

    node = {"data-dir": str(folder), "cache-dir": str(tmp / "cache"), "device": "cpu",
            "accept-unsigned-models": True, "threads": 1, "holdout-every": 4}
    if dp:
        node.update({"require-dp": True, "dp-epsilon": 1000.0, "state-dir": str(tmp / "state")})
    model = _model("group" if dp else "batch")  # DP-SGD needs per-sample norms
    train = TrainConfig(local_steps=1, batch_size=4, dp_noise_multiplier=1.0 if dp else 0.0)
    config = protocol.train_config(model, train, 1, _data_config(),
                                   **{protocol.CLASS_EXAMPLES: K})
    content = RecordDict({protocol.ARRAYS: protocol.to_record(encode(
        get_family("cdcgan").build(model))), protocol.CONFIG: config})
    with task_identity():
        reply = app(server_message(content, 7), client_context(7, node))
    assert not reply.has_error(), reply.error
    return dict(reply.content.metric_records[protocol.METRICS])


def test_a_hospital_sends_its_class_counts_but_not_if_it_requires_dp(lesion_sites, tmp_path
                                                                      ) -> None:
    plain = _hospital_reply(lesion_sites[0], tmp_path / "plain", dp=False)
    counts = [plain[protocol.class_examples_key(k)] for k in range(K)]
    assert sum(counts) == plain[protocol.NUM_EXAMPLES] and len(set(counts)) > 1
    assert not any(k.startswith(protocol.CLASS_EXAMPLES_PREFIX) for k in plain if
                   k[len(protocol.CLASS_EXAMPLES_PREFIX):] not in {"0", "1", "2"})
    # the same ask at a hospital that requires DP (a DP-SGD round it trains): nothing per class
    private = _hospital_reply(lesion_sites[0], tmp_path / "dp", dp=True)
    assert "dp-epsilon" in private and private[protocol.NUM_EXAMPLES] > 0
    assert not any(k.startswith(protocol.CLASS_EXAMPLES_PREFIX) for k in private), private


# -- in-process federation: the setting reaches the aggregation ---------------------------------

@pytest.mark.slow
def test_the_run_setting_reaches_the_aggregation(lesion_sites, tmp_path, monkeypatch) -> None:
    import server.strategy as strategy_module
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    seen: list[tuple[dict, list]] = []
    real = strategy_module.aggregate

    def spy(updates, *args, **kw):  # noqa: ANN001, ANN202
        seen.append((dict(kw.get("class_slices") or {}), [u.class_examples for u in updates]))
        return real(updates, *args, **kw)

    monkeypatch.setattr(strategy_module, "aggregate", spy)
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "threads": 1, "holdout-every": 4} for f in lesion_sites]

    def run(on: bool) -> Path:
        cfg = FederationConfig(model=_model(), train=TrainConfig(local_steps=1, batch_size=4),
                               data=_data_config(), rounds=1, num_samples=2,
                               run_dir=str(tmp_path / "runs"), run_id=f"cw-{on}",
                               class_weighted_aggregation=on)
        return run_inprocess(cfg, hospitals)[0]

    folder = run(True)
    family = get_family("cdcgan")
    assert seen[-1][0] == family.class_slices(family.build(_model()))
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    reported = sorted(tuple(m[protocol.class_examples_key(k)] for k in range(K))
                      for m in rows[0]["hospitals"].values())
    assert sorted(seen[-1][1]) == reported and len(set(reported)) == 2  # two class mixes
    run(False)
    assert seen[-1] == ({}, [None, None])
