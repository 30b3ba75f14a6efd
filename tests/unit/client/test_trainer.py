"""LocalTrainer: family-driven draws, per-component examples, metrics the protocol knows."""

from __future__ import annotations

import math

import pytest
import torch

from client.trainer import LocalTrainer
from protocol import records as protocol
from shared_models import ModelConfig, TrainConfig

TRAIN = TrainConfig(local_steps=2, batch_size=4)


def _trainer(family: str, dims: int = 2, size: int = 16, **kw: int) -> LocalTrainer:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, image_size=size, width=4, latent_dim=8, spatial_dims=dims, **kw)
    return LocalTrainer(cfg, torch.device("cpu"), amp="off")


def _images(n: int, dims: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand((n, 1) + (size,) * dims) * 2 - 1


def _protocol_ok(metrics: dict[str, float], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in metrics if k not in allowed and not k.startswith("num-examples")]
    assert not unknown, f"metric keys missing from protocol: {unknown}"


def test_cyclegan_with_a_missing_domain_reports_zero_for_its_discriminators() -> None:
    trainer = _trainer("cyclegan")
    d_before = {k: v.clone() for k, v in trainer.nets["d_b"].state_dict().items()}
    result = trainer.fit({"a": _images(6), "b": _images(0)}, TRAIN, seed=1)
    m = result.metrics
    assert m[protocol.examples_key("g_ab")] == 6 and m[protocol.examples_key("g_ba")] == 6
    assert m[protocol.examples_key("d_a")] == 0 and m[protocol.examples_key("d_b")] == 0
    assert m[protocol.NUM_EXAMPLES] == 6
    assert "loss-d" not in m and math.isfinite(m["loss-cycle"])
    assert all(torch.equal(d_before[k], v) for k, v in trainer.nets["d_b"].state_dict().items())
    assert {k.split(".")[0] for k in result.arrays} == {"g_ab", "g_ba", "d_a", "d_b"}


def test_cyclegan_both_domains_counts_each_domain() -> None:
    trainer = _trainer("cyclegan")
    m = trainer.fit({"a": _images(5), "b": _images(3)}, TRAIN, seed=1).metrics
    assert (m["num-examples-d_a"], m["num-examples-d_b"], m["num-examples-g_ab"]) == (5, 3, 8)
    assert math.isfinite(m["loss-d"])


def test_examples_override_and_unknown_component() -> None:
    trainer = _trainer("dcgan")
    m = trainer.fit({"image": _images(6)}, TRAIN, seed=0,
                    examples={"discriminator": 0}).metrics
    assert m["num-examples-generator"] == 6 and m["num-examples-discriminator"] == 0
    with pytest.raises(ValueError, match="unknown component"):
        trainer.fit({"image": _images(6)}, TRAIN, seed=0, examples={"d_b": 1})
    with pytest.raises(ValueError, match="no training images"):
        _trainer("cyclegan").fit({"a": _images(0), "b": _images(0)}, TRAIN, seed=0)


def test_cdcgan_trains_with_labels_and_evaluates_per_class() -> None:
    trainer = _trainer("cdcgan", size=32, num_classes=2)  # FeatureNet needs >= 32 px
    data = {"image": _images(8, size=32), "label": torch.arange(8) % 2}
    m = trainer.fit(data, TRAIN, seed=0).metrics
    assert m["steps"] == 2 and m["num-examples-generator"] == 8
    ev = trainer.evaluate({"image": _images(4, size=32), "label": torch.tensor([0, 1, 0, 1])},
                          seed=1)
    assert ev["eval-examples"] == 4 and math.isfinite(ev["eval-frechet"])
    _protocol_ok(ev, protocol.EVAL_METRICS)


@pytest.mark.parametrize("dims,size", [(2, 16), (3, 16)])
def test_pix2pix_evaluates_ssim_psnr_mae_on_pairs(dims: int, size: int) -> None:
    trainer = _trainer("pix2pix", dims=dims, size=size)
    a = _images(4, dims, size)
    trainer.fit({"a": a, "b": a.clone()}, TRAIN, seed=0)
    ev = trainer.evaluate({"a": a, "b": a.clone()}, seed=0)
    assert ev["eval-examples"] == 4
    assert -1 <= ev["eval-ssim"] <= 1 and ev["eval-psnr"] > 0 and 0 <= ev["eval-mae"] <= 2
    # a perfect translation would score SSIM 1 / MAE 0; compare with ground truth directly
    fake = trainer.family.sample(trainer.nets, a)
    assert ev["eval-mae"] == pytest.approx((fake - a).abs().mean().item(), rel=1e-4)


def test_translation_evaluate_without_pairs_reports_zero_examples() -> None:
    ev = _trainer("cyclegan").evaluate({"a": _images(3)}, seed=0)
    assert ev == {"eval-examples": 0}  # no NaN figure: it would poison the weighted mean


@pytest.mark.parametrize("family,data", [
    ("dcgan", {"image": _images(6)}),
    ("wgan-gp", {"image": _images(6)}),
    ("pix2pix", {"a": _images(6), "b": _images(6)}),
    ("cyclegan", {"a": _images(6), "b": _images(2)}),
])
def test_train_metrics_are_protocol_keys_with_one_sync(family: str, data: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(family)
    calls = []
    original = torch.Tensor.tolist

    def counting(self: torch.Tensor) -> object:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    result = trainer.fit(data, TRAIN, seed=0)
    monkeypatch.undo()
    assert len(calls) == 1  # the one host sync of the round
    _protocol_ok(result.metrics, protocol.TRAIN_METRICS)
