"""Small local data (issue 13 item 1): DiffAugment, R1, generator EMA at hospital and coordinator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.augment import diff_augment, parse_policy
from shared_models.small_data import GeneratorEMA, SmallData

POLICY = "translation,cutout,brightness,contrast"


@pytest.mark.parametrize("dims", [2, 3])
def test_augment_is_differentiable_shape_preserving_and_in_range(dims: int) -> None:
    torch.manual_seed(0)
    x = (torch.rand(6, 1, *(16,) * dims) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, POLICY)
    assert y.shape == x.shape
    # brightness +-0.5 and contrast x[0.5, 1.5] around the mean keep values near [-1, 1]
    assert y.min() >= -3.5 and y.max() <= 3.5
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # each image draws its own parameters: the batch is not transformed as one
    same = torch.full((6, 1, *(16,) * dims), 0.3)
    out = diff_augment(same, "brightness")
    assert len(torch.unique(out.flatten(1)[:, 0])) == 6


def test_each_op_does_what_it_says() -> None:
    torch.manual_seed(1)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    # translation: every output pixel is an input pixel of the same image or the background
    t = diff_augment(x, "translation")
    for i in range(8):
        vals = set(x[i].flatten().tolist()) | {-1.0}
        assert set(t[i].flatten().tolist()) <= vals
    # some image moved, and by at most 2 pixels (1/8 of 16) on each axis
    assert not torch.equal(t, x)
    # cutout: an 8x8 (half side) box of background, possibly cut by the border; the rest unchanged
    c = diff_augment(x, "cutout")
    changed = c != x
    assert torch.all(c[changed] == -1.0)
    assert 0 < changed.flatten(1).sum(1).max() <= 64
    # brightness: one offset per image in [-0.5, 0.5]
    b = diff_augment(x, "brightness") - x
    assert torch.allclose(b, b[:, :, :1, :1].expand_as(b), atol=1e-6)
    assert b.abs().max() <= 0.5
    # contrast: mean kept, spread scaled by [0.5, 1.5]
    k = diff_augment(x, "contrast")
    assert torch.allclose(k.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)
    ratio = k.std((1, 2, 3)) / x.std((1, 2, 3))
    assert torch.all((ratio >= 0.5 - 1e-4) & (ratio <= 1.5 + 1e-4))
    assert torch.equal(diff_augment(x, ""), x)


def test_policy_is_refused_when_unknown() -> None:
    assert parse_policy(" translation , cutout ") == ("translation", "cutout")
    assert parse_policy("") == ()
    with pytest.raises(ValueError, match="saturation"):
        parse_policy("translation,color")
    with pytest.raises(ValueError, match="unknown augment op 'flip'"):
        parse_policy("flip")
    with pytest.raises(ValueError, match="repeats"):
        parse_policy("cutout,cutout")


def test_r1_equals_a_hand_computation_on_a_linear_discriminator() -> None:
    """D(x) = w.x + b: grad_x D = w for every image, so R1 = gamma / 2 * ||w||^2."""
    torch.manual_seed(0)
    d = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    sd = SmallData(r1_gamma=3.0)
    x = sd.real_view(torch.randn(5, 1, 4, 4))
    assert x.requires_grad and x.is_leaf
    penalty = sd.r1(d(x).squeeze(1), x)
    w = d[1].weight.detach()
    assert torch.allclose(penalty, 1.5 * (w ** 2).sum())
    # the penalty trains D: its gradient w.r.t. w is gamma * w
    (gw,) = torch.autograd.grad(penalty, d[1].weight)
    assert torch.allclose(gw, 3.0 * w)
    assert SmallData().r1(d(x).squeeze(1), x) == 0.0


def test_r1_on_a_nonlinear_net_matches_per_image_gradients() -> None:
    torch.manual_seed(0)
    d = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    sd = SmallData(r1_gamma=2.0)
    raw = torch.randn(3, 1, 4, 4)
    x = sd.real_view(raw)
    penalty = sd.r1(d(x).squeeze(1), x)
    hand = 0.0
    for i in range(3):
        xi = raw[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d(xi).sum(), xi)
        hand += (g ** 2).sum() / 3
    assert torch.allclose(penalty, hand, rtol=1e-5)


def test_ema_arithmetic() -> None:
    net = nn.Linear(2, 1)
    bn = nn.BatchNorm1d(1)
    nets = {"generator": nn.Sequential(net, bn)}
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = GeneratorEMA(nets, ["generator"], 0.9)
    with torch.no_grad():
        net.weight.fill_(3.0)
        bn.num_batches_tracked.fill_(7)
    ema.update()  # 0.9 * 1 + 0.1 * 3
    with torch.no_grad():
        net.weight.fill_(5.0)
    ema.update()  # 0.9 * 1.2 + 0.1 * 5
    assert torch.allclose(ema.shadow["generator"]["0.weight"], torch.full((1, 2), 1.58))
    assert int(ema.shadow["generator"]["1.num_batches_tracked"]) == 7  # copied, not averaged
    ema.apply()
    assert torch.allclose(net.weight, torch.full((1, 2), 1.58))
    with pytest.raises(ValueError):
        GeneratorEMA(nets, ["generator"], 1.0)


def test_server_ema_arithmetic_and_checkpoint_keys(tmp_path) -> None:
    from server.ema import EMA_PREFIX, ServerEMA
    from server.run_folder import RunFolder, load_checkpoint

    e = ServerEMA(0.5, get_family("dcgan").ema_components)
    e.update({"generator.w": np.array([2.0], np.float32), "discriminator.w": np.array([9.0])})
    e.update({"generator.w": np.array([4.0], np.float32), "discriminator.w": np.array([1.0])})
    assert e.arrays == {"generator.w": pytest.approx(np.array([3.0]))}  # starts at round 1's
    raw = {"generator.w": np.array([4.0], np.float32), "discriminator.w": np.array([1.0])}
    assert e.overlay(raw)["generator.w"][0] == 3.0 and e.overlay(raw)["discriminator.w"][0] == 1
    ckpt = RunFolder(tmp_path / "run").save_checkpoint(1, {**raw, **e.checkpoint_arrays()},
                                                        {"round": 1})
    plain, _ = load_checkpoint(ckpt)
    assert set(plain) == set(raw) and plain["generator.w"][0] == 4.0  # resume: raw weights
    averaged, _ = load_checkpoint(ckpt, ema=True)
    assert set(averaged) == set(raw) and averaged["generator.w"][0] == 3.0
    assert EMA_PREFIX + "generator.w" in load_checkpoint(ckpt, with_ema=True)[0]
    off = ServerEMA(0.0, ("generator",))
    off.update(raw)
    assert off.checkpoint_arrays() == {} and off.overlay(raw) == raw


def test_settings_are_refused_when_invalid() -> None:
    from server.run_config import from_flat

    with pytest.raises(ValueError, match="unknown augment op"):
        TrainConfig(augment="translation,zoom")
    with pytest.raises(ValueError):
        TrainConfig(r1_gamma=-1.0)
    with pytest.raises(ValueError):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="server-ema-decay"):
        from_flat({"server-ema-decay": 1.5})
    with pytest.raises(ValueError, match="augment is for"):
        from_flat({"family": "cyclegan", "augment": "cutout"})
    with pytest.raises(ValueError, match="own gradient penalty"):
        from_flat({"family": "wgan-gp", "r1-gamma": 1.0})
    cfg = from_flat({"family": "cdcgan", "augment": "translation", "r1-gamma": 0.5,
                     "ema-decay": 0.99, "server-ema-decay": 0.5})
    assert cfg.train.augment == "translation" and cfg.server_ema_decay == 0.5
    # the hospital refuses them too, should a coordinator send them for a family that ignores
    from client.trainer import LocalTrainer

    trainer = LocalTrainer(ModelConfig(family="cyclegan", image_size=16, width=4),
                           torch.device("cpu"))
    with pytest.raises(ValueError, match="augment is for"):
        trainer.fit({"a": torch.zeros(2, 1, 16, 16), "b": torch.zeros(2, 1, 16, 16)},
                    TrainConfig(local_steps=1, augment="cutout"), seed=0)


@pytest.mark.parametrize("family", ["dcgan", "cdcgan", "wgan-gp", "pix2pix"])
def test_train_steps_use_them(family: str, monkeypatch) -> None:
    """The family's step sends everything D sees through ``view`` and adds R1 to D's loss."""
    model = ModelConfig(family=family, image_size=16, width=4,
                        num_classes=2 if family == "cdcgan" else 0)
    fam = get_family(family)
    torch.manual_seed(0)
    nets = fam.build(model)
    opts = fam.optimizers(nets, TrainConfig())
    seen: list[tuple[int, ...]] = []
    r1_calls: list[int] = []
    orig_view, orig_r1 = SmallData.view, SmallData.r1
    monkeypatch.setattr(SmallData, "view", lambda s, x: seen.append(tuple(x.shape))
                        or orig_view(s, x))
    monkeypatch.setattr(SmallData, "r1", lambda s, lo, x: r1_calls.append(1) or orig_r1(s, lo, x))
    r1 = 1.0 if family != "wgan-gp" else 0.0
    ctx = StepContext(small_data=SmallData(parse_policy(POLICY), r1))
    imgs = torch.rand(8, 1, 16, 16) * 2 - 1
    data = ({"a": imgs, "b": imgs.flip(-1)} if family == "pix2pix"
            else {"image": imgs, "label": torch.arange(8) % 2})
    out = fam.train_step(fam.draw(data, 4), nets, opts, ctx)
    assert all(torch.isfinite(v) for v in out.values())
    per_d_update = 2 if family != "wgan-gp" else 2 * fam.n_critic
    assert len(seen) == per_d_update + 1  # real + fake per D update, the fake again in G's step
    assert len(r1_calls) == (1 if r1 else 0)


def test_generator_ema_at_the_hospital_is_what_is_sent() -> None:
    from client.trainer import LocalTrainer
    from shared_models.codec import encode

    model = ModelConfig(family="dcgan", image_size=16, width=4)
    data = {"image": torch.rand(8, 1, 16, 16) * 2 - 1}
    start = LocalTrainer(model, torch.device("cpu"))
    start.reset(0)
    received = encode(start.nets)
    results = {}
    for decay in (0.0, 0.5):
        t = LocalTrainer(model, torch.device("cpu"))
        t.load(received)
        results[decay] = t.fit(data, TrainConfig(local_steps=4, batch_size=4,
                                                 ema_decay=decay), seed=3).arrays
    key = next(k for k in received if k.startswith("generator.") and k.endswith("weight"))
    moved_raw = np.abs(results[0.0][key] - received[key]).sum()
    moved_ema = np.abs(results[0.5][key] - received[key]).sum()
    assert 0 < moved_ema < moved_raw  # the average lags the last step: it moved less
    dkey = next(k for k in received if k.startswith("discriminator.") and k.endswith("weight"))
    assert np.allclose(results[0.0][dkey], results[0.5][dkey])  # D is sent as trained


@pytest.mark.slow
def test_a_federation_with_them_on_samples_from_the_coordinators_average(
        demo_hospitals, tmp_path) -> None:
    """run_federation (the ServerApp's loop) over the in-process grid to the real ClientApp:
    every mechanism on; the checkpoint keeps the raw weights and the average, the grid and
    ``fedsynth sample`` draw from the average, the demo's quality line scores it."""
    from PIL import Image

    from fedsynth.cli import main
    from fedsynth.demo_quality import frechet_vs_floor
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig
    from server.run_folder import load_checkpoint

    cfg = FederationConfig(
        model=ModelConfig(family="dcgan", image_size=32, width=4),
        train=TrainConfig(local_steps=2, batch_size=4, augment=POLICY, r1_gamma=1.0,
                          ema_decay=0.9),
        rounds=2, run_dir=str(tmp_path / "runs"), run_id="small", num_samples=4,
        keep_checkpoints=3, server_ema_decay=0.5)
    hospitals = [{"data-dir": str(h), "cache-dir": str(tmp_path / "cache" / h.name)}
                 for h in demo_hospitals]
    folder, _ = run_inprocess(cfg, hospitals)
    import json

    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["replied"] for r in rows] == [3, 3] and all(r["failed"] == 0 for r in rows)
    from tests.harness.report_checks import assert_report_scores

    assert any(t.startswith("Fréchet distance") for t in assert_report_scores(folder))
    raw1, _ = load_checkpoint(folder / "checkpoints" / "round-001.npz")
    raw2, _ = load_checkpoint(folder / "checkpoints" / "round-002.npz")
    avg2, _ = load_checkpoint(folder / "checkpoints" / "round-002.npz", ema=True)
    key = "generator.project.0.weight"
    assert np.allclose(avg2[key], 0.5 * raw1[key] + 0.5 * raw2[key], atol=1e-6)
    assert not np.allclose(avg2[key], raw2[key])
    dkey = next(k for k in raw2 if k.startswith("discriminator."))
    assert np.array_equal(avg2[dkey], raw2[dkey])  # only the generator is averaged
    # `fedsynth sample` loads the checkpoint (the average) and writes images
    out = tmp_path / "samples"
    assert main(["sample", str(folder / "checkpoints" / "round-002.npz"), "--n", "3",
                 "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert pngs and Image.open(pngs[0]).size[0] >= 32
    q = frechet_vs_floor(folder / "checkpoints" / "round-002.npz", hospitals)
    assert q["floor"] > 0 and q["frechet"] > 0 and q["factor"] == q["frechet"] / q["floor"]
