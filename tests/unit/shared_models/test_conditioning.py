"""How the cdcgan carries its class: AC-GAN, class-conditional BN, multi-scale projection,
class-balanced batches, and the intended-class accuracy that scores them (issue 21 item 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from protocol import records as protocol
from client.trainer import LocalTrainer
from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.downstream import balanced_accuracy, intended_class_accuracy
from shared_models.dp import PrivateSteps

K = 3


def _model(conditioning: str, size: int = 16, **kw) -> ModelConfig:
    return ModelConfig(family="cdcgan", image_size=size, width=8, latent_dim=8, num_classes=K,
                       conditioning=conditioning, **kw)


def _data(n: int = 24, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1  # smooth slices: radiomics need texture
    image = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return {"image": image, "label": torch.arange(n) % K}


@pytest.mark.parametrize("conditioning", ["projection", "projection,acgan", "projection,cbn",
                                          "projection,multiscale",
                                          "projection,acgan,cbn,multiscale"])
def test_every_conditioning_trains_and_samples(conditioning):
    family = get_family("cdcgan")
    model = _model(conditioning)
    nets = family.build(model)
    train = TrainConfig(batch_size=8)
    opts = family.optimizers(nets, train)
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
    out = family.train_step(family.draw(_data(), 8), nets, opts, StepContext())
    assert all(torch.isfinite(v) for v in out.values())
    for k, net in nets.items():  # every component moved
        assert any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters())), k
    x = family.sample(nets, torch.randn(6, 8), torch.arange(6) % K)
    assert x.shape == (6, 1, 16, 16) and x.abs().max() <= 1
    d = nets["discriminator"]
    assert (d.classifier is not None) == ("acgan" in conditioning)
    assert (d.stage_embeds is not None) == ("multiscale" in conditioning)
    assert nets["generator"].class_norm == ("cbn" in conditioning)


def test_class_norm_makes_the_class_act_inside_the_generator():
    """With cbn the same noise gives different images for different classes even when the
    input one-hot's weights are zeroed: the class acts through the norms."""
    family = get_family("cdcgan")
    nets = family.build(_model("projection,cbn"))
    g = nets["generator"]
    with torch.no_grad():
        g.project[0].weight[:, -K:] = 0  # remove the one-hot's path
        for norm in g.norms:
            norm.scale.weight.normal_(1.0, 0.5)
    z = torch.randn(1, 8).repeat(K, 1)
    x = family.sample(nets, z, torch.arange(K))
    assert (x[0] - x[1]).abs().max() > 0.1 * x.abs().max() > 0
    with torch.no_grad():  # the same scales for every class: the class has no path left
        for norm in g.norms:
            norm.scale.weight.copy_(norm.scale.weight[:1].expand(K, -1))
    same = family.sample(nets, z, torch.arange(K))
    assert torch.allclose(same[0], same[1])


def test_unknown_or_projectionless_conditioning_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown: film"):
        _model("projection,film")
    with pytest.raises(ValueError, match="projection included"):
        _model("acgan")


def test_acgan_trains_under_dp():
    """The auxiliary classifier's term on real slices is a real-data term: it goes through the
    per-record clipped, noised step (a vmap over D.classify)."""
    family = get_family("cdcgan")
    model = _model("projection,acgan", norm="group")
    nets = family.build(model)
    train = TrainConfig(batch_size=8, dp_noise_multiplier=1.0)
    opts = family.optimizers(nets, train)
    data = _data()
    q, _ = family.dp_plan(data, 8)
    ctx = StepContext(dp=PrivateSteps(data, 8, q, 1.0, 1.0, torch.device("cpu")))
    w = nets["discriminator"].classifier.weight.detach().clone()
    out = family.train_step({}, nets, opts, ctx)
    assert torch.isfinite(out["loss-g"])
    assert not torch.equal(w, nets["discriminator"].classifier.weight)
    assert ctx.dp.releases == 1


def test_class_balanced_batches_draw_a_rare_class_as_often_as_a_common_one():
    family = get_family("cdcgan")
    labels = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    data = {"image": torch.arange(100, dtype=torch.float).view(100, 1, 1, 1).expand(100, 1, 2, 2)
            .contiguous(), "label": labels}
    torch.manual_seed(0)
    plain = torch.cat([family.draw(data, 50)["label"] for _ in range(40)]).float().mean()
    balanced_batches = [family.draw(data, 50, balanced=True) for _ in range(40)]
    balanced = torch.cat([b["label"] for b in balanced_batches]).float().mean()
    assert plain < 0.2
    assert 0.4 < balanced < 0.6
    for b in balanced_batches:  # images and labels stay paired
        assert torch.equal((b["image"][:, 0, 0, 0] >= 90).long(), b["label"])


def test_class_balanced_batches_are_refused_with_dp():
    with pytest.raises(ValueError, match="class-balanced batches are not supported with DP"):
        TrainConfig(class_balanced=True, dp_noise_multiplier=1.0)


def test_a_coordinator_cannot_order_an_open_ended_evaluation_classifier():
    with pytest.raises(ValueError, match="eval-classifier-steps must be in"):
        TrainConfig(eval_classifier_steps=10**9)


class _Oracle(nn.Module):
    """Reads the class from the image's mean brightness band (a stand-in real-slice classifier
    whose answers are known)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ((x.flatten(1).mean(1) + 1) / 2 * K).clamp(0, K - 1e-3).floor().long()
        return nn.functional.one_hot(k, K).float() * 10


def test_intended_class_accuracy_scores_the_class_asked_for():
    labels = torch.arange(K).repeat_interleave(4)
    centre = (labels.float() + 0.5) / K * 2 - 1
    faithful = centre.view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    acc, per = intended_class_accuracy(_Oracle(), {"image": faithful, "label": labels}, K)
    assert acc == 1.0 and per == [1.0] * K
    ignores_label = torch.full_like(faithful, centre[0].item())  # every slice looks like class 0
    acc, per = intended_class_accuracy(_Oracle(), {"image": ignores_label, "label": labels}, K)
    assert acc == pytest.approx(1 / K) and per == [1.0, 0.0, 0.0]


def test_balanced_accuracy_skips_absent_classes():
    acc, per = balanced_accuracy(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2]), 3)
    assert acc == pytest.approx(0.75) and math.isnan(per[1])


def test_hospital_evaluation_reports_intended_class_accuracy_for_conditional_models_only():
    data = _data(30, size=32)  # FeatureNet needs >= 32 px
    cond = LocalTrainer(_model("projection", size=32), torch.device("cpu"))
    m = cond.evaluate(data, seed=1, classifier_steps=3)
    assert 0.0 <= m["eval-intended-class-accuracy"] <= 1.0
    assert set(m) <= set(protocol.EVAL_METRICS)  # the coordinator accepts the key
    assert "eval-intended-class-accuracy" not in cond.evaluate(data, seed=1, classifier_steps=0)
    plain = LocalTrainer(ModelConfig(family="dcgan", image_size=32, width=8, latent_dim=8),
                         torch.device("cpu"))
    assert "eval-intended-class-accuracy" not in plain.evaluate({"image": data["image"]}, seed=1,
                                                                classifier_steps=3)


def test_the_evaluation_classifier_does_not_reset_the_rounds_random_stream():
    data = _data(30)
    trainer = LocalTrainer(_model("projection"), torch.device("cpu"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer._intended_class_accuracy(data["image"], data["label"], data["image"],
                                     data["label"], 2)
    assert torch.equal(torch.rand(3), expected)
