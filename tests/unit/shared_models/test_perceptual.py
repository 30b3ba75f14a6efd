"""Issue 22 item 6: pix2pix ``perceptual-loss`` (Zhao et al. 2018) in the hospital's own
hash-pinned feature network: the loss on known inputs, the checkpoint helper, the hash and the
missing-file refusals (one line), a training step, DP, launch checks, one tiny round."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from client.admission import PerceptualRefused
from client.trainer import LocalTrainer
from server.grid import REFUSAL_KINDS
from server.run_config import from_flat
from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.perceptual import (FeatureNet, load_feature_net, perceptual_loss,
                                      save_feature_net, sha256_of)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _identity_net(dims: int) -> FeatureNet:
    """conv1 copies the input into channel 0 (centre tap 1), everything else 0: feature map 1 is
    leaky_relu(x) in channel 0, the deeper maps are 0 for every input."""
    net = FeatureNet(dims, 1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv1.weight[(0, 0) + (1,) * dims] = 1.0
    return net.requires_grad_(False)


@pytest.mark.parametrize("dims", [2, 3])
def test_loss_on_known_inputs(dims: int) -> None:
    net = _identity_net(dims)
    shape = (2, 1) + (4,) * dims
    ones, zeros = torch.ones(shape), torch.zeros(shape)
    # layer 1: |1 - 0| in channel 0 of 16 -> 1/16; layers 2 and 3: 0; mean of the three: 1/48
    assert perceptual_loss(net, ones, zeros).item() == pytest.approx(1 / 48)
    # negative side: leaky_relu(-1) = -0.2 against 0 -> 0.2/16/3
    assert perceptual_loss(net, -ones, zeros).item() == pytest.approx(0.2 / 48)
    assert perceptual_loss(net, ones, ones.clone()).item() == 0.0
    fake = torch.rand(shape, requires_grad=True)
    perceptual_loss(net, fake, zeros).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # the feature net stays frozen


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    digest = save_feature_net(path, spatial_dims=2, seed=3)
    assert digest == sha256_of(path) and len(digest) == 64
    net = load_feature_net(path, digest.upper(), 2, 1)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 FeatureNet(2, 1).state_dict().values()))
    assert not any(p.requires_grad for p in net.parameters())
    for args, match in (((path, "0" * 64, 2, 1), "has SHA-256 .* not the pinned"),
                        ((tmp_path / "none.pt", digest, 2, 1), "is not a file"),
                        ((path, digest, 3, 1), "is not a 3D FeatureNet with 1 channel")):
        with pytest.raises(ValueError, match=match) as exc:
            load_feature_net(*args)
        assert "\n" not in str(exc.value)


def _round_for(tmp_path: Path, **hospital: object) -> SimpleNamespace:
    from client.settings import HospitalSettings

    h = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "c", **hospital)
    return SimpleNamespace(hospital=h, train=TrainConfig(perceptual_loss=1.0),
                           model=ModelConfig(family="pix2pix", image_size=16), perceptual=None)


def test_the_hospital_refuses_without_a_pinned_file_or_with_another_hash(tmp_path: Path,
                                                                         caplog) -> None:  # noqa: ANN001
    from client.round import plan_perceptual

    path = tmp_path / "net.pt"
    digest = save_feature_net(path)
    cases = ({}, {"perceptual_network": tmp_path / "gone.pt", "perceptual_network_sha256": digest},
             {"perceptual_network": path, "perceptual_network_sha256": "ab" * 32})
    for settings, match in zip(cases, ("none are set", "is not a file", "not the pinned")):
        with caplog.at_level("ERROR"), pytest.raises(PerceptualRefused, match=match) as exc:
            plan_perceptual(_round_for(tmp_path, **settings))
        assert "\n" not in str(exc.value)
    assert sum("REFUSED message (perceptual-network)" in r.getMessage()
               for r in caplog.records) == 3
    r = _round_for(tmp_path, perceptual_network=path, perceptual_network_sha256=digest)
    plan_perceptual(r)
    assert isinstance(r.perceptual, FeatureNet)
    # the coordinator counts the refusal by its kind, not as never-send or an error
    from server.grid import failure_kind

    reply = SimpleNamespace(error=SimpleNamespace(
        reason="train failed at the hospital (PerceptualRefused); see the hospital's log"))
    assert failure_kind(reply) == "perceptual-network"
    assert ("(PerceptualRefused)", "perceptual-network") in REFUSAL_KINDS


@pytest.mark.parametrize("dims", [2, 3])
def test_step_adds_exactly_the_weighted_term(dims: int) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (2, 1) + (16,) * dims
    batch = {"a": torch.rand(shape, generator=g) * 2 - 1, "b": torch.rand(shape, generator=g) * 2 - 1}
    torch.manual_seed(5)
    feat = FeatureNet(dims).requires_grad_(False)
    outs = {}
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        fam = get_family("pix2pix")
        nets = fam.build(ModelConfig(family="pix2pix", image_size=16, width=4, spatial_dims=dims))
        opts = fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=1e-3))
        before = copy.deepcopy(feat.state_dict())
        outs[weight] = fam.train_step(batch, nets, opts, StepContext(
            perceptual_loss=weight, perceptual_net=feat if weight else None))
        assert all(torch.equal(before[k], v) for k, v in feat.state_dict().items())
    assert "loss-perceptual" not in outs[0.0]
    perc = outs[3.0]["loss-perceptual"].item()
    assert perc > 0
    assert outs[3.0]["loss-g"].item() == pytest.approx(outs[0.0]["loss-g"].item() + perc,
                                                       rel=1e-5)


def test_dp_and_launch_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ModelConfig(family="pix2pix", image_size=16, width=4, norm="group")
    data = {"a": torch.rand(6, 1, 16, 16) * 2 - 1, "b": torch.rand(6, 1, 16, 16) * 2 - 1}
    t = LocalTrainer(model, CPU, "off")
    t.reset(0)
    train = TrainConfig(local_steps=1, batch_size=3, dp_noise_multiplier=0.8, perceptual_loss=1.0)
    with pytest.raises(ValueError, match="needs the hospital's perceptual-network"):
        t.fit(data, train, seed=1)
    gen = torch.Generator().manual_seed(7)
    monkeypatch.setattr("shared_models.dp.secret_generator", lambda device: gen)
    result = t.fit(data, train, seed=1, perceptual_net=FeatureNet(2).requires_grad_(False))
    assert result.dp_releases > 0 and "loss-perceptual" not in result.metrics
    assert from_flat({"family": "pix2pix", "perceptual-loss": 2.0,
                      "dp-noise-multiplier": 1.0}).train.perceptual_loss == 2.0
    for values, match in (({"family": "dcgan", "perceptual-loss": 1.0},
                           "perceptual-loss is for pix2pix, not family 'dcgan'"),
                          ({"family": "pix2pix", "perceptual-loss": -1.0},
                           "perceptual-loss must be finite"),
                          ({"family": "pix2pix", "perceptual-loss": float("inf")},
                           "perceptual-loss must be finite")):
        with pytest.raises(ValueError, match=match) as exc:
            from_flat(values)
        assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_inprocess_round_with_perceptual_loss(tmp_path: Path) -> None:
    """One hospital pinned its network, the other has none: one reply, one refusal counted."""
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    digest = save_feature_net(tmp_path / "net.pt")
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in folders]
    hospitals[0] |= {"perceptual-network": str(tmp_path / "net.pt"),
                     "perceptual-network-sha256": digest}
    cfg = FederationConfig(model=ModelConfig(family="pix2pix", image_size=16, width=4),
                           train=TrainConfig(local_steps=2, batch_size=2, perceptual_loss=1.0),
                           run_dir=str(tmp_path / "runs"), run_id="perc", num_samples=2, rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert row["replied"] == 1 and row["train"]["loss-perceptual"] > 0
    assert row["failed"] == 1
    assert list(row["failed_hospitals"].values()) == ["perceptual-network"]
